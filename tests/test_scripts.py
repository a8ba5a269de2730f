"""The study's scripts on tiny models, so that the commands docs/ cite cannot rot: the calibration and the vLLM
reload arithmetic. (The skip-set probe became `nested-reft probe`: tests/test_probe.py.)"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def script(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def test_the_calibration_reports_the_gain_of_its_own_evaluations(tmp_path):
    calibrate = script("calibrate_smollm2")
    out = tmp_path / "calibration"
    assert calibrate.main(["--model", "tiny-llama", "--n-train", "16", "--n-eval", "4", "--sft-examples", "8",
                           "--sft-batch-size", "4", "--steps", "2", "--batch-size", "2", "--num-generations", "2",
                           "--micro-batch-size", "4", "--max-new-tokens", "4", "--eval-batch-size", "4",
                           "--output-dir", str(out)]) == 0
    (result,) = json.loads((out / "results.json").read_text())["seeds"]
    before = json.loads((out / "sft-s0" / "eval" / "eval.json").read_text())["average"]
    after = json.loads((out / "reft-s0" / "eval" / "eval.json").read_text())["average"]
    assert result["gain_points"] == pytest.approx(100 * (after - before))
    assert result["reft_steps"] == 2 and not list((out / "reft-s0").glob("checkpoint-*"))
    train, held_out = calibrate.arithmetic_sets([1], 16, 4, 0, 1)
    assert not {p.question for p in train} & {p.question for p in held_out}


def test_the_reload_moves_the_kept_layers_and_scales_with_them():
    reload = script("vllm_reload")
    model, work = reload.scaling.QWEN_MATH_1_5B, reload.scaling.Workload()
    full, nested = (reload.step_cost(model, work, reload.H200, ratio) for ratio in (0.0, 0.30))
    assert full.skipped == 0 and nested.skipped == 8  # Table 1: 30% of 28 layers
    assert full.reload_bytes == 6 * model.parameters  # float32 read, bfloat16 written
    assert full.reload_bytes - nested.reload_bytes == 6 * 8 * model.layer_parameters
    assert nested.kv_bytes_per_token == pytest.approx(full.kv_bytes_per_token * 20 / 28)
    assert nested.generation_s < full.generation_s


@pytest.mark.parametrize("study", ["study-smollm2", "study-nested-warmup", "study-bridged-nesting",
                                   "study-rollout-selection"])
def test_the_study_runner_orders_every_instance_of_the_study_grid_once(study):
    """scripts/<study>.sh lists the grid's instances by name (its run order); a variant added to the grid and not to
    the script would stop the study at its start, so the two are checked here."""
    import re

    from nested_reft.experiments.grid import enumerate_instances, load_grid

    runner = (SCRIPTS / f"{study}.sh").read_text().replace("\\\n", " ")
    blocks = re.findall(r"for seed in ([\d ]+); do\s+for run in ([^;]+); do", runner)
    listed = [f"{run}-s{seed}" for seeds, runs in blocks for seed in seeds.split() for run in runs.split()]
    grid = load_grid(SCRIPTS.parent / "configs" / "grids" / f"{study}.yaml")
    instances = [instance.id.split("/", 2)[-1] for instance in enumerate_instances(grid)]  # past model/dataset/
    assert len(listed) == len(set(listed))
    assert sorted(listed) == sorted(instances)


def test_the_nested_warm_up_calibration_tables_what_its_probes_and_evaluations_measured(tmp_path):
    calibrate = script("calibrate_nested_warmup")
    docs = tmp_path / "docs"
    calibrate.main(["--model", "tiny-llama", "--only", "plain-64", "distill1-64", "--output-dir", str(tmp_path / "runs"),
                    "--docs", str(docs)])
    rows = json.loads((docs / "calibration.json").read_text())
    assert [row["warm_up"] for row in rows] == ["plain-64", "distill1-64"]
    plain, distill = rows
    assert distill["sft_flops"] > plain["sft_flops"] > 0  # distillation's second forward is counted
    table = (docs / "calibration.md").read_text().splitlines()
    kl_15 = [float(line.split("|")[8]) for line in table[2:]]
    assert kl_15 == [round(next(x["kl_behavior_target"] for x in row["probe"]["ratios"] if x["skip_ratio"] == 0.15), 2)
                     for row in rows]
    assert (docs / calibrate.FIGURE).stat().st_size > 0
    (docs / calibrate.FIGURE).unlink()
    calibrate.main(["--figure-only", "--docs", str(docs)])  # redrawn from calibration.json alone
    assert (docs / calibrate.FIGURE).stat().st_size > 0
    config = calibrate.config_for("distill1-64", {"train": {"sft": {"epochs": 1}}, "models": ["m"],
                                                  "datasets": ["d"]}, tmp_path)
    assert config["sft"] == {"epochs": 1, "distill_nested": 1.0, "distill_ratio": 0.15} and config["rft_steps"] == 0


def test_sequential_bridges_equal_parallel_ones_where_no_earlier_block_is_skipped_and_differ_after_one():
    """Sequential calibration reads the nested model's state where block i was: for a single skipped block that is
    the full model's, so its bridge is the parallel one; after an earlier skipped block it is not."""
    from nested_reft.config import NestingConfig
    from nested_reft.experiments.probe import calibrated_bridges
    from nested_reft.models.tiny import tiny_model
    from nested_reft.tasks.arithmetic import generate_arithmetic
    from nested_reft.training.bridging import calibration_texts

    calibration = script("bridge_calibration")
    model, tokenizer = tiny_model("llama", num_layers=6)
    problems = generate_arithmetic(6, seed=1)
    parallel = calibrated_bridges(model, tokenizer, problems, NestingConfig(bridge_ridge=1e-3))
    texts = calibration_texts(tokenizer, problems)
    alone = calibration.sequential_bridges(model, tokenizer, texts, (3,), parallel, 1e-3)
    row = parallel.layers.index(3)
    assert torch_close(alone.weight[row], parallel.weight[row]) and torch_close(alone.bias[row], parallel.bias[row])
    after = calibration.sequential_bridges(model, tokenizer, texts, (2, 3), parallel, 1e-3)
    assert torch_close(after.weight[parallel.layers.index(2)], parallel.weight[parallel.layers.index(2)])
    assert not torch_close(after.weight[row], parallel.weight[row])


def torch_close(a, b) -> bool:
    import torch

    return torch.allclose(a, b, atol=1e-4, rtol=1e-3)


def test_the_bridge_calibration_script_measures_removed_parallel_and_sequential(tmp_path, capsys):
    calibration = script("bridge_calibration")
    calibration.main(["--model", "tiny-llama", "--skip-ratios", "0.3", "--draws", "1", "--problems", "2",
                      "--calibration", "4", "--max-new-tokens", "4", "--output", str(tmp_path)])
    (row,) = json.loads((tmp_path / "calibration.json").read_text())["draws"]
    assert [json.loads(line) for line in (tmp_path / "draws.jsonl").read_text().splitlines()] == [row]
    assert row["skip_ratio"] == 0.3 and len(row["skip_set"]) == 2
    assert all(row[key] >= 0 for key in ("removed", "parallel", "sequential"))
    assert "| 0.3 |" in capsys.readouterr().out
