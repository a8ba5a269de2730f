"""Evaluation: pass@1 accuracy is right, results are keyed by problem, and an interrupted run resumes exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import nested_reft.evaluation.evaluate as evaluation
from nested_reft.cli import main
from nested_reft.config import ConfigError
from nested_reft.tasks.data import DATA_ENV, DataError, load_problems, svamp_split
from nested_reft.evaluation.records import RECORD_FIELDS, EvalError, read_records
from nested_reft.evaluation.evaluate import (
    DEFAULT_BENCHMARKS,
    EvalConfig,
    benchmark_names,
    eval_config,
    evaluate,
    evaluate_model,
)
from nested_reft.models.loading import ModelLoadError, load_model

FAST = EvalConfig(max_new_tokens=12, batch_size=2)
GSM8K_ANSWERS = ["7", "3", "7", "7", "1"]  # a model that always answers 7 gets 3/5


@pytest.fixture(autouse=True)
def _no_data_env(monkeypatch):
    monkeypatch.delenv(DATA_ENV, raising=False)


@pytest.fixture
def data_dir(tmp_path) -> Path:
    """gsm8k/test.jsonl and svamp/SVAMP.json in their original formats, questions of different lengths."""
    root = tmp_path / "data"
    (root / "gsm8k").mkdir(parents=True)
    rows = [
        {"question": f"Problem {i}: what comes next" + " and next" * (3 * i % 7) + "?", "answer": f"Work.\n#### {a}"}
        for i, a in enumerate(GSM8K_ANSWERS)
    ]
    (root / "gsm8k" / "test.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    ids = [f"chal-{i}" for i in range(10)]
    first_test_id = sorted(svamp_split(ids)["test"])[0]  # the one test problem whose answer is 7
    svamp = [
        {
            "ID": problem_id,
            "Body": f"There are {i} boxes" + " of apples" * i + ".",
            "Question": "How many apples are there?",
            "Equation": "( 3.0 + 4.0 )" if problem_id == first_test_id else "( 1.0 + 1.0 )",
            "Answer": 7.0 if problem_id == first_test_id else 2.0,
            "Type": "Addition",
        }
        for i, problem_id in enumerate(ids)
    ]
    (root / "svamp").mkdir()
    (root / "svamp" / "SVAMP.json").write_text(json.dumps(svamp))
    return root


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny-llama")


class AnswerThenStop(torch.nn.Module):
    """An output head that makes the model write `digit`, then EOS, whatever the prompt."""

    def __init__(self, model, digit: int, eos: int):
        super().__init__()
        self.head, self.digit, self.eos = model.lm_head, digit, eos
        self.last_tokens = None
        model.register_forward_pre_hook(self._remember_input, with_kwargs=True)

    def _remember_input(self, module, args, kwargs):
        self.last_tokens = kwargs["input_ids"][:, -1]

    def forward(self, hidden):
        logits = self.head(hidden)
        target = torch.where(self.last_tokens == self.digit, self.eos, self.digit)
        return logits + 100.0 * torch.nn.functional.one_hot(target, logits.shape[-1])[:, None, :]


def answers_seven():
    model, tokenizer = load_model("tiny-llama")
    model.lm_head = AnswerThenStop(model, tokenizer.convert_tokens_to_ids("7"), tokenizer.eos_token_id)
    return model, tokenizer


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


class CountingGenerate:
    """Stands in for `generate_rollouts`, counting calls (and prompts), optionally failing at call `fail_at`."""

    def __init__(self, monkeypatch, fail_at: int | None = None):
        self.calls, self.prompts, self.fail_at = 0, [], fail_at
        self.real = evaluation.generate_rollouts
        monkeypatch.setattr(evaluation, "generate_rollouts", self)

    def __call__(self, model, tokenizer, prompts, *args, **kwargs):
        self.calls += 1
        if self.calls == self.fail_at:
            raise KeyboardInterrupt("killed")
        self.prompts.append(list(prompts))
        return self.real(model, tokenizer, prompts, *args, **kwargs)


# ----------------------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------------------


def test_defaults_follow_the_paper():
    config = EvalConfig()
    assert (config.temperature, config.top_p) == (0.6, 0.95)
    sampling = config.sampling()
    assert sampling.min_new_tokens == 0 and sampling.top_k == 0  # stop at EOS, no top-k
    assert sampling.max_new_tokens == config.max_new_tokens == 1024
    assert DEFAULT_BENCHMARKS == ("aime24", "amc", "math500", "minerva", "olympiadbench")


@pytest.mark.parametrize(
    "kwargs, option",
    [
        (dict(temperature=-0.1), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(batch_size=0), "batch_size"),
        (dict(seed=1.5), "seed"),
    ],
)
def test_bad_settings_name_the_option(kwargs, option):
    with pytest.raises(ConfigError, match=option):
        EvalConfig(**kwargs)


def test_eval_config_leaves_unset_options_at_their_defaults():
    assert eval_config(temperature=None, max_new_tokens=8, seed=None) == EvalConfig(max_new_tokens=8)


def test_benchmark_names_are_distinct_and_known():
    assert benchmark_names(["gsm8k", "amc", "gsm8k"]) == ["gsm8k", "amc"]
    assert benchmark_names("svamp") == ["svamp"]
    assert benchmark_names("gsm8k,math500") == ["gsm8k", "math500"]  # as lm-eval's users type them
    assert benchmark_names(["gsm8k,", "math500", "amc, svamp"]) == ["gsm8k", "math500", "amc", "svamp"]
    with pytest.raises(DataError, match="unknown benchmark.s. 'aime25'"):
        benchmark_names("gsm8k,aime25")
    with pytest.raises(DataError, match="no benchmark given"):
        benchmark_names([])


def test_progress_rewrites_one_line_per_benchmark(capsys):
    evaluation.print_progress("amc", 1, 2)
    evaluation.print_progress("amc", 2, 2)
    assert capsys.readouterr().err == "\reval amc: 1/2\reval amc: 2/2\n"


# ----------------------------------------------------------------------------------------------------------
# Accuracy and the files
# ----------------------------------------------------------------------------------------------------------


def test_accuracy_of_a_model_that_always_answers_seven(data_dir, tmp_path):
    model, tokenizer = answers_seven()
    out = tmp_path / "out"
    result = evaluate(model, tokenizer, ["gsm8k", "svamp"], out, FAST, data_dir=data_dir)

    svamp = load_problems("svamp", "test", data_dir=data_dir)
    expected_svamp = sum(p.answer == "7" for p in svamp) / len(svamp)
    assert 0 < expected_svamp < 1
    assert result["benchmarks"]["gsm8k"] == {
        "accuracy": 3 / 5, "n": 5, "correct": 3, "mean_completion_tokens": 2.0, "finished_fraction": 1.0,
    }
    assert result["benchmarks"]["svamp"]["accuracy"] == pytest.approx(expected_svamp)
    assert result["benchmarks"]["svamp"]["n"] == len(svamp)
    assert result["average"] == pytest.approx((3 / 5 + expected_svamp) / 2)
    assert json.loads((out / "eval.json").read_text()) == result
    assert result["config"] == {"temperature": 0.6, "top_p": 0.95, "max_new_tokens": 12, "batch_size": 2, "seed": 0,
                                "engine": "eager"}
    assert result["complete"] and result["timing"]["generated_tokens"] == 2 * (5 + len(svamp))

    lines = read_lines(out / "gsm8k.jsonl")
    assert [line["id"] for line in lines] == [f"gsm8k/test/{i}" for i in range(5)]  # data set order
    for line, gold in zip(lines, GSM8K_ANSWERS):
        assert line["completion"] == "7" and line["extracted_answer"] == "7" and line["gold"] == gold
        assert line["correct"] == (gold == "7") and line["finished"] and line["completion_tokens"] == 2
        assert line["prompt"].endswith("<|im_start|>assistant\n")


def test_limit_fields_and_batches_sorted_by_prompt_length(tiny, data_dir, tmp_path, monkeypatch):
    model, tokenizer = tiny
    calls = CountingGenerate(monkeypatch)
    result = evaluate(model, tokenizer, ["gsm8k"], tmp_path / "out", EvalConfig(max_new_tokens=6, batch_size=2),
                      data_dir=data_dir, limit=4)
    assert result["benchmarks"]["gsm8k"]["n"] == 4 and result["limit"] == 4
    lines = read_lines(tmp_path / "out" / "gsm8k.jsonl")
    assert [line["id"] for line in lines] == [f"gsm8k/test/{i}" for i in range(4)]
    for line in lines:
        assert set(line) == set(RECORD_FIELDS)
        assert 1 <= line["completion_tokens"] <= 6 and isinstance(line["correct"], bool)
    assert [len(batch) for batch in calls.prompts] == [2, 2]
    lengths = [len(tokenizer(prompt)["input_ids"]) for batch in calls.prompts for prompt in batch]
    assert lengths == sorted(lengths, reverse=True)  # longest first


# ----------------------------------------------------------------------------------------------------------
# Resuming
# ----------------------------------------------------------------------------------------------------------


def test_a_killed_evaluation_resumes_to_the_files_of_an_uninterrupted_one(tiny, data_dir, tmp_path, monkeypatch):
    model, tokenizer = tiny
    benchmarks = ["gsm8k", "svamp"]  # 5 + 3 problems in batches of 2: 3 + 2 generate calls
    config = EvalConfig(temperature=1.0, top_p=0.95, max_new_tokens=12, batch_size=2, seed=3)
    whole = evaluate(model, tokenizer, benchmarks, tmp_path / "whole", config, data_dir=data_dir)

    CountingGenerate(monkeypatch, fail_at=2)
    with pytest.raises(KeyboardInterrupt):
        evaluate(model, tokenizer, benchmarks, tmp_path / "resumed", config, data_dir=data_dir)
    assert len(read_lines(tmp_path / "resumed" / "gsm8k.jsonl")) == 2  # the first batch was kept
    assert not (tmp_path / "resumed" / "eval.json").exists()

    calls = CountingGenerate(monkeypatch)
    resumed = evaluate(model, tokenizer, benchmarks, tmp_path / "resumed", config, data_dir=data_dir)
    assert calls.calls == 4  # the first batch is not generated again
    assert resumed["timing"]["resumed_problems"] == 2
    for name in benchmarks:
        expected = (tmp_path / "whole" / f"{name}.jsonl").read_text()
        assert (tmp_path / "resumed" / f"{name}.jsonl").read_text() == expected
    assert {k: v for k, v in resumed.items() if k != "timing"} == {k: v for k, v in whole.items() if k != "timing"}

    calls = CountingGenerate(monkeypatch)  # a finished evaluation run again generates nothing
    again = evaluate(model, tokenizer, benchmarks, tmp_path / "resumed", config, data_dir=data_dir)
    assert calls.calls == 0 and again["benchmarks"] == whole["benchmarks"]
    completions = {line["completion"] for line in read_lines(tmp_path / "whole" / "gsm8k.jsonl")}
    assert len(completions) > 1  # sampled, not a degenerate constant


def test_a_trailing_partial_line_is_dropped_and_the_problem_generated(tiny, data_dir, tmp_path, monkeypatch):
    model, tokenizer = tiny
    whole = evaluate(model, tokenizer, ["gsm8k"], tmp_path / "whole", FAST, data_dir=data_dir)
    out = tmp_path / "out"
    CountingGenerate(monkeypatch, fail_at=2)
    with pytest.raises(KeyboardInterrupt):
        evaluate(model, tokenizer, ["gsm8k"], out, FAST, data_dir=data_dir)
    path = out / "gsm8k.jsonl"
    complete = path.read_text()
    torn = complete + complete.splitlines()[0][:25]  # a kill in the middle of a write
    path.write_text(torn)

    records = read_records(path)
    assert len(records) == 2 and path.read_text() == torn  # a reader leaves the file to the evaluation's writer
    calls = CountingGenerate(monkeypatch)
    resumed = evaluate(model, tokenizer, ["gsm8k"], out, FAST, data_dir=data_dir)
    assert calls.calls == 2
    assert path.read_text() == (tmp_path / "whole" / "gsm8k.jsonl").read_text()
    assert resumed["benchmarks"] == whole["benchmarks"]


def test_a_corrupt_line_inside_the_file_is_refused(tmp_path):
    path = tmp_path / "gsm8k.jsonl"
    record = {"id": "x", "prompt": "p", "completion": "c", "extracted_answer": None, "gold": "1", "correct": False,
              "completion_tokens": 3, "finished": True}
    path.write_text(json.dumps(record) + "\n{oops\n" + json.dumps(record) + "\n")
    with pytest.raises(EvalError, match="line 2"):
        read_records(path)
    path.write_text(json.dumps({"id": "a"}) + "\n")
    with pytest.raises(EvalError, match="missing prompt"):
        read_records(path)


def test_results_of_other_settings_are_not_mixed(tiny, data_dir, tmp_path):
    model, tokenizer = tiny
    evaluate(model, tokenizer, ["gsm8k"], tmp_path, FAST, data_dir=data_dir, limit=2)
    with pytest.raises(EvalError, match="max_new_tokens was 12, now 5"):
        evaluate(model, tokenizer, ["gsm8k"], tmp_path, EvalConfig(max_new_tokens=5), data_dir=data_dir, limit=2)
    with pytest.raises(EvalError, match="model"):
        evaluate(model, tokenizer, ["gsm8k"], tmp_path, FAST, data_dir=data_dir, limit=2, model_name="other")
    # A different batch size only changes how the remaining problems are grouped: allowed.
    result = evaluate(model, tokenizer, ["gsm8k"], tmp_path, EvalConfig(max_new_tokens=12, batch_size=4),
                      data_dir=data_dir, limit=3)
    assert result["benchmarks"]["gsm8k"]["n"] == 3 and result["timing"]["resumed_problems"] == 2


# ----------------------------------------------------------------------------------------------------------
# Errors before any work
# ----------------------------------------------------------------------------------------------------------


def refuse_to_load(*args, **kwargs):
    raise AssertionError("the model must not be loaded")


def test_unknown_benchmark_fails_before_the_model_is_loaded(tmp_path, monkeypatch):
    monkeypatch.setattr("nested_reft.models.loading.load_model", refuse_to_load)
    with pytest.raises(DataError, match=r"'aime25'.*aime24, amc, math500, minerva, olympiadbench"):
        evaluate_model("tiny-llama", ["aime24", "aime25"], tmp_path / "out")
    assert not (tmp_path / "out").exists()  # the command line's exit 2: tests/test_cli.py


def test_a_directory_that_is_not_a_model_fails_before_any_work(data_dir, tmp_path, monkeypatch):
    not_a_model = tmp_path / "empty"
    not_a_model.mkdir()
    calls = CountingGenerate(monkeypatch)
    with pytest.raises(ModelLoadError, match="not a model directory"):
        evaluate_model(str(not_a_model), ["gsm8k"], tmp_path / "out", data_dir=data_dir)
    assert calls.calls == 0 and not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------


def test_cli_eval_prints_a_table_and_writes_the_files(data_dir, tmp_path, capsys):
    import datasets

    math500 = {"problem": ["What is $1+1$?", "What is $2 \\cdot 3$?", "What is $10-3$?"], "answer": ["2", "6", "7"]}
    datasets.Dataset.from_dict(math500).save_to_disk(str(data_dir / "eval_suite" / "r1zero_suite" / "math"))
    out = tmp_path / "out"
    argv = ["eval", "--model", "tiny-llama", "--benchmarks", "gsm8k", "svamp", "math500", "--limit", "2",
            "--max-new-tokens", "8", "--data-dir", str(data_dir), "--output-dir", str(out), "--batch-size", "2",
            "--seed", "1"]  # fmt: skip
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "average" in table and all(name in table for name in ("gsm8k", "svamp", "math500"))
    result = json.loads((out / "eval.json").read_text())
    assert result["model"] == "tiny-llama" and result["config"]["seed"] == 1
    sizes = {name: summary["n"] for name, summary in result["benchmarks"].items()}
    assert sizes == {"gsm8k": 2, "svamp": 2, "math500": 2}
    assert len(read_lines(out / "math500.jsonl")) == 2


@pytest.mark.parametrize("listed", [["gsm8k,svamp"], ["gsm8k,", "svamp"], ["gsm8k", "svamp"]],
                         ids=["commas", "comma-and-space", "spaces"])
def test_cli_eval_takes_benchmarks_separated_by_commas_or_spaces(data_dir, tmp_path, listed):
    out = tmp_path / "out"
    argv = ["eval", "--model", "tiny-llama", "--benchmarks", *listed, "--limit", "1", "--max-new-tokens", "4",
            "--data-dir", str(data_dir), "--output-dir", str(out)]
    assert main(argv) == 0
    assert list(json.loads((out / "eval.json").read_text())["benchmarks"]) == ["gsm8k", "svamp"]


@pytest.mark.integration
def test_cli_eval_on_the_shared_benchmarks(shared_data, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["eval", "--model", "tiny-llama", "--limit", "2", "--max-new-tokens", "8", "--data-dir", str(shared_data),
            "--output-dir", str(out)]  # fmt: skip
    assert main(argv) == 0
    result = json.loads((out / "eval.json").read_text())
    assert list(result["benchmarks"]) == list(DEFAULT_BENCHMARKS)
    for name in DEFAULT_BENCHMARKS:
        lines = read_lines(out / f"{name}.jsonl")
        assert len(lines) == 2 and all(line["gold"] for line in lines)
    assert "average" in capsys.readouterr().out
