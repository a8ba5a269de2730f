"""One ReFT step as the trainer runs it, per setup (decoding engine, LoRA, gradient checkpointing): step time, the
generation share, and peak device memory per phase beside what `scripts/scaling.py` (docs/scaling.md) predicts.

Each setup gets a fresh model of `--model` (a `load_model` name or `config:FILE`, random weights of a config: the
paper's Qwen2.5-Math-1.5B shapes without its weights), float32 master weights with the compute under autocast
(`--dtype`), prepared as the trainer prepares it (`add_adapters` with LoRA r = 16, `prepare_for_reft`), and takes
`--steps` steps of the trainer's pieces in the trainer's order: a skip set of f_{x,1}, `generate_rollouts`,
rewards, `group_advantages`, `policy_update` (retrace at x > 0). Rewards are seeded coin flips, not scores: a
random model earns none, and all-zero advantages would not exercise the loss; the step's work does not depend on
the rewards. Completions have exactly `--tokens` tokens (min = max, the paper's setting).

Memory is the peak of allocated device memory in each phase (`torch.cuda.max_memory_allocated`, reset at the
phase's start); the prediction is `scaling.peaks` for one GPU, this step's shapes (the prompts' padded length
included) and the nested model's N - U layers for the KV cache. On a CPU the memory columns are "-".

    python bench/train_step.py --model tiny-llama --tokens 8 --prompts 2 --generations 2 --micro-batch 2
    python bench/train_step.py --device cuda --dtype bfloat16 --model config:bench/configs/qwen2.5-math-1.5b.json
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "bench"), str(ROOT / "scripts")]

import scaling  # noqa: E402  (scripts/scaling.py: the memory model of docs/scaling.md)
from rollout import load, prompts_for  # noqa: E402  (bench/rollout.py: config:FILE models, arithmetic prompts)

from nested_reft.config import (  # noqa: E402
    GRPOConfig,
    ImportanceConfig,
    LoRAConfig,
    NestingConfig,
    SamplingConfig,
    TrainConfig,
)
from nested_reft.algorithm.grpo import group_advantages  # noqa: E402
from nested_reft.models.lora import add_adapters  # noqa: E402
from nested_reft.nesting.layers import num_decoder_layers, sample_skip_set  # noqa: E402
from nested_reft.training.optim import make_optimizer  # noqa: E402
from nested_reft.engines.rollout import generate_rollouts  # noqa: E402
from nested_reft.training.trainer import MIXED_PRECISION, prepare_for_reft  # noqa: E402
from nested_reft.training.update import TrainingState, policy_update  # noqa: E402

SETUPS = {  # name -> (engine, LoRA rank, gradient checkpointing); compiled last: its CUDA graphs keep their memory
    "eager": ("eager", 0, False),
    "lora": ("eager", 16, False),
    "checkpointing": ("eager", 0, True),
    "compiled": ("compiled", 0, False),
}
GB = 1e9


@dataclass
class StepRecord:
    generation_s: float
    training_s: float
    step_s: float
    tokens: int
    generation_peak_gb: float | None
    training_peak_gb: float | None
    loss: float
    grad_norm: float
    stepped: bool  # the update was finite, so the optimizer stepped
    optimizer_state_gb: float  # AdamW's moments after the step (they exist from the first step on)


@dataclass
class SetupResult:
    setup: str
    engine: str
    lora: int
    checkpointing: bool
    skipped: int
    prompt_tokens: int
    steps: list[StepRecord]
    predicted_generation_gb: float
    predicted_training_gb: float


class PhaseClock:
    """Wall time and peak allocated device memory of one phase (synchronised on CUDA)."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        self.started = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_gb = torch.cuda.max_memory_allocated(self.device) / GB
        else:
            self.peak_gb = None
        self.seconds = time.perf_counter() - self.started


def train_config(args, setup: str) -> TrainConfig:
    engine, rank, checkpointing = SETUPS[setup]
    return TrainConfig(
        model=args.model,
        batch_size=args.prompts,
        micro_batch_size=args.micro_batch,
        dtype=args.dtype,
        gradient_checkpointing=checkpointing,
        nesting=NestingConfig(skip_ratio=args.ratio, border=1 if args.ratio else 0),
        importance=ImportanceConfig(mitigation="retrace" if args.ratio else "base"),
        sampling=SamplingConfig(temperature=1.0, max_new_tokens=args.tokens, min_new_tokens=args.tokens,
                                engine=engine),
        grpo=GRPOConfig(num_generations=args.generations),
        lora=LoRAConfig(r=rank),
    )


def run_setup(args, setup: str, accelerator: Accelerator) -> SetupResult:
    """`args.steps` ReFT steps of a fresh model prepared for `setup`."""
    config, device = train_config(args, setup), accelerator.device
    model, tokenizer = load(args.model, str(device), "float32")  # float32 master weights, as the trainer's
    if config.lora.r:
        model = add_adapters(model, config.lora)
    model = accelerator.prepare_model(model)
    prepare_for_reft(model, config)
    optimizer, scheduler = make_optimizer(model, config.grpo, args.steps)
    state = TrainingState(model, accelerator.prepare_optimizer(optimizer), scheduler, accelerator)
    layers, G = num_decoder_layers(model), config.grpo.num_generations
    prompts = prompts_for(tokenizer, args.prompts)
    coins = torch.Generator().manual_seed(0)
    steps, prompt_tokens, skipped = [], 0, 0
    for step in range(args.steps):
        skip_set = sample_skip_set(layers, args.ratio, config.nesting.border, torch.Generator().manual_seed(step))
        with PhaseClock(device) as generation, accelerator.autocast():
            rollouts = generate_rollouts(model, tokenizer, prompts, G, config.sampling, skip_set,
                                         torch.Generator(device=device).manual_seed(step))
        rewards = torch.randint(0, 2, (len(prompts) * G,), generator=coins).float()
        with PhaseClock(device) as training:
            update = policy_update(state, rollouts, group_advantages(rewards, G, config.grpo.scale_rewards), config)
        steps.append(StepRecord(generation.seconds, training.seconds, generation.seconds + training.seconds,
                                rollouts.completion_tokens, generation.peak_gb, training.peak_gb, update.loss,
                                update.grad_norm, update.finite, optimizer_state_bytes(optimizer) / GB))
        prompt_tokens, skipped = rollouts.prompt_ids.shape[1], len(skip_set)
        print(f"{setup} step {step + 1}: generation {generation.seconds:.2f} s, training {training.seconds:.2f} s, "
              f"peaks {generation.peak_gb} / {training.peak_gb} GB, loss {update.loss:.4g}, grad norm "
              f"{update.grad_norm:.4g}, AdamW state {steps[-1].optimizer_state_gb:.2f} GB", file=sys.stderr, flush=True)
    generation_gb, training_gb = predicted_peaks(model.config, config, prompt_tokens, layers - skipped)
    del model, optimizer, scheduler, state
    release(accelerator)
    return SetupResult(setup, config.sampling.engine, config.lora.r, config.gradient_checkpointing, skipped,
                       prompt_tokens, steps, generation_gb, training_gb)


def predicted_peaks(model_config, config: TrainConfig, prompt_tokens: int, kept_layers: int) -> tuple[float, float]:
    """docs/scaling.md's peaks (GB) for this step on one GPU: generation, and training with or without
    gradient checkpointing as the setup trains."""
    text = model_config.get_text_config()
    model = scaling.Model(
        "measured", hidden=text.hidden_size, layers=text.num_hidden_layers, intermediate=text.intermediate_size,
        heads=text.num_attention_heads, kv_heads=getattr(text, "num_key_value_heads", None) or text.num_attention_heads,
        vocab=text.vocab_size, tied_embeddings=bool(getattr(text, "tie_word_embeddings", False)))
    work = scaling.Workload(prompts=config.batch_size, generations=config.grpo.num_generations,
                            prompt_tokens=prompt_tokens, completion_tokens=config.sampling.max_new_tokens,
                            micro_batch=config.micro_batch_size, lora_rank=config.lora.r or 16)
    setup = scaling.Setup("one GPU", gpus=1, sharded=False, lora=bool(config.lora.r))
    parts = scaling.components(model, setup, work)
    parts["KV cache (rollout)"] = scaling.kv_cache(dataclasses.replace(model, layers=kept_layers),
                                                   work.prompts * work.generations, work)
    peaks = scaling.peaks(parts)
    training = peaks["training, checkpointing" if config.gradient_checkpointing else "training, no checkpointing"]
    return peaks["generation"] / GB, training / GB


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(value.numel() * value.element_size() for state in optimizer.state.values()
               for value in state.values() if torch.is_tensor(value))


def release(accelerator: Accelerator) -> None:
    """Drop the setup's model and optimizer before the next setup's (the accelerator keeps what it prepared)."""
    accelerator.free_memory()
    gc.collect()
    if accelerator.device.type == "cuda":
        torch.cuda.empty_cache()


def table(results: list[SetupResult]) -> str:
    """Markdown: per setup the first step (compilation included) and the median of the later ones."""
    rows = ["| setup | engine | LoRA r | checkpointing | U | prompt tokens | first step s | step s | generation s | "
            "generation share | training s | tokens/s | updates applied | peak generation GB | predicted | "
            "peak training GB | predicted |", "|---|" * 1 + "---|" * 16]
    for result in results:
        later = result.steps[1:] or result.steps
        median = {name: statistics.median(getattr(s, name) for s in later)
                  for name in ("generation_s", "training_s", "step_s")}
        tokens = statistics.median(s.tokens / s.generation_s for s in later)
        peaks = [max((getattr(s, name) for s in result.steps if getattr(s, name) is not None), default=None)
                 for name in ("generation_peak_gb", "training_peak_gb")]
        shown = ["-" if peak is None else f"{peak:.1f}" for peak in peaks]
        rows.append(
            f"| {result.setup} | {result.engine} | {result.lora} | {result.checkpointing} | {result.skipped} | "
            f"{result.prompt_tokens} | {result.steps[0].step_s:.2f} | {median['step_s']:.2f} | "
            f"{median['generation_s']:.2f} | {median['generation_s'] / median['step_s']:.2f} | "
            f"{median['training_s']:.2f} | {tokens:.0f} | {sum(s.stepped for s in result.steps)} of "
            f"{len(result.steps)} | {shown[0]} | {result.predicted_generation_gb:.1f} | "
            f"{shown[1]} | {result.predicted_training_gb:.1f} |")
    return "\n".join(rows)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="config:bench/configs/qwen2.5-math-1.5b.json")
    parser.add_argument("--setups", nargs="+", default=list(SETUPS), choices=SETUPS)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=MIXED_PRECISION, help="compute precision (autocast)")
    parser.add_argument("--prompts", type=int, default=16, help="prompts per step (paper: 16)")
    parser.add_argument("--generations", type=int, default=8, help="G (paper: 8)")
    parser.add_argument("--tokens", type=int, default=256, help="completion length, min = max (paper: 256)")
    parser.add_argument("--micro-batch", type=int, default=16, help="sequences per forward/backward (paper: 16)")
    parser.add_argument("--ratio", type=float, default=0.15, help="skip ratio x (border 1)")
    parser.add_argument("--steps", type=int, default=2, help="steps per setup; the first includes compilation")
    parser.add_argument("--json", type=Path, default=None, help="also write the raw records here")
    args = parser.parse_args(argv)
    accelerator = Accelerator(cpu=args.device == "cpu", mixed_precision=MIXED_PRECISION[args.dtype])
    results = []
    for setup in args.setups:
        results.append(run_setup(args, setup, accelerator))
        if args.json:
            args.json.write_text(json.dumps([dataclasses.asdict(r) for r in results], indent=1))
    print(f"\n{args.model}, {args.prompts} prompts x G {args.generations}, {args.tokens} tokens, micro-batch "
          f"{args.micro_batch}, x = {args.ratio:.0%}, dtype {args.dtype}, device {args.device}; torch "
          f"{torch.__version__}")
    print(table(results))
    skipped = [r.setup for r in results if not all(s.stepped for s in r.steps)]
    if skipped:  # a non-finite loss or gradient: the step measured is not a training step
        sys.exit(f"updates skipped (non-finite loss or gradient) in: {', '.join(skipped)}")


if __name__ == "__main__":
    main()
