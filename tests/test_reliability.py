"""Issue 25: nothing lost, nothing mixed, one line per mistake. One test (or a few) per finding of the second
bad-input probe, each named after its finding (f01 ... f21); tiny random models, a few steps at most."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from nested_reft.experiments import demo
from nested_reft.experiments import sweep
from nested_reft.training import trainer
from nested_reft.training.checkpoint import CheckpointError
from nested_reft.tasks.arithmetic import generate_arithmetic
from nested_reft.cli import main
from nested_reft.config import ConfigError, load_config, save_config
from nested_reft.tasks.data import DATA_ENV, DataError, load_problems
from nested_reft.evaluation.records import EvalError, read_records
from nested_reft.evaluation.evaluate import EvalConfig, evaluate, evaluate_tasks
from nested_reft.experiments.grid import enumerate_instances, load_grid
from nested_reft.store.files import LOCK_FILE, LockHeldError, PathError, exclusive_lock
from nested_reft.models.loading import ModelLoadError, load_model, remove_abandoned_staging
from nested_reft.experiments.results import RESULTS_FILE, csv_text, read_results, results_columns
from nested_reft.tasks.problems import Problem
from nested_reft.training.rundir import (
    CONFIG_FILE, FINAL_MODEL_DIR, METRICS_FILE, SFT_METRICS_FILE, SUMMARY_FILE, RunState, read_metrics,
    run_state,
)
from nested_reft.tasks.task import Task
from nested_reft.models.tiny import tiny_model
from test_rundir import PROBLEMS
from test_rundir import config_for as run_config
from nested_reft.training.trainer import ensure_trained, train


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
    ("report_to: [1, 2]\n", "report_to"),
    ("lora:\n  target_modules: [1, 2]\n", "lora.target_modules"),
])
def test_f09_a_value_of_the_wrong_type_is_refused_naming_the_option(tmp_path, text, option):
    with pytest.raises(ConfigError, match=rf"^{option.replace('.', '[.]')} must be"):
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


def test_f10_an_infinite_evaluation_temperature_is_refused():
    with pytest.raises(ConfigError, match=r"^temperature must be a finite number"):
        EvalConfig(temperature=float("inf"))


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


# ----------------------------------------------------------------------------------------------------------
# The run directory: taken before it is touched, created once the run can start, removed again if the run
# fails before its first checkpoint; the data and settings a run started with are compared on resume
# ----------------------------------------------------------------------------------------------------------

def tiny_task(problems=PROBLEMS):
    return Task("tiny", list(problems), reward=lambda c, g: 0.5)


def resumable_run(output, **overrides):
    """A run with a checkpoint and no end: what a kill after step 2 of 3 leaves."""
    train(run_config(output, **overrides), tiny_task())
    for name in (SUMMARY_FILE, FINAL_MODEL_DIR):
        path = output / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    assert run_state(output) is RunState.RESUMABLE


def test_f01_a_second_writer_is_refused_before_it_clears_anything(tmp_path):
    """The demo and sweeps call `ensure_trained`, which clears a run stopped before its first checkpoint:
    only once it holds the lock, so a running warm-up's files are never removed by a second demo."""
    output = tmp_path / "sft"
    output.mkdir()
    (output / CONFIG_FILE).write_text("seed: 0\n")  # a running warm-up, before its first checkpoint
    (output / SFT_METRICS_FILE).write_text('{"step": 1}\n')
    with exclusive_lock(output / LOCK_FILE, "the running demo"):
        with pytest.raises(LockHeldError, match=rf"run directory {output} is in use by pid"):
            ensure_trained(run_config(output), tiny_task())
    assert (output / CONFIG_FILE).read_text() == "seed: 0\n"
    assert (output / SFT_METRICS_FILE).read_text() == '{"step": 1}\n'


def test_f05_resume_without_the_saved_config_is_refused(tmp_path):
    output = tmp_path / "run"
    resumable_run(output)
    (output / CONFIG_FILE).unlink()
    with pytest.raises(ConfigError, match=rf"--resume: {output} has no {CONFIG_FILE}"):
        train(run_config(output, **{"grpo.learning_rate": 1e-3}), tiny_task(), resume=True)
    assert not (output / CONFIG_FILE).exists()


def test_f06_resume_on_other_data_is_refused(tmp_path):
    output = tmp_path / "run"
    resumable_run(output)
    other = generate_arithmetic(8, seed=2)
    with pytest.raises(ConfigError, match="--resume: the run in .* was trained on other data"):
        train(run_config(output), tiny_task(other), resume=True)
    train(run_config(output), tiny_task(), resume=True)  # the same data resumes


def test_f19_a_run_that_fails_before_its_first_checkpoint_leaves_nothing(tmp_path, monkeypatch):
    output = tmp_path / "run"

    def fail(*args, **kwargs):
        raise RuntimeError("out of memory at step 1")

    monkeypatch.setattr(trainer, "reft", fail)
    with pytest.raises(RuntimeError, match="out of memory"):
        train(run_config(output), tiny_task())
    assert not output.exists()


def test_f19_a_run_killed_before_its_first_checkpoint_restarts_on_the_plain_rerun(tmp_path):
    output = tmp_path / "run"
    output.mkdir()
    (output / CONFIG_FILE).write_text("seed: 0\n")  # what a kill -9 during the warm-up leaves
    (output / SFT_METRICS_FILE).write_text('{"step": 1}\n')
    with pytest.raises(ConfigError, match="stopped before its first checkpoint.*rerun it without --resume"):
        train(run_config(output), tiny_task(), resume=True)
    summary = train(run_config(output), tiny_task())
    assert summary["steps"] == 2 and run_state(output) is RunState.FINISHED


@pytest.mark.parametrize("overrides", [{"nesting.border": 100}, {"model": "tiny-nonexistent"}])
def test_f21_a_refused_run_creates_no_directory(tmp_path, overrides):
    output = tmp_path / "new" / "run"
    with pytest.raises(ValueError):
        train(run_config(output, **overrides), tiny_task())
    assert not (tmp_path / "new").exists()


def test_f21_resume_on_a_missing_directory_creates_nothing(tmp_path):
    with pytest.raises(ConfigError, match="holds no run to resume"):
        train(run_config(tmp_path / "typo"), tiny_task(), resume=True)
    assert not (tmp_path / "typo").exists()


@pytest.mark.parametrize("where", ["file", "under-file"])
def test_f18_an_output_dir_that_is_a_file_is_one_line(tmp_path, capsys, where):
    (tmp_path / "file").write_text("")
    target = tmp_path / "file" if where == "file" else tmp_path / "file" / "run"
    assert main(["train", *TINY_RUN, "--output-dir", str(target)]) == 2
    assert f"output_dir {target}" in error_line(capsys)
    assert main(["eval", "--model", "tiny-llama", "--benchmarks", "arithmetic", "--limit", "1",
                 "--output-dir", str(target)]) == 2
    assert str(target) in error_line(capsys)
    assert main(["probe", "--model", "tiny-llama", "--dataset", "arithmetic", "--output-dir", str(target)]) == 2
    assert f"--output-dir {target}" in error_line(capsys)


# ----------------------------------------------------------------------------------------------------------
# Files read back: one reader (UTF-8, JSON lines with a torn or blank last line, wrong types) naming file and
# line; evaluation records reused only for the problem they answer
# ----------------------------------------------------------------------------------------------------------

EVAL_RECORD = {"id": "gsm8k/0", "prompt": "p", "completion": "c", "extracted_answer": None, "gold": "1",
               "correct": False, "completion_tokens": 3, "finished": True}


def gsm8k_dir(root, questions):
    (root / "gsm8k").mkdir(parents=True)
    rows = [{"question": question, "answer": f"Work.\n#### {index}"} for index, question in enumerate(questions)]
    (root / "gsm8k" / "test.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return root


def test_f02_eval_into_the_same_directory_with_other_data_is_refused(tmp_path, monkeypatch):
    monkeypatch.delenv(DATA_ENV, raising=False)
    model, tokenizer = load_model("tiny-llama")
    first = gsm8k_dir(tmp_path / "a", ["What is 1 + 1?", "What is 2 + 2?"])
    second = gsm8k_dir(tmp_path / "b", ["What is 3 + 3?", "What is 4 + 4?"])
    settings = EvalConfig(max_new_tokens=4, batch_size=2)
    evaluate(model, tokenizer, ["gsm8k"], tmp_path / "out", settings, data_dir=first)
    with pytest.raises(EvalError, match="problem gsm8k/test/0 was evaluated with another prompt"):
        evaluate(model, tokenizer, ["gsm8k"], tmp_path / "out", settings, data_dir=second)


def test_f16_a_torn_or_blank_last_metrics_line_is_left_out_and_damage_is_named(tmp_path):
    path = tmp_path / METRICS_FILE
    path.write_text('{"step": 1}\n\n{"step": 2, "rew')
    assert read_metrics(path) == [{"step": 1}]
    path.write_text('{"step": 1}\n{"step": 2, "rew\n{"step": 3}\n')
    with pytest.raises(PathError, match=rf"{path}, line 2: invalid JSON"):
        read_metrics(path)
    path.write_text('{"step": "one"}\n')
    with pytest.raises(PathError, match=rf"{path}, line 1: a metrics record needs an integer step"):
        read_metrics(path)


def test_f16_resume_after_a_torn_metrics_line(tmp_path):
    output = tmp_path / "run"
    resumable_run(output, rft_steps=3, save_steps=2)  # checkpoint-2, metrics of steps 1-3
    with open(output / METRICS_FILE, "a") as stream:
        stream.write('{"step": 4, "rew')  # killed mid-append
    summary = train(run_config(output, rft_steps=3, save_steps=2), tiny_task(), resume=True)
    assert summary["steps"] == 3
    assert [record["step"] for record in read_metrics(output / METRICS_FILE)] == [1, 2, 3]


@pytest.mark.parametrize("field, value", [("correct", "yes"), ("completion_tokens", 2.5), ("id", 3),
                                          ("prompt", None)])
def test_f16_an_eval_record_with_a_field_of_the_wrong_type_is_named(tmp_path, field, value):
    path = tmp_path / "gsm8k.jsonl"
    path.write_text(json.dumps(EVAL_RECORD) + "\n" + json.dumps({**EVAL_RECORD, field: value}) + "\n")
    with pytest.raises(EvalError, match=rf"{path}, line 2: field '{field}' must be"):
        read_records(path)


@pytest.mark.parametrize("content", [b"[]", "{\"model\": \"caf\xe9\"}".encode("latin-1")])
def test_f16_damaged_eval_settings_are_one_line(tmp_path, capsys, content):
    output = tmp_path / "out"
    output.mkdir()
    (output / "eval_settings.json").write_bytes(content)
    assert main(["eval", "--model", "tiny-llama", "--benchmarks", "arithmetic", "--limit", "1",
                 "--output-dir", str(output)]) == 2
    assert "eval_settings.json" in error_line(capsys)


@pytest.mark.parametrize("flag, value", [("--device", "meta"), ("--dtype", "int8")])
def test_f16_eval_device_and_dtype_that_cannot_run_are_one_line(tmp_path, capsys, flag, value):
    assert main(["eval", "--model", "tiny-llama", "--benchmarks", "arithmetic", "--limit", "1", flag, value,
                 "--output-dir", str(tmp_path / "out")]) == 2
    assert flag.lstrip("-") in error_line(capsys)
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------------------
# Grids: one directory per instance, and a warm-up reused only under the settings it was trained with
# ----------------------------------------------------------------------------------------------------------


def grid_file(tmp_path, **options):
    values = {"name": "test", "output_dir": str(tmp_path / "sweep"), "models": ["tiny-llama"],
              "datasets": ["arithmetic"], "skip_ratios": [0.2], "mitigations": ["retrace"],
              "train": {"sft": {"epochs": 1}}, "eval": {"benchmarks": ["arithmetic"], "limit": 2}}
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump({**values, **options}))
    return path


@pytest.mark.parametrize("options", [
    {"skip_ratios": [0.1, 0.1000001]},
    {"skip_ratios": [0.2], "variants": [{"skip_ratio": 0.2000001, "mitigation": "base"}]},
])
def test_f03_instances_whose_ids_collide_are_refused_naming_both(tmp_path, options):
    with pytest.raises(ConfigError, match=r"share the id .*x0\.[12]-b1-base-s0.*(0\.1000001|0\.2000001)"):
        load_grid(grid_file(tmp_path, mitigations=["base"], **options))


def test_f04_a_warm_up_trained_with_other_sft_options_is_not_reused(tmp_path, monkeypatch):
    trained = []

    def fake_train(config, callbacks=()):
        output = Path(config.output_dir)
        trained.append(output.name)
        (output / FINAL_MODEL_DIR).mkdir(parents=True, exist_ok=True)
        save_config(config, output / CONFIG_FILE)
        (output / SUMMARY_FILE).write_text("{}")
        return {}

    monkeypatch.setattr(sweep, "ensure_trained", fake_train)
    monkeypatch.setattr(sweep, "evaluate_instance", lambda *args: {})
    path = grid_file(tmp_path)
    grid = load_grid(path)
    instance = enumerate_instances(grid)[0]
    sweep.ensure_warm_up(grid, instance)
    changed = load_grid(grid_file(tmp_path, train={"sft": {"epochs": 1, "learning_rate": 1e-4}}))
    with pytest.raises(ConfigError, match=r"sft-s0 was trained with other settings.*sft\.learning_rate"):
        sweep.ensure_warm_up(changed, instance)
    assert trained == ["sft-s0"]


@pytest.mark.parametrize("option", ["seeds", "baseline_seeds"])
def test_f12_a_boolean_seed_is_refused(tmp_path, option):
    with pytest.raises(ConfigError, match=option):
        load_grid(grid_file(tmp_path, **{option: [True]}))


# ----------------------------------------------------------------------------------------------------------
# Models: every weight loaded as it was saved, or a refusal naming it
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny") / "model"
    model, tokenizer = tiny_model("llama", num_layers=2)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def damaged_copy(source, target, change):
    shutil.copytree(source, target)
    weights = load_file(target / "model.safetensors")
    change(weights)
    save_file(weights, target / "model.safetensors", metadata={"format": "pt"})
    return target


UP = "model.layers.0.mlp.up_proj.weight"


@pytest.mark.parametrize("change, named", [
    (lambda weights: weights.pop(UP), f"missing: {UP}"),
    (lambda weights: weights.update(extra=torch.zeros(2)), "not in the architecture: extra"),
])
def test_f08_a_checkpoint_missing_or_adding_a_weight_is_refused_by_name(saved_tiny, tmp_path, change, named):
    damaged = damaged_copy(saved_tiny, tmp_path / "damaged", change)
    with pytest.raises(ModelLoadError, match=named):
        load_model(str(damaged))
    load_model(str(saved_tiny))  # the intact copy loads


def test_f14_a_weight_of_the_wrong_shape_is_one_line(saved_tiny, tmp_path, capsys):
    damaged = damaged_copy(saved_tiny, tmp_path / "damaged", lambda weights: weights.update({UP: torch.zeros(3, 3)}))
    assert main(["eval", "--model", str(damaged), "--benchmarks", "arithmetic", "--limit", "1",
                 "--output-dir", str(tmp_path / "out")]) == 2
    assert f"of another shape: {UP}" in error_line(capsys)


# ----------------------------------------------------------------------------------------------------------
# Results and reports
# ----------------------------------------------------------------------------------------------------------


def results_rows(accuracy=0.5) -> list[dict]:
    common = dict(model="M", dataset="d", status="done", token_speed=100.0, total_runtime_s=50.0, error="", seed=0)
    return [dict(common, instance="M/d/baseline-s0", role="baseline", skip_ratio=0.0, border=0, mitigation="base",
                 accuracy=0.5),
            dict(common, instance="M/d/x0.1-b1-retrace-s0", role="nested", skip_ratio=0.1, border=1,
                 mitigation="retrace", accuracy=accuracy)]


def sweep_dir_with(tmp_path, text: str | bytes):
    directory = tmp_path / "sweep"
    directory.mkdir()
    path = directory / RESULTS_FILE
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return directory


@pytest.mark.parametrize("accuracy", ["nan", "inf"])
def test_f11_a_done_row_with_a_non_finite_accuracy_is_refused_naming_the_row(tmp_path, capsys, accuracy):
    directory = sweep_dir_with(tmp_path, csv_text(results_columns([]), results_rows(accuracy)))
    assert main(["report", str(directory)]) == 2
    assert f"{RESULTS_FILE}, line 3: column accuracy must be a finite number, got '{accuracy}'" in error_line(capsys)


def test_f17_a_row_with_extra_fields_is_refused_naming_it(tmp_path, capsys):
    text = csv_text(results_columns([]), results_rows())
    lines = text.splitlines()
    lines[2] += ",surplus"
    assert main(["report", str(sweep_dir_with(tmp_path, "\n".join(lines) + "\n"))]) == 2
    assert f"{RESULTS_FILE}, line 3: more fields than the header" in error_line(capsys)


def test_f17_a_results_file_that_is_not_utf8_is_one_line(tmp_path, capsys):
    text = csv_text(results_columns([]), results_rows()).replace("retrace", "r\xe9trace", 1)
    assert main(["report", str(sweep_dir_with(tmp_path, text.encode("latin-1")))]) == 2
    assert "is not UTF-8" in error_line(capsys)


def test_f17_report_output_dir_naming_a_file_is_one_line(tmp_path, capsys):
    directory = sweep_dir_with(tmp_path, csv_text(results_columns([]), results_rows()))
    (tmp_path / "file").write_text("")
    assert main(["report", str(directory), "--output-dir", str(tmp_path / "file")]) == 2
    assert f"--output-dir {tmp_path / 'file'} is a file" in error_line(capsys)


@pytest.mark.parametrize("where", ["directory", "under-file"])
def test_f18_emit_commands_naming_a_directory_or_a_path_under_a_file_is_one_line(tmp_path, capsys, where):
    (tmp_path / "file").write_text("")
    target = tmp_path if where == "directory" else tmp_path / "file" / "jobs.txt"
    assert main(["sweep", str(grid_file(tmp_path)), "--emit-commands", str(target)]) == 2
    assert f"--emit-commands {target}" in error_line(capsys)


# ----------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("final", ["twelve", "12 apples", "1,2,3x"])
def test_f12_a_gsm8k_gold_answer_that_is_not_a_number_is_refused_naming_the_line(tmp_path, final):
    root = gsm8k_dir(tmp_path / "data", ["What is 1 + 1?"])
    (root / "gsm8k" / "test.jsonl").write_text(json.dumps({"question": "q", "answer": f"Work.\n#### {final}"}) + "\n")
    with pytest.raises(DataError, match=r"test\.jsonl, line 1: field 'answer' must end in '#### N', N a number"):
        load_problems("gsm8k", "test", data_dir=root)


def test_f15_a_directory_where_a_data_file_belongs_is_one_line(tmp_path, capsys):
    (tmp_path / "gsm8k" / "test.jsonl").mkdir(parents=True)
    assert main(["data", "show", "gsm8k", "--split", "test", "--data-dir", str(tmp_path)]) == 2
    assert "test.jsonl is a directory" in error_line(capsys)


def test_f15_a_data_file_that_is_not_utf8_is_one_line(tmp_path, capsys):
    (tmp_path / "gsm8k").mkdir()
    (tmp_path / "gsm8k" / "test.jsonl").write_bytes('{"question": "caf\xe9", "answer": "#### 1"}\n'.encode("latin-1"))
    assert main(["data", "show", "gsm8k", "--split", "test", "--data-dir", str(tmp_path)]) == 2
    assert "test.jsonl is not UTF-8" in error_line(capsys)


def test_f15_a_svamp_equation_nested_too_deeply_is_one_line(tmp_path, capsys):
    (tmp_path / "svamp").mkdir()
    equation = "1.0" + " + 1.0" * 20000
    rows = [{"ID": f"chal-{i}", "Body": "b", "Question": "q", "Equation": equation if i == 0 else "1.0 + 1.0",
             "Answer": 2.0} for i in range(10)]
    (tmp_path / "svamp" / "SVAMP.json").write_text(json.dumps(rows))
    assert main(["data", "show", "svamp", "--split", "train", "--data-dir", str(tmp_path)]) == 2
    assert "index 0: field 'Equation' nests too deeply" in error_line(capsys)


def test_f13_lora_target_modules_that_match_nothing_are_refused_naming_the_option(tmp_path):
    output = tmp_path / "run"
    with pytest.raises(ConfigError, match=r"lora\.target_modules \('nothing',\) match no module"):
        train(run_config(output, **{"lora.r": 2, "lora.target_modules": "nothing"}), tiny_task())
    assert not output.exists()


@pytest.mark.parametrize("damage, named", [
    (lambda d: [p.unlink() for p in d.glob("tokenizer*")], "has no tokenizer"),
    (lambda d: (d / "config.json").write_text("[]"), "config.json"),
    (lambda d: (d / "config.json").write_text(json.dumps({**json.loads((d / "config.json").read_text()),
                                                          "model_type": "nonsense"})), "model_type"),
    (lambda d: save_file({k: torch.full_like(v, float("nan")) for k, v in load_file(d / "model.safetensors").items()},
                         d / "model.safetensors", metadata={"format": "pt"}), "not finite"),
], ids=["no-tokenizer", "config-list", "model-type", "nan-weights"])
def test_f14_a_model_directory_that_cannot_serve_is_one_line(saved_tiny, tmp_path, capsys, damage, named):
    damaged = tmp_path / "damaged"
    shutil.copytree(saved_tiny, damaged)
    damage(damaged)
    assert main(["train", *TINY_RUN, "--model", str(damaged), "--output-dir", str(tmp_path / "out")]) == 2
    line = error_line(capsys)
    assert str(damaged) in line and named in line
    assert not (tmp_path / "out").exists()


def test_f18_a_disk_full_during_a_checkpoint_leaves_the_run_clean_or_resumable(tmp_path, monkeypatch):
    output = tmp_path / "run"
    save = trainer.save_checkpoint
    writes = []

    def disk_full_at(failing: int):
        def save_checkpoint(directory, *args):
            writes.append(directory.name)
            if len(writes) == failing:
                raise OSError(28, "No space left on device")
            save(directory, *args)
        return save_checkpoint

    monkeypatch.setattr(trainer, "save_checkpoint", disk_full_at(1))
    with pytest.raises(OSError, match="No space left"):
        train(run_config(output), tiny_task())
    assert not output.exists()  # the first checkpoint failed: nothing to resume, nothing kept
    writes.clear()
    monkeypatch.setattr(trainer, "save_checkpoint", disk_full_at(2))
    with pytest.raises(OSError, match="No space left"):
        train(run_config(output), tiny_task())
    assert run_state(output) is RunState.RESUMABLE  # checkpoint-1 is complete
    monkeypatch.setattr(trainer, "save_checkpoint", save)
    assert train(run_config(output), tiny_task(), resume=True)["steps"] == 2


def test_f20_a_killed_conversion_leaves_no_staging_directory_behind(tmp_path):
    target = tmp_path / "smollm2-135m-instruct"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    abandoned = tmp_path / f".{target.name}.partial-{host}-{dead.pid}-0a1b2c3d"
    running = tmp_path / f".{target.name}.partial-{host}-{os.getpid()}-0a1b2c3d"  # a conversion under way
    elsewhere = tmp_path / f".{target.name}.partial-another-host-{dead.pid}-0a1b2c3d"
    for directory in (abandoned, running, elsewhere):
        directory.mkdir()
    remove_abandoned_staging(target)
    assert not abandoned.exists() and running.exists() and elsewhere.exists()


def test_f15_a_problem_longer_than_the_models_positions_is_refused_naming_it(tmp_path):
    long = Problem("tiny/long", "What is " + " + ".join(["1"] * 400) + "?", "400", None)
    output = tmp_path / "run"
    with pytest.raises(DataError, match=r"problem tiny/long: its prompt \(\d+ tokens\) plus sampling.max_new_tokens"):
        train(run_config(output, model="tiny-gpt2"), tiny_task([*PROBLEMS, long]))
    assert not output.exists()
    model, tokenizer = load_model("tiny-gpt2")
    with pytest.raises(DataError, match=r"problem tiny/long: .* plus max_new_tokens \(4\) runs past the model's 512"):
        evaluate_tasks(model, tokenizer, [tiny_task([long])], tmp_path / "eval", EvalConfig(max_new_tokens=4), None,
                       None, "tiny-gpt2", None)
    assert not (tmp_path / "eval").exists()


# ----------------------------------------------------------------------------------------------------------
# Cosmetic, one line each
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv, named", [
    (["--report-to", "nonsense"], "report_to must name trackers among"),
    (["--set", "model.name=x"], "unknown option model.name: model is an option, not a section"),
    (["--set", "=5"], "option '' has an empty name"),
])
def test_cosmetic_messages_name_what_is_wrong(tmp_path, capsys, argv, named):
    assert main(["train", *TINY_RUN, *argv, "--output-dir", str(tmp_path / "o")]) == 2
    assert named in error_line(capsys)
    assert not (tmp_path / "o").exists()


def test_cosmetic_a_missing_data_dir_is_one_line(tmp_path, capsys):
    assert main(["data", "show", "gsm8k", "--data-dir", str(tmp_path / "nowhere")]) == 2
    assert "data directory" in error_line(capsys)
    assert main(["data", "show", "gsm8k", "--data-dir", str(tmp_path)]) == 2
    assert "gsm8k/train.jsonl" in error_line(capsys)


def test_cosmetic_two_evaluations_of_one_directory_are_refused(tmp_path):
    model, tokenizer = load_model("tiny-llama")
    with exclusive_lock(tmp_path / LOCK_FILE, "the first evaluation"):
        with pytest.raises(LockHeldError, match=rf"evaluation directory {tmp_path} is in use"):
            evaluate(model, tokenizer, ["arithmetic"], tmp_path, EvalConfig(max_new_tokens=4), limit=1)


def test_cosmetic_ctrl_c_is_one_line(monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "run_demo", interrupted)
    assert main(["demo", "--steps", "1"]) == 130
    assert capsys.readouterr().err == "nested-reft: interrupted\n"


def gguf_file(path, architecture: str):
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_block_count(2)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("architecture, named", [
    ("bloom", "missing: transformer.h.0"),  # a readable architecture, most tensors absent
    ("nonsense", "architecture nonsense is not supported"),
])
def test_f14_a_gguf_file_that_does_not_make_a_model_is_one_line(tmp_path, capsys, architecture, named):
    path = gguf_file(tmp_path / f"{architecture}.gguf", architecture)
    assert main(["eval", "--model", str(path), "--benchmarks", "arithmetic", "--limit", "1",
                 "--output-dir", str(tmp_path / "out")]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]  # below the GGUF reader's own progress bar
    assert line.startswith("nested-reft: error: ") and str(path) in line and named in line
    assert "not a complete GGUF" not in line


def test_cosmetic_resume_of_a_finished_run_says_so(tmp_path, caplog):
    output = tmp_path / "run"
    train(run_config(output), tiny_task())
    with caplog.at_level("WARNING"):
        train(run_config(output), tiny_task(), resume=True)
    assert f"the run in {output} is finished" in caplog.text


def test_f12_a_warm_up_without_a_solution_to_imitate_is_refused(tmp_path):
    unsolved = [Problem(problem.id, problem.question, problem.answer, None) for problem in PROBLEMS]
    with pytest.raises(DataError, match=r"sft\.epochs=1, but no problem of training set 'tiny' has a solution"):
        train(run_config(tmp_path / "run", **{"sft.epochs": 1}), tiny_task(unsolved))
    assert not (tmp_path / "run").exists()


def test_cosmetic_an_unknown_model_name_is_one_line_at_once(tmp_path, capsys):
    started = time.perf_counter()
    assert main(["eval", "--model", "tiny-lama", "--benchmarks", "arithmetic", "--limit", "1",
                 "--output-dir", str(tmp_path / "out")]) == 2
    assert "'tiny-lama' is not a model alias" in error_line(capsys)
    assert time.perf_counter() - started < 15  # not a minute of the Hub's retries


def test_cosmetic_ctrl_c_ends_a_demo_lane_quietly():
    code = ("import os, signal, time\nfrom nested_reft.experiments.demo import start_lane\nstart_lane()\n"
            "os.kill(os.getpid(), signal.SIGINT)\ntime.sleep(30)\n")
    finished = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                              env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert finished.returncode == 128 + signal.SIGINT and finished.stderr == ""


# ==========================================================================================================
# Issue 33, the third bad-input probe: one test (or a few) per finding, named i33_fNN
# ==========================================================================================================

# ----------------------------------------------------------------------------------------------------------
# A finished run is its summary and its evaluation, never its model/
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("keep_checkpoint", [False, True])
def test_i33_f01_a_finished_run_whose_model_was_deleted_is_not_trained_again(tmp_path, capsys, keep_checkpoint):
    output = tmp_path / "run"
    train(run_config(output), tiny_task())
    shutil.rmtree(output / FINAL_MODEL_DIR)  # keep_models: false
    if not keep_checkpoint:
        for checkpoint in output.glob("checkpoint-*"):
            shutil.rmtree(checkpoint)
    before = {name: (output / name).read_text() for name in (SUMMARY_FILE, METRICS_FILE)}
    assert run_state(output) is RunState.FINISHED
    with pytest.raises(ConfigError, match=rf"{output} already holds a run, finished \({SUMMARY_FILE}\)"):
        train(run_config(output), tiny_task())
    save_config(run_config(output), tmp_path / "config.yaml")
    capsys.readouterr()
    assert main(["train", "--config", str(tmp_path / "config.yaml"), "--output-dir", str(output)]) == 2
    assert "finished" in error_line(capsys)
    if not keep_checkpoint:
        assert main(["train", "--config", str(tmp_path / "config.yaml"), "--output-dir", str(output), "--resume"]) == 2
        assert "a finished run" in error_line(capsys) and "without --resume" not in capsys.readouterr().err
    assert {name: (output / name).read_text() for name in before} == before


def fake_sweep(monkeypatch, evaluations: list):
    """Training and evaluation stood in by files: a finished run (config, summary, model/) and an eval.json."""
    def fake_train(config, callbacks=()):
        output = Path(config.output_dir)
        if not (output / SUMMARY_FILE).is_file():
            (output / FINAL_MODEL_DIR).mkdir(parents=True, exist_ok=True)
            save_config(config, output / CONFIG_FILE)
            step = {"step": 1, "reward_mean": 0.5, "skipped_layers": 1, "kl_behavior_target": 0.1, "h_ess": 0.9,
                    "h_truncated": 0.0, "gen_tokens_per_s": 10.0}
            (output / METRICS_FILE).write_text(json.dumps(step) + "\n")
            (output / SUMMARY_FILE).write_text('{"token_speed": 1.0, "total_runtime_s": 1.0}')
        return {}

    def fake_evaluate(model_dir, output_dir, *args):
        assert Path(model_dir).is_dir()
        evaluations.append(str(output_dir))
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        record = {"id": "arithmetic/0", "prompt": "p", "completion": "c", "extracted_answer": "1", "gold": "1",
                  "correct": True, "completion_tokens": 1, "finished": True}
        (Path(output_dir) / "arithmetic.jsonl").write_text(json.dumps(record) + "\n")
        (Path(output_dir) / "eval.json").write_text('{"benchmarks": {"arithmetic": {"accuracy": 0.5}}, "average": 0.5}')
        return {}

    monkeypatch.setattr(sweep, "ensure_trained", fake_train)
    monkeypatch.setattr(sweep, "evaluate_instance", fake_evaluate)


@pytest.mark.parametrize("keep_models", [True, False])
def test_i33_f12_a_done_run_whose_evaluation_is_gone_is_evaluated_again_or_reported(tmp_path, monkeypatch,
                                                                                     keep_models):
    evaluations = []
    fake_sweep(monkeypatch, evaluations)
    grid = load_grid(grid_file(tmp_path, train={"sft": {"epochs": 0}}, keep_models=keep_models))
    instance = enumerate_instances(grid)[0]
    assert sweep.run_sweep(grid, log=lambda line: None).ran
    shutil.rmtree(grid.root / instance.id / "eval")
    evaluations.clear()
    outcome = sweep.run_sweep(grid, log=lambda line: None)
    assert instance.id not in outcome.skipped
    row = next(row for row in read_results(grid.root / RESULTS_FILE) if row["instance"] == instance.id)
    if keep_models:  # evaluated again from its model
        assert instance.id in outcome.ran and evaluations == [str(grid.root / instance.id / "eval")]
        assert row["status"] == "done" and row["accuracy"] == 0.5
    else:  # nothing to evaluate: reported, not "done" with an empty accuracy
        assert "model/ is gone" in outcome.failed[instance.id] and not evaluations
        assert row["status"] == "failed" and "model/ is gone" in row["error"]


# ----------------------------------------------------------------------------------------------------------
# Identity by content: labels as path components, directories compared resolved, models by their files
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("options, named", [
    ({"warm_ups": [{"label": ".", "sft": {"layer_drop": 0.2}}]}, "warm_ups.label"),
    ({"warm_ups": [{"label": "..", "sft": {"layer_drop": 0.2}}]}, "warm_ups.label"),
    ({"variants": [{"skip_ratio": 0.3, "label": ".."}]}, "variants.label"),
    ({"name": ".."}, "name"),
    ({"warm_ups": [{"label": "baseline-s0", "sft": {"layer_drop": 0.2}}]}, "would share a directory"),
])
def test_i33_f04_labels_that_make_two_runs_share_a_directory_are_refused(tmp_path, options, named):
    with pytest.raises(ConfigError, match=named):
        load_grid(grid_file(tmp_path, **options))


def test_i33_f05_evaluation_records_are_not_reused_for_another_model_at_the_same_path(saved_tiny, tmp_path, capsys):
    model_dir = tmp_path / "model"
    shutil.copytree(saved_tiny, model_dir)
    argv = ["eval", "--model", str(model_dir), "--benchmarks", "arithmetic", "--limit", "2", "--max-new-tokens", "2",
            "--output-dir", str(tmp_path / "eval")]
    assert main(argv) == 0
    records = (tmp_path / "eval" / "arithmetic.jsonl").read_text()
    assert main(argv) == 0  # the same model: resumed
    damaged_copy(saved_tiny, tmp_path / "other", lambda weights: weights[UP].mul_(2))
    shutil.rmtree(model_dir)
    (tmp_path / "other").rename(model_dir)  # another model saved at the same path
    capsys.readouterr()
    assert main(argv) == 2
    assert "another model at the same path" in error_line(capsys)
    assert (tmp_path / "eval" / "arithmetic.jsonl").read_text() == records


# ----------------------------------------------------------------------------------------------------------
# Results tables: merged row by row with what is on disk, one row per key, every CSV read with its schema
# ----------------------------------------------------------------------------------------------------------


def table(path) -> list[dict]:
    import csv
    with open(path, encoding="utf-8") as stream:
        return list(csv.DictReader(stream))


def test_i33_f02_a_smaller_grid_on_the_same_output_dir_keeps_the_other_instances_rows(tmp_path, monkeypatch):
    fake_sweep(monkeypatch, [])
    larger = load_grid(grid_file(tmp_path, train={"sft": {"epochs": 0}}, skip_ratios=[0.2, 0.3]))
    sweep.run_sweep(larger, log=lambda line: None)
    before = {name: table(larger.root / name) for name in ("results.csv", "steps.csv", "problems.csv")}
    assert {row["instance"].split("/")[-1] for row in before["steps.csv"]} >= {"x0.3-b1-retrace-s0"}
    smaller = load_grid(grid_file(tmp_path, train={"sft": {"epochs": 0}}, skip_ratios=[0.2]))
    sweep.run_sweep(smaller, log=lambda line: None)
    for name, rows in before.items():
        after = table(larger.root / name)
        assert sorted(map(sorted, (row.items() for row in after))) == sorted(map(sorted, (row.items() for row in rows)))


def recorded_sweep(tmp_path, monkeypatch):
    """A grid swept once (its results as a record to merge) and the same grid on a fresh output_dir."""
    fake_sweep(monkeypatch, [])
    grid = load_grid(grid_file(tmp_path, train={"sft": {"epochs": 0}}))
    sweep.run_sweep(grid, log=lambda line: None)
    record = tmp_path / "record"
    record.mkdir()
    for name in ("results.csv", "steps.csv", "problems.csv", "run_settings.json"):
        if (grid.root / name).exists():
            shutil.copy(grid.root / name, record / name)
    (tmp_path / "fresh").mkdir()
    return record, grid_file(tmp_path / "fresh", train={"sft": {"epochs": 0}})


def append_line(path, line: str) -> None:
    with open(path, "a", encoding="utf-8") as stream:
        stream.write(line + "\n")


@pytest.mark.parametrize("damage, named", [
    (lambda r: append_line(r / "results.csv", (r / "results.csv").read_text().splitlines()[1]),
     r"results\.csv, line 4: a second row for .*baseline-s0 \(the first is on line 2\)"),
    (lambda r: (r / "problems.csv").write_text("instance,correct\nx,1\n"), r"problems\.csv lacks column\(s\) benchmark"),
])
def test_i33_f11_merge_refuses_duplicate_rows_and_tables_without_their_columns(tmp_path, monkeypatch, capsys, damage,
                                                                               named):
    record, grid_path = recorded_sweep(tmp_path, monkeypatch)
    damage(record)
    capsys.readouterr()
    assert main(["sweep", str(grid_path), "--collect", "--merge", str(record)]) == 2
    assert re.search(named, error_line(capsys))


@pytest.mark.parametrize("table, line, named", [
    ("problems.csv", "0", "problems.csv, line 4: 1 field(s), but the header has 4 columns"),  # f11, f22
    ("steps.csv", "damaged", "steps.csv, line 4: 1 field(s)"),  # f23: refused after the figures are made
])
def test_i33_f11_f22_f23_a_report_refuses_a_short_row_and_writes_none_of_its_files(tmp_path, monkeypatch, capsys,
                                                                                   table, line, named):
    fake_sweep(monkeypatch, [])
    grid = load_grid(grid_file(tmp_path, train={"sft": {"epochs": 0}}))
    sweep.run_sweep(grid, log=lambda line: None)
    append_line(grid.root / table, line)
    capsys.readouterr()
    assert main(["report", str(grid.root)]) == 2
    assert named in error_line(capsys)
    assert not (grid.root / "report").exists()


def test_i33_f22_merge_of_a_steps_table_without_instance_is_one_line(tmp_path, monkeypatch, capsys):
    record, grid_path = recorded_sweep(tmp_path, monkeypatch)
    rows = table(record / "steps.csv")
    (record / "steps.csv").write_text(csv_text([c for c in rows[0] if c != "instance"], rows))
    capsys.readouterr()
    assert main(["sweep", str(grid_path), "--collect", "--merge", str(record)]) == 2
    assert "steps.csv lacks column(s) instance" in error_line(capsys)


@pytest.mark.parametrize("record", ["tables", "output_dir", "output_dir-without-settings"])
@pytest.mark.parametrize("change, named", [
    ({"train": {"sft": {"epochs": 1}, "rft_steps": 3}}, "rft_steps: 99 -> 3"),
    ({"train": {"sft": {"epochs": 1}}, "eval": {"benchmarks": ["arithmetic"], "limit": 3}}, "eval.limit: 2 -> 3"),
])
def test_i33_f06_merge_refuses_runs_recorded_under_other_settings(tmp_path, monkeypatch, capsys, record, change,
                                                                  named):
    fake_sweep(monkeypatch, [])
    grid = load_grid(grid_file(tmp_path))  # warms up: its instances start from a model under its output_dir
    sweep.run_sweep(grid, log=lambda line: None)
    source = grid.root
    if record == "tables":
        source = tmp_path / "record"
        source.mkdir()
        for name in ("results.csv", "steps.csv", "problems.csv", "run_settings.json"):
            shutil.copy(grid.root / name, source / name)
    elif record == "output_dir-without-settings":
        (grid.root / "run_settings.json").unlink()
    (tmp_path / "fresh").mkdir()
    same = grid_file(tmp_path / "fresh")  # the same grid on another output_dir: its runs count as done
    assert main(["sweep", str(same), "--collect", "--merge", str(source)]) == 0
    for argv in (["--collect"], ["--emit-commands", str(tmp_path / "jobs.txt")], []):
        capsys.readouterr()
        assert main(["sweep", str(grid_file(tmp_path / "fresh", **change)), *argv, "--merge", str(source)]) == 2
        assert named in error_line(capsys)


# ----------------------------------------------------------------------------------------------------------
# Every command that writes an output directory: the one lock, nothing overwritten, results staged
# ----------------------------------------------------------------------------------------------------------

TINY_PROBE = ["probe", "--model", "tiny-llama", "--dataset", "arithmetic", "--skip-ratios", "0.2", "--problems", "1",
              "--draws", "1", "--generations", "1", "--max-new-tokens", "2"]


def test_i33_f03_a_probe_never_overwrites_an_earlier_one_and_a_second_probe_is_refused(tmp_path, capsys):
    output = tmp_path / "probe"
    assert main([*TINY_PROBE, "--output-dir", str(output)]) == 0
    first = {name: (output / name).read_bytes() for name in ("probe.json", "probe.png")}
    capsys.readouterr()
    assert main([*TINY_PROBE, "--seed", "1", "--output-dir", str(output)]) == 2
    assert "already holds a probe (probe.json)" in error_line(capsys)
    with exclusive_lock(tmp_path / "other" / LOCK_FILE, "the first probe"):  # a probe under way there
        assert main([*TINY_PROBE, "--output-dir", str(tmp_path / "other")]) == 2
        assert "is in use by pid" in error_line(capsys)
    assert {name: (output / name).read_bytes() for name in first} == first
    assert not (tmp_path / "other" / "probe.json").exists()


def test_i33_f07_a_probe_into_a_run_directory_a_train_is_writing_is_refused(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    with exclusive_lock(run / LOCK_FILE, "the running train"):
        assert main([*TINY_PROBE, "--output-dir", str(run)]) == 2
        assert f"probe output directory {run} is in use by pid {os.getpid()}" in error_line(capsys)
    assert sorted(path.name for path in run.iterdir()) == [LOCK_FILE]


# ----------------------------------------------------------------------------------------------------------
# Weights from safetensors only, through an index too; our own checkpoint's pickle refused by name
# ----------------------------------------------------------------------------------------------------------


class _Forbidden:
    """Pickles as a call of a global that weights_only never allows (print: harmless, were it ever called)."""

    def __reduce__(self):
        return print, ("unpickled",)


def indexed_bin_model(saved, target, payload):
    """`saved` with its weights moved to pytorch_model.bin (torch.save of `payload(weights)`) and a safetensors
    index that lists that file."""
    shutil.copytree(saved, target)
    weights = load_file(target / "model.safetensors")
    (target / "model.safetensors").unlink()
    torch.save(payload(weights), target / "pytorch_model.bin")
    index = {"metadata": {}, "weight_map": {name: "pytorch_model.bin" for name in weights}}
    (target / "model.safetensors.index.json").write_text(json.dumps(index))
    return target


@pytest.mark.parametrize("finding, payload", [("f08", lambda weights: weights),
                                              ("f09", lambda weights: {**weights, "x": _Forbidden()})])
def test_i33_f08_f09_an_index_listing_a_pickled_file_is_refused_before_it_is_read(saved_tiny, tmp_path, capsys,
                                                                                  monkeypatch, finding, payload):
    model = indexed_bin_model(saved_tiny, tmp_path / "model", payload)
    loads = []
    monkeypatch.setattr(torch, "load", lambda *args, **kwargs: loads.append(args))
    assert main(["train", *TINY_RUN, "--model", str(model), "--output-dir", str(tmp_path / "out")]) == 2
    line = error_line(capsys)
    assert "model.safetensors.index.json lists pytorch_model.bin" in line and "safetensors only" in line
    assert not loads and not (tmp_path / "out").exists()


def rewrite_checkpoint_file(checkpoint, name, write):
    """Replace a checkpoint's file and update its manifest's checksum, as a deliberate edit would."""
    write(checkpoint / name)
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    manifest[name] = __import__("hashlib").sha256((checkpoint / name).read_bytes()).hexdigest()
    (checkpoint / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("finding, name, write, named", [
    ("f09", "optimizer.pt", lambda path: torch.save({"optimizer": _Forbidden(), "scheduler": {}}, path),
     "optimizer.pt is not an optimizer state of tensors and plain values"),
    ("f22", "trainer_state.json", lambda path: path.write_text('{"step": 1, "total": {}}'),
     "trainer_state.json is not a trainer state (totals must map names of"),
])
def test_i33_f09_f22_a_checkpoint_file_replaced_with_its_checksum_is_refused_by_name(tmp_path, finding, name, write,
                                                                                     named):
    output = tmp_path / "run"
    resumable_run(output)
    rewrite_checkpoint_file(max(output.glob("checkpoint-*")), name, write)
    with pytest.raises(CheckpointError, match=re.escape(named)):  # the CLI's one line, exit 2
        train(run_config(output), tiny_task(), resume=True)


# ----------------------------------------------------------------------------------------------------------
# Silent wrong: non-finite warm-ups, options that do nothing, what a probe ran with, ranks wider than the model
# ----------------------------------------------------------------------------------------------------------


def test_i33_f10_a_warm_up_whose_loss_is_not_finite_stops_and_saves_nothing(tmp_path, capsys):
    output = tmp_path / "sft"
    argv = ["sft", *TINY_RUN, "--sft-epochs", "1", "--sft-max-examples", "2", "--sft-distill-nested", "1e300",
            "--skip-ratio", "0.2", "--output-dir", str(output)]
    assert main(argv) == 2
    assert "SFT warm-up step 1: the loss" in error_line(capsys)
    assert not (output / FINAL_MODEL_DIR).exists() and not (output / SUMMARY_FILE).exists()


@pytest.mark.parametrize("argv, named", [
    (["--sft-layer-drop", "0.2"], "sft.layer_drop must be 0 while sft.epochs = 0"),
    (["--sft-distill-nested", "1.0", "--skip-ratio", "0.2"], "sft.distill_nested must be 0 while sft.epochs = 0"),
    (["--sft-epochs", "1", "--sft-distill-ratio", "0.2"], "sft.distill_ratio must be unset (null) while "
                                                          "sft.distill_nested = 0"),
])
def test_i33_f13_options_that_would_do_nothing_are_refused_not_recorded(tmp_path, capsys, argv, named):
    assert main(["train", *TINY_RUN, *argv, "--output-dir", str(tmp_path / "o")]) == 2
    assert named in error_line(capsys)
    assert not (tmp_path / "o").exists()


def test_i33_f13_a_grid_whose_warm_up_drops_layers_runs_its_instances_without_those_options(tmp_path):
    grid = load_grid(grid_file(tmp_path, train={"sft": {"epochs": 1, "layer_drop": 0.2}}))
    instance = enumerate_instances(grid)[0]
    assert sweep.sft_config(grid, instance).sft.layer_drop == 0.2
    assert sweep.instance_config(grid, instance).sft.layer_drop == 0.0


def test_i33_f14_a_probe_refuses_more_problems_than_the_set_has_and_records_what_it_ran_with(tmp_path, capsys):
    assert main([*TINY_PROBE, "--problems", "100000", "--output-dir", str(tmp_path / "many")]) == 2
    assert "--problems 100000: training set arithmetic has" in error_line(capsys)
    assert not (tmp_path / "many").exists()
    assert main([*TINY_PROBE, "--output-dir", str(tmp_path / "probe")]) == 0
    settings = json.loads((tmp_path / "probe" / "probe.json").read_text())["settings"]
    assert (settings["problems"], settings["problems_probed"], settings["draws"], settings["generations"]) == (1, 1, 1, 1)
    assert settings["sampling"]["max_new_tokens"] == 2 and settings["seed"] == 0


def test_i33_f15_a_lora_rank_wider_than_the_model_is_refused_before_adapters_are_added(tmp_path, monkeypatch):
    def added(*args):
        raise AssertionError("adapters of rank 100000 were added")

    monkeypatch.setattr(trainer, "add_adapters", added)
    with pytest.raises(ConfigError, match=r"lora\.r=100000 is wider than the model \(hidden size 32\)"):
        train(run_config(tmp_path / "run", **{"lora.r": 100000}), tiny_task())
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------------------------------------
# Refused before start: what can be known then (every layer skipped, vLLM missing or unable, prompts too long)
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv, named", [
    (["train", *TINY_RUN, "--skip-ratio", "0.95", "--border", "0"], "nesting.skip_ratio=0.95 skips all 6"),
    (["sft", *TINY_RUN, "--sft-epochs", "1", "--sft-layer-drop", "0.95", "--border", "0"],
     "sft.layer_drop=0.95 skips all 6"),
    ([*TINY_PROBE, "--skip-ratios", "0.95", "--border", "0"], "--skip-ratios 0.95 skips all 6"),
], ids=["train", "sft", "probe"])
def test_i33_f16_skipping_every_layer_is_refused_before_start(tmp_path, capsys, argv, named):
    assert main([*argv, "--output-dir", str(tmp_path / "o")]) == 2
    assert named in error_line(capsys)
    assert not (tmp_path / "o").exists()


VLLM_INSTALLED = __import__("importlib").util.find_spec("vllm") is not None


@pytest.mark.skipif(VLLM_INSTALLED, reason="vLLM is installed here")
@pytest.mark.parametrize("argv, named", [
    (["train", *TINY_RUN, "--engine", "vllm"], "sampling.engine=vllm needs vLLM, which is not installed"),
    (["eval", "--model", "tiny-llama", "--benchmarks", "arithmetic", "--limit", "1", "--engine", "vllm"],
     "engine=vllm needs vLLM, which is not installed"),
], ids=["train", "eval"])
def test_i33_f17_the_vllm_engine_without_vllm_is_refused_before_anything_is_written(tmp_path, capsys, argv, named):
    assert main([*argv, "--output-dir", str(tmp_path / "o")]) == 2
    assert named in error_line(capsys)
    assert not (tmp_path / "o").exists()


def test_i33_f17_an_evaluation_that_fails_before_its_first_record_leaves_no_directory(tmp_path, monkeypatch):
    import nested_reft.evaluation.evaluate as evaluation

    def engine_fails(*args, **kwargs):
        raise RuntimeError("the engine could not start")

    monkeypatch.setattr(evaluation, "generate_rollouts", engine_fails)
    model, tokenizer = load_model("tiny-llama")
    with pytest.raises(RuntimeError, match="could not start"):
        evaluate(model, tokenizer, ["arithmetic"], tmp_path / "eval", EvalConfig(max_new_tokens=2), limit=1)
    assert not (tmp_path / "eval").exists()


@pytest.mark.vllm
@pytest.mark.parametrize("argv, named", [
    (["train", *TINY_RUN, "--engine", "vllm"], "sampling.engine=vllm: vLLM's CPU attention has no kernel for this "
                                               "model's head size 8"),
    (["eval", "--model", "tiny-llama", "--benchmarks", "arithmetic", "--limit", "1", "--engine", "vllm"],
     "engine=vllm: vLLM's CPU attention has no kernel for this model's head size 8"),
], ids=["train", "eval"])
def test_i33_f18_a_head_size_vllms_cpu_kernels_lack_is_refused_before_anything_is_written(tmp_path, capsys, argv,
                                                                                          named):
    pytest.importorskip("vllm")
    assert main([*argv, "--output-dir", str(tmp_path / "o")]) == 2
    assert named in error_line(capsys)
    assert not (tmp_path / "o").exists()


def test_i33_f19_prompts_longer_than_the_vllm_engine_takes_are_refused_before_start():
    from nested_reft.training.startup import check_task

    model, tokenizer = load_model("tiny-llama")
    config = load_config(None, {"sampling.engine": "vllm", "sampling.vllm_max_model_len": 20,
                                "sampling.max_new_tokens": 4, "sampling.min_new_tokens": 4, "sft.epochs": 0})
    with pytest.raises(DataError, match=r"plus sampling\.max_new_tokens \(4\) runs past sampling\.vllm_max_model_len=20"):
        check_task(config, tiny_task(), tokenizer, model, fresh=True)


# ----------------------------------------------------------------------------------------------------------
# A full disk and a read-only or unreachable output directory: one line naming the path and the cause
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture
def mount(tmp_path):
    """mount(name, *options): a file system mounted at tmp_path/name for the test (a small tmpfs, a read-only bind);
    the test is skipped where this process may not mount (not root)."""
    mounted = []

    def make(name: str, *options: str) -> Path:
        target = tmp_path / name
        target.mkdir()
        result = subprocess.run(["mount", *options, str(target)], capture_output=True, text=True)
        if result.returncode:
            pytest.skip(f"cannot mount here: {result.stderr.strip()[:100]}")
        mounted.append(target)
        return target

    yield make
    for target in reversed(mounted):  # lazily where a failed write still holds a file open there
        subprocess.run(["umount", "-l", str(target)], check=True)


@pytest.mark.parametrize("argv, size, named", [
    (["train", *TINY_RUN, "--rft-steps", "2", "--save-steps", "1"], "600k",
     "checkpoint-1 could not be written: no space left on its file system"),
    (["eval", "--model", "tiny-llama", "--benchmarks", "arithmetic", "--limit", "2", "--max-new-tokens", "2"], "8k",
     "arithmetic.jsonl could not be written: no space left on its file system"),
], ids=["checkpoint", "eval"])
def test_i33_f20_a_full_disk_is_one_line_naming_the_path_and_the_cause(tmp_path, capsys, mount, argv, size, named):
    disk = mount("disk", "-t", "tmpfs", "-o", f"size={size}", "tmpfs")
    assert main([*argv, "--output-dir", str(disk / "out")]) == 2
    line = error_line(capsys)
    assert str(disk / "out") in line and named in line
    assert not (disk / "out").exists()  # nothing to resume yet, so nothing is kept


@pytest.mark.parametrize("where", ["read-only", "dangling", "loop"])
def test_i33_f21_a_sweep_output_dir_that_cannot_be_made_is_one_line(tmp_path, capsys, mount, where):
    if where == "read-only":
        (tmp_path / "source").mkdir()
        output, named = mount("ro", "--bind", "-o", "ro", str(tmp_path / "source")) / "sweep", "read-only file system"
    elif where == "dangling":
        (tmp_path / "sweep").symlink_to(tmp_path / "nowhere")
        output, named = tmp_path / "sweep", "is a symbolic link to"
    else:
        (tmp_path / "sweep").symlink_to(tmp_path / "sweep")
        output, named = tmp_path / "sweep", "is a symbolic link to"
    path = grid_file(tmp_path, output_dir=str(output))
    for argv in ([], ["--collect"]):
        capsys.readouterr()
        assert main(["sweep", str(path), *argv]) == 2
        line = error_line(capsys)
        assert f"output_dir {output}" in line and named in line


def test_i33_f22_a_svamp_equation_with_a_number_out_of_range_is_one_line(tmp_path, capsys):
    (tmp_path / "svamp").mkdir()
    rows = [{"ID": f"chal-{i}", "Body": "b", "Question": "q", "Equation": "( 1e400 - 3.0 )" if i == 0 else "1.0 + 1.0",
             "Answer": 2.0} for i in range(10)]
    (tmp_path / "svamp" / "SVAMP.json").write_text(json.dumps(rows))
    assert main(["data", "show", "svamp", "--split", "train", "--data-dir", str(tmp_path)]) == 2
    assert "index 0: field 'Equation' holds a number out of range (inf)" in error_line(capsys)
