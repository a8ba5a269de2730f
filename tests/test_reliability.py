"""Issue 25: nothing lost, nothing mixed, one line per mistake. One test (or a few) per finding of the second
bad-input probe, each named after its finding (f01 ... f21); tiny random models, a few steps at most."""

from __future__ import annotations

import pytest

from nested_reft.cli import main
from nested_reft.config import ConfigError, load_config


def error_line(capsys) -> str:
    """The one line a refused command prints; asserting it is one line asserts there is no traceback."""
    err = capsys.readouterr().err.strip()
    assert err.startswith("nested-reft: error: ") and "\n" not in err, err
    return err


# A run that takes seconds even where a refusal it tests is missing.
TINY_RUN = ["--model", "tiny-llama", "--dataset", "arithmetic", "--rft-steps", "1", "--batch-size", "2",
            "--num-generations", "2", "--max-completion-length", "4", "--sft-epochs", "0"]


def write(tmp_path, text: str, name: str = "config.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


# ----------------------------------------------------------------------------------------------------------
# Options: one validation pass over every option (ranges, finiteness, types, combinations)
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [-3, 0])
def test_f07_a_negative_or_zero_sft_max_examples_is_refused(value):
    with pytest.raises(ConfigError, match=r"sft\.max_examples must be >= 1"):
        load_config(None, {"sft.max_examples": value})


@pytest.mark.parametrize("text, option", [
    ("output_dir: [a, b]\n", "output_dir"),
    ("model: {name: x}\n", "model"),
    ("dataset: [arithmetic]\n", "dataset"),
    ("report_to: [1, 2]\n", "report_to"),
    ("lora:\n  target_modules: [1, 2]\n", "lora.target_modules"),
    ("seed: [1]\n", "seed"),
])
def test_f09_a_value_of_the_wrong_type_is_refused_naming_the_option(tmp_path, text, option):
    with pytest.raises(ConfigError, match=rf"^{option.replace('.', '[.]')} (must be|is a single value)"):
        load_config(write(tmp_path, text))


@pytest.mark.parametrize("overrides, option", [
    ({"sampling.temperature": "inf"}, "sampling.temperature"),
    ({"grpo.learning_rate": "inf"}, "grpo.learning_rate"),
    ({"grpo.learning_rate": float("nan")}, "grpo.learning_rate"),
    ({"grpo.max_grad_norm": "inf"}, "grpo.max_grad_norm"),
    ({"nesting.kl_target": "inf"}, "nesting.kl_target"),
])
def test_f10_non_finite_values_are_refused_at_start_up(overrides, option):
    with pytest.raises(ConfigError, match=rf"^{option.replace('.', '[.]')} must be a finite"):
        load_config(None, overrides)


def test_f10_cli_temperature_inf_exits_2_writing_nothing(tmp_path, capsys):
    assert main(["train", *TINY_RUN, "--temperature", "inf", "--output-dir", str(tmp_path / "o")]) == 2
    assert "sampling.temperature" in error_line(capsys)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("text, named", [
    ("grpo: []\n", "grpo must be a mapping of options, got list"),
    ("nesting: false\n", "nesting must be a mapping of options, got bool"),
    ("seed: 1\nseed: 2\n", "duplicate key 'seed'"),
    ("grpo:\n  beta: 0.1\n  beta: 0.2\n", "duplicate key 'beta'"),
])
def test_f12_sections_that_are_not_mappings_and_duplicate_keys_are_refused(tmp_path, text, named):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=named):
        load_config(path)


def test_f12_duplicate_keys_name_the_file_and_line(tmp_path):
    path = write(tmp_path, "rft_steps: 3\nseed: 1\nseed: 2\n")
    with pytest.raises(ConfigError, match=rf"{path}, line 3: duplicate key 'seed'"):
        load_config(path)


def test_f12_a_warm_up_of_zero_examples_is_refused(tmp_path, capsys):
    argv = ["train", *TINY_RUN, "--sft-epochs", "1", "--sft-max-examples", "0", "--output-dir", str(tmp_path / "o")]
    assert main(argv) == 2
    assert "sft.max_examples must be >= 1" in error_line(capsys)


@pytest.mark.parametrize("overrides, option", [
    ({"seed": -1}, "seed"),
    ({"seed": 2**32}, "seed"),
    ({"grpo.adam_beta1": 5}, "grpo.adam_beta1"),
    ({"grpo.adam_beta2": 1}, "grpo.adam_beta2"),
    ({"grpo.weight_decay": -1}, "grpo.weight_decay"),
    ({"grpo.adam_epsilon": -1}, "grpo.adam_epsilon"),
    ({"nesting.influence_temperature": 1e-300}, "nesting.influence_temperature"),
    ({"output_dir": None}, "output_dir"),
    ({"model": None}, "model"),
])
def test_f13_out_of_range_options_are_refused_before_anything_is_written(overrides, option):
    with pytest.raises(ConfigError, match=rf"^{option.replace('.', '[.]')} must be"):
        load_config(None, overrides)


def test_f13_unknown_keys_of_mixed_types_are_named_not_a_type_error(tmp_path):
    with pytest.raises(ConfigError, match="unknown option"):
        load_config(write(tmp_path, "1: 2\nfoo: 3\n"))
