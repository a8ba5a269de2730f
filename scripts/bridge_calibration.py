"""Parallel or sequential calibration of bridges (issue 31): which hidden states should a bridge be fitted on?

A bridge replaces skipped block i by h -> h + h W_i + c_i. The library fits it on the full model's own states
(parallel: X = the full model's input to block i, Delta = block i's update), once for every block, whatever the skip
set: what the update forward provides for free. Inside a nested model, though, the state arriving where block i was
is not the full model's when an earlier block was skipped too. Sequential calibration fits, for one skip set, each
bridge on the nested model's own state there (the earlier bridges already in place), with the target the full
model's output of block i (Delta = h_full_out_i - h_nested_in_i: the bridge also corrects the drift before it). It
needs a forward of the nested model per skipped block and per skip set, so a run would pay it at every step.

This script measures both on one model: for K skip sets at each x, KL(behavior || target) per token of the nested
model's own completions (as `nested-reft probe` measures it) with the blocks removed, bridged in parallel, and
bridged sequentially, all bridges fitted on the same calibration problems (after the probed ones).

    python scripts/bridge_calibration.py --skip-ratios 0.15 0.3 --draws 3 --output docs/study-bridged-nesting/calibration
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from nested_reft.config import NestingConfig, SamplingConfig
from nested_reft.engines.rollout import generate_rollouts
from nested_reft.experiments.probe import _distance, calibrated_bridges
from nested_reft.models.loading import load_model
from nested_reft.nesting.bridges import BridgeFitter, Bridges, NormalEquations, fit_bridges, nested_bridged
from nested_reft.nesting.layers import decoder_layers, num_decoder_layers, sample_skip_set
from nested_reft.store.files import atomic_write_json, atomic_write_text
from nested_reft.training.rundir import append_jsonl
from nested_reft.store.seeding import step_generator
from nested_reft.tasks.task import Task
from nested_reft.training.bridging import calibration_texts


def sequential_bridges(model, tokenizer, texts: list[str], skip_set: tuple[int, ...], parallel: Bridges,
                       ridge: float) -> Bridges:
    """Bridges for `skip_set` fitted one after the other on the nested model's own states (see the docstring)."""
    _, _, layers = decoder_layers(model)
    encoded = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    mask = encoded["attention_mask"].bool()
    with torch.no_grad():
        full = model(**encoded, output_hidden_states=True, use_cache=False).hidden_states  # full[i] enters block i
    fitted = Bridges(parallel.layers, parallel.weight.clone(), parallel.bias.clone())
    for index in sorted(skip_set):
        arriving: list[torch.Tensor] = []
        handle = layers[index].register_forward_pre_hook(lambda module, args, kwargs: arriving.append(
            (args[0] if args else kwargs["hidden_states"]).detach()), with_kwargs=True)
        earlier = tuple(i for i in skip_set if i < index)
        try:  # block `index` runs here, so its input is the nested model's state with the earlier bridges
            with torch.no_grad(), nested_bridged(model, earlier, fitted):
                model(**encoded, use_cache=False)
        finally:
            handle.remove()
        equations = NormalEquations.zeros((index,), full[0].shape[-1])
        equations.add(index, arriving[0][mask], full[index + 1][mask])  # target: the full model's output of block i
        row = fitted.layers.index(index)
        solved = fit_bridges(equations, ridge)
        fitted.weight[row], fitted.bias[row] = solved.weight[0], solved.bias[0]
    return fitted


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--skip-ratios", type=float, nargs="+", default=[0.15, 0.30])
    parser.add_argument("--draws", type=int, default=3)
    parser.add_argument("--problems", type=int, default=8)
    parser.add_argument("--calibration", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--output", type=Path, default=None,
                        help="a directory: draws.jsonl gets each draw as it is measured, calibration.json all at the end")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    model, tokenizer = load_model(args.model)
    nesting = NestingConfig(bridge="linear", bridge_calibration=args.calibration)
    task = Task.load("arithmetic", "train", None, limit=args.problems + args.calibration)
    probed, calibration = task.problems[: args.problems], task.problems[args.problems:]
    prompts = task.prompts(tokenizer, probed)
    texts = calibration_texts(tokenizer, calibration)
    parallel = calibrated_bridges(model, tokenizer, calibration, nesting)
    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, min_new_tokens=0)
    rows = []
    if args.output is not None:
        atomic_write_text(args.output / "draws.jsonl", "")  # this run's draws only
    for x in args.skip_ratios:
        for draw in range(args.draws):
            skip_set = sample_skip_set(num_decoder_layers(model), x, 1, step_generator(0, draw, f"calibration-{x:g}"))
            start = time.perf_counter()
            sequential = sequential_bridges(model, tokenizer, texts, skip_set, parallel, nesting.bridge_ridge)
            fit_s = time.perf_counter() - start
            kl = {}
            for name, bridges in (("removed", None), ("parallel", parallel), ("sequential", sequential)):
                rollouts = generate_rollouts(model, tokenizer, prompts, 2, sampling, skip_set,
                                             step_generator(0, draw, "calibration-sample"), bridges=bridges)
                kl[name] = _distance(model, rollouts, sampling.temperature)[1]
            rows.append({"skip_ratio": x, "skip_set": list(skip_set), "sequential_fit_s": fit_s, **kl})
            print(json.dumps(rows[-1]), flush=True)
            if args.output is not None:  # a draw takes minutes on a CPU: each is kept as soon as it is measured
                append_jsonl(args.output / "draws.jsonl", rows[-1])
    print("| x | removed | parallel | sequential | sequential fit, s |\n|---|---|---|---|---|")
    for x in args.skip_ratios:
        mine = [row for row in rows if row["skip_ratio"] == x]
        means = [statistics.mean(row[key] for row in mine) for key in ("removed", "parallel", "sequential",
                                                                        "sequential_fit_s")]
        print(f"| {x:g} | " + " | ".join(f"{value:.3f}" for value in means[:3]) + f" | {means[3]:.1f} |")
    if args.output is not None:
        atomic_write_json(args.output / "calibration.json", {"settings": vars(args) | {"output": str(args.output)},
                                                              "draws": rows})


if __name__ == "__main__":
    main()
