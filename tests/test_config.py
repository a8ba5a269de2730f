"""Configuration: defaults against their sources, YAML and dotted overrides, validation, saving."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from nested_reft.config import (
    NAMED_OPTIONS,
    ConfigError,
    GRPOConfig,
    ImportanceConfig,
    NestingConfig,
    SFTConfig,
    TrainConfig,
    config_differences,
    flat_options,
    load_config,
    save_config,
    to_dict,
)
from nested_reft.engines.rollout import SamplingConfig

REPO = Path(__file__).resolve().parents[1]


def field_defaults(cls) -> dict:
    return {
        f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
        for f in dataclasses.fields(cls)
        if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
    }


# --- defaults ------------------------------------------------------------------------------------------


def test_paper_defaults():
    """Appendix F of the paper: E_sft = 2, S = 99, batch 16, G = 8, 256 tokens (min = max), beta = 0, b = 1."""
    config = TrainConfig()
    assert config.sft.epochs == 2
    assert config.rft_steps == 99
    assert config.batch_size == 16
    assert config.grpo.num_generations == 8
    assert config.sampling.max_new_tokens == 256 and config.sampling.min_new_tokens == 256
    assert config.grpo.beta == 0.0
    assert config.nesting.border == 1
    assert config.importance.mitigation in ("base", "practical", "retrace")


# Our field -> TRL GRPOConfig field, where the meaning is the same.
TRL_GRPO_FIELDS = {
    ("grpo", "learning_rate"): "learning_rate",
    ("grpo", "epsilon"): "epsilon",
    ("grpo", "num_iterations"): "num_iterations",
    ("grpo", "loss_type"): "loss_type",
    ("grpo", "scale_rewards"): "scale_rewards",
    ("grpo", "num_generations"): "num_generations",
    ("grpo", "beta"): "beta",
    ("grpo", "max_grad_norm"): "max_grad_norm",
    ("grpo", "weight_decay"): "weight_decay",
    ("grpo", "adam_beta1"): "adam_beta1",
    ("grpo", "adam_beta2"): "adam_beta2",
    ("grpo", "adam_epsilon"): "adam_epsilon",
    ("grpo", "lr_scheduler"): "lr_scheduler_type",
    ("sampling", "temperature"): "temperature",
    ("sampling", "top_p"): "top_p",
    ("sampling", "top_k"): "top_k",
    ("importance", "level"): "importance_sampling_level",
}


def test_defaults_match_trl_grpo_config():
    trl = pytest.importorskip("trl")
    assert trl.__version__.startswith("1.16"), f"defaults were taken from TRL 1.16, installed {trl.__version__}"
    theirs = field_defaults(trl.GRPOConfig)
    config = TrainConfig()
    for (section, name), trl_name in TRL_GRPO_FIELDS.items():
        ours = getattr(getattr(config, section), name)
        expected = theirs[trl_name]
        expected = getattr(expected, "value", expected)  # enums such as SchedulerType
        assert ours == expected, f"{section}.{name}={ours!r} but trl.GRPOConfig.{trl_name}={expected!r}"
    # TRL's epsilon_high=None means "the same as epsilon"; so does ours
    assert theirs["epsilon_high"] is None and config.grpo.epsilon_high is None
    assert config.grpo.clip_high == config.grpo.epsilon
    # a deliberate difference, documented in GRPOConfig: dropout off, so that h = 1 at x = 0
    assert theirs["disable_dropout"] is False and config.grpo.disable_dropout is True


def test_documented_trl_values():
    """The values the brief names, independently of TRL being importable."""
    grpo, sampling = GRPOConfig(), SamplingConfig()
    assert grpo.learning_rate == 1e-6 and grpo.epsilon == 0.2
    assert grpo.loss_type == "dapo" and grpo.scale_rewards == "group"
    assert sampling.temperature == 1.0


def test_sft_defaults_match_trl_sft_config():
    trl = pytest.importorskip("trl")
    theirs = field_defaults(trl.SFTConfig)
    assert SFTConfig().learning_rate == theirs["learning_rate"]
    assert SFTConfig().max_length == theirs["max_length"]
    assert SFTConfig().max_grad_norm == theirs["max_grad_norm"]
    assert SFTConfig().weight_decay == theirs["weight_decay"]
    assert SFTConfig().lr_scheduler == getattr(theirs["lr_scheduler_type"], "value", theirs["lr_scheduler_type"])
    assert theirs["warmup_steps"] == 0  # our SFT schedule has no warm-up


def test_epsilon_high_follows_epsilon_unless_set():
    assert GRPOConfig(num_iterations=2, epsilon=0.1).clip_high == 0.1
    assert GRPOConfig(num_iterations=2, epsilon=0.1, epsilon_high=0.28).clip_high == 0.28
    assert load_config(None, {"grpo.epsilon_high": "none"}).grpo.epsilon_high is None
    assert load_config(None, {"grpo.epsilon_high": "0.28", "grpo.num_iterations": 2}).grpo.clip_high == 0.28


@pytest.mark.parametrize("option", ["grpo.epsilon", "grpo.epsilon_high"])
def test_a_clip_setting_that_cannot_act_is_refused_naming_both_options(option):
    """With one update per batch the ratio pi_theta / pi_old is 1: a changed clip would silently do nothing."""
    with pytest.raises(ConfigError, match=rf"{option} must be left at its default while grpo.num_iterations = 1"):
        load_config(None, {option: 0.3})
    assert getattr(load_config(None, {option: 0.3, "grpo.num_iterations": 2}).grpo, option[5:]) == 0.3


def test_masking_cut_completions_at_a_fixed_length_is_refused_naming_the_options():
    """min = max bans EOS to the last token: every completion is cut, so masking them empties every loss."""
    with pytest.raises(ConfigError, match=r"^grpo\.mask_truncated_completions .*sampling\.min_new_tokens") as error:
        load_config(None, {"grpo.mask_truncated_completions": True})  # the defaults: min = max = 256
    assert "\n" not in str(error.value)
    assert load_config(None, {"grpo.mask_truncated_completions": True, "sampling.min_new_tokens": 255}).grpo
    assert load_config(REPO / "configs" / "paper.yaml").sampling.min_new_tokens == 256  # the paper does not mask


def test_config_differences_name_the_options_that_shape_a_run():
    saved = load_config(None, {"seed": 1})
    current = load_config(None, {"seed": 2, "nesting.skip_ratio": 0.1, "save_steps": 7, "report_to": "tensorboard",
                                 "max_nonfinite_steps": 0, "output_dir": "elsewhere", "data_dir": "data"})
    assert config_differences(saved, current) == ["nesting.skip_ratio: 0.0 -> 0.1", "seed: 1 -> 2"]
    assert config_differences(saved, saved) == []


# --- loading -------------------------------------------------------------------------------------------


def write(tmp_path, text: str):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def test_yaml_sections_and_top_level_keys_load(tmp_path):
    path = write(tmp_path, """
model: tiny-llama
rft_steps: 7
report_to: [tensorboard]
nesting:
  skip_ratio: 0.15
  border: 2
importance:
  mitigation: practical
grpo:
  learning_rate: 1e-5
  num_generations: 4
sampling:
  max_new_tokens: 32
  min_new_tokens: 0
sft:
  epochs: 0
  max_examples: 8
""")
    config = load_config(path)
    assert config.model == "tiny-llama" and config.rft_steps == 7 and config.report_to == ("tensorboard",)
    assert config.nesting == NestingConfig(skip_ratio=0.15, border=2)
    assert config.importance == ImportanceConfig(mitigation="practical")
    assert config.grpo.learning_rate == 1e-5 and isinstance(config.grpo.learning_rate, float)  # YAML reads 1e-5 as str
    assert config.grpo.num_generations == 4
    assert config.sampling == SamplingConfig(max_new_tokens=32, min_new_tokens=0)
    assert config.sft.epochs == 0 and config.sft.max_examples == 8
    # untouched options keep their defaults
    assert config.batch_size == TrainConfig().batch_size and config.grpo.epsilon == GRPOConfig().epsilon


def test_dotted_overrides_win_over_the_file(tmp_path):
    path = write(tmp_path, "nesting:\n  skip_ratio: 0.15\nseed: 3\n")
    config = load_config(path, {"nesting.skip_ratio": "0.1", "importance.mitigation": "base", "seed": "5",
                                "grpo.num_generations": 2, "sft.max_examples": "none"})
    assert config.nesting.skip_ratio == 0.1 and config.nesting.border == 1
    assert config.importance.mitigation == "base"
    assert config.seed == 5 and config.grpo.num_generations == 2 and config.sft.max_examples is None


def test_no_file_gives_defaults():
    assert load_config(None) == TrainConfig()
    assert load_config(None, {}) == TrainConfig()


@pytest.mark.parametrize(
    "source, key",
    [
        ({"nesting.skip_ratoi": 0.1}, "nesting.skip_ratoi"),
        ({"rft_stpes": 3}, "rft_stpes"),
        ({"grpo.lerning_rate": 1e-5}, "grpo.lerning_rate"),
        ({"optimizer.lr": 1e-5}, "optimizer"),
        ("nesting:\n  skip_ratoi: 0.1\n", "nesting.skip_ratoi"),
        ("lerning_rate: 0.1\n", "lerning_rate"),
    ],
)
def test_unknown_keys_are_rejected_naming_the_key(tmp_path, source, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        if isinstance(source, str):
            load_config(write(tmp_path, source))
        else:
            load_config(None, source)


@pytest.mark.parametrize(
    "overrides, option",
    [
        ({"nesting.skip_ratio": 1.2}, "nesting.skip_ratio"),
        ({"nesting.skip_ratio": -0.1}, "nesting.skip_ratio"),
        ({"importance.mitigation": "foo"}, "importance.mitigation"),
        ({"importance.retrace_lambda": 1.5}, "importance.retrace_lambda"),
        ({"importance.level": "word"}, "importance.level"),
        ({"nesting.border": -1}, "nesting.border"),
        ({"grpo.num_generations": 1}, "grpo.num_generations"),
        ({"grpo.learning_rate": 0}, "grpo.learning_rate"),
        ({"grpo.loss_type": "ppo"}, "grpo.loss_type"),
        ({"dataset": "imagenet"}, "dataset"),
        ({"rft_steps": -1}, "rft_steps"),
        ({"save_steps": 0}, "save_steps"),
        ({"save_total_limit": -1}, "save_total_limit"),
        ({"sft.epochs": -1}, "sft.epochs"),
        ({"rft_steps": "many"}, "rft_steps"),
        ({"rft_steps": 2.5}, "rft_steps"),  # not silently truncated to 2
        ({"sft.epochs": True}, "sft.epochs"),
        ({"grpo.learning_rate": "fast"}, "grpo.learning_rate"),
        ({"sampling.max_new_tokens": 0}, "sampling.max_new_tokens"),
        ({"sampling.min_new_tokens": 300, "sampling.max_new_tokens": 256}, "sampling.min_new_tokens"),
        ({"sampling.temperature": -1.0}, "sampling.temperature"),
        ({"grpo.epsilon_high": 0}, "grpo.epsilon_high"),
        ({"sft.lr_scheduler": "step"}, "sft.lr_scheduler"),
        ({"sft.max_grad_norm": 0}, "sft.max_grad_norm"),
        ({"sft.weight_decay": -0.1}, "sft.weight_decay"),
    ],
)
def test_invalid_values_are_rejected_naming_the_option(overrides, option):
    with pytest.raises(ConfigError, match=option.replace(".", r"\.")):
        load_config(None, overrides)


def test_invalid_values_are_rejected_when_built_directly():
    with pytest.raises(ConfigError, match="nesting.skip_ratio"):
        NestingConfig(skip_ratio=1.2)
    with pytest.raises(ConfigError, match="grpo.num_generations"):
        GRPOConfig(num_generations=1)


@pytest.mark.parametrize("text", ["[1, 2]\n", "nesting: [1\n"])
def test_malformed_files_are_refused(tmp_path, text):
    with pytest.raises(ConfigError, match="config file"):
        load_config(write(tmp_path, text))


def test_missing_file_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


# --- saving --------------------------------------------------------------------------------------------


def test_saved_config_round_trips(tmp_path):
    config = load_config(None, {
        "model": "tiny-qwen2", "output_dir": str(tmp_path / "run"), "seed": 11, "rft_steps": 5, "batch_size": 4,
        "report_to": "tensorboard,wandb", "nesting.skip_ratio": 0.15, "nesting.border": 0,
        "importance.mitigation": "base", "importance.retrace_lambda": 0.5, "importance.level": "sequence",
        "sampling.temperature": 0.7, "sampling.top_k": 40, "sampling.max_new_tokens": 64,
        "sampling.min_new_tokens": 16, "grpo.learning_rate": 3e-6, "grpo.num_iterations": 2, "grpo.epsilon_high": 0.28,
        "grpo.lr_scheduler": "cosine", "sft.epochs": 1, "sft.max_examples": 32,
    })
    assert config != TrainConfig()
    path = tmp_path / "saved" / "config.yaml"
    save_config(config, path)
    assert load_config(path) == config
    assert yaml.safe_load(path.read_text()) == to_dict(config)
    assert [p.name for p in path.parent.iterdir()] == ["config.yaml"]  # no temporary file left behind


def test_default_config_round_trips(tmp_path):
    save_config(TrainConfig(), tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == TrainConfig()


@pytest.mark.parametrize("overrides", [{"model.x": 1}, {"grpo.beta.y": "2"}])
def test_a_dotted_option_under_a_plain_option_is_refused(overrides):
    with pytest.raises(ConfigError, match=r"(model|grpo\.beta) is (a single value|an option), not a section"):
        load_config(None, overrides)


# --- the names options take ----------------------------------------------------------------------------

def test_config_imports_nothing_of_nested_reft_but_store():
    """The name tables live in config, so the modules an option configures (and the data loaders) may import config's
    types: config imports store only."""
    code = "import sys, nested_reft.config; print(' '.join(sorted(sys.modules)))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            cwd=REPO).stdout.split()
    assert "nested_reft.config" in loaded
    outside = [name for name in loaded if name.startswith("nested_reft.")
               and not name.startswith(("nested_reft.config", "nested_reft.store"))]
    assert outside == []


def test_every_name_an_option_takes_is_one_its_module_implements():
    from nested_reft import config
    from nested_reft.algorithm import grpo
    from nested_reft.algorithm import importance
    from nested_reft.engines import choice
    from nested_reft.nesting import bridges
    from nested_reft.nesting import skip_policy
    from nested_reft.tasks import data
    from nested_reft.training import optim, rollout_selection, trainer

    assert config.ENGINES == tuple(choice.ENGINE_FACTORIES)
    assert config.FILTER_METRICS == tuple(rollout_selection.FILTER_METRICS)
    assert config.BRIDGES == tuple(bridges.BRIDGE_FITS)
    assert config.MITIGATIONS == tuple(importance.MITIGATION_TABLE)
    assert config.LOSS_TYPES == tuple(grpo.LOSS_AGGREGATIONS)
    assert config.SCALINGS == tuple(grpo.REWARD_SCALINGS)
    assert config.SCHEDULERS == tuple(optim.SHAPES)
    assert config.LEVELS == tuple(importance.PER_COMPLETION)
    assert config.SKIP_POLICIES == tuple(skip_policy.POLICY_LAYERS)
    assert config.LAYER_CHOICES == tuple(skip_policy.DRAWS_BY_INFLUENCE)
    assert {layers for layers in skip_policy.POLICY_LAYERS.values() if layers} == set(config.LAYER_CHOICES)
    assert config.DTYPES == tuple(trainer.MIXED_PRECISION)
    splits = {split: {name for name, kind in data.REGISTRY if kind == split} for split in ("train", "test")}
    assert set(config.TRAINING_SETS) == splits["train"]
    assert set(config.EVALUATION_SETS) == splits["test"] - {"math12k"}  # math12k's test split is MATH500 again
    assert set(config.DEFAULT_BENCHMARKS) <= set(config.BENCHMARKS)


def test_every_option_that_takes_a_name_is_listed_with_its_names():
    """NAMED_OPTIONS (the CLI's --help lists it) holds every option refused for a name outside its table, with it."""
    options = flat_options(to_dict(TrainConfig()))
    refused = {}
    for option, value in options.items():
        if isinstance(value, str):
            try:
                load_config(None, {option: "no-such-name"})
            except ConfigError as error:
                refused[option] = str(error)
    assert set(refused) == set(NAMED_OPTIONS)
    for option, names in NAMED_OPTIONS.items():
        assert f"one of {names}" in refused[option]
