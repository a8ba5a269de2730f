"""Peak memory of the training forward and backward's log-probs at Qwen's 152k vocabulary: the chunked
`policy.chosen_logprobs` beside a whole-vocabulary float32 log-softmax (what `completion_logprobs` did before),
side by side in one run.

A tiny Qwen2 model (2 layers, hidden 64) with Qwen2.5's vocabulary, so that the logits dominate as they do at
the paper's scale; one micro-batch of the paper (16 completions of 256 tokens after 64-token prompts) under
bfloat16 autocast, forward and backward. Each variant runs in a fresh process (a process's peak RSS cannot be
reset) and reports its peak RSS above the same process's RSS just before the forward pass.

    python bench/logprob_memory.py
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, Qwen2Config

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rollout import peak_rss_mb  # noqa: E402  (bench/rollout.py)

from nested_reft.engines.logprobs import chosen_logprobs  # noqa: E402

VARIANTS = ("whole", "chunked")


def whole_vocabulary(logits: torch.Tensor, tokens: torch.Tensor, temperature: float) -> torch.Tensor:
    """The earlier computation: a float32 copy of every logit, tempered, through logsumexp."""
    scaled = logits.float() / temperature
    return scaled.gather(-1, tokens[..., None]).squeeze(-1) - torch.logsumexp(scaled, dim=-1)


def current_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def measure(variant: str, args) -> float:
    """Peak RSS (MB) of one forward and backward above the RSS before it."""
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=args.vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = AutoModelForCausalLM.from_config(config)
    ids = torch.randint(0, args.vocab, (args.rows, args.prompt + args.tokens))
    completion = ids[:, args.prompt:]
    baseline = current_rss_mb()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(input_ids=ids, logits_to_keep=args.tokens + 1).logits[:, :-1]
        logp = (chosen_logprobs(logits, completion, 0.9) if variant == "chunked"
                else whole_vocabulary(logits, completion, 0.9))
    del logits
    logp.sum().backward()
    return peak_rss_mb() - baseline


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", type=int, default=151936, help="Qwen2.5's vocabulary")
    parser.add_argument("--rows", type=int, default=16, help="completions per micro-batch (paper: 16)")
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=256, help="completion length (paper: 256)")
    parser.add_argument("--variant", choices=VARIANTS, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.variant:
        print(measure(args.variant, args))
        return
    passed = [a for a in (argv if argv is not None else sys.argv[1:])]
    peaks = {variant: float(subprocess.run([sys.executable, __file__, *passed, "--variant", variant],
                                           capture_output=True, text=True, check=True).stdout.split()[-1])
             for variant in VARIANTS}
    logits_mb = args.rows * (args.tokens + 1) * args.vocab * 2 / 2**20
    print(f"{args.rows} completions x {args.tokens} tokens, vocabulary {args.vocab}, bfloat16 autocast on CPU; "
          f"the bfloat16 logits alone: {logits_mb:.0f} MB; torch {torch.__version__}")
    print("| log-probs | peak RSS above start (MB) | vs whole |")
    print("|---|---|---|")
    for variant in VARIANTS:
        print(f"| {variant} | {peaks[variant]:.0f} | {peaks[variant] / peaks['whole']:.3f} |")


if __name__ == "__main__":
    main()
