"""How often a decoder should ask the device which rows have ended, measured: evaluation-style decoding (greedy,
stopping at EOS, min_new_tokens = 0) of one batch with each engine at several `sync_every` values, timed in
interleaved rounds, reported as the median wall time per batch and its ratio to asking every token (k = 1).

Asking is a host sync (`int(finished.sum())`): on a GPU the host stops queueing kernels until the device has
caught up; on a CPU it costs nothing, while asking less often keeps ended rows in the batch longer (the eager
engine drops them once a quarter has ended) and may decode up to k - 1 tokens past the last EOS. Greedy decoding
draws the same tokens whatever k is (checked here), so the times compare the same work.

    python bench/host_sync.py                                   # SmolLM2-135M-Instruct on this CPU, batch 32
    python bench/host_sync.py --device cuda --dtype bfloat16 --model config:bench/configs/qwen2.5-math-1.5b.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rollout import add_device_arguments, load_on_device, prompts_for, synchronized_clock  # noqa: E402  (bench/rollout.py)

from nested_reft.config import ENGINES, SamplingConfig  # noqa: E402
from nested_reft.engines.compiled import CompiledDecoder, default_compiled_mode  # noqa: E402
from nested_reft.engines.eager import EagerDecoder  # noqa: E402
from nested_reft.engines.rollout import generate_rollouts  # noqa: E402


def decoder(engine: str, sync_every: int):
    if engine == "eager":
        return EagerDecoder(sync_every=sync_every)
    return CompiledDecoder(mode=default_compiled_mode(), sync_every=sync_every)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--engines", nargs="+", default=["eager"], choices=ENGINES)
    parser.add_argument("--sync-every", nargs="+", type=int, default=[1, 4, 8, 16], help="k values, 1 first")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=128, help="max_new_tokens")
    parser.add_argument("--repeats", type=int, default=3)
    add_device_arguments(parser)
    args = parser.parse_args(argv)
    model, tokenizer = load_on_device(args)
    prompts = prompts_for(tokenizer, args.batch)
    sampling = SamplingConfig(temperature=0, max_new_tokens=args.tokens, min_new_tokens=0)
    decoders = {(engine, k): decoder(engine, k) for engine in args.engines for k in args.sync_every}
    seconds = {key: [] for key in decoders}
    tokens = {}
    for round_ in range(args.repeats + 1):  # round 0 warms up (and compiles), then is dropped
        keys = list(decoders)
        keys = keys[round_ % len(keys):] + keys[: round_ % len(keys)]
        for key in keys:
            start = synchronized_clock()
            rollouts = generate_rollouts(model, tokenizer, prompts, 1, sampling, (), None, decoders[key])
            elapsed = synchronized_clock() - start
            if round_:
                seconds[key].append(elapsed)
            completions = rollouts.completion_ids * rollouts.completion_mask
            tokens.setdefault(key[0], (completions, rollouts.completion_tokens))
            if not torch.equal(completions, tokens[key[0]][0]):
                raise AssertionError(f"{key}: greedy completions differ with sync_every={key[1]}")
    print(f"\n{args.model}, batch {args.batch}, greedy, up to {args.tokens} tokens, stop at EOS, device {args.device}, "
          f"dtype {args.dtype}, median of {args.repeats} after a warm-up; torch {torch.__version__}, "
          f"{time.strftime('%Y-%m-%d')}")
    print("| engine | sync every k tokens | generated tokens | s per batch | vs k = 1 |")
    print("|---|---|---|---|---|")
    for engine, k in decoders:
        median = statistics.median(seconds[(engine, k)])
        reference = statistics.median(seconds[(engine, args.sync_every[0])])
        print(f"| {engine} | {k} | {tokens[engine][1]} | {median:.3f} | {median / reference:.3f} |")


if __name__ == "__main__":
    main()
