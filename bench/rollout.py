"""Rollout throughput of nested behavior models, side by side with Hugging Face `generate`, in one process.

For each model and skip ratio x it times, on the same left-padded batch and in rounds of interleaved
configurations (see `round_order`), our sampler (`generate_rollouts`) with each decoding engine asked for
(`--engine eager compiled`) and `model.generate` (all under `nested(model, S)` with the same skip set, fixed
length min = max), and prints generation tokens/s (medians), the compiled engine's compile time (its first
call at x = 0 less a steady one) and the extra time of its first call with a new skip set (a recompilation
or, on CUDA, a graph re-capture; the median over x > 0 of first less steady), the speedup over x = 0
(`rollout_speedup`: the median over rounds of the ratio within a round, and its range), the
FLOP bound (N c_layer + c_head) / ((N - U) c_layer + c_head) from the model's own shapes, the block-time
bound 1 / (1 - s U / N), where s is the share of a full-model generation's wall time spent in the decoder
blocks (timed by forward hooks), i.e. the speedup if each skipped block saves what a block costs on this
machine, and the peak memory of a nested generation relative to x = 0 (on CPU the peak RSS of a fresh child
process per x; on a GPU the peak of allocated device memory).

A model is a `load_model` name, or `config:FILE`: a random-initialised model of that config (for instance
`bench/configs/qwen2.5-math-1.5b.json`, the paper's model) with a byte tokenizer. Speed at fixed length
does not depend on the weights, so this measures the paper's shapes where the weights cannot be fetched.

    python bench/rollout.py                       # SmolLM2-135M-Instruct and tiny-llama, batch 32
    python bench/rollout.py --models tiny-llama --tokens 16 --repeats 1 --engine eager   # a quick look
    python bench/rollout.py --device cuda --dtype bfloat16 --batch 64 --tokens 256 \
        --models config:bench/configs/smollm2-135m.json config:bench/configs/qwen2.5-math-1.5b.json
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from nested_reft.tasks.arithmetic import generate_arithmetic
from nested_reft.config import ENGINES
from nested_reft.engines.choice import decoder_for
from nested_reft.models.loading import load_model
from nested_reft.nesting.bridges import Bridges
from nested_reft.nesting.layers import (
    decoder_layers,
    nested,
    num_skipped_layers,
    sample_skip_set,
    valid_layers,
)
from nested_reft.tasks.prompts import build_prompt
from nested_reft.engines.rollout import SamplingConfig, generate_rollouts, rollout_speedup, speedup_ratios
from nested_reft.models.tiny import byte_tokenizer

RATIOS = (0.0, 0.05, 0.10, 0.15, 0.25)  # the default of --ratios; x = 0 first: the speedups' reference


def layer_and_head_flops(model, context: float) -> tuple[float, float]:
    """FLOPs per generated token of one decoder block and of the output head, from the model's shapes.

    A block costs 2 FLOPs per parameter (its matrix multiplies) plus attention over `context`
    positions (2 x 2 x context x hidden for scores and values); the head costs 2 x hidden x vocab.
    """
    config = model.config.get_text_config()
    block = decoder_layers(model)[2][0]
    block_params = sum(p.numel() for p in block.parameters())
    head = model.get_output_embeddings().weight
    layer = 2 * block_params + 4 * context * config.hidden_size
    return float(layer), float(2 * head.numel())


def flop_bound(model, skipped: int, context: float, bridged: bool = False) -> float:
    """The best speedup that skipping `skipped` of N blocks can give: (N c + h) / ((N - U) c + U b + h), where a
    bridge costs b = 2 (d^2 + d) when the skipped blocks are bridged (`nesting.bridges`), else 0."""
    layer, head = layer_and_head_flops(model, context)
    n = len(decoder_layers(model)[2])
    hidden = model.config.get_text_config().hidden_size
    bridge = 2.0 * (hidden * hidden + hidden) if bridged else 0.0
    return (n * layer + head) / ((n - skipped) * layer + skipped * bridge + head)


def skip_set_for(model, ratio: float) -> tuple[int, ...]:
    """One seeded draw of f_{x,1}, reused for every timing of this ratio."""
    n = len(decoder_layers(model)[2])
    return sample_skip_set(n, ratio, border=1, generator=torch.Generator().manual_seed(0))


def prompts_for(tokenizer, batch: int) -> list[str]:
    return [build_prompt(tokenizer, p.question) for p in generate_arithmetic(batch, seed=0)]


BRIDGED = "+bridges"  # the suffix of a timer whose skipped blocks run their bridges


def time_ours(engine: str, bridged: bool = False):
    """A timer of `generate_rollouts` through the decoding engine `engine` (tokens/s, first call included); with
    `bridged`, each skipped block runs a bridge (identity maps: the time of h + h W + c does not depend on W)."""

    def timed(model, tokenizer, prompts, sampling, skip) -> float:
        generator = torch.Generator(device=model.device).manual_seed(0)
        bridges = None
        if bridged:
            n, hidden = len(decoder_layers(model)[2]), model.config.get_text_config().hidden_size
            bridges = Bridges.identity(valid_layers(n, 1), hidden, model.device)
        rollouts = generate_rollouts(model, tokenizer, prompts, 1, sampling, skip, generator, decoder_for(engine),
                                     bridges=bridges)
        return rollouts.completion_tokens / rollouts.generation_time_s

    return timed


def synchronized_clock() -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


def time_hf(model, tokenizer, prompts, sampling, skip) -> float:
    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    start = synchronized_clock()
    with nested(model, skip), torch.no_grad():
        out = model.generate(
            **batch,
            do_sample=True,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k or None,
            max_new_tokens=sampling.max_new_tokens,
            min_new_tokens=sampling.min_new_tokens,
        )
    elapsed = synchronized_clock() - start
    return (out.shape[1] - batch["input_ids"].shape[1]) * out.shape[0] / elapsed


def add_device_arguments(parser: argparse.ArgumentParser) -> None:
    """--device, --dtype and --threads, as the benches of one model on one device take them (`load_on_device`)."""
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")


def load_on_device(args: argparse.Namespace):
    """(model, tokenizer) of `args.model` as `add_device_arguments` asked, torch's CPU threads set first."""
    torch.set_num_threads(args.threads)
    return load(args.model, args.device, args.dtype)


def load(model_name: str, device: str, dtype: str):
    """(model, tokenizer) for a `load_model` name or a `config:FILE` (random weights, byte tokenizer)."""
    if not model_name.startswith("config:"):
        return load_model(model_name, dtype=dtype, device=device)
    path = Path(model_name.removeprefix("config:"))
    values = json.loads(path.read_text())
    config = AutoConfig.for_model(values.pop("model_type"), **values)
    torch.manual_seed(0)
    with torch.device(device):  # initialised where it runs: a 1.5B model's random init takes a minute on a CPU
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype)).eval()
    return model, byte_tokenizer()


def peak_memory_mb(model_name: str, ratio: float, args) -> float:
    """Peak memory (MB) of one nested generation at ratio x: device memory on a GPU, else the peak RSS of a
    fresh child process that loads the model and runs it (a process's RSS peak cannot be reset)."""
    if args.device.startswith("cuda"):
        return cuda_peak_memory_mb(model_name, ratio, args)
    command = [sys.executable, __file__, "--probe-memory", str(ratio), "--models", model_name,
               "--batch", str(args.batch), "--tokens", str(args.tokens), "--dtype", args.dtype]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return float(result.stdout.strip().splitlines()[-1])


def probe_memory(model_name: str, ratio: float, args) -> None:
    """Child side of `peak_memory_mb`: print the peak RSS after one generation at ratio x."""
    model, tokenizer = load(model_name, "cpu", args.dtype)
    sampling = SamplingConfig(max_new_tokens=args.tokens, min_new_tokens=args.tokens)
    generate_rollouts(model, tokenizer, prompts_for(tokenizer, args.batch), 1, sampling, skip_set_for(model, ratio))
    print(peak_rss_mb())


def peak_rss_mb() -> float:
    """This process's peak RSS. Linux's VmHWM belongs to the process image, while ru_maxrss survives exec and
    so would report the (larger) parent's RSS at fork time."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


_models: dict = {}  # the model under measurement, so the CUDA probes reuse it


def cuda_peak_memory_mb(model_name: str, ratio: float, args) -> float:
    model, tokenizer = _models[model_name]
    sampling = SamplingConfig(max_new_tokens=args.tokens, min_new_tokens=args.tokens)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    generate_rollouts(model, tokenizer, prompts_for(tokenizer, args.batch), 1, sampling, skip_set_for(model, ratio))
    return torch.cuda.max_memory_allocated() / 2**20


def time_shares(model, tokenizer, prompts, sampling) -> dict[str, float]:
    """The shares of one full-model generation's wall time spent in the decoder blocks, in the output head
    and elsewhere (sampling, embedding, masks), timed by forward hooks around each block and the head."""
    spent = {"blocks": 0.0, "head": 0.0}

    def timed(module: torch.nn.Module, part: str) -> list:
        start = [0.0]
        before = module.register_forward_pre_hook(lambda *_: start.__setitem__(0, synchronized_clock()))
        after = module.register_forward_hook(lambda *_: spent.__setitem__(part, spent[part] + synchronized_clock() - start[0]))
        return [before, after]

    handles = [h for block in decoder_layers(model)[2] for h in timed(block, "blocks")]
    handles += timed(model.get_output_embeddings(), "head")
    try:
        total = generate_rollouts(model, tokenizer, prompts, 1, sampling).generation_time_s
    finally:
        for handle in handles:
            handle.remove()
    return {"blocks": spent["blocks"] / total, "head": spent["head"] / total,
            "rest": 1 - (spent["blocks"] + spent["head"]) / total}


def run_model(model_name: str, args) -> list[dict]:
    model, tokenizer = _models[model_name] = load(model_name, args.device, args.dtype)
    prompts = prompts_for(tokenizer, args.batch)
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=args.tokens, min_new_tokens=args.tokens)
    prompt_length = tokenizer(prompts, return_tensors="pt", padding=True)["input_ids"].shape[1]
    context = prompt_length + args.tokens / 2
    timers = {**{engine: time_ours(engine) for engine in args.engine},
              **{engine + BRIDGED: time_ours(engine, bridged=True) for engine in args.bridged}, "hf": time_hf}
    tokens = args.batch * args.tokens
    first_calls = {}  # the full batch first, so that allocator, kernel choices and compilation are settled
    for engine, timer in timers.items():
        first_calls[engine] = tokens / timer(model, tokenizer, prompts, sampling, ())
    ratios = args.ratios
    samples = {(r, engine): [] for r in ratios for engine in timers}
    for round_ in range(args.repeats):
        for ratio, engine in round_order(round_, ratios, list(timers)):
            samples[(ratio, engine)].append(timers[engine](model, tokenizer, prompts, sampling,
                                                           skip_set_for(model, ratio)))
    n = len(decoder_layers(model)[2])
    shares = [time_shares(model, tokenizer, prompts, sampling) for _ in range(args.repeats)]
    share = {part: statistics.median(run[part] for run in shares) for part in ("blocks", "head", "rest")}
    print(f"# {model_name} at x = 0, median of {args.repeats} runs timed by forward hooks: decoder blocks "
          f"{share['blocks']:.1%}, output head {share['head']:.1%}, the rest {share['rest']:.1%} of the wall time")
    rows = []
    for engine in timers:
        steady = tokens / statistics.median(samples[(0.0, engine)])
        # only the compiled engine has a cost per new U (a recompilation); for the others first less steady is noise
        first_skip_set = [tokens / samples[(ratio, engine)][0] - tokens / statistics.median(samples[(ratio, engine)])
                          for ratio in ratios[1:]] if engine == "compiled" else []
        for ratio in ratios:
            tok_s, hf = statistics.median(samples[(ratio, engine)]), statistics.median(samples[(ratio, "hf")])
            # (x = 0, x) seconds per token of each round, timed side by side
            pairs = [(1 / x0, 1 / x) for x0, x in zip(samples[(0.0, engine)], samples[(ratio, engine)])]
            paired, speedup = speedup_ratios(pairs), rollout_speedup(pairs)
            skipped = num_skipped_layers(n, ratio)
            bound = flop_bound(model, skipped, context, bridged=engine.endswith(BRIDGED))
            rows.append(
                dict(model=model_name, engine=engine, layers=n, x=ratio, skipped=skipped, tok_s=tok_s, hf_tok_s=hf,
                     over_hf=tok_s / hf, speedup=speedup, speedup_min=min(paired),
                     speedup_max=max(paired), flop_bound=bound, speedup_over_bound=speedup / bound,
                     block_time_bound=1 / (1 - share["blocks"] * skipped / n),
                     compile_s=first_calls[engine] - steady,
                     new_skip_set_s=statistics.median(first_skip_set) if first_skip_set else math.nan)
            )
    if args.memory:
        base_memory = peak_memory_mb(model_name, 0.0, args)
        memory = {ratio: peak_memory_mb(model_name, ratio, args) for ratio in ratios}
        for row in rows:
            row["peak_mem_mb"] = memory[row["x"]]
            row["peak_mem_vs_x0"] = memory[row["x"]] / base_memory
    del _models[model_name]
    return rows


def round_order(round_: int, ratios: list[float], engines: list[str]) -> list[tuple[float, str]]:
    """The (ratio, engine) timings of one round: every ratio with one engine, then every ratio with the
    next. Each round rotates the order of the ratios and of the engines, so that no configuration
    always runs first or after the same neighbour, and the runs of one engine that a speedup compares sit
    next to each other in time. The speedup of x is the median over rounds of x's tokens/s over x = 0's in
    the same round, which cancels the machine's drift (on this shared CPU its speed moves by 10-40% over
    hours, more than the effects measured)."""
    shift = round_ % len(ratios)
    turn = round_ % len(engines)
    return [(ratio, engine) for engine in engines[turn:] + engines[:turn] for ratio in ratios[shift:] + ratios[:shift]]


def seconds_or_dash(seconds: float) -> str:
    return "-" if math.isnan(seconds) else f"{seconds:.2f}"


def print_table(rows: list[dict]) -> None:
    header = ("| model | engine | N | x | U | tok/s | HF generate tok/s | /HF | speedup vs x=0 [min, max] "
              "| FLOP bound | speedup / FLOP bound | block-time bound | compile s | new skip set s | peak mem (MB) "
              "| peak mem vs x=0 |")
    print(header)
    print("|---" * (header.count("|") - 1) + "|")
    for r in rows:
        memory = f"{r['peak_mem_mb']:.0f} | {r['peak_mem_vs_x0']:.3f}" if "peak_mem_mb" in r else "- | -"
        print(
            f"| {r['model']} | {r['engine']} | {r['layers']} | {r['x']:.0%} | {r['skipped']} | {r['tok_s']:.1f} | "
            f"{r['hf_tok_s']:.1f} | {r['over_hf']:.2f} | {r['speedup']:.3f} [{r['speedup_min']:.3f}, "
            f"{r['speedup_max']:.3f}] | {r['flop_bound']:.3f} | {r['speedup_over_bound']:.3f} | "
            f"{r['block_time_bound']:.3f} | {r['compile_s']:.1f} | {seconds_or_dash(r['new_skip_set_s'])} | {memory} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["smollm2-135m-instruct", "tiny-llama"])
    parser.add_argument("--ratios", nargs="+", type=float, default=list(RATIOS), help="skip ratios x, 0 first")
    parser.add_argument("--engine", nargs="+", default=["eager", "compiled"], choices=ENGINES,
                        help="our decoding engines to time beside HF generate (vllm where it is installed)")
    parser.add_argument("--bridged", nargs="*", default=[], choices=ENGINES,
                        help="also time these engines with each skipped block bridged (nesting.bridge: linear)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per completion (min = max)")
    parser.add_argument("--repeats", type=int, default=5, help="rounds of timings; medians are shown")
    parser.add_argument("--no-memory", dest="memory", action="store_false", help="skip the peak-memory probes")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", help="weights and compute, e.g. bfloat16 on a GPU")
    parser.add_argument("--probe-memory", type=float, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.ratios[0] != 0.0:
        parser.error("--ratios must start with 0: the speedups are over x = 0")
    torch.set_num_threads(args.threads)
    if args.probe_memory is not None:
        return probe_memory(args.models[0], args.probe_memory, args)
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU, {args.threads} threads"
    print(f"# torch {torch.__version__}, {where}, {args.dtype}, batch {args.batch}, {args.tokens} tokens, "
          f"median of {args.repeats}")
    print_table([row for name in args.models for row in run_model(name, args)])


if __name__ == "__main__":
    main()
