"""bench/gpu.sh, the prepared GPU measurement, dry-run on the CPU with a tiny model so that it cannot rot."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_gpu_script_runs_every_part_end_to_end_on_the_cpu(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable, DEVICE="cpu", DTYPE="float32",
               MODEL="tiny-llama", PROMPTS="2", GENERATIONS="2", TOKENS="4", MICRO_BATCH="2", STEPS="2",
               SETUPS="eager lora checkpointing", BATCH="2", REPEATS="1", ENGINES="eager",
               TESTS="tests/test_policy.py", OMP_NUM_THREADS="1")
    done = subprocess.run(["bash", str(ROOT / "bench" / "gpu.sh")], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    log = (tmp_path / "gpu-bench.log").read_text()
    for part in ("tests", "train-step", "host-sync", "decoding"):
        assert f"## {part}: exit 0" in log, log[-3000:]
    assert " passed" in (tmp_path / "tests.log").read_text()
    records = json.loads((tmp_path / "train-step.json").read_text())
    assert [(r["setup"], r["lora"], r["checkpointing"]) for r in records] == [
        ("eager", 0, False), ("lora", 16, False), ("checkpointing", 0, True)]
    assert all(len(r["steps"]) == 2 and r["steps"][1]["tokens"] == 2 * 2 * 4 for r in records)  # B x G x T
    assert all(r["predicted_training_gb"] > r["predicted_generation_gb"] > 0 for r in records)
    rows = [line.split("|")[1:-1] for line in (tmp_path / "gpu-bench.md").read_text().splitlines()
            if not line.startswith("|---")]
    tables = [row[0].strip() for row in rows]
    assert tables.count("setup") == 1 and tables.count("model") == 1 and tables.count("engine") == 1
    host_sync = [row for row in rows if row[0].strip() == "eager" and len(row) == 5]
    assert [row[1].strip() for row in host_sync] == ["1", "8"]
    decoding = [row for row in rows if row[0].strip() == "tiny-llama"]
    assert [(row[1].strip(), row[3].strip()) for row in decoding] == [
        ("eager", "0%"), ("eager", "15%"), ("eager+bridges", "0%"), ("eager+bridges", "15%"), ("hf", "0%"), ("hf", "15%")]
    bound = {row[1].strip(): float(row[9]) for row in decoding if row[3].strip() == "15%"}
    assert bound["eager+bridges"] < bound["eager"]  # the bridged FLOP bound counts the bridges' d^2 per token
    assert all(float(row[5]) > 0 for row in decoding)  # tokens/s measured
