"""Evaluation: pass@1 accuracy a_k on each benchmark k and their mean, the paper's test-time metric.

Section 1 ("Goal") defines a_k = (1/|B_k|) sum_i 1[v(y_hat_i) = y_i], one sampled answer per problem, and the
paper reports the average of a_k over the 5 benchmarks of Liu et al. 2025 (aime24, amc, math500, minerva,
olympiadbench). Appendix F samples with temperature 0.6 and top-p 0.95, up to 32k new tokens; completions end at
EOS. The score of a completion is `Task.score`, the very function that is the training reward.

Files written to `output_dir` (their layout, the one-writer lock and the record store are `nested_reft.evaluation.records`):
the per-problem records `<benchmark>.jsonl`, `eval_settings.json` (the model and `EvalConfig` they were drawn
with) and `eval.json`: `{"benchmarks": {name: {"accuracy", "n", "correct", "mean_completion_tokens",
"finished_fraction"}}, "average", "model", "config", "limit", "data_dir", "complete", "timing"}`, written
atomically at the end. Everything but `timing` is a function of the settings, the data and the seed.

Resuming: an interrupted evaluation started again with the same output directory reads the lines already
written (a trailing partial line, from a kill in the middle of a write, is dropped and the file rewritten
without it), and generates only the problems that have no line yet. Problems are sorted by prompt length
(longest first, so an out-of-memory error shows in the first batch) and cut into batches over the whole
requested set, done or not; each batch draws from a generator seeded by (seed, benchmark, batch index). A run
resumed at a batch boundary therefore draws exactly what an uninterrupted one does, and its files are equal.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from nested_reft.evaluation.records import (
    EVAL_FILE, claimed_output_dir, json_line, locked_eval_directory, resumable_records, write_records,
)
from nested_reft.store.files import LOCK_FILE, atomic_write_json, check_output_directory, removed_unless_used, writing
from nested_reft.config import (  # noqa: F401 (eval_config: callers import it from here too)
    DEFAULT_BENCHMARKS, EVALUATION_SETS, ConfigError, EvalConfig, eval_config, listed_benchmarks,
)
from nested_reft.tasks.data import DATA_ENV, DataError, Problem
from nested_reft.tasks.rewards import extract_answer
from nested_reft.engines.rollout import generate_rollouts
from nested_reft.engines.vllm_engine import check_vllm_runs, check_vllm_supports, engine_positions
from nested_reft.store.seeding import seeded_generator
from nested_reft.tasks.task import Task

logger = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]  # (benchmark, problems done, problems in the benchmark)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def print_progress(benchmark: str, done: int, total: int) -> None:
    """A `Progress` for terminals: one line per benchmark on stderr, rewritten after every batch."""
    print(f"\reval {benchmark}: {done}/{total}", end="\n" if done == total else "", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------------------
# Entry points
# ----------------------------------------------------------------------------------------------------------


def evaluate_model(
    name_or_path: str,
    benchmarks: Sequence[str] = DEFAULT_BENCHMARKS,
    output_dir: str | Path | None = None,
    config: EvalConfig = EvalConfig(),
    data_dir: str | Path | None = None,
    limit: int | None = None,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device | None = None,
    progress: Progress | None = None,
) -> dict:
    """Load `name_or_path` with `models.load_model` and `evaluate` it; `output_dir` defaults to
    `default_output_dir(name_or_path)`, `device` to cuda where there is one, else cpu.

    Benchmark names and the data are checked before the model is loaded; a path that is not a model raises
    `ModelLoadError` before anything is generated or written.
    """
    from nested_reft.models.loading import MODEL_ALIASES, load_model, model_fingerprint

    device = usable_device(device)
    output_dir = default_output_dir(name_or_path) if output_dir is None else output_dir
    check_output_directory(output_dir, "--output-dir")
    tasks = load_tasks(benchmarks, data_dir, limit)
    model, tokenizer = load_model(name_or_path, dtype=dtype, device=device)
    local = Path(name_or_path).expanduser()
    model_name = str(local.resolve()) if name_or_path not in MODEL_ALIASES and local.exists() else str(name_or_path)
    return evaluate_tasks(model, tokenizer, tasks, output_dir, config, data_dir, limit, model_name, progress,
                          model_files=model_fingerprint(str(name_or_path)))


def usable_device(device: str | torch.device | None) -> torch.device:
    """`device`, or cuda where there is one, else cpu; a ConfigError naming --device where `device` is no
    device name, or names one this machine does not have (cuda without a GPU), before anything is loaded."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        torch.empty(0, device=device)  # the one check that covers every device type and index
        if torch.device(device).type == "meta":
            raise RuntimeError("the meta device holds shapes, not numbers")
    except (RuntimeError, AssertionError) as error:  # torch's two ways of saying no (AssertionError: no CUDA)
        reason = str(error).splitlines()[0][:200]
        raise ConfigError(f"--device {device}: not usable on this machine ({reason}); leave --device unset "
                          "for cuda where there is one, else cpu") from None
    return torch.device(device)


def evaluate(
    model,
    tokenizer,
    benchmarks: Sequence[str],
    output_dir: str | Path,
    config: EvalConfig = EvalConfig(),
    data_dir: str | Path | None = None,
    limit: int | None = None,
    *,
    model_name: str | None = None,
    progress: Progress | None = None,
) -> dict:
    """pass@1 accuracy of `model` on each of `benchmarks` and their mean; writes and returns `eval.json`.

    `tokenizer` must pad on the left (as `load_model` sets it up). `data_dir` as in `data.load_problems`;
    `limit` keeps the first `limit` problems of each benchmark. `model_name` is recorded in the output and
    checked on resume (default: the model's `name_or_path`). `progress(benchmark, done, total)` is called after
    every batch.
    """
    tasks = load_tasks(benchmarks, data_dir, limit)
    name = model_name if model_name is not None else str(getattr(model, "name_or_path", "") or type(model).__name__)
    return evaluate_tasks(model, tokenizer, tasks, output_dir, config, data_dir, limit, name, progress)


def load_tasks(benchmarks: Sequence[str], data_dir: str | Path | None = None, limit: int | None = None) -> list[Task]:
    """The test problems of each benchmark (duplicates dropped), every name checked before any data is read."""
    names = benchmark_names(benchmarks)
    if limit is not None and (not _is_int(limit) or limit < 1):
        raise DataError(f"limit must be an integer >= 1, got {limit!r}")
    tasks = [Task.load(name, split="test", data_dir=data_dir, limit=limit) for name in names]
    for task in tasks:
        duplicates = len(task.problems) - len({problem.id for problem in task.problems})
        if duplicates:
            raise DataError(f"benchmark {task.name!r} has {duplicates} duplicate problem id(s)")
    return tasks


def benchmark_names(benchmarks: Sequence[str] | str) -> list[str]:
    """The distinct names of `benchmarks` (see `listed_benchmarks`), in order; a DataError naming those
    `evaluate` does not know.

    Cheap, so callers check names before any data, model or (in a sweep) training is loaded.
    """
    names = list(dict.fromkeys(listed_benchmarks(benchmarks)))
    if not names:
        raise DataError(f"no benchmark given; expected some of {', '.join(EVALUATION_SETS)}")
    unknown = [name for name in names if name not in EVALUATION_SETS]
    if unknown:
        listed = ", ".join(map(repr, unknown))
        raise DataError(f"unknown benchmark(s) {listed}; expected some of {', '.join(EVALUATION_SETS)}")
    return names


def default_output_dir(name_or_path: str) -> Path:
    """`runs/eval/<the model name with every run of odd characters made one '_'>`."""
    return Path("runs") / "eval" / (re.sub(r"[^A-Za-z0-9._-]+", "_", str(name_or_path).strip("/")) or "model")


# ----------------------------------------------------------------------------------------------------------
# The evaluation loop
# ----------------------------------------------------------------------------------------------------------


def evaluate_tasks(
    model,
    tokenizer,
    tasks: list[Task],
    output_dir: str | Path,
    config: EvalConfig,
    data_dir: str | Path | None,
    limit: int | None,
    model_name: str,
    progress: Progress | None,
    model_files: str | None = None,
) -> dict:
    """pass@1 of a loaded model on `tasks` (a benchmark's, or any problems a script holds out), written and
    resumed in `output_dir` as `evaluate` does; `data_dir` and `limit` are only recorded in eval.json.
    `model_files`: the model's fingerprint (`models.loading.model_fingerprint`), recorded beside its name and
    compared on resume, so that records are never resumed for another model saved at the same path."""
    output_dir = Path(output_dir)
    check_output_directory(output_dir, "--output-dir")  # again for callers of `evaluate` and this function
    if config.engine == "vllm":
        check_vllm_supports(model, option="engine")
        check_vllm_runs(model, option="engine")
    positions, positions_name = engine_positions(model, config.sampling())
    for task in tasks:
        task.check_fits(tokenizer, positions, config.max_new_tokens, "max_new_tokens", positions_name)
    with removed_unless_used(output_dir, (LOCK_FILE,)), locked_eval_directory(output_dir):
        return _evaluate_tasks(model, tokenizer, tasks, output_dir, config, data_dir, limit, model_name, progress,
                               model_files)


def _evaluate_tasks(model, tokenizer, tasks: list[Task], output_dir: Path, config: EvalConfig,
                    data_dir: str | Path | None, limit: int | None, model_name: str, progress: Progress | None,
                    model_files: str | None) -> dict:
    settings = {"model": model_name, "model_files": model_files, "config": dataclasses.asdict(config)}
    with claimed_output_dir(output_dir, settings, [task.name for task in tasks]):
        return _evaluate_claimed(model, tokenizer, tasks, output_dir, config, data_dir, limit, model_name, progress,
                                 settings)


def _evaluate_claimed(model, tokenizer, tasks: list[Task], output_dir: Path, config: EvalConfig,
                      data_dir: str | Path | None, limit: int | None, model_name: str, progress: Progress | None,
                      settings: dict) -> dict:
    started = time.perf_counter()
    timing = {"generated_tokens": 0, "generation_time_s": 0.0, "generated_problems": 0, "resumed_problems": 0}
    summaries = {}
    for task in tasks:
        records = _evaluate_task(model, tokenizer, task, output_dir / f"{task.name}.jsonl", config, timing, progress)
        summaries[task.name] = _summary(records)
    timing["tokens_per_s"] = timing["generated_tokens"] / max(timing["generation_time_s"], 1e-9)
    timing["wall_time_s"] = time.perf_counter() - started
    result = {
        "benchmarks": summaries,
        "average": sum(s["accuracy"] for s in summaries.values()) / len(summaries),
        "model": model_name,
        "config": settings["config"],
        "limit": limit,
        "data_dir": str(data_dir) if data_dir is not None else os.environ.get(DATA_ENV) or None,
        "complete": True,
        "timing": timing,
    }
    atomic_write_json(output_dir / EVAL_FILE, result)
    return result


def _evaluate_task(
    model, tokenizer, task: Task, path: Path, config: EvalConfig, timing: dict, progress: Progress | None
) -> list[dict]:
    """Records for every problem of `task`, generating only those `path` does not hold yet."""
    prompts = dict(zip((p.id for p in task.problems), task.prompts(tokenizer, task.problems)))
    done = resumable_records(path, {p.id: (prompts[p.id], p.answer) for p in task.problems})
    wanted = {problem.id for problem in task.problems}
    timing["resumed_problems"] += sum(1 for key in done if key in wanted)
    batches = _batches(task.problems, [prompts[p.id] for p in task.problems], tokenizer, config.batch_size)
    _warn_if_longer_than_context(model, tokenizer, batches, prompts, config.max_new_tokens)
    sampling = config.sampling()
    device = next(model.parameters()).device
    with writing(path), path.open("a", encoding="utf-8") as stream:
        for index, batch in enumerate(batches):
            pending = [problem for problem in batch if problem.id not in done]
            if pending:
                generator = seeded_generator(f"eval:{config.seed}:{task.name}:{index}", device)
                rollouts = generate_rollouts(
                    model, tokenizer, [prompts[p.id] for p in pending], 1, sampling, generator=generator
                )
                records = _records(task, pending, [prompts[p.id] for p in pending], rollouts, tokenizer)
                stream.write("".join(json_line(record) for record in records))
                stream.flush()
                os.fsync(stream.fileno())
                done.update((record["id"], record) for record in records)
                timing["generated_tokens"] += rollouts.completion_tokens
                timing["generation_time_s"] += rollouts.generation_time_s
                timing["generated_problems"] += len(pending)
            if progress is not None:
                progress(task.name, sum(1 for key in done if key in wanted), len(task.problems))
    # Data set order, then any lines of problems outside this request (a larger --limit before), kept as they were.
    ordered = [done[problem.id] for problem in task.problems]
    ordered += [record for key, record in done.items() if key not in wanted]
    write_records(path, ordered)
    return [done[problem.id] for problem in task.problems]


def _records(task: Task, problems: list[Problem], prompts: list[str], rollouts, tokenizer) -> list[dict]:
    lengths = rollouts.completion_mask.sum(dim=1).tolist()
    ids = rollouts.completion_ids.tolist()
    completions = [tokenizer.decode(row[:length], skip_special_tokens=True) for row, length in zip(ids, lengths)]
    scores = task.score(completions, [problem.answer for problem in problems])
    return [
        {
            "id": problem.id,
            "prompt": prompt,
            "completion": completion,
            "extracted_answer": extract_answer(completion),
            "gold": problem.answer,
            "correct": score == 1.0,
            "completion_tokens": int(length),
            "finished": finished,
        }
        for problem, prompt, completion, score, length, finished
        in zip(problems, prompts, completions, scores, lengths, rollouts.finished.tolist())
    ]


def _summary(records: list[dict]) -> dict:
    n = len(records)
    correct = sum(bool(record["correct"]) for record in records)
    return {
        "accuracy": correct / n,
        "n": n,
        "correct": correct,
        "mean_completion_tokens": sum(record["completion_tokens"] for record in records) / n,
        "finished_fraction": sum(bool(record["finished"]) for record in records) / n,
    }


def _batches(problems: list[Problem], prompts: list[str], tokenizer, batch_size: int) -> list[list[Problem]]:
    """Problems sorted by prompt length in tokens, longest first (ties in data set order), cut into batches."""
    lengths = [len(ids) for ids in tokenizer(prompts, add_special_tokens=False)["input_ids"]]
    order = sorted(range(len(problems)), key=lambda i: (-lengths[i], i))
    ordered = [problems[i] for i in order]
    return [ordered[start : start + batch_size] for start in range(0, len(ordered), batch_size)]


def _warn_if_longer_than_context(model, tokenizer, batches, prompts, max_new_tokens: int) -> None:
    limit = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    if not limit or not batches:
        return
    longest = len(tokenizer(prompts[batches[0][0].id], add_special_tokens=False)["input_ids"])
    if longest + max_new_tokens > limit:
        logger.warning(
            "%s: the longest prompt (%d tokens) plus max_new_tokens (%d) exceeds the model's %d positions; "
            "generation may run past the positions the model was trained on",
            batches[0][0].id.split("/")[0], longest, max_new_tokens, limit,
        )


def format_table(result: dict) -> str:
    """Accuracy per benchmark and the average, as a small text table."""
    rows = [("benchmark", "accuracy", "correct", "n")]
    for name, summary in result["benchmarks"].items():
        rows.append((name, f"{100 * summary['accuracy']:.1f}%", str(summary["correct"]), str(summary["n"])))
    rows.append(("average", f"{100 * result['average']:.1f}%", "", ""))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = [
        f"{row[0]:<{widths[0]}}  {row[1]:>{widths[1]}}  {row[2]:>{widths[2]}}  {row[3]:>{widths[3]}}".rstrip()
        for row in rows
    ]
    lines.insert(1, "-" * len(lines[0]))
    lines.insert(len(lines) - 1, "-" * len(lines[0]))
    return "\n".join(lines)
