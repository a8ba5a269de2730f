"""The TRL peer figures at GRPO's mu = 2 (TRL's num_iterations) that tests/test_trl_peer.py asserts within 1e-5:
our loss and each iteration's gradients against TRL 1.16's on the test's batch, and the clipped fraction.

    .venv/bin/python scripts/trl_peer_mu2.py
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import test_trl_peer as peer  # noqa: E402  (the test's own batch, models and helpers)


def main() -> None:
    rollouts, advantages = peer.batch.__wrapped__()
    for loss_type in ("dapo", "grpo"):
        update, ours = peer.our_two_iterations(rollouts, advantages, peer.mu_config(loss_type))
        model, tokenizer = peer.fresh_model()
        trainer = peer.trl_trainer(model, tokenizer, Path(tempfile.mkdtemp()), loss_type, 1, num_iterations=2)
        old = peer.trl_old_logps(trainer, model, rollouts)
        losses, theirs = [], []
        for _ in range(2):
            loss, gradients = peer.trl_loss_and_gradients(trainer, model, rollouts, advantages, 1, old_logps=old)
            losses.append(loss)
            theirs.append(gradients)
            with torch.no_grad():
                for name, parameter in model.named_parameters():
                    parameter.sub_(peer.LEARNING_RATE * gradients[name])
        trl_loss = sum(losses) / 2
        differences = [peer.max_gradient_difference(ours[i], theirs[i])[0] for i in range(2)]
        print(f"{loss_type}: loss ours {update.loss:.8f} TRL {trl_loss:.8f} (|diff| {abs(update.loss - trl_loss):.1e}); "
              f"max gradient difference iteration 1 {differences[0]:.1e}, iteration 2 {differences[1]:.1e}; "
              f"clip fraction {update.clip_fraction:.3f}")


if __name__ == "__main__":
    main()
