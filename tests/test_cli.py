"""The `nested-reft` command line, called in-process: the fixed training flags, resuming, sft, data show, and
bad input that exits 2 with one line naming the option (never a traceback). Tiny models, a few steps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from nested_reft.config import EVALUATION_SETS, NAMED_OPTIONS
from nested_reft.training import trainer
from nested_reft.training.checkpoint import latest_checkpoint
from nested_reft.cli import build_parser, config_from_args, main
from nested_reft.tasks.data import DATA_ENV, load_problems
from nested_reft.tasks.task import Task
from nested_reft.models.tiny import tiny_model
from nested_reft.training.rundir import CONFIG_FILE, FINAL_MODEL_DIR, METRICS_FILE, SUMMARY_FILE

# The fixed flags of `nested-reft train` (issue 4) and the config option each one must land in.
FIXED_FLAGS = {
    "--model": ("tiny-llama", "model"),
    "--dataset": ("arithmetic", "dataset"),
    "--skip-ratio": ("0.3", "nesting.skip_ratio"),
    "--border": ("1", "nesting.border"),
    "--mitigation": ("practical", "importance.mitigation"),
    "--retrace-lambda": ("0.5", "importance.retrace_lambda"),
    "--sft-epochs": ("1", "sft.epochs"),
    "--rft-steps": ("2", "rft_steps"),
    "--batch-size": ("2", "batch_size"),
    "--num-generations": ("2", "grpo.num_generations"),
    "--max-completion-length": ("8", "sampling.max_new_tokens"),
    "--seed": ("3", "seed"),
}
TINY_RUN = ["--model", "tiny-llama", "--dataset", "arithmetic", "--rft-steps", "2", "--batch-size", "2",
            "--num-generations", "2", "--max-completion-length", "8", "--sft-max-examples", "4"]


@pytest.fixture(autouse=True)
def _no_data_env(monkeypatch):
    monkeypatch.delenv(DATA_ENV, raising=False)


def option(config: dict, dotted: str):
    for key in dotted.split("."):
        config = config[key]
    return config


def metric_rows(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / METRICS_FILE).read_text().splitlines()]


def error_line(capsys) -> str:
    """The one line a refused command prints; asserting it is one line asserts there is no traceback."""
    err = capsys.readouterr().err.strip()
    assert err.startswith("nested-reft: error: ") and "\n" not in err, err
    return err


# ----------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------


def test_train_with_the_fixed_flags(tmp_path, capsys):
    output = tmp_path / "run"
    argv = [word for flag, (value, _) in FIXED_FLAGS.items() for word in (flag, value)]
    assert main(["train", *argv, "--sft-max-examples", "4", "--output-dir", str(output)]) == 0

    rows = metric_rows(output)
    assert [row["step"] for row in rows] == [1, 2]
    for row in rows:
        assert {"step", "skipped_layers", "reward_mean", "gen_tokens_per_s", "step_time_s"} <= set(row)
        assert row["skipped_layers"] >= 1 and row["gen_tokens_per_s"] > 0 and row["step_time_s"] > 0
    summary = json.loads((output / SUMMARY_FILE).read_text())
    assert summary["total_runtime_s"] > 0 and summary["token_speed"] > 0
    assert "token_speed" in capsys.readouterr().out  # the summary is printed too

    config = yaml.safe_load((output / CONFIG_FILE).read_text())
    for flag, (value, dotted) in FIXED_FLAGS.items():
        assert str(option(config, dotted)) == value, flag
    assert config["sampling"]["min_new_tokens"] == 8  # paper: min = max completion length
    assert config["output_dir"] == str(output)
    assert (output / FINAL_MODEL_DIR).is_dir()


class Killed(Exception):
    """Stands for the process dying: not an error the command line catches."""


def test_resume_continues_a_killed_run(tmp_path, monkeypatch, capsys):
    output = tmp_path / "run"
    argv = ["train", *TINY_RUN, "--sft-epochs", "0", "--save-steps", "1", "--output-dir", str(output)]
    score = Task.score

    def dies_in_step_two(task, completions, golds):
        dies_in_step_two.calls += 1
        if dies_in_step_two.calls == 2:
            raise Killed
        return score(task, completions, golds)

    dies_in_step_two.calls = 0
    with monkeypatch.context() as patch:
        patch.setattr(Task, "score", dies_in_step_two)
        with pytest.raises(Killed):
            main(argv)
    assert [row["step"] for row in metric_rows(output)] == [1]
    assert latest_checkpoint(output).name == "checkpoint-1" and not (output / SUMMARY_FILE).exists()

    assert main(argv) == 2  # a trainer refusal: the directory holds a run
    assert "--resume" in error_line(capsys)

    assert main([*argv, "--resume"]) == 0
    assert [row["step"] for row in metric_rows(output)] == [1, 2]
    assert json.loads((output / SUMMARY_FILE).read_text())["steps"] == 2
    assert (output / FINAL_MODEL_DIR).is_dir()


def test_the_rollout_selection_flags_land_in_their_options():
    args = build_parser().parse_args(["train", "--filter-groups", "--generation-batch-size", "6", "--skip-predictable",
                                      "--train-problems", "64"])
    config = config_from_args(args)
    assert config.grpo.filter_groups and config.grpo.generation_batch_size == 6
    assert config.sampling.skip_predictable and config.train_problems == 64
    plain = config_from_args(build_parser().parse_args(["train"]))  # absent switches leave the defaults: off
    assert not plain.grpo.filter_groups and not plain.sampling.skip_predictable and plain.train_problems is None


def test_sft_saves_the_warm_up_model_without_reft_steps(tmp_path, capsys):
    output = tmp_path / "sft"
    assert main(["sft", *TINY_RUN, "--sft-epochs", "1", "--output-dir", str(output)]) == 0
    assert f"SFT model saved to {output}/model" in capsys.readouterr().out
    assert (output / FINAL_MODEL_DIR / "config.json").is_file()
    assert metric_rows(output) == []
    assert json.loads((output / SUMMARY_FILE).read_text())["steps"] == 0


def test_a_non_finite_abort_is_one_line_not_a_traceback(tmp_path, monkeypatch, capsys):
    def aborts(config, resume=False):
        raise FloatingPointError("5 updates had a non-finite loss or gradient (max_nonfinite_steps=5)")

    monkeypatch.setattr(trainer, "train", aborts)
    assert main(["train", *TINY_RUN, "--output-dir", str(tmp_path / "run")]) == 2
    assert "max_nonfinite_steps" in error_line(capsys)


# ----------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["train", "sft"])
def test_help_lists_the_names_each_option_takes(command, capsys):
    """Generated from config's name tables: the engines, skip policies, mitigations, and (under --set) loss types."""
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for option, names in NAMED_OPTIONS.items():
        assert f"{{{','.join(names)}}}" in text, option
    assert "--engine {eager,compiled,vllm} config option sampling.engine" in text
    assert "--skip-policy {uniform,influence,kl_target} config option nesting.skip_policy" in text
    assert "--mitigation {base,practical,retrace} config option importance.mitigation" in text
    assert "grpo.loss_type {dapo,bnpo,grpo,dr_grpo}" in text


@pytest.mark.parametrize("argv, listed", [
    (["eval"], ["--engine {eager,compiled,vllm}", " ".join(EVALUATION_SETS)]),
    (["probe"], ["--skip-policy {uniform,influence,kl_target}", "--dataset {svamp,gsm8k,math12k,arithmetic}"]),
    (["demo"], ["--skip-policy {uniform,influence,kl_target}"]),
])
def test_help_of_the_other_commands_lists_names_too(argv, listed, capsys):
    with pytest.raises(SystemExit):
        main([*argv, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert all(names in text for names in listed)


def test_data_show_arithmetic(capsys):
    assert main(["data", "show", "arithmetic", "--limit", "2"]) == 0
    out = capsys.readouterr().out
    problems = load_problems("arithmetic", split="train", limit=2)
    assert out.count("--- ") == 2 and out.count("question: ") == 2 and out.count("solution: ") == 2
    for problem in problems:
        assert f"--- {problem.id}\nquestion: {problem.question}\nanswer:   {problem.answer}" in out


def test_data_show_of_an_empty_file_is_an_error_naming_it(tmp_path, capsys):
    (tmp_path / "gsm8k").mkdir()
    (tmp_path / "gsm8k" / "train.jsonl").write_text("")
    assert main(["data", "show", "gsm8k", "--data-dir", str(tmp_path)]) == 2
    assert f"{tmp_path / 'gsm8k' / 'train.jsonl'} holds 0 problems" in error_line(capsys)


@pytest.mark.integration
def test_data_show_gsm8k_from_the_shared_data(shared_data, capsys):
    assert main(["data", "show", "gsm8k", "--limit", "2", "--data-dir", str(shared_data)]) == 0
    out = capsys.readouterr().out
    assert out.count("--- ") == 2 and out.count("answer:   ") == 2 and out.count("solution: ") == 2


# ----------------------------------------------------------------------------------------------------------
# Bad input: exit 2 and one line that names the option, before any work
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, named",
    [
        (["train", "--dataset", "arithmetc"], "dataset must be one of"),
        (["train", "--skip-ratio", "1.5"], "nesting.skip_ratio"),
        (["train", "--set", "grpo.num_generatons=4"], "grpo.num_generatons"),
        (["train", "--set", "grpo.beta"], "--set expects OPTION=VALUE"),
        (["train", "--config", "{tmp}/missing.yaml"], "config file {tmp}/missing.yaml does not exist"),
        (["sft", "--sft-epochs", "0"], "sft.epochs"),
        (["eval", "--model", "tiny-llama", "--benchmarks", "gsm8k", "aime25"], "unknown benchmark(s) 'aime25'"),
        (["eval", "--model", "{tmp}/not-a-model", "--benchmarks", "arithmetic", "--limit", "1"],
         "not a model directory"),
        (["sweep", "{tmp}/grid.yaml"], "skip_ratio"),
    ],
    ids=["dataset", "skip-ratio", "set-key", "set-form", "config-file", "sft-epochs", "benchmark", "model-dir",
         "grid-key"],
)
def test_bad_input_exits_2_naming_the_option(tmp_path, capsys, argv, named):
    (tmp_path / "not-a-model").mkdir()
    grid = {"name": "typo", "output_dir": str(tmp_path / "out"), "models": ["tiny-llama"],
            "datasets": ["arithmetic"], "skip_ratio": [0.1]}  # skip_ratios, misspelt
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(grid))
    argv = [word.format(tmp=tmp_path) for word in argv]
    if argv[0] in ("train", "sft", "eval"):
        argv += ["--output-dir", str(tmp_path / "out")]
    assert main(argv) == 2
    assert named.format(tmp=tmp_path) in error_line(capsys)
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory) -> Path:
    """Damaged inputs: model weights cut short or empty, GGUF files that are junk or cut short, a config whose
    `grpo:` section is a number, a config in Latin-1."""
    bad = tmp_path_factory.mktemp("bad")
    model, tokenizer = tiny_model("llama", num_layers=2)
    for name in ("truncated", "empty"):
        model.save_pretrained(bad / name)
        tokenizer.save_pretrained(bad / name)
    weights = bad / "truncated" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    (bad / "empty" / "model.safetensors").write_bytes(b"")
    (bad / "junk.gguf").write_bytes(b"not a model " * 100)
    (bad / "truncated.gguf").write_bytes(b"GGUF\x03\x00\x00\x00\x01")  # magic and version, then the header ends
    (bad / "scalar.yaml").write_text("grpo: 5\n")
    (bad / "latin1.yaml").write_bytes("model: café\n".encode("latin-1"))
    return bad


EVAL_ONE = ["--benchmarks", "arithmetic", "--limit", "1"]


@pytest.mark.parametrize(
    "argv, named",
    [
        (["eval", "--model", "{bad}/truncated", *EVAL_ONE], "weights in {bad}/truncated (model.safetensors) cannot"),
        (["eval", "--model", "{bad}/empty", *EVAL_ONE], "weights in {bad}/empty (model.safetensors) cannot"),
        (["eval", "--model", "{bad}/junk.gguf", *EVAL_ONE], "{bad}/junk.gguf is not a complete GGUF file"),
        (["eval", "--model", "{bad}/truncated.gguf", *EVAL_ONE], "{bad}/truncated.gguf is not a complete GGUF file"),
        (["train", "--config", "{bad}/scalar.yaml", "--num-generations", "2"],
         "grpo must be a mapping of options, got 5 in config file {bad}/scalar.yaml"),
        (["train", "--config", "{bad}/latin1.yaml"], "config file {bad}/latin1.yaml is not UTF-8"),
        (["train", "--config", "{bad}"], "config file {bad} is a directory"),
        (["eval", "--model", "tiny-llama", "--device", "gpu", *EVAL_ONE], "--device gpu: not usable"),
    ],
    ids=["truncated-weights", "empty-weights", "junk-gguf", "truncated-gguf", "scalar-section", "latin1-config",
         "config-directory", "device-name"],
)
def test_damaged_input_exits_2_naming_the_culprit(bad_files, tmp_path, capsys, argv, named):
    argv = [word.format(bad=bad_files) for word in argv] + ["--output-dir", str(tmp_path / "out")]
    assert main(argv) == 2
    assert named.format(bad=bad_files) in error_line(capsys)
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_eval_on_cuda_without_cuda_names_the_device_flag(tmp_path, capsys):
    assert main(["eval", "--model", "tiny-llama", "--device", "cuda", *EVAL_ONE, "--output-dir", str(tmp_path)]) == 2
    assert "--device cuda: not usable on this machine" in error_line(capsys)


def test_eval_refuses_results_it_cannot_resume(tmp_path, capsys):
    output = tmp_path / "out"
    output.mkdir()
    (output / "arithmetic.jsonl").write_text("")  # results without the settings they were drawn with
    argv = ["eval", "--model", "tiny-llama", "--benchmarks", "arithmetic", "--limit", "1", "--output-dir", str(output)]
    assert main(argv) == 2
    assert "eval_settings.json" in error_line(capsys)
