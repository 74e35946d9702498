#!/usr/bin/env bash
# Every GPU check in one call, for a lent single-GPU machine (its python3 holds torch + triton;
# nothing can be fetched there). Run from the repository root:
#
#     bash benchmarks/gpu_checks.sh            # on the GPU machine; logs under $OUT (or ./gpu_out)
#     GPU_CHECKS_SMALL=1 bash benchmarks/gpu_checks.sh   # tiny sizes: checks the plumbing on CPU
#
# Steps (each under its own time limit, so one slow step cannot eat the lease; the limits
# add up to 590 s, under the device tool's 600 s per call):
#   1. environment: GPU, driver, torch / triton versions, commit
#   2. pip install -e . (no download, no dependency): pyruntime._C built in place with the
#      CUDA sources (flat_pack kernel), pyruntime.triton_kernels mapped onto triton_kernels/
#   3. measured ceilings: device-to-device copy bandwidth, bf16 matmul TFLOP/s (random data)
#   4. kernel and op tests on CUDA: Triton kernels compiled for real, bf16 included
#   5. bench tp: fused GEMM+bias+GeLU / SwiGLU vs eager, GEMM vs torch.matmul, vocab-parallel
#      cross-entropy time and peak memory vs F.cross_entropy (7B shapes, tp 1, 2, 8)
#   6. bench overlap: exposed sequence-parallel communication of the overlapped tp GEMMs at
#      7B MLP shapes, tp 8 and 2, the peers stood in for by copies on a second stream
#   7. bench flat: flat pack / unpack (CUDA kernel) and the fused AdamW (Triton) vs torch
#   8. single-GPU training throughput and MFU (bf16 autocast, 1b preset)
#   9. the same with --offload optimizer --recompute selective: the CUDA paths of offload (pinned
#      host state, gradients to the host on a side stream, the C++ host AdamW, parameters back)
# Output: $OUT/gpu_checks.log (everything) and $OUT/results.md (the tables, for
# benchmarks/RESULTS.md). Record the figures there with device, date, commit and command.
set -u -o pipefail

OUT=${OUT:-$PWD/gpu_out}
PY=${PY:-python3}
SMALL=${GPU_CHECKS_SMALL:-0}
mkdir -p "$OUT"
LOG=$OUT/gpu_checks.log
MD=$OUT/results.md
: > "$LOG"
: > "$MD"
export PYTHONUNBUFFERED=1
FAILED=()

# step NAME SECONDS CMD...: runs CMD under a time limit, output to the log (and the screen)
step() {
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s): $*" | tee -a "$LOG"
    local t0=$SECONDS
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc after $((SECONDS - t0)) s" | tee -a "$LOG"
    [ "$rc" -eq 0 ] || FAILED+=("$name (exit $rc)")
    return 0
}

if [ "$SMALL" = 1 ]; then
    TP_ARGS=(--tp 1,2 --tokens 64 --hidden 64 --ffn 96 --vocab 300 --repeat 2 --warmup 1)
    OVERLAP_ARGS=(--tokens 64 --hidden 64 --ffn 96 --repeat 2 --warmup 1)
    OVERLAP_TPS=(2)
    FLAT_ARGS=(--preset tiny --repeat 2)
    TRAIN_ARGS=(--preset tiny --steps 4 --seq-len 64 --global-batch 4 --micro-batch 2 --log-every 2)
    OFFLOAD_ARGS=(--preset tiny --steps 3 --seq-len 64 --global-batch 4 --micro-batch 2 --log-every 1)
    CEIL_N=512
    TESTS=(tests/triton_kernels/test_adamw.py)
else
    TP_ARGS=(--tp 1,2,8)
    OVERLAP_ARGS=()
    OVERLAP_TPS=(8 2)
    FLAT_ARGS=(--preset 1b)
    TRAIN_ARGS=(--preset 1b --steps 12 --seq-len 2048 --global-batch 8 --micro-batch 4 --log-every 2)
    OFFLOAD_ARGS=(--preset 1b --steps 4 --seq-len 2048 --global-batch 4 --micro-batch 4 --log-every 1)
    CEIL_N=8192
    TESTS=(tests/triton_kernels tests/pyruntime/ops tests/pyruntime/model)
fi

step environment 20 bash -c "nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,memory.total \
    --format=csv 2>/dev/null || echo 'no nvidia-smi'; git rev-parse --short HEAD 2>/dev/null; date -u; \
    $PY -c 'import torch, triton; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \
\"triton\", triton.__version__, \"device\", torch.cuda.get_device_name() if torch.cuda.is_available() else \"cpu\")'"

# The editable install, as the Makefile does it: it builds pyruntime._C in place and maps
# pyruntime.triton_kernels onto the repository's triton_kernels/ (a bare build_ext would not).
step build 120 env MAX_JOBS="$(nproc)" "$PY" -m pip install -q --no-build-isolation --no-deps --use-pep517 -e .

step ceilings 40 "$PY" - "$CEIL_N" <<'EOF'
import sys
import torch
n = int(sys.argv[1])
dev = "cuda" if torch.cuda.is_available() else "cpu"
def timed(fn, reps=10):
    for _ in range(3):
        fn()
    if dev == "cuda":
        torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(reps):
            fn()
        b.record()
        b.synchronize()
        return a.elapsed_time(b) / 1e3 / reps
    import time
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps
src = torch.randn(n * n * 8, device=dev)  # 2 GiB at n=8192 (fp32), well past L2
dst = torch.empty_like(src)
s = timed(lambda: dst.copy_(src))
print(f"ceiling: device copy {2 * src.numel() * 4 / s / 1e12:.2f} TB/s (bytes read + written)")
dt = torch.bfloat16 if dev == "cuda" else torch.float32
a, b = torch.randn(n, n, device=dev, dtype=dt), torch.randn(n, n, device=dev, dtype=dt)
s = timed(lambda: a @ b)
print(f"ceiling: {n}^3 {dt} matmul {2 * n**3 / s / 1e12:.1f} TFLOP/s (random data)")
EOF

# The compile-only checks (every kernel for sm_90a / sm_80 via aot_check, the .cu via nvcc)
# are for machines without a GPU; here the kernels are compiled and run for real.
step tests-cuda 110 "$PY" -m pytest -q -x -p no:cacheprovider "${TESTS[@]}" \
    --ignore=tests/triton_kernels/test_aot_check.py --ignore=tests/pyruntime/ops/test_cuda_sources_compile.py

step bench-tp 120 "$PY" -m pyruntime bench tp "${TP_ARGS[@]}" --markdown
for tp in "${OVERLAP_TPS[@]}"; do
    step "bench-overlap-tp$tp" 30 "$PY" -m pyruntime bench overlap --tp "$tp" "${OVERLAP_ARGS[@]}" --markdown
done
step bench-flat 30 "$PY" -m pyruntime bench flat "${FLAT_ARGS[@]}"
step train-1gpu 60 "$PY" -m pyruntime train "${TRAIN_ARGS[@]}" --eval-every 0 --out "$OUT/train"
step train-1gpu-offload 30 "$PY" -m pyruntime train "${OFFLOAD_ARGS[@]}" --offload optimizer --recompute selective \
    --eval-every 0 --out "$OUT/train-offload"

# The Markdown tables and the lines worth keeping, for benchmarks/RESULTS.md.
{
    echo "# GPU checks, $(date -u +%F), commit $(git rev-parse --short HEAD 2>/dev/null)"
    grep -E '^(ceiling:|torch |NVIDIA|name,)' "$LOG"
    grep -E '^\|' "$LOG"
    for run in train-1gpu train-1gpu-offload; do  # each run's last log lines (step time, memory)
        awk -v run="$run" '$0 ~ "^== " run " \\(" {f = 1} $0 ~ "^== " run ":" {f = 0} f' "$LOG" \
            | grep -E 'step +[0-9]+/[0-9]+ \|' | tail -2
    done
    grep -E '^== .*: exit' "$LOG"
} >> "$MD"

echo "== summary" | tee -a "$LOG"
cat "$MD"
if [ ${#FAILED[@]} -gt 0 ]; then
    echo "FAILED: ${FAILED[*]}"
    exit 1
fi
echo "all steps passed"
