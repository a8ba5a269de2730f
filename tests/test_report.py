"""report: deltas, Table 2, best/worst/neutral counts and linear fits on rows with known answers; files from a CSV."""

from __future__ import annotations

import csv
import io
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nested_reft.experiments import report
from nested_reft.cli import main
from nested_reft.experiments.report import (
    compute_deltas,
    efficiency_fits,
    format_table2,
    instance_means,
    linear_fit,
    mitigation_counts,
    table2,
    write_report,
)
from nested_reft.experiments.results import RESULT_COLUMNS, ResultsError, parse_results, read_results


def row(model="M", dataset="d", x=0.05, b=1, m="retrace", seed=0, acc=0.5, speed=100.0, runtime=50.0,
        role="nested", status="done") -> dict:
    """A parsed results.csv row."""
    name = f"baseline-s{seed}" if role == "baseline" else f"x{x:g}-b{b}-{m}-s{seed}"
    return dict(model=model, dataset=dataset, instance=f"{model}/{dataset}/{name}", role=role, skip_ratio=x,
                border=b, mitigation=m, seed=seed, status=status, accuracy=acc, token_speed=speed,
                total_runtime_s=runtime, error="")


def baseline(model="M", dataset="d", seed=0, acc=0.5, speed=100.0, runtime=50.0) -> dict:
    return row(model, dataset, x=0.0, b=0, m="base", seed=seed, acc=acc, speed=speed, runtime=runtime, role="baseline")


def to_csv(rows: list[dict], drop: str | None = None, extra: tuple[str, ...] = ()) -> str:
    columns = [c for c in RESULT_COLUMNS if c != drop] + list(extra)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def test_deltas_are_to_the_mean_of_the_baseline_seeds():
    rows = [
        baseline(seed=0, acc=0.4, speed=100.0, runtime=50.0),
        baseline(seed=1, acc=0.6, speed=110.0, runtime=50.0),
        row(acc=0.55, speed=126.0, runtime=40.0),
        row(model="other", acc=0.9),  # no baseline of its own: left out
    ]
    deltas = compute_deltas(rows)
    assert [d["role"] for d in deltas] == ["baseline", "baseline", "nested"]
    nested = deltas[-1]
    assert nested["accuracy_baseline"] == pytest.approx(0.5)
    assert nested["accuracy_baseline_std"] == pytest.approx(math.sqrt(0.02))  # sample sd of 0.4, 0.6
    assert nested["delta_abs_accuracy"] == pytest.approx(0.05)
    assert nested["delta_accuracy"] == pytest.approx(10.0)
    assert nested["delta_token_speed"] == pytest.approx(20.0)
    assert nested["delta_abs_token_speed"] == pytest.approx(21.0)
    assert nested["delta_total_runtime_s"] == pytest.approx(-20.0)
    assert deltas[0]["delta_abs_accuracy"] == pytest.approx(-0.1)  # a baseline seed against the mean


def test_relative_delta_of_a_zero_baseline_is_undefined_not_an_error():
    deltas = compute_deltas([baseline(acc=0.0), row(acc=0.1)])
    assert deltas[-1]["delta_accuracy"] is None and deltas[-1]["delta_abs_accuracy"] == pytest.approx(0.1)


def test_seeds_of_one_configuration_are_averaged():
    points = instance_means(compute_deltas([baseline(acc=0.5), row(seed=0, acc=0.6), row(seed=1, acc=0.7)]))
    assert len(points) == 1 and points[0]["n_seeds"] == 2
    assert points[0]["delta_abs_accuracy"] == pytest.approx(0.15)


def paper_table2_rows() -> list[dict]:
    """The 1.5B rows of the paper's Table 2 as deltas over a baseline of 0.5, plus middling instances."""
    rows = []
    for dataset, best, worst in (("svamp", 0.008, -0.016), ("gsm8k", 0.015, -0.006), ("math12k", 0.026, -0.005)):
        rows.append(baseline(model="1.5B", dataset=dataset, acc=0.5))
        for x, m, delta in ((0.05, "base", best), (0.10, "practical", worst), (0.15, "retrace", 0.001)):
            rows.append(row(model="1.5B", dataset=dataset, x=x, m=m, acc=0.5 + delta))
    return rows


def test_table2_matches_the_paper_numbers():
    table = table2(instance_means(compute_deltas(paper_table2_rows())))
    entry = table["1.5B"]
    assert entry["datasets"] == ["svamp", "gsm8k", "math12k"]
    assert [entry["best"][d] for d in entry["datasets"]] == pytest.approx([0.008, 0.015, 0.026])
    assert [entry["worst"][d] for d in entry["datasets"]] == pytest.approx([-0.016, -0.006, -0.005])
    assert entry["best_mean_abs"] == pytest.approx(0.049 / 3)  # the paper's 0.016
    assert entry["worst_mean_abs"] == pytest.approx(0.027 / 3)  # the paper's 0.009
    markdown = format_table2(table)
    assert "| 1.5B | Best | +0.008 | +0.015 | +0.026 | 0.016 |" in markdown
    assert "|  | Worst | -0.016 | -0.006 | -0.005 | 0.009 |" in markdown


def test_counts_a_mitigation_that_is_both_best_and_worst():
    points = [
        # configuration 1: practical holds both the best and the worst instance
        dict(model="M", dataset="a", skip_ratio=0.05, mitigation="practical", delta_abs_accuracy=0.03),
        dict(model="M", dataset="a", skip_ratio=0.10, mitigation="practical", delta_abs_accuracy=-0.04),
        dict(model="M", dataset="a", skip_ratio=0.05, mitigation="base", delta_abs_accuracy=0.01),
        dict(model="M", dataset="a", skip_ratio=0.05, mitigation="retrace", delta_abs_accuracy=0.0),
        # configuration 2: retrace best, base worst, practical neutral
        dict(model="M", dataset="b", skip_ratio=0.05, mitigation="practical", delta_abs_accuracy=0.0),
        dict(model="M", dataset="b", skip_ratio=0.05, mitigation="base", delta_abs_accuracy=-0.02),
        dict(model="M", dataset="b", skip_ratio=0.05, mitigation="retrace", delta_abs_accuracy=0.02),
    ]
    counts = mitigation_counts(points)
    assert counts["practical"] == {"best": 1, "worst": 1, "neutral": 1, "configurations": 2}
    assert counts["base"] == {"best": 0, "worst": 1, "neutral": 1, "configurations": 2}
    assert counts["retrace"] == {"best": 1, "worst": 0, "neutral": 1, "configurations": 2}


def test_ties_count_for_every_mitigation_that_reaches_the_extreme():
    points = [dict(model="M", dataset="a", skip_ratio=0.05, mitigation=m, delta_abs_accuracy=v)
              for m, v in (("base", 0.02), ("practical", 0.02), ("retrace", -0.01))]
    counts = mitigation_counts(points)
    assert counts["base"]["best"] == counts["practical"]["best"] == 1 and counts["retrace"]["worst"] == 1


def test_linear_fit_of_an_exact_line():
    xs = [0.0, 0.05, 0.10, 0.15]
    fit = linear_fit(xs, [3.0 + 200.0 * x for x in xs])
    assert fit.slope == pytest.approx(200.0) and fit.intercept == pytest.approx(3.0)
    assert fit.r2 == pytest.approx(1.0) and fit.n == 4
    noisy = linear_fit(xs, [0.0, 12.0, 18.0, 31.0])
    assert 0.9 < noisy.r2 < 1.0
    assert math.isnan(linear_fit([0.1, 0.1], [1.0, 2.0]).slope)  # no line through one x


def test_efficiency_fits_per_configuration_and_pooled():
    rows = [baseline(dataset=d, speed=100.0, runtime=100.0) for d in ("a", "b")]
    for dataset, slope in (("a", 100.0), ("b", 200.0)):
        for x in (0.0, 0.05, 0.10, 0.15):
            for m in ("base", "retrace"):
                rows.append(row(dataset=dataset, x=x, m=m, speed=100.0 * (1 + slope * x / 100),
                                runtime=100.0 * (1 - slope * x / 200)))
    fits = {(f["dataset"], f["metric"]): f for f in efficiency_fits(instance_means(compute_deltas(rows)))}
    assert fits[("a", "token_speed")]["slope"] == pytest.approx(100.0)
    assert fits[("b", "token_speed")]["slope"] == pytest.approx(200.0)
    assert fits[("b", "total_runtime_s")]["slope"] == pytest.approx(-100.0)
    assert fits[("a", "token_speed")]["r2"] == pytest.approx(1.0)
    pooled = fits[("all", "token_speed")]
    assert pooled["slope"] == pytest.approx(150.0) and pooled["n"] == 16 and pooled["r2"] < 1.0


def test_report_files_from_results_csv(tmp_path):
    rows = paper_table2_rows() + [baseline(model="1.5B", dataset="svamp", seed=1, acc=0.52)]
    rows.append(row(model="1.5B", dataset="gsm8k", x=0.15, m="base", status="failed", acc=""))
    rows[-1]["error"] = "RuntimeError: out of memory"
    (tmp_path / "results.csv").write_text(to_csv(rows))
    path = write_report(tmp_path)
    output = tmp_path / "report"
    assert path == output / "report.md"
    for dataset in ("svamp", "gsm8k", "math12k"):
        assert (output / f"figure1-1.5b-{dataset}.png").stat().st_size > 1000
    text = path.read_text()
    assert "Table 2" in text and "| 1.5B | Best |" in text and "figure1-1.5b-svamp.png" in text
    assert "out of memory" in text  # failed instances are listed, not silently dropped
    deltas = list(csv.DictReader((output / "deltas.csv").open()))
    assert len(deltas) == 4 * 3 + 1  # every finished instance, baselines included
    assert main(["report", str(tmp_path), "--output-dir", str(tmp_path / "elsewhere")]) == 0
    assert (tmp_path / "elsewhere" / "report.md").is_file()


@pytest.mark.parametrize("model", ["Qwen/Qwen2.5-Math-1.5B-Instruct", "/models/smollm2-135m.gguf", "runs/sft-s0/model/"])
def test_figures_are_named_like_the_sweep_directories(model):
    from nested_reft.experiments.grid import Instance

    group = Instance(model, "gsm8k", 0, 0.0, 0, "base", "baseline").group  # <model-slug>/<dataset>
    assert report.figure_name(model, "gsm8k") == f"figure1-{group.replace('/', '-')}.png"


def test_the_report_imports_nothing_that_trains(tmp_path):
    """`report` reads numbers: writing a whole report (figures included) loads no torch, transformers or accelerate."""
    (tmp_path / "results.csv").write_text(to_csv(paper_table2_rows()))
    code = ("import sys; from nested_reft.experiments.report import write_report; write_report(sys.argv[1]); "
            "print(sorted({'torch', 'transformers', 'accelerate'} & set(sys.modules)))")
    repo = str(Path(__file__).resolve().parents[1])
    environment = {**os.environ, "PYTHONPATH": repo}
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, cwd=repo,
                            env=environment, check=True)
    assert result.stdout.splitlines()[-1] == "[]"
    assert (tmp_path / "report" / "report.md").is_file()


def test_missing_column_is_a_clear_error(tmp_path, capsys):
    text = to_csv([baseline(), row()], drop="token_speed")
    with pytest.raises(ResultsError, match="lacks column.*token_speed"):
        parse_results(text)
    (tmp_path / "results.csv").write_text(text)
    assert main(["report", str(tmp_path)]) == 2
    assert "token_speed" in capsys.readouterr().err


def test_done_row_without_a_metric_or_with_a_non_number_is_an_error():
    with pytest.raises(ResultsError, match="line 3.*no accuracy"):
        parse_results(to_csv([baseline(), row(acc="")]))
    with pytest.raises(ResultsError, match="line 2: column token_speed must be a number"):
        parse_results(to_csv([baseline(speed="fast")]))


def warm_up_runs(label: str, baselines: list[float], nested: list[float]) -> list[dict]:
    """Per seed (0, 1, ...) a baseline and an x = 0.15 retrace run from the warm-up `label` ("" the plain one), with
    the accuracies given, named as the sweep names them (`M/d/<label>/...`)."""
    rows = []
    for seed, (base, run) in enumerate(zip(baselines, nested)):
        for entry in (baseline(seed=seed, acc=base), row(x=0.15, seed=seed, acc=run)):
            entry["warm_up"] = label
            entry["instance"] = entry["instance"].replace("M/d/", f"M/d/{label}/" if label else "M/d/")
            rows.append(entry)
    return rows


# The plain warm-up's baselines score 0.5, 0.6, 0.7 and its nested runs 0.45, 0.58, 0.62 (seed deltas -0.05, -0.02,
# -0.08); distill-256's baselines 0.8, 0.7, 0.9 and nested 0.75, 0.72, 0.83 (seed deltas -0.05, +0.02, -0.07). Against
# the plain baselines the distilled runs would gain; against the mean of their own, seed 1 would lose.
TWO_WARM_UPS = warm_up_runs("", [0.5, 0.6, 0.7], [0.45, 0.58, 0.62]) + \
    warm_up_runs("distill-256", [0.8, 0.7, 0.9], [0.75, 0.72, 0.83])


def test_deltas_are_to_the_baselines_of_the_same_warm_up_and_seed():
    deltas = {(d["warm_up"], d["role"], d["seed"]): d for d in compute_deltas(TWO_WARM_UPS)}
    distilled = deltas[("distill-256", "nested", 1)]
    assert distilled["accuracy_baseline"] == pytest.approx(0.8)  # the mean of distill-256's baselines only
    assert distilled["delta_abs_accuracy"] == pytest.approx(0.72 - 0.8)
    assert distilled["accuracy_seed_baseline"] == pytest.approx(0.7)  # distill-256's baseline of seed 1
    assert distilled["delta_abs_accuracy_seed"] == pytest.approx(0.02)
    assert deltas[("", "nested", 1)]["accuracy_baseline"] == pytest.approx(0.6)
    assert deltas[("", "nested", 1)]["delta_abs_accuracy_seed"] == pytest.approx(-0.02)
    # the t interval of the plain configuration by hand: mean -0.05, sd 0.03, t_{0.975, 2} = 4.302652729911275
    plain = deltas[("", "nested", 0)]
    half = 4.302652729911275 * 0.03 / math.sqrt(3)
    assert plain["seeds_paired"] == 3 and plain["delta_abs_accuracy_seeds_mean"] == pytest.approx(-0.05)
    assert plain["delta_abs_accuracy_seeds_t_low"] == pytest.approx(-0.05 - half)
    assert plain["delta_abs_accuracy_seeds_t_high"] == pytest.approx(-0.05 + half)
    assert distilled["delta_abs_accuracy_seeds_mean"] == pytest.approx(-0.1 / 3)
    points = {p["warm_up"]: p for p in instance_means(compute_deltas(TWO_WARM_UPS))}
    assert points["distill-256"]["delta_abs_accuracy"] == pytest.approx((0.75 + 0.72 + 0.83) / 3 - 0.8)
    assert points[""]["delta_abs_accuracy_seeds_t_high"] == pytest.approx(-0.05 + half)


def test_one_seed_gives_a_seed_delta_but_no_interval():
    deltas = compute_deltas(warm_up_runs("", [0.5], [0.4]))
    assert deltas[-1]["seeds_paired"] == 1 and deltas[-1]["delta_abs_accuracy_seeds_mean"] == pytest.approx(-0.1)
    assert deltas[-1]["delta_abs_accuracy_seeds_t_low"] is None and deltas[-1]["delta_abs_accuracy_seeds_t_high"] is None
    assert "| -0.1000 [–] |" in report._points_table(instance_means(deltas))


def test_a_report_of_several_warm_ups_keeps_them_apart(tmp_path):
    (tmp_path / "results.csv").write_text(to_csv(TWO_WARM_UPS, extra=("warm_up",)))
    text = write_report(tmp_path).read_text()
    output = tmp_path / "report"
    assert (output / "figure1-m-d.png").is_file() and (output / "figure1-m-d-distill-256.png").is_file()
    assert "| M | plain/d | 3 |" in text and "| M | distill-256/d | 3 |" in text  # the baselines, one row each
    assert "| Model | Instance | plain/d | distill-256/d | mean abs |" in text  # Table 2
    assert "| M | distill-256/d | 0.15 | 1 | retrace | 3 |" in text
    deltas = list(csv.DictReader((output / "deltas.csv").open()))
    assert len(deltas) == 12 and {d["warm_up"] for d in deltas} == {"", "distill-256"}
    seed_1 = next(d for d in deltas if d["instance"] == "M/d/distill-256/x0.15-b1-retrace-s1")
    assert float(seed_1["accuracy_seed_baseline"]) == pytest.approx(0.7)
    assert float(seed_1["delta_abs_accuracy_seed"]) == pytest.approx(0.02)


def test_a_report_of_one_warm_up_does_not_name_it():
    rows = TWO_WARM_UPS[:6]  # the plain warm-up's
    deltas = compute_deltas(rows)
    text = report.render_markdown(rows, report.baseline_summary(rows), deltas, instance_means(deltas), [])
    assert "plain/" not in text and "| M | d | 3 |" in text and "| M | d | 0.15 | 1 | retrace | 3 |" in text


def test_missing_results_file(tmp_path):
    with pytest.raises(ResultsError, match="does not exist"):
        read_results(tmp_path / "results.csv")
