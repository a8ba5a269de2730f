#!/usr/bin/env bash
# The prepared GPU measurement, for a lent H200, in one command under 9 minutes, most important first; each part
# has its own time limit within a common deadline and writes to $OUT as it ends, so a part that overruns leaves
# the earlier ones' results:
#   1. train-step: one ReFT step at the Qwen2.5-Math-1.5B shapes (random weights, bf16 autocast, 16 prompts x
#      G 8 x 256 tokens, micro-batch 16, x = 15% retrace) with each engine, then LoRA, then gradient
#      checkpointing: whether every update was applied (it exits non-zero if one was skipped), step time,
#      generation share, peak memory against docs/scaling.md (bench/train_step.py);
#   2. tests: the decoding engines' equality on the GPU (tests/test_decoding.py with NESTED_REFT_TEST_DEVICE:
#      the compiled engine's CUDA graphs against the eager engine under changing skip sets) and the chunked
#      log-probs (tests/test_policy.py); cold compilation can take it past its limit (16 of 35 in 150 s once);
#   3. host-sync: evaluation-style decoding with the host asking for ended rows every k tokens (bench/host_sync.py);
#   4. decoding: the engines' tokens/s table beside HF generate (bench/rollout.py), vllm's where it imports, and
#      each engine with the skipped blocks bridged (issue 31: its speedup against the bridged FLOP bound).
#
#   bash bench/gpu.sh fetch      # here, once: the wheels the device's image lacks or has too old
#   device run, carry [".whl"], timeout_s 600:  bash bench/gpu.sh
#
# Every setting can be overridden through the environment; the test suite runs it on the CPU with a tiny model
# (DEVICE=cpu DTYPE=float32 MODEL=tiny-llama ...) so that it cannot rot.
set -uo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = fetch ]; then
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl transformers==5.24.0 regex==2026.11.19 peft==0.21.2 math-verify==0.9.0 \
        latex2sympy2_extended==1.11.0 antlr4-python3-runtime==4.13.2
    exit 0
fi

OUT=${OUT:-runs/gpu-bench}
PYTHON=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
DTYPE=${DTYPE:-bfloat16}
MODEL=${MODEL:-config:bench/configs/qwen2.5-math-1.5b.json}
PROMPTS=${PROMPTS:-16}
GENERATIONS=${GENERATIONS:-8}
TOKENS=${TOKENS:-256}
MICRO_BATCH=${MICRO_BATCH:-16}
STEPS=${STEPS:-2}
SETUPS=${SETUPS:-eager lora checkpointing compiled}
BATCH=${BATCH:-128}
DECODE_TOKENS=${DECODE_TOKENS:-128}
REPEATS=${REPEATS:-2}
# vllm too where it imports (the device image has none today, and its wheel is too large to carry)
ENGINES=${ENGINES:-eager compiled$($PYTHON -c 'import vllm' >/dev/null 2>&1 && echo ' vllm')}
TESTS=${TESTS:-tests/test_decoding.py tests/test_policy.py}
BUDGET=${BUDGET:-540}  # seconds for all four parts
mkdir -p "$OUT"
deadline=$(( $(date +%s) + BUDGET ))

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

part() {  # part NAME LIMIT COMMAND...: run within min(LIMIT, time left), its output to $OUT/NAME.log
    local name=$1 limit=$2 left
    shift 2
    left=$(( deadline - $(date +%s) ))
    [ "$left" -lt "$limit" ] && limit=$left
    if [ "$limit" -le 10 ]; then echo "## $name: not run, no time left"; return; fi
    echo "## $name (limit $limit s): $*"
    local start=$(date +%s)
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local status=$?
    grep -v '^\s*$' "$OUT/$name.log" | tail -n 40
    echo "## $name: exit $status after $(( $(date +%s) - start )) s"
}

{
    echo "# bench/gpu.sh on $(hostname), $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
    if command -v nvidia-smi >/dev/null; then nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; fi
    $PYTHON -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
    # shellcheck disable=SC2086  # the lists are word-split on purpose
    part train-step 250 $PYTHON bench/train_step.py --setups $SETUPS --device "$DEVICE" --dtype "$DTYPE" --model "$MODEL" \
        --prompts "$PROMPTS" --generations "$GENERATIONS" --tokens "$TOKENS" --micro-batch "$MICRO_BATCH" \
        --steps "$STEPS" --json "$OUT/train-step.json"
    # shellcheck disable=SC2086
    NESTED_REFT_TEST_DEVICE=$DEVICE part tests 150 $PYTHON -m pytest -q -p no:cacheprovider $TESTS
    # shellcheck disable=SC2086
    part host-sync 60 $PYTHON bench/host_sync.py --device "$DEVICE" --dtype "$DTYPE" --model "$MODEL" \
        --batch "$BATCH" --tokens "$DECODE_TOKENS" --repeats "$REPEATS" --sync-every 1 8 --engines eager
    # shellcheck disable=SC2086
    part decoding 600 $PYTHON bench/rollout.py --device "$DEVICE" --dtype "$DTYPE" --batch "$BATCH" \
        --tokens "$DECODE_TOKENS" --repeats "$REPEATS" --ratios 0 0.15 --engine $ENGINES --bridged $ENGINES \
        --models "$MODEL" --no-memory
    echo "# wall time of the parts: $(( $(date +%s) - deadline + BUDGET )) s"
} 2>&1 | tee "$OUT/gpu-bench.log"
grep -h '^|' "$OUT/train-step.log" "$OUT/host-sync.log" "$OUT/decoding.log" > "$OUT/gpu-bench.md" 2>/dev/null || true
