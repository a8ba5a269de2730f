"""Typed configuration: the options of a run, an evaluation and the commands, each default in one place with its source.

The name tables (`names`) let it check names without importing the modules that implement them.

May import: store.
"""

from nested_reft.config.checks import ConfigError, check_option, check_path_component, check_types, from_dict, to_dict
from nested_reft.config.commands import DemoSettings, ProbeSettings
from nested_reft.config.evaluation import EvalConfig, EvalSettings, eval_config, listed_benchmarks
from nested_reft.config.names import (
    BENCHMARKS, BRIDGES, DEFAULT_BENCHMARKS, DTYPES, ENGINES, EVALUATION_SETS, FILTER_METRICS, LAYER_CHOICES, LEVELS,
    LOSS_TYPES, MITIGATIONS, NAMED_OPTIONS, SCALINGS, SCHEDULERS, SKIP_POLICIES, TRAINING_SETS,
)
from nested_reft.config.options import (
    RESUMABLE_OPTIONS, GRPOConfig, ImportanceConfig, LoRAConfig, NestingConfig, SamplingConfig, SFTConfig, TrainConfig,
)
from nested_reft.config.yaml_io import config_differences, flat_options, load_config, read_yaml_mapping, save_config

__all__ = [
    "BENCHMARKS", "BRIDGES", "DEFAULT_BENCHMARKS", "DTYPES", "ENGINES", "EVALUATION_SETS", "FILTER_METRICS",
    "LAYER_CHOICES", "LEVELS", "LOSS_TYPES", "MITIGATIONS", "NAMED_OPTIONS", "RESUMABLE_OPTIONS", "SCALINGS",
    "SCHEDULERS", "SKIP_POLICIES", "TRAINING_SETS",
    "ConfigError", "DemoSettings", "EvalConfig", "EvalSettings", "GRPOConfig", "ImportanceConfig", "LoRAConfig",
    "NestingConfig", "ProbeSettings", "SFTConfig", "SamplingConfig", "TrainConfig", "check_option", "check_types",
    "check_path_component", "config_differences", "eval_config", "flat_options", "from_dict", "listed_benchmarks", "load_config",
    "read_yaml_mapping", "save_config", "to_dict",
]
