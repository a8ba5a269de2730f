#!/usr/bin/env bash
# The prepared GPU measurement of the decoding engines (issue 9), for a lent H200, in under 8 minutes:
# random weights of the SmolLM2-135M and Qwen2.5-Math-1.5B configs in bfloat16, 16 prompts x G 8 = 128
# sequences, 256 new tokens, x in {0, 15%}, engines HF generate, eager and compiled (CUDA graphs), through
# bench/rollout.py; its table and raw output go to $OUT.
#
#   bash bench/gpu.sh fetch      # here, once: the wheels the device's image lacks (transformers 5.24, regex)
#   device run, carry [".whl"]:  bash bench/gpu.sh
#
# Every setting can be overridden through the environment; the test suite runs it on the CPU with a tiny
# model (DEVICE=cpu DTYPE=float32 MODELS=tiny-llama ...) so that it cannot rot.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = fetch ]; then
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl transformers==5.24.0 regex==2026.11.19
    exit 0
fi

OUT=${OUT:-runs/gpu-bench}
PYTHON=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
DTYPE=${DTYPE:-bfloat16}
MODELS=${MODELS:-config:bench/configs/smollm2-135m.json config:bench/configs/qwen2.5-math-1.5b.json}
BATCH=${BATCH:-128}
TOKENS=${TOKENS:-256}
REPEATS=${REPEATS:-3}
RATIOS=${RATIOS:-0 0.15}
ENGINES=${ENGINES:-eager compiled}
mkdir -p "$OUT"

too_old() {  # the device image's transformers is older than the one we need
    $PYTHON -c "import transformers, sys; from packaging.version import Version
sys.exit(Version(transformers.__version__) >= Version('5.24'))"
}
if too_old; then
    $PYTHON -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1

{
    echo "# bench/gpu.sh on $(hostname), $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    if command -v nvidia-smi >/dev/null; then nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; fi
    $PYTHON -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
    start=$(date +%s)
    # shellcheck disable=SC2086  # the lists are word-split on purpose
    $PYTHON bench/rollout.py --device "$DEVICE" --dtype "$DTYPE" --batch "$BATCH" --tokens "$TOKENS" \
        --repeats "$REPEATS" --ratios $RATIOS --engine $ENGINES --models $MODELS --no-memory
    echo "# wall time: $(( $(date +%s) - start )) s"
} 2>&1 | tee "$OUT/gpu-bench.log"
grep '^|' "$OUT/gpu-bench.log" > "$OUT/gpu-bench.md"
