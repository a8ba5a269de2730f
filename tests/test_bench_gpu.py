"""bench/gpu.sh, the prepared GPU measurement, dry-run on the CPU with a tiny model so that it cannot rot."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_gpu_script_runs_end_to_end_on_the_cpu(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable, DEVICE="cpu", DTYPE="float32",
               MODELS="tiny-llama", BATCH="2", TOKENS="2", REPEATS="1", ENGINES="eager", OMP_NUM_THREADS="1")
    done = subprocess.run(["bash", str(ROOT / "bench" / "gpu.sh")], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    table = (tmp_path / "gpu-bench.md").read_text().splitlines()
    rows = [line.split("|")[1:-1] for line in table[2:]]
    assert [(row[1].strip(), row[3].strip()) for row in rows] == [("eager", "0%"), ("eager", "15%"), ("hf", "0%"),
                                                                   ("hf", "15%")]
    assert all(float(row[5]) > 0 for row in rows)  # tokens/s measured
    assert all(row[13].strip() == "-" for row in rows)  # no cost per new skip set: neither engine compiles
    assert "# wall time:" in (tmp_path / "gpu-bench.log").read_text()
