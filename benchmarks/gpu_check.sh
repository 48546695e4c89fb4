#!/usr/bin/env bash
# Every GPU figure from one command, in at most about 8 minutes on one H100/H200:
#
#     benchmarks/gpu_check.sh OUTDIR            # on a CUDA machine
#     benchmarks/gpu_check.sh OUTDIR --dry-run  # the same steps on the CPU, tiny sizes (the tests run this)
#
# Each step writes its log (and JSON where the tool makes one) to OUTDIR and is
# bounded by a timeout; a failing step does not stop the others.  OUTDIR/summary.json
# lists every step with its exit status and seconds.
#   1. the CUDA tests (kernels, CPU/CUDA agreement, autocast, real SyncBatchNorm)
#   2. bench_kernels.py: BatchNorm products against the measured copy bandwidth
#   3. bench_curvature.py --device cuda: resnet20_bn and resnet18_bn at batch 512, float32
#   4. bench_mixed_precision.py: the same models' G@v under bfloat16 autocast against float32
#   5. bench_hf_vs_sgd_step.py: one HF step against one SGD step, resnet20_bn, batch 512
set -uo pipefail
OUT=${1:?usage: benchmarks/gpu_check.sh OUTDIR [--dry-run]}
DRY=${2:-}
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-python}
STEPS=()

step() {  # step NAME TIMEOUT_S COMMAND...
    local name=$1 limit=$2
    shift 2
    local t0=$SECONDS
    echo "== $name: $*" | tee "$OUT/$name.log"
    timeout "$limit" "$@" >>"$OUT/$name.log" 2>&1
    local rc=$?
    STEPS+=("{\"step\": \"$name\", \"rc\": $rc, \"seconds\": $((SECONDS - t0))}")
    echo "   rc=$rc, $((SECONDS - t0)) s"
}

if [ "$DRY" = "--dry-run" ]; then
    DEV=cpu; MODELS=resnet8_bn; CURV_MODELS=convnet; BATCH=4; SIZE=8
    KERNELS=(--cpu-smoke)
    CURV=(--quick --batch 2 --repeats 1 --warmup 0 --skip-bn)
    MP=(--size "$SIZE" --repeats 1 --threads 1)
    STEP=(--size "$SIZE" --repeats 1 --threads 1)
elif [ -z "$DRY" ]; then
    DEV=cuda; MODELS=resnet20_bn,resnet18_bn; CURV_MODELS=$MODELS; BATCH=512; SIZE=32
    KERNELS=(--check)
    CURV=(--batch "$BATCH" --check)
    MP=(--repeats 6)
    STEP=(--repeats 3)
else
    echo "unknown option $DRY (only --dry-run)" >&2
    exit 2
fi

step cuda-tests 240 "$PY" -m pytest -q -rs -k cuda tests/test_kernels.py tests/test_curvature.py \
    tests/test_mixed_precision.py tests/test_distributed.py --junitxml "$OUT/cuda-tests.xml"
step kernels 60 "$PY" benchmarks/bench_kernels.py "${KERNELS[@]}"
step curvature-float32 180 "$PY" benchmarks/bench_curvature.py --device "$DEV" --models "$CURV_MODELS" "${CURV[@]}" \
    --json "$OUT/curvature-float32.json"
for m in ${MODELS//,/ }; do
    step "mixed-precision-$m" 90 "$PY" benchmarks/bench_mixed_precision.py --device "$DEV" --model "$m" \
        --batch "$BATCH" "${MP[@]}" --json "$OUT/mixed-precision-$m.json"
done
step hf-vs-sgd 90 "$PY" benchmarks/bench_hf_vs_sgd_step.py --device "$DEV" --model "${MODELS%%,*}" \
    --batch "$BATCH" "${STEP[@]}" --json "$OUT/hf-vs-sgd.json"

{
    echo "["
    for i in "${!STEPS[@]}"; do
        sep=","; [ "$i" -eq $((${#STEPS[@]} - 1)) ] && sep=""
        echo "  ${STEPS[$i]}$sep"
    done
    echo "]"
} >"$OUT/summary.json"
echo "summary: $OUT/summary.json"
