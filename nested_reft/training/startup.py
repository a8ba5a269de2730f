"""Start-up checks: what can be known before a run writes anything is refused then, naming the option.

The trainer calls them in order: the launch (`check_world`), the model against the options
(`check_model`), the training set against the options and the tokenizer (`check_task`). Each raises
`ConfigError` or `DataError` with one line; none writes.
"""

from __future__ import annotations

import dataclasses
import os

from nested_reft.config import ConfigError, TrainConfig
from nested_reft.engines.vllm_engine import check_vllm_runs, check_vllm_supports, engine_positions
from nested_reft.nesting.layers import num_decoder_layers, skip_count_problem
from nested_reft.tasks.data import DataError
from nested_reft.tasks.task import Task
from nested_reft.training.sft import sft_examples


def check_world(accelerator) -> None:
    """Refuse a multi-process launch that `accelerate` does not see (each rank would run, and write, alone)."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and accelerator.num_processes != launched:
        raise ConfigError(
            f"{launched} processes were launched (WORLD_SIZE) but accelerate runs {accelerator.num_processes}: "
            "on CPU launch with `accelerate launch --cpu` or set ACCELERATE_USE_CPU=1"
        )


def check_model(config: TrainConfig, model, world: int) -> None:
    """The loaded model against the options and the launch: its layers (`check_fits_model`) and, for the vllm
    engine, what vLLM can serve."""
    check_fits_model(config, num_decoder_layers(model), world)
    if config.sampling.engine == "vllm":
        check_vllm_supports(model, world, config.sampling.merge_adapters)
        check_vllm_runs(model)


def check_lora_fits(config: TrainConfig, model) -> None:
    """Refuse LoRA adapters wider than the model, before they are added: a rank above the hidden size adds
    parameters (and gigabytes of checkpoints) and no capacity, the update of a layer being of rank <= its width."""
    width = getattr(model.config.get_text_config(), "hidden_size", None)
    if config.lora.r and width and config.lora.r > width:
        raise ConfigError(f"lora.r={config.lora.r} is wider than the model (hidden size {width}): a rank above it adds "
                          f"parameters and no capacity; use lora.r <= {width}")


def check_fits_model(config: TrainConfig, num_layers: int, world: int) -> None:
    """Start-up checks that need the model or the launch: refused before SFT, not after an hour of it.

    The border is checked whatever the skip ratio (a border the model does not have is a typo even at
    x = 0). The micro-batch size need not divide a rank's completions: the update weights each chunk.
    """
    if config.batch_size % world:
        raise ConfigError(f"batch_size={config.batch_size} must be divisible by the number of processes ({world})")
    if (config.grpo.generation_batch_size or 0) % world:
        raise ConfigError(f"grpo.generation_batch_size={config.grpo.generation_batch_size} must be divisible by the "
                          f"number of processes ({world}): each rank samples its share of a generation round")
    if 2 * config.nesting.border > num_layers:
        raise ConfigError(
            f"nesting.border={config.nesting.border} protects the first and last {config.nesting.border} layers, "
            f"but the model has {num_layers}: the border must be at most {num_layers // 2}"
        )
    for option, ratio in _skip_ratios(config):
        problem = skip_count_problem(num_layers, config.nesting.border, ratio)
        if problem:
            raise ConfigError(f"{option}={ratio} {problem}: lower one of them")
    if config.sft.epochs and config.sft.layer_drop and world > 1:
        raise ConfigError(
            f"sft.layer_drop={config.sft.layer_drop} with {world} processes: the layers a micro-batch skips get no "
            "gradient, which DDP waits for; warm up in one process, or use sft.distill_nested (its full forward "
            "reaches every layer)"
        )


def _skip_ratios(config: TrainConfig) -> list[tuple[str, float]]:
    """Each skip ratio the run draws at, named by its option: ReFT's and, when it warms up, the warm-up's."""
    ratios = [("nesting.skip_ratio", config.nesting.skip_ratio)]
    if config.sft.epochs and config.sft.layer_drop:
        ratios.append(("sft.layer_drop", config.sft.layer_drop))
    if config.sft.epochs and config.sft.distill_nested:
        ratios.append(("sft.distill_ratio", config.sft.nested_ratio(config.nesting.skip_ratio)))
    return ratios


def training_set(config: TrainConfig, task: Task) -> Task:
    """ReFT's problems: `task`, or its first `train_problems` problems (refused when it has fewer); the warm-up reads
    all of `task` (as many as sft.max_examples)."""
    if config.train_problems is None:
        return task
    if len(task.problems) < config.train_problems:
        raise DataError(f"train_problems={config.train_problems}, but training set {task.name!r} has "
                        f"{len(task.problems)} problems")
    return dataclasses.replace(task, problems=task.problems[: config.train_problems])


def check_task(config: TrainConfig, task: Task, tokenizer, model, fresh: bool) -> None:
    """The training set: not empty, something to imitate when a fresh run warms up, and ReFT's prompts (its pool,
    `training_set`, refused where the set is smaller) that fit the model's position table, or what the vllm engine
    takes, with `sampling.max_new_tokens` completion tokens (never truncated)."""
    if not task.problems:
        raise DataError(f"training set {task.name!r} has 0 problems: nothing to train on")
    if fresh and config.sft.epochs > 0 and not sft_examples(task.problems):
        raise DataError(f"sft.epochs={config.sft.epochs}, but no problem of training set {task.name!r} has a "
                        "solution to imitate: the warm-up would train nothing; set sft.epochs=0")
    positions, limit = engine_positions(model, config.sampling)
    training_set(config, task).check_fits(tokenizer, positions, config.sampling.max_new_tokens,
                                          "sampling.max_new_tokens", limit)
