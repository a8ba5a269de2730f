"""Nested-ReFT, Algorithm 1 of the paper: SFT warm-up, then S GRPO steps on rollouts from nested models.

How Nested-ReFT differs from plain GRPO (TRL's GRPOTrainer), each marked where it happens:
  [N1] every step draws a skip set S_s = f_{x,b}(eta_s): U_x random valid layers;
  [N2] the G completions per prompt come from the nested behavior model eta'_s = nested(pi_theta, S_s),
       the same weights with those layers skipped, and their log-probs are recorded while sampling;
  [N3] the off-policy gap is corrected by a detached importance weight h_m(pi_theta, eta'_s) (`update`);
  [N4] each token's clipped GRPO term is multiplied by h_m (`update`).
With x = 0, b = 0 and m = base the loop is classical ReFT (h = 1 up to rounding). Past the paper, the skip
set may come from an adaptive policy (`skip_policy`: layer influence, a KL target) that each step's
measurements feed; the default, `uniform`, is f_{x,b}.

This module is the loop (`reft`) and the setting up around it (`train`). The rest lives elsewhere: the nested
model (`nesting`), sampling (`engines`), h_m and the objective (`algorithm`), and beside this module the
update (the gradient step), the warm-up (`sft`), the start-up checks (`startup`), the batches (`data_order`; past the
paper, `rollout_selection` picks which prompts get rollouts and which groups train: DAPO's filter, GRESO-style skips),
metrics, the run directory (`rundir`: its files and start/resume rules), checkpoints and FSDP2 (`sharding`). Processes are run by `accelerate`: each rank samples
for its share of the prompts and DDP averages the gradients; launched with configs/accelerate/fsdp2.yaml, the
weights, gradients and optimizer state are sharded over the ranks instead (FSDP2, `sharding`).

Randomness: `accelerate.utils.set_seed(seed)` at start; every sampling decision (data order, skip set,
tokens) comes from a generator seeded by (seed, step, purpose) alone (`seeding.step_generator`), so a
checkpoint's step is the state of that randomness, and a resumed run draws what the uninterrupted one
did. The global torch RNG, still consumed in training mode (dropout when enabled), is saved in checkpoints.

Precision: weights and AdamW stay float32; `dtype` bfloat16/float16 runs every forward pass (rollouts,
training, reference, SFT) under accelerate's autocast (`Accelerator(mixed_precision=...)`).

Reference model (only when grpo.beta > 0, as in TRL): a frozen copy of the model ReFT starts from,
i.e. after the SFT warm-up; that model is saved to OUTPUT/sft-model so a resumed run reloads the same
reference (with sft.epochs = 0 the reference is `config.model` itself).
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, fields
from pathlib import Path
from typing import Protocol

import torch
from accelerate import Accelerator
from accelerate.utils import LoggerType, gather_object, set_seed

from nested_reft.algorithm.grpo import group_advantages
from nested_reft.config import ConfigError, TrainConfig, flat_options, save_config, to_dict
from nested_reft.engines.choice import decoder_closed_after
from nested_reft.engines.rollout import generate_rollouts
from nested_reft.models.loading import load_model
from nested_reft.models.lora import add_adapters, has_adapters, merge
from nested_reft.nesting.influence import InfluenceMeter
from nested_reft.nesting.layers import num_decoder_layers
from nested_reft.nesting.skip_policy import SkipPolicy
from nested_reft.store.files import atomic_write_json, atomic_write_text, check_output_directory, read_json
from nested_reft.store.seeding import step_generator
from nested_reft.tasks.task import Task
from nested_reft.training.checkpoint import (
    TRAINER_STATE,
    CheckpointError,
    checkpoint_path,
    load_checkpoint,
    load_run_tensors,
    remove_old_checkpoints,
    restore_rng_states,
    rng_states_of_rank,
    save_checkpoint,
    save_model,
    verify_checkpoint,
)
from nested_reft.training.bridging import BridgeTraining
from nested_reft.training.data_order import calibration_problems
from nested_reft.training.metrics import (
    ModelShapes, RunTotals, StepMetrics, StepResult, StepTimes, metrics_record, step_metrics, summarize,
)
from nested_reft.training.optim import make_optimizer
from nested_reft.training.rollout_selection import RolloutSelection
from nested_reft.training.rundir import (
    ADAPTER_DIR,
    CONFIG_FILE,
    DATA_FILE,
    FINAL_MODEL_DIR,
    METRICS_FILE,
    SFT_METRICS_FILE,
    SFT_MODEL_DIR,
    SUMMARY_FILE,
    RunState,
    append_jsonl,
    check_resumed_config,
    check_resumed_data,
    checkpoint_to_resume,
    claimed_run_directory,
    clear_started_run,
    data_identity,
    keep_metrics_up_to,
    read_metrics,
    run_state,
)
from nested_reft.training.sft import sft_warmup
from nested_reft.training.sharding import FSDP2, check_fits_fsdp2, fsdp2_of_launch, gathered_state, gathered_weights
from nested_reft.training.startup import check_lora_fits, check_model, check_task, check_world, training_set
from nested_reft.training.update import TrainingState, no_update, policy_update

MIXED_PRECISION = {"float32": "no", "bfloat16": "bf16", "float16": "fp16"}  # config.dtype -> accelerate


class StepCallback(Protocol):
    """Called on every process after each ReFT step is logged and before its checkpoint (TRL's `on_step_end`; the
    sweep's evaluation during training runs in one process only),
    with the policy as it leaves the step (the unwrapped module: under FSDP2, each rank's shards) and the tokenizer,
    under the run's autocast and with the random states put back afterwards, so that a callback (an evaluation
    during training) changes nothing the run does. Before the checkpoint: a run killed inside a callback resumes
    from the checkpoint before and calls it again on the same step's policy."""

    def __call__(self, step: int, policy: torch.nn.Module, tokenizer) -> None: ...


def train(config: TrainConfig, task: Task | None = None, resume: bool | None = False,
          callbacks: Sequence[StepCallback] = ()) -> dict:
    """Run SFT (if sft.epochs > 0) and ReFT for `config`; return the summary written to summary.json.

    `resume`: continue the run's checkpoint (True), start a fresh run (False), or whatever the directory holds
    (None, `ensure_trained`). `callbacks` are called after each ReFT step (`StepCallback`: an evaluation during
    training, the sweep's `eval.steps`). Nothing is written before the inputs are checked: the output directory, its
    state, the model, the data and their fit; only one process at a time may write a run directory, and it
    takes the lock before it touches anything. A run that fails before its first checkpoint is removed again.
    """
    accelerator = _accelerator(config)
    set_seed(config.seed)
    output = Path(config.output_dir)
    check_world(accelerator)
    check_output_directory(output, "output_dir")
    fsdp2 = fsdp2_of_launch()
    if fsdp2 is not None:
        check_fits_fsdp2(config, accelerator.num_processes)
    with claimed_run_directory(output, accelerator), decoder_closed_after(config.sampling.engine):
        if resume is None and run_state(output) is RunState.FINISHED:
            return read_json(output / SUMMARY_FILE)
        checkpoint = checkpoint_to_resume(output, resume)
        if checkpoint is not None:
            check_resumed_config(config, output)
        model, tokenizer = load_model(config.model, dtype=torch.float32, device=accelerator.device)  # fp32 master weights
        if config.lora.r:
            check_lora_fits(config, model)
            model = add_adapters(model, config.lora)
        check_model(config, model, accelerator.num_processes)
        task = task or Task.load(config.dataset, "train", config.data_dir)
        check_task(config, task, tokenizer, model, fresh=checkpoint is None)  # ReFT's pool (train_problems) too
        identity = data_identity(task.name, task.problems)
        if checkpoint is not None:
            check_resumed_data(output, identity)
        accelerator.wait_for_everyone()  # every rank has decided and checked before the main process writes
        if accelerator.is_main_process:
            clear_started_run(output)  # what a run killed before its first checkpoint left
            save_config(config, output / CONFIG_FILE)
            atomic_write_json(output / DATA_FILE, identity)
        try:
            summary = _train_model(config, task, model, tokenizer, accelerator, checkpoint, fsdp2, callbacks)
        except BaseException:
            if accelerator.is_main_process:  # no checkpoint yet: nothing to resume, so nothing is kept
                clear_started_run(output)
            raise
    accelerator.end_training()
    return summary


def ensure_trained(config: TrainConfig, task: Task | None = None, callbacks: Sequence[StepCallback] = ()) -> dict:
    """Bring the run in `config.output_dir` to its end, for callers that own the directory (sweeps, the demo):
    a finished run is left as it is (its summary is returned), one with a checkpoint resumes, one that stopped
    before its first checkpoint is cleared and started again, and an empty directory starts a run; all of it
    decided under the run directory's lock, so a second caller is refused before it clears anything."""
    return train(config, task, resume=None, callbacks=callbacks)


def _train_model(
    config: TrainConfig, task: Task, model, tokenizer, accelerator, checkpoint: Path | None, fsdp2: FSDP2 | None,
    callbacks: Sequence[StepCallback] = (),
) -> dict:
    """Algorithm 1 from a loaded model: warm-up (fresh runs), ReFT from step 0 or the checkpoint, final files.
    The warm-up reads the training set `task`, ReFT its first `train_problems` (`training_set`: a pool that several
    epochs revisit).

    The model is prepared once, for both phases: sharded under FSDP2, else by accelerate (DDP wraps it).
    """
    output = Path(config.output_dir)
    model = fsdp2.shard(model) if fsdp2 is not None else accelerator.prepare_model(model)
    totals = RunTotals()
    if checkpoint is None and config.sft.epochs > 0:
        totals.sft_runtime_s, totals.sft_flops = _warm_up(config, model, tokenizer, task, accelerator)
    policy, task = accelerator.unwrap_model(model), training_set(config, task)
    prepare_for_reft(policy, config)
    optimizer, scheduler = make_optimizer(policy, config.grpo, config.rft_steps * config.grpo.num_iterations)
    skip_policy = SkipPolicy.from_config(config.nesting, num_decoder_layers(policy))
    state = TrainingState(model, optimizer, scheduler, accelerator,
                          reference_model(config, policy, accelerator, resumed=checkpoint is not None),
                          InfluenceMeter(policy) if skip_policy.measures_influence else None, fsdp2,
                          BridgeTraining.of(policy, config.nesting))
    start_step, selection = 0, RolloutSelection(config, tokenizer.pad_token_id)
    if checkpoint is not None:
        saved = load_checkpoint(checkpoint, policy, optimizer, scheduler)
        start_step, totals = _saved_progress(saved, checkpoint)
        if "skip_policy" in saved:  # checkpoints before adaptive policies hold none (their policy was uniform)
            skip_policy.load_state_dict(saved["skip_policy"])
        if selection.active:
            selection.load_state_dict(saved["rollout_selection"])
        if state.bridging is not None:
            state.bridging.load_state_dict(load_run_tensors(checkpoint))
    elif state.bridging is not None:  # past the paper: the first bridges, from a calibration pass
        calibration = calibration_problems(task.problems, config, accelerator)
        totals.add_fit(state.bridging.calibrate(policy, tokenizer, calibration, config.micro_batch_size, accelerator))
    if accelerator.is_main_process:
        keep_metrics_up_to(output / METRICS_FILE, start_step)
    state.optimizer = accelerator.prepare_optimizer(optimizer)
    if config.report_to:
        accelerator.init_trackers("nested-reft", config=_tracker_hyperparameters(config))
    if checkpoint is not None:  # last, so that nothing above (loading, copying) moves the restored states
        restore_rng_states(checkpoint, accelerator.process_index)
    reft(config, task, state, tokenizer, skip_policy, start_step, totals, selection, callbacks)
    summary = summarize(read_metrics(output / METRICS_FILE), totals, config)
    weights = gathered_weights(policy)  # FSDP2: every rank takes part in gathering onto the main process
    if accelerator.is_main_process:
        if has_adapters(policy):  # the adapters as PEFT saves them, then merged into the base: model/ loads plainly
            save_model(output / ADAPTER_DIR, policy, tokenizer)
            policy = merge(policy)
        save_model(output / FINAL_MODEL_DIR, policy, tokenizer, weights)
        atomic_write_json(output / SUMMARY_FILE, summary)
    # Every rank returns once the final model exists, and the ranks destroy the process group together:
    # a rank that destroys it while another still writes can hang the launch (pytorch/pytorch#75097).
    accelerator.wait_for_everyone()
    return summary


def _saved_progress(saved: dict, checkpoint: Path) -> tuple[int, RunTotals]:
    """The step and the run's totals a checkpoint's trainer_state.json holds; a CheckpointError naming the file where
    it holds no integer step >= 0, or totals that are not RunTotals' names with numbers."""
    step, totals = saved.get("step"), saved.get("totals")
    names = {spec.name for spec in fields(RunTotals)}
    problems = [] if isinstance(step, int) and not isinstance(step, bool) and step >= 0 else [
        f"step must be an integer >= 0, got {step!r}"]
    if not (isinstance(totals, dict) and set(totals) <= names and all(
            isinstance(value, (int, float)) and not isinstance(value, bool) for value in totals.values())):
        problems.append(f"totals must map names of {', '.join(sorted(names))} to numbers, got {totals!r:.100}")
    if not isinstance(saved.get("skip_policy", {}), dict):
        problems.append(f"skip_policy must be a mapping, got {saved['skip_policy']!r:.100}")
    if problems:
        raise CheckpointError(f"{checkpoint / TRAINER_STATE} is not a trainer state ({'; '.join(problems)}): restore "
                              "the checkpoint, or start a new --output-dir")
    return step, RunTotals(**totals)


def reft(
    config: TrainConfig, task: Task, state: TrainingState, tokenizer, skip_policy: SkipPolicy, start_step: int,
    totals: RunTotals, selection: RolloutSelection, callbacks: Sequence[StepCallback] = (),
) -> None:
    """Algorithm 1, step 2: for s = 1..S, sample a nested model, roll out, score, update."""
    accelerator = state.accelerator
    shapes = ModelShapes.of(state.policy)
    with _progress(accelerator, config.rft_steps, start_step) as advance:
        for step in range(start_step + 1, config.rft_steps + 1):
            started_at = time.perf_counter()
            skip_set = skip_policy.draw(step_generator(config.seed, step, "skip"))  # [N1] line 9: f_{x,b}(eta_s)
            generate, score = _roll_out(config, task, state, tokenizer, skip_set, step)
            with accelerator.autocast(), state.gathered_for_generation(skip_set) as gathered_bytes:
                # line 7, the prompts; lines 8, 10-12 in `generate` and `score`; past the paper, groups that cannot
                # teach are filtered out after sampling (DAPO) and predictable prompts skipped before it (GRESO)
                batch = selection.batch(task.problems, step, accelerator, generate, score)
            all_rewards, advantages = _advantages(batch.rewards, config, accelerator)
            scored_at = time.perf_counter()
            learning_rate = state.scheduler.get_last_lr()[0]  # the rate this step's update uses (logged as such)
            update = (policy_update(state, batch.rollouts, advantages, config) if batch.trains  # lines 13-14, [N3-4]
                      else no_update(state, batch.rollouts, config))
            bridge_fit = state.bridging.end_of(step, accelerator) if state.bridging else None  # past the paper
            times = StepTimes(started_at, scored_at - batch.scoring_time_s, scored_at, time.perf_counter())
            influence = state.influence.take(accelerator) if state.influence else None
            result = StepResult(step, batch.rollouts, all_rewards, update, learning_rate, times, influence,
                                gathered_bytes, bridge_fit, batch.selection)
            metrics = step_metrics(result, config, accelerator, shapes)
            skip_policy.observe(skip_set, influence, metrics.kl_behavior_target)  # past the paper: adaptive policies
            totals.add(metrics)
            _log(metrics, config, accelerator)
            advance(metrics)
            if not update.finite and 0 < config.max_nonfinite_steps <= totals.nonfinite_updates:
                raise FloatingPointError(
                    f"{totals.nonfinite_updates} updates had a non-finite loss or gradient "
                    f"(max_nonfinite_steps={config.max_nonfinite_steps}); last at step {step}"
                )
            for callback in callbacks:
                with accelerator.autocast(), _random_states_kept(accelerator.device):
                    callback(step, state.policy, tokenizer)
            if step % config.save_steps == 0 or step == config.rft_steps:
                saved = {"step": step, "totals": asdict(totals), "skip_policy": skip_policy.state_dict()}
                if selection.active:  # past the paper: the data order's cursor and the prompts' history
                    saved["rollout_selection"] = selection.state_dict()
                _checkpoint(config, state, tokenizer, step, saved)


def _roll_out(config: TrainConfig, task: Task, state: TrainingState, tokenizer, skip_set, step: int):
    """(generate, score) of step `step`: G completions per prompt from the step's nested model, and their rewards.
    Round r > 0 of a selecting step (`rollout_selection`) samples with a generator of its own."""
    accelerator, G = state.accelerator, config.grpo.num_generations

    def generate(problems, round_index: int):
        purpose = f"sample-{accelerator.process_index}" + (f"-round{round_index}" if round_index else "")
        return generate_rollouts(  # [N2] lines 8, 10, 11: eta'_s = pi_{theta_{s-1}} without S_s
            state.policy, tokenizer, task.prompts(tokenizer, problems), G, config.sampling, skip_set,
            step_generator(config.seed, step, purpose, accelerator.device),
            bridges=state.bridges,  # past the paper: each skipped block's bridge runs in its place
        )

    def score(problems, rollouts) -> torch.Tensor:
        completions = tokenizer.batch_decode(rollouts.completion_ids, skip_special_tokens=True)
        golds = [problem.answer for problem in problems for _ in range(G)]
        return torch.tensor(task.score(completions, golds), dtype=torch.float32)  # line 12

    return generate, score


def _accelerator(config: TrainConfig) -> Accelerator:
    """The run's Accelerator, its mixed precision set by `config.dtype` (the one place that decides it)."""
    trackers = [tracker.value for tracker in LoggerType]
    unknown = [name for name in config.report_to if name not in trackers]
    if unknown:  # accelerate's own refusal reads like one of the precision below
        raise ConfigError(f"report_to must name trackers among {', '.join(trackers)}; got {', '.join(unknown)}")
    try:
        return Accelerator(
            mixed_precision=MIXED_PRECISION[config.dtype], log_with=list(config.report_to) or None,
            project_dir=config.output_dir,
        )
    except ValueError as error:  # accelerate's state is per process: its first precision stays
        raise ConfigError(f"dtype={config.dtype!r} cannot be used in this process: {error}") from error


def _warm_up(config: TrainConfig, model, tokenizer, task: Task, accelerator) -> tuple[float, float]:
    """Algorithm 1, step 1: the SFT warm-up, its steps logged to sft_metrics.jsonl; returns its runtime and its
    training FLOPs (what a nested-aware warm-up pays for its closeness: sft.layer_drop, sft.distill_nested).

    With beta > 0 the warmed-up model is also saved to OUTPUT/sft-model: it is the reference model,
    which a resumed run (that skips SFT) reloads from there.
    """
    output = Path(config.output_dir)
    if accelerator.is_main_process:
        atomic_write_text(output / SFT_METRICS_FILE, "")

    def log(step) -> None:
        if accelerator.is_main_process:
            append_jsonl(output / SFT_METRICS_FILE, asdict(step))

    start = time.perf_counter()
    steps = sft_warmup(model, tokenizer, task.problems, config.sft, config.micro_batch_size, config.seed, accelerator,
                       log, config.nesting)
    elapsed = time.perf_counter() - start
    if config.grpo.beta > 0 and accelerator.is_main_process:
        save_model(output / SFT_MODEL_DIR, accelerator.unwrap_model(model), tokenizer)
    accelerator.wait_for_everyone()
    return elapsed, sum(step.flops for step in steps)


def prepare_for_reft(policy, config: TrainConfig) -> None:
    """How ReFT trains the policy, after the warm-up: dropout off (`grpo.disable_dropout`, as TRL) and activations
    recomputed in the backward pass (`gradient_checkpointing`)."""
    if config.grpo.disable_dropout:
        disable_dropout(policy)
    if config.gradient_checkpointing:
        policy.activation_checkpointing_enable({"use_reentrant": False})  # TRL's setting for transformers >= 5


def disable_dropout(model) -> None:
    """Dropout off everywhere, as TRL's `disable_dropout` (nn.Dropout p = 0), and also in modules that keep
    their probability as a float attribute (Llama/OPT attention_dropout, OPT dropout and layerdrop)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for name, value in list(vars(module).items()):
            if ("dropout" in name or name == "layerdrop") and isinstance(value, float):
                setattr(module, name, 0.0)


def reference_model(config: TrainConfig, model, accelerator, resumed: bool):
    """The frozen pi_ref of the KL penalty, or None when beta = 0 (then no reference is loaded at all).

    A fresh run copies the model it starts ReFT from; a resumed one reloads it: OUTPUT/sft-model after
    an SFT warm-up, else `config.model`.
    """
    if config.grpo.beta == 0:
        return None
    if not resumed:
        reference = copy.deepcopy(model)
    else:
        source = Path(config.output_dir) / SFT_MODEL_DIR if config.sft.epochs > 0 else config.model
        if config.sft.epochs > 0:
            verify_checkpoint(source)  # a missing or damaged sft-model is a CheckpointError, not another reference
        reference, _ = load_model(str(source), dtype=torch.float32, device=accelerator.device)
    reference.eval()  # no dropout in the reference, whatever grpo.disable_dropout says
    reference.requires_grad_(False)
    return reference


def _advantages(rewards: torch.Tensor, config: TrainConfig, accelerator) -> tuple[torch.Tensor, torch.Tensor]:
    """(all ranks' rewards, this rank's advantages), normalised over the whole batch as TRL does.

    Groups never straddle ranks, so "group" scaling is the same either way; "batch" needs the global std. A batch
    without a group (rollout selection at its round limit, on every rank alike) has none.
    """
    if not rewards.numel():
        return rewards, rewards
    all_rewards = accelerator.gather(rewards.to(accelerator.device)).cpu()  # rank-major = prompt-major
    advantages = group_advantages(all_rewards, config.grpo.num_generations, config.grpo.scale_rewards)
    rows = rewards.shape[0]
    return all_rewards, advantages[accelerator.process_index * rows : (accelerator.process_index + 1) * rows]


def _log(metrics: StepMetrics, config: TrainConfig, accelerator) -> None:
    if accelerator.is_main_process:
        append_jsonl(Path(config.output_dir) / METRICS_FILE, metrics_record(metrics))
    if config.report_to:
        scalars = {k: v for k, v in asdict(metrics).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        accelerator.log(scalars, step=metrics.step)


def _checkpoint(config: TrainConfig, state: TrainingState, tokenizer, step: int, saved: dict) -> None:
    """Save the newest checkpoint (main process): `saved` (the step, totals and skip policy's measurements) and
    every rank's global RNG states."""
    accelerator = state.accelerator
    rng_states = {}
    for states in gather_object([rng_states_of_rank(accelerator.process_index)]):
        rng_states.update(states)
    gathered = gathered_state(state.policy, state.optimizer)  # FSDP2: every rank takes part
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        output = Path(config.output_dir)
        save_checkpoint(checkpoint_path(output, step), state.policy, tokenizer, state.optimizer, state.scheduler,
                        saved, rng_states, gathered, state.bridging.state_dict() if state.bridging else None)
        remove_old_checkpoints(output, config.save_total_limit)
    accelerator.wait_for_everyone()


def _tracker_hyperparameters(config: TrainConfig) -> dict:
    """The config as tracker hyperparameters: dotted names, non-scalar values as strings."""
    return {key: value if isinstance(value, (int, float, str, bool)) else str(value)
            for key, value in flat_options(to_dict(config)).items()}


def _random_states_kept(device: torch.device) -> contextlib.AbstractContextManager:
    """The global torch random states (CPU, and the run's GPU) as they were, once the block is left."""
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])


@contextlib.contextmanager
def _progress(accelerator, total: int, done: int) -> Iterator:
    """A live progress bar (main process only) showing reward and generation tokens/s."""
    if not accelerator.is_main_process or total == 0:
        yield lambda metrics: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("ReFT"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
               TextColumn("{task.fields[status]}"))
    with Progress(*columns, transient=False) as progress:
        bar = progress.add_task("reft", total=total, completed=done, status="")

        def advance(metrics: StepMetrics) -> None:
            status = f"reward {metrics.reward_mean:.3f}  gen {metrics.gen_tokens_per_s:.0f} tok/s  skip {metrics.skip_set}"
            progress.update(bar, advance=1, status=status)

        yield advance
