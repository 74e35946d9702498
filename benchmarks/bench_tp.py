"""Kernels behind the tensor-parallel layers vs PyTorch: fused GEMM + bias + GeLU, fused
SwiGLU projection, plain GEMM, vocab-parallel cross-entropy (time, TFLOP/s or GB/s, peak
memory). The suite lives in pyruntime/bench.py so the CLI can run it too; this is the same
as `python -m pyruntime bench tp`.

    .venv/bin/python benchmarks/bench_tp.py                  # 7B shapes, tp 1,2,8 (CUDA)
    .venv/bin/python benchmarks/bench_tp.py --markdown       # table for benchmarks/RESULTS.md
    .venv/bin/python benchmarks/bench_tp.py --tp 8 --only ce
"""
import sys

from pyruntime.bench import run

if __name__ == "__main__":
    sys.exit(run(["tp", *sys.argv[1:]]))
