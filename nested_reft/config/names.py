"""The names options take: one table per option, declared here so that config imports none of the modules it configures.

Each module an option configures keeps its own table mapping the same names to what they do, and imports config's
types; tests/test_config.py holds the two tables of every name to each other.
"""

from __future__ import annotations

ENGINES = ("eager", "compiled", "vllm")  # nested_reft.engines.choice.ENGINE_FACTORIES: the decoding engines
SKIP_POLICIES = ("uniform", "influence", "kl_target")  # nested_reft.nesting.skip_policy
LAYER_CHOICES = ("uniform", "influence")  # how the kl_target policy draws its layers
BRIDGES = ("none", "linear")  # what stands in for a skipped block: nested_reft.nesting.bridges.BRIDGE_FITS
MITIGATIONS = ("base", "practical", "retrace")  # nested_reft.algorithm.importance.MITIGATION_TABLE
LEVELS = ("token", "sequence")  # importance weights per token or per completion
LOSS_TYPES = ("dapo", "bnpo", "grpo", "dr_grpo")  # nested_reft.algorithm.grpo.LOSS_AGGREGATIONS
SCALINGS = ("group", "batch", "none")  # nested_reft.algorithm.grpo.REWARD_SCALINGS
SCHEDULERS = ("constant", "linear", "cosine")  # nested_reft.training.optim.SHAPES
DTYPES = ("float32", "bfloat16", "float16")  # nested_reft.training.trainer.MIXED_PRECISION
# what grpo.filter_groups reads the spread of: nested_reft.training.rollout_selection.FILTER_METRICS
FILTER_METRICS = ("reward", "correct")

# The data sets (nested_reft.tasks.data.REGISTRY loads each): training sets have a train split, benchmarks a test one
TRAINING_SETS = ("svamp", "gsm8k", "math12k", "arithmetic")
BENCHMARKS = ("aime24", "amc", "math500", "minerva", "olympiadbench", "gsm8k", "svamp")
# What evaluation accepts: the benchmarks, plus the generated arithmetic test set (the demo's task).
EVALUATION_SETS = BENCHMARKS + ("arithmetic",)
DEFAULT_BENCHMARKS = ("aime24", "amc", "math500", "minerva", "olympiadbench")  # paper: the 5 of Liu et al. 2025

# The run's options whose value is a name of one of the tables above (the CLI lists them in --help).
NAMED_OPTIONS: dict[str, tuple[str, ...]] = {
    "dataset": TRAINING_SETS,
    "dtype": DTYPES,
    "nesting.skip_policy": SKIP_POLICIES,
    "nesting.kl_target_layers": LAYER_CHOICES,
    "nesting.bridge": BRIDGES,
    "importance.mitigation": MITIGATIONS,
    "importance.level": LEVELS,
    "sampling.engine": ENGINES,
    "grpo.loss_type": LOSS_TYPES,
    "grpo.scale_rewards": SCALINGS,
    "grpo.filter_metric": FILTER_METRICS,
    "grpo.lr_scheduler": SCHEDULERS,
    "sft.lr_scheduler": SCHEDULERS,
}
