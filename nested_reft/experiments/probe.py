"""`nested-reft probe`: how far a model's nested versions are from it, measured before any GPU hour goes to ReFT.

A reader of the house, not an engine: nesting draws the skip sets (the run's skip policy at each ratio x, as the
warm-up draws them: `skip_policy.fixed_ratio_policy`), rollout samples the full and the nested model's completions
on the same problems with the same seeds, importance turns the full model's log-probs of the nested completions
into KL(behavior || target) per token, the effective sample size and the fraction retrace truncates, the task's
reward scores both, and influence reads each layer's Block Influence on the full model's own completions. Per x
it also times the nested rollouts beside the full ones (draw by draw, so the machine's load falls on both; the full
model first on even draws, last on odd ones), their speedup `rollout.rollout_speedup` of the draws' seconds per
generated token, and counts their FLOPs per token (`metrics.rollout_flops`, machine-independent).

The recommendation is the largest x whose mean KL per token stays under `kl_threshold`, or none. Nothing trains.

    nested-reft probe --model smollm2-135m-instruct --dataset arithmetic --skip-ratios 0.05 0.15 0.3 \
        --output-dir runs/probe
"""

from __future__ import annotations

import statistics
import textwrap
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from nested_reft.config import ConfigError, ImportanceConfig, NestingConfig, ProbeSettings, SamplingConfig
from nested_reft.store.files import atomic_write_json, check_output_directory, written_on_success
from nested_reft.algorithm.importance import ImportanceStats, behavior_target_kl, importance_statistics
from nested_reft.nesting.bridges import BridgeFitter, Bridges, fit_bridges, record_texts
from nested_reft.nesting.influence import InfluenceMeter
from nested_reft.training.metrics import ModelShapes, rollout_flops
from nested_reft.nesting.layers import num_decoder_layers, skip_count_problem, valid_layers
from nested_reft.experiments.plots import pyplot, save_figure
from nested_reft.engines.logprobs import completion_logprobs
from nested_reft.engines.rollout import Rollouts, generate_rollouts, rollout_speedup
from nested_reft.store.seeding import step_generator
from nested_reft.nesting.skip_policy import fixed_ratio_policy
from nested_reft.tasks.problems import Problem
from nested_reft.tasks.task import Task
from nested_reft.training.bridging import calibration_texts

PROBE_FILE, FIGURE_FILE = "probe.json", "probe.png"
NO_RECOMMENDATION = "none: nesting will not pay on this model"


@dataclass
class RatioResult:
    """The probe at one skip ratio x, over its draws (means of the draws' values)."""

    skip_ratio: float
    skipped_layers: int  # U at x
    skip_sets: list[list[int]]
    kl_behavior_target: float  # nats per token, the k3 estimate ReFT's metrics log
    ess: float  # effective sample size of pi/eta as a fraction of the tokens (1 on-policy)
    truncated: float  # fraction of the tokens where retrace cuts the ratio (pi/eta > 1)
    nested_reward: float  # mean reward of the nested model's completions
    full_reward: float  # the full model's, on the same problems with the same sampling seeds
    speedup: float  # median over draws of t(full) / t(nested) per generated token, timed side by side
    flops_ratio: float  # nested rollout FLOPs per generated token / the full model's
    bridge: str = "none"  # what stood in for the skipped blocks: none (removed) or linear (`nesting.bridges`)


@dataclass
class ProbeResult:
    model: str
    dataset: str
    num_layers: int
    block_influence: list[float]  # BI_l = 1 - cos(h_in, h_out) per layer, on the full model's completions
    ratios: list[RatioResult]
    kl_threshold: float
    recommendation: str  # "x = 0.15: ..." or NO_RECOMMENDATION
    # nesting.bridge = linear: the training problems the bridges were fitted on (the nesting.bridge_calibration after
    # the probed ones, else the probed ones themselves); 0 without bridges
    bridge_calibration_problems: int = 0
    # what the probe ran with: ProbeSettings (problems, draws, generations, sampling with its token limit, nesting,
    # threshold, seed) and the number of problems it measured on
    settings: dict = field(default_factory=dict)

    @property
    def recommended_ratio(self) -> float | None:
        return recommend(self.ratios, self.kl_threshold)


def recommend(ratios: Sequence[RatioResult], kl_threshold: float) -> float | None:
    """The largest x whose KL per token stays under the threshold, or None."""
    chosen = recommended(ratios, kl_threshold)
    return chosen.skip_ratio if chosen is not None else None


def recommended(ratios: Sequence[RatioResult], kl_threshold: float) -> RatioResult | None:
    """Among the settings whose KL per token stays under the threshold, the one that saves most: the largest x,
    and at equal x the faster measured rollout (removed blocks cost nothing, bridges their d^2); None if none."""
    under = [r for r in ratios if r.kl_behavior_target <= kl_threshold]
    return max(under, key=lambda r: (r.skip_ratio, r.speedup)) if under else None


def recommendation_text(ratios: Sequence[RatioResult], kl_threshold: float) -> str:
    chosen = recommended(ratios, kl_threshold)
    if chosen is None:
        return NO_RECOMMENDATION
    how = " with linear bridges" if chosen.bridge == "linear" else ""
    return (f"x = {chosen.skip_ratio:g}{how}: the largest ratio probed whose KL(behavior || target), "
            f"{chosen.kl_behavior_target:.3f} nats per token, stays under {kl_threshold:g} (U = {chosen.skipped_layers}, "
            f"rollout speedup {chosen.speedup:.2f}x, nested reward {chosen.nested_reward:.3f} against "
            f"{chosen.full_reward:.3f})")


@dataclass
class _Draw:
    """One draw's rollouts and what was measured of them."""

    rollouts: Rollouts
    rewards: list[float]
    flops: float


def probe(model, tokenizer, task: Task, settings: ProbeSettings, model_name: str = "") -> ProbeResult:
    """Measure `model` on the first `settings.problems` problems of `task` (see the module's docstring)."""
    num_layers = num_decoder_layers(model)
    _check_ratios(settings, num_layers)
    model.eval()
    problems = task.problems[: settings.problems]
    prompts = task.prompts(tokenizer, problems)
    golds = [problem.answer for problem in problems for _ in range(settings.generations)]
    shapes = ModelShapes.of(model)
    policies = {x: fixed_ratio_policy(settings.nesting, x, num_layers) for x in settings.skip_ratios}

    calibration = task.problems[settings.problems: settings.problems + settings.nesting.bridge_calibration] or problems
    variants = {"none": None}
    if settings.nesting.bridge == "linear":  # past the paper: each skipped block's bridge, beside removing it
        variants["linear"] = calibrated_bridges(model, tokenizer, calibration, settings.nesting)

    def sample(skip_set: Sequence[int], draw: int, bridges: Bridges | None = None) -> _Draw:
        generator = step_generator(settings.seed, draw, "probe-sample")  # the same seed for full and nested
        rollouts = generate_rollouts(model, tokenizer, prompts, settings.generations, settings.sampling, skip_set,
                                     generator, bridges=bridges)
        completions = tokenizer.batch_decode(rollouts.completion_ids, skip_special_tokens=True)
        flops = rollout_flops(shapes, skip_set, rollouts.prompt_mask.sum(-1), rollouts.completion_mask.sum(-1),
                              rollouts.bridged)
        return _Draw(rollouts, task.score(completions, golds), flops)

    # untimed: a process's first generation pays one-time costs (allocations, first kernel calls) that would
    # count against the full model, which the first draw times first
    generate_rollouts(model, tokenizer, prompts[:1], 1, settings.sampling, (), torch.Generator().manual_seed(0))
    full_draws = []
    nested_draws = {(x, name): [] for x in settings.skip_ratios for name in variants}
    influence = None
    for draw in range(settings.draws):
        full_first = draw % 2 == 0  # the order alternates, so that a machine slowing down favours neither side
        if full_first:
            full_draws.append(sample((), draw))
        if influence is None:  # measured once, on the first draw's full completions, before any influence draw
            influence = block_influence(model, full_draws[0].rollouts)
            for policy in policies.values():
                policy.influence = influence
        for x, policy in policies.items():
            skip_set = policy.draw(step_generator(settings.seed, draw, f"probe-skip-{x:g}"))
            for name, bridges in variants.items():  # the same skip set removed and bridged
                nested_draws[x, name].append(sample(skip_set, draw, bridges))
        if not full_first:
            full_draws.append(sample((), draw))
    ratios = [_ratio_result(x, name, policies[x].max_count, nested_draws[x, name], full_draws, model, settings)
              for x in settings.skip_ratios for name in variants]
    return ProbeResult(model_name, task.name, num_layers, influence, ratios, settings.kl_threshold,
                       recommendation_text(ratios, settings.kl_threshold),
                       len(calibration) if len(variants) > 1 else 0,
                       asdict(settings) | {"problems_probed": len(problems)})


def calibrated_bridges(model, tokenizer, problems: Sequence[Problem], nesting: NestingConfig) -> Bridges:
    """Bridges for every block the border lets a skip set drop, fitted on one calibration forward of the full model
    over `problems` (prompt and reference solution), as a training run fits its first ones."""
    fitter = BridgeFitter(model, valid_layers(num_decoder_layers(model), nesting.border), decay=1.0)
    record_texts(fitter, model, tokenizer, calibration_texts(tokenizer, problems), batch_size=8)
    fitter.end_step()
    return fit_bridges(fitter.total, nesting.bridge_ridge)


def block_influence(model, rollouts: Rollouts) -> list[float]:
    """Each layer's Block Influence on the completion tokens of `rollouts`, read by `InfluenceMeter`'s hooks on
    one teacher-forced forward of the full model."""
    meter = InfluenceMeter(model)  # its hooks stay on the model, idle outside `measuring`
    with torch.no_grad(), meter.measuring(rollouts.completion_mask):
        completion_logprobs(model, rollouts.prompt_ids, rollouts.prompt_mask, rollouts.completion_ids,
                            rollouts.completion_mask)
    return meter.take() or [0.0] * meter.num_layers


def _ratio_result(x: float, bridge: str, count: int, nested_draws: list[_Draw], full_draws: list[_Draw], model,
                  settings: ProbeSettings) -> RatioResult:
    """Means over the draws at x: KL, ESS and truncation of the nested completions under the full model."""
    distances = [_distance(model, draw.rollouts, settings.sampling.temperature) for draw in nested_draws]
    stats = [stat for stat, _ in distances]
    return RatioResult(
        skip_ratio=x,
        skipped_layers=count,
        skip_sets=[list(draw.rollouts.skip_set) for draw in nested_draws],
        kl_behavior_target=statistics.mean(kl for _, kl in distances),
        ess=statistics.mean(s.ess for s in stats),
        truncated=statistics.mean(s.truncated for s in stats),
        nested_reward=_mean_reward(nested_draws),
        full_reward=_mean_reward(full_draws),
        speedup=rollout_speedup((full.rollouts.seconds_per_token, nested.rollouts.seconds_per_token)
                                for full, nested in zip(full_draws, nested_draws)),
        flops_ratio=_flops_per_token(nested_draws) / max(_flops_per_token(full_draws), 1e-12),
        bridge=bridge,
    )


def _distance(model, rollouts: Rollouts, temperature: float) -> tuple[ImportanceStats, float]:
    """The importance statistics (retrace) and KL per token of the nested completions: the full model scores
    them (every completion has a token, so neither is None)."""
    with torch.no_grad():
        target = completion_logprobs(model, rollouts.prompt_ids, rollouts.prompt_mask, rollouts.completion_ids,
                                     rollouts.completion_mask, temperature)
    mask = rollouts.completion_mask.float()
    return (importance_statistics(target, rollouts.behavior_logprobs, mask, ImportanceConfig(mitigation="retrace")),
            behavior_target_kl(target, rollouts.behavior_logprobs, mask))


def _mean_reward(draws: list[_Draw]) -> float:
    return statistics.mean(reward for draw in draws for reward in draw.rewards)


def _flops_per_token(draws: list[_Draw]) -> float:
    return sum(draw.flops for draw in draws) / max(sum(draw.rollouts.completion_tokens for draw in draws), 1)


def _check_ratios(settings: ProbeSettings, num_layers: int) -> None:
    """Refuse, before sampling, a ratio whose U the border's valid layers cannot give, or that skips every layer."""
    for x in settings.skip_ratios:
        problem = skip_count_problem(num_layers, settings.nesting.border, x, "--border")
        if problem:
            raise ConfigError(f"--skip-ratios {x:g} {problem}: lower it")


def write_probe(result: ProbeResult, output_dir: str | Path) -> tuple[Path, Path]:
    """probe.json (every number) and probe.png (KL and rewards against x; Block Influence per layer)."""
    output = Path(output_dir)
    record = asdict(result) | {"recommended_skip_ratio": result.recommended_ratio}
    atomic_write_json(output / PROBE_FILE, record)
    return output / PROBE_FILE, save_figure(_figure(result), output / FIGURE_FILE)


def _figure(result: ProbeResult):
    plt = pyplot()
    figure, (distance, influence) = plt.subplots(1, 2, figsize=(11, 4))
    rewards = distance.twinx()
    for bridge, style in (("none", "-"), ("linear", "--")):
        rows = [r for r in result.ratios if r.bridge == bridge]
        if not rows:
            continue
        xs, how = [100 * r.skip_ratio for r in rows], "removed" if bridge == "none" else "bridged"
        distance.plot(xs, [r.kl_behavior_target for r in rows], "o" + style, color="tab:red", label=f"KL, {how}")
        rewards.plot(xs, [r.nested_reward for r in rows], "s" + style, color="tab:blue", label=f"nested reward, {how}")
    distance.axhline(result.kl_threshold, color="tab:red", linestyle=":", label=f"threshold {result.kl_threshold:g}")
    distance.set_xlabel("skip ratio x (%)")
    distance.set_ylabel("KL(behavior || target), nats per token")
    rewards.axhline(result.ratios[0].full_reward, linestyle=":", color="tab:gray", label="full reward")
    rewards.set_ylabel("mean reward")
    lines = distance.get_legend_handles_labels()[0] + rewards.get_legend_handles_labels()[0]
    distance.legend(lines, [line.get_label() for line in lines], fontsize=8, loc="upper left")
    influence.bar(range(result.num_layers), result.block_influence, color="tab:green")
    influence.set_xlabel("layer")
    influence.set_ylabel("Block Influence 1 - cos(h_in, h_out)")
    influence.set_title(f"{result.model} on {result.dataset}", fontsize=9)
    figure.suptitle(textwrap.fill(f"recommendation: {result.recommendation}", 120), fontsize=9)
    figure.tight_layout()
    return figure


def probe_settings(skip_ratios: Sequence[float] | None = None, max_new_tokens: int | None = None,
                   temperature: float | None = None, nesting: dict | None = None, **options) -> ProbeSettings:
    """ProbeSettings from the command line's values, None leaving a default: `nesting` holds NestingConfig options
    (border, skip_policy, influence_temperature, ...), the others are ProbeSettings' own."""
    defaults = ProbeSettings()
    sampling = {"max_new_tokens": max_new_tokens, "temperature": temperature}
    try:
        return ProbeSettings(
            skip_ratios=tuple(skip_ratios) if skip_ratios else defaults.skip_ratios,
            sampling=SamplingConfig(**(asdict(defaults.sampling) | _given(sampling))),
            nesting=NestingConfig(**_given(nesting or {})),
            **_given(options),
        )
    except ValueError as error:  # SamplingConfig's and NestingConfig's own checks name the option
        raise ConfigError(str(error)) from None


def _given(options: dict) -> dict:
    return {key: value for key, value in options.items() if value is not None}


def probe_main(model: str, dataset: str, output_dir: str, settings: ProbeSettings, data_dir: str | None = None,
               dtype: str = "float32", device: str | None = None) -> ProbeResult:
    """Load, probe, write; prints the table and the recommendation. Inputs are checked before anything is written;
    the output directory is held (its one-writer lock, as a run's: a probe into a directory a run or another probe
    is writing is refused), never holds a probe already, and gets probe.json and probe.png together at the end."""
    from nested_reft.evaluation.evaluate import usable_device
    from nested_reft.models.loading import load_model

    check_output_directory(output_dir, "--output-dir")
    with written_on_success(output_dir, f"probe output directory {output_dir}") as staging:
        if (Path(output_dir) / PROBE_FILE).exists():
            raise ConfigError(f"--output-dir {output_dir} already holds a probe ({PROBE_FILE}): choose another "
                              "--output-dir, or delete it to probe again")
        calibrating = settings.nesting.bridge == "linear"  # the bridges are fitted on the problems after the probed ones
        task = Task.load(dataset, "train", data_dir,
                         limit=settings.problems + (settings.nesting.bridge_calibration if calibrating else 0))
        if len(task.problems) < settings.problems:  # never fewer problems than asked for, silently
            raise ConfigError(f"--problems {settings.problems}: training set {dataset} has {len(task.problems)} "
                              "problems; ask for at most that many")
        loaded, tokenizer = load_model(model, dtype=dtype, device=usable_device(device))
        result = probe(loaded, tokenizer, task, settings, model)
        write_probe(result, staging)
    print(format_table(result))
    return result


def format_table(result: ProbeResult) -> str:
    """The probe as a Markdown table, Block Influence and the recommendation below it."""
    lines = ["| x | U | skipped blocks | KL per token | ESS | truncated | nested reward | full reward | speedup | "
             "FLOPs ratio |", "|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r.skip_ratio:g} | {r.skipped_layers} | {'bridged' if r.bridge == 'linear' else 'removed'} | "
              f"{r.kl_behavior_target:.3f} | {r.ess:.3f} | "
              f"{r.truncated:.3f} | {r.nested_reward:.3f} | {r.full_reward:.3f} | {r.speedup:.2f} | "
              f"{r.flops_ratio:.3f} |" for r in result.ratios]
    lines.append("BI per layer: " + " ".join(f"{value:.3f}" for value in result.block_influence))
    lines.append(f"recommendation: {result.recommendation}")
    return "\n".join(lines)
