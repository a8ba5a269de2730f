"""The demo on a tiny model: one shared SFT warm-up, a baseline and a Nested-ReFT run, the table and the plot."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest
import yaml

from nested_reft import trainer
from nested_reft.demo import RUNS, run_demo
from nested_reft.rundir import CONFIG_FILE, FINAL_MODEL_DIR, METRICS_FILE

ROWS = ("step time (s, median)", "generation tok/s (median)", "reward (mean of run)", "token speed (tok/s)")


def row_from_files(run: Path) -> dict[str, float]:
    """A run's column of the comparison, recomputed from its metrics.jsonl alone (one record per step)."""
    steps = [json.loads(line) for line in (run / METRICS_FILE).read_text().splitlines()]
    runtime = sum(step["step_time_s"] for step in steps)
    return {
        "step time (s, median)": statistics.median(step["step_time_s"] for step in steps),
        "generation tok/s (median)": statistics.median(step["gen_tokens_per_s"] for step in steps),
        "reward (mean of run)": statistics.fmean(step["reward_mean"] for step in steps),
        "token speed (tok/s)": sum(step["tokens_processed"] for step in steps) / runtime,
    }


@pytest.fixture
def warm_ups(monkeypatch) -> list[str]:
    """Records every SFT warm-up the trainer runs (by the model it starts from)."""
    calls, warm_up = [], trainer.sft_warmup

    def recording(model, *args, **kwargs):
        calls.append(model.name_or_path)
        return warm_up(model, *args, **kwargs)

    monkeypatch.setattr(trainer, "sft_warmup", recording)
    return calls


def test_demo_compares_baseline_and_nested_from_one_warm_up(tmp_path, warm_ups, capsys):
    table = run_demo(output_dir=tmp_path, model="tiny-llama", steps=2)

    assert (tmp_path / "comparison.md").read_text() == table
    lines = table.splitlines()
    assert lines[0] == "| metric | baseline | nested | nested / baseline |"
    expected = {name: row_from_files(tmp_path / name) for name in RUNS}
    for line, metric in zip(lines[2:], ROWS, strict=True):
        label, baseline_cell, nested_cell, ratio_cell = (cell.strip() for cell in line.strip("|").split("|"))
        baseline, nested = expected["baseline"][metric], expected["nested"][metric]
        assert label == metric
        assert (float(baseline_cell), float(nested_cell)) == pytest.approx((baseline, nested), abs=6e-4), line
        ratio = nested / baseline if baseline else math.nan
        assert float(ratio_cell) == pytest.approx(ratio, abs=6e-4, nan_ok=True), line
    assert (tmp_path / "demo.png").stat().st_size > 1000
    assert table in capsys.readouterr().out

    assert len(warm_ups) == 1  # one SFT warm-up, shared
    shared = str(tmp_path / "sft" / FINAL_MODEL_DIR)
    for name, (nesting, importance) in RUNS.items():
        config = yaml.safe_load((tmp_path / name / CONFIG_FILE).read_text())
        assert config["model"] == shared and config["sft"]["epochs"] == 0 and config["seed"] == 0
        assert (config["nesting"]["skip_ratio"], config["nesting"]["border"]) == (nesting.skip_ratio, nesting.border)
        assert config["importance"]["mitigation"] == importance.mitigation
        assert config["rft_steps"] == 2
