"""What merging LoRA adapters for the rollout buys: one batch of Nested-ReFT rollouts from the plain model, from
the model with adapters sampled through them (`sampling.merge_adapters: false`: three matmuls per adapted linear
layer and token) and sampled merged (the default: `lora.merged_for_sampling`), timed in interleaved rounds,
reported as the median seconds per batch and each one's ratio to sampling through the adapters.

The adapters are random with B not zero (a trained adapter's cost, which does not depend on its values); the
completions have a fixed length (min_new_tokens = max_new_tokens) so that every setup does the same work, and the
merged rollouts are checked greedy-equal to those through the adapters.

    python bench/lora_rollouts.py                  # SmolLM2-135M-Instruct on this CPU, r = 16, batch 16 x 64 tokens
    python bench/lora_rollouts.py --device cuda --dtype bfloat16 --model config:bench/configs/qwen2.5-math-1.5b.json
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rollout import add_device_arguments, load_on_device, prompts_for, synchronized_clock  # noqa: E402  (bench/rollout.py)

from nested_reft.config import ENGINES, SamplingConfig  # noqa: E402
from nested_reft.engines.choice import decoder_for  # noqa: E402
from nested_reft.nesting.layers import draw_uniform, num_decoder_layers, num_skipped_layers  # noqa: E402
from nested_reft.engines.rollout import generate_rollouts  # noqa: E402

SETUPS = ("no adapters", "through adapters", "merged")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--engine", default="eager", choices=[e for e in ENGINES if e != "vllm"])
    parser.add_argument("--rank", type=int, default=16, help="lora.r (TRL's lora_r default)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--skip-ratio", type=float, default=0.15)
    parser.add_argument("--repeats", type=int, default=5)
    add_device_arguments(parser)
    args = parser.parse_args(argv)
    model, tokenizer = load_on_device(args)
    layers = num_decoder_layers(model)
    skip_set = draw_uniform(layers, num_skipped_layers(layers, args.skip_ratio), 1, torch.Generator().manual_seed(0))
    adapted = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules="all-linear",
                                               init_lora_weights=False)).eval()
    prompts = prompts_for(tokenizer, args.batch)
    sampling = SamplingConfig(temperature=0, max_new_tokens=args.tokens, min_new_tokens=args.tokens, engine=args.engine)
    decoder = decoder_for(args.engine)

    def rollout(setup: str):
        config = dataclasses.replace(sampling, merge_adapters=setup == "merged")
        if setup == "no adapters":
            with adapted.disable_adapter():
                return generate_rollouts(adapted, tokenizer, prompts, 1, config, skip_set, None, decoder)
        return generate_rollouts(adapted, tokenizer, prompts, 1, config, skip_set, None, decoder)

    seconds = {setup: [] for setup in SETUPS}
    for round_ in range(args.repeats + 1):  # round 0 warms up (and compiles), then is dropped
        completions = {}
        for setup in SETUPS[round_ % 3:] + SETUPS[: round_ % 3]:
            start = synchronized_clock()
            completions[setup] = rollout(setup).completion_ids
            if round_:
                seconds[setup].append(synchronized_clock() - start)
        if not torch.equal(completions["merged"], completions["through adapters"]):
            raise AssertionError("greedy completions sampled merged differ from those sampled through the adapters")
    tokens = args.batch * args.tokens
    print(f"\n{args.model}, LoRA r = {args.rank} on every linear layer of the blocks, batch {args.batch} x {args.tokens} "
          f"tokens, x = {args.skip_ratio} (U = {len(skip_set)} of {layers}), engine {args.engine}, device "
          f"{args.device}, dtype {args.dtype}, median of {args.repeats} interleaved rounds after a warm-up; torch "
          f"{torch.__version__}, {time.strftime('%Y-%m-%d')}")
    print("| rollout | s per batch | tokens/s | vs through adapters |")
    print("|---|---|---|---|")
    reference = statistics.median(seconds["through adapters"])
    for setup in SETUPS:
        median = statistics.median(seconds[setup])
        print(f"| {setup} | {median:.3f} | {tokens / median:.1f} | {median / reference:.3f} |")


if __name__ == "__main__":
    main()
