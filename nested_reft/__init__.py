"""nested-reft: reinforced fine-tuning of LLMs on math with rollouts from nested (layer-skipped) models.

The package is laid out by part, each a folder whose `__init__` says what it holds and what it may import,
imports running downward only: store < config < models, tasks < nesting < engines < algorithm < training <
evaluation < experiments < cli (the README's module map lists every module).

The public API is importable from here, loaded on first use so that `import nested_reft` stays cheap:
`train`, `evaluate`, `evaluate_model`, `load_model`, `nested`, `sample_skip_set`, `generate_rollouts`,
`load_config` and the configs (`TrainConfig`, `NestingConfig`, ...).
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_PUBLIC = {
    "train": "nested_reft.training.trainer",
    "evaluate": "nested_reft.evaluation.evaluate",
    "evaluate_model": "nested_reft.evaluation.evaluate",
    "load_model": "nested_reft.models.loading",
    "nested": "nested_reft.nesting.layers",
    "sample_skip_set": "nested_reft.nesting.layers",
    "num_skipped_layers": "nested_reft.nesting.layers",
    "generate_rollouts": "nested_reft.engines.rollout",
    "Rollouts": "nested_reft.engines.rollout",
    "Task": "nested_reft.tasks.task",
    "load_config": "nested_reft.config",
    "TrainConfig": "nested_reft.config",
    "NestingConfig": "nested_reft.config",
    "ImportanceConfig": "nested_reft.config",
    "SamplingConfig": "nested_reft.config",
    "GRPOConfig": "nested_reft.config",
    "SFTConfig": "nested_reft.config",
    "LoRAConfig": "nested_reft.config",
}
__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str):
    """The public name `name`, imported from its module on first use (PEP 562)."""
    if name not in _PUBLIC:
        raise AttributeError(f"module 'nested_reft' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))
