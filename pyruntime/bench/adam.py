"""The host AdamW of `--offload optimizer` (the C++ op, csrc/adamw_cpu.cpp) against
torch.optim.AdamW(fused=True) and (foreach=True) on CPU, over one flat fp32 buffer of N
parameters, next to this machine's memory bandwidth measured in the same run (a STREAM triad,
a = b + s * c, and the in-place update a += s * b, through torch's multi-threaded add).

    python -m pyruntime bench adam                          # 1M, 10M, 100M parameters
    python -m pyruntime bench adam --sizes 1e6,3e7 --repeat 20 --threads 8

GB/s counts the bytes an AdamW step must move, 28 per parameter (read parameter, gradient and
both moments, write parameter and moments, fp32), whichever implementation runs; the triad
and the in-place update count 12 bytes per element (the triad's write into a buffer it has not
read also pulls that buffer into the cache first, so it reads below what an in-place update,
like AdamW's, reaches: the in-place figure is the ceiling the "of in-place" column uses).
Every implementation gets the same threads (torch's pool); ours and each peer are timed in
alternating single steps (median of each), so the machine's bandwidth drifting during the run
(other tenants) falls on both alike.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

from pyruntime.bench.harness import compare, header, print_table, suite_parser, table_lines, time_fn
from pyruntime.ops.adamw import adamw_step

BYTES_PER_PARAM = 28  # read p, g, m, v and write p, m, v, fp32
HYPER = {"lr": 1e-4, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1}


def _sizes(text: str) -> list[int]:
    try:
        sizes = [int(float(s)) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--sizes takes numbers of parameters like 1e6,1e7; got '{text}'") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"--sizes must be >= 1 each; got '{text}'")
    return sizes


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = suite_parser("adam", __doc__)
    p.add_argument("--sizes", type=_sizes, default=_sizes("1e6,1e7,1e8"), help="parameters per buffer, comma-separated")
    p.add_argument("--repeat", type=int, default=10, help="timed steps per implementation (median)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    p.add_argument("--markdown", action="store_true", help="Markdown tables (for RESULTS.md)")
    args = p.parse_args(argv)
    if args.repeat < 1 or args.warmup < 0 or args.threads < 0:
        p.error(f"--repeat must be >= 1, --warmup and --threads >= 0; got {args.repeat}, {args.warmup}, {args.threads}")
    cores = os.cpu_count() or 1
    if args.threads > 4 * cores:  # torch.set_num_threads(100000) segfaults
        p.error(f"--threads {args.threads}: at most 4 x the {cores} CPU(s) here ({4 * cores})")
    # the largest size's buffers at once (master, grad, two moments, a copy, a temporary): 24 bytes each
    need, have = 24 * max(args.sizes), os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need > have:
        p.error(f"--sizes {max(args.sizes):.3g} needs about {need / 1e9:.1f} GB (24 bytes per parameter); this "
                f"machine has {have / 1e9:.1f} GB")
    return args


def bandwidth_seconds(n: int, repeat: int, warmup: int) -> tuple[float, float]:
    """Seconds of a STREAM triad (a = b + 3c into a third buffer: 12 bytes per element counted,
    but the write also reads `a` into the cache first, 16 moved) and of the in-place update
    a += 3b (12 bytes, every line written was just read: AdamW's access pattern, so the
    ceiling that applies to it)."""
    b, c = torch.rand(n), torch.rand(n)
    a = torch.empty(n)
    triad = time_fn(lambda: torch.add(b, c, alpha=3.0, out=a), warmup=warmup, repeat=repeat, device="cpu")
    update = time_fn(lambda: a.add_(b, alpha=3.0), warmup=warmup, repeat=repeat, device="cpu")
    return triad, update


def _ours(n: int, copy_dtype: torch.dtype | None = None):
    """One step of the C++ AdamW; with copy_dtype it also writes the parameters' copy in that
    dtype in the same pass (what `--offload optimizer` sends back to the device)."""
    g = torch.Generator().manual_seed(0)
    master, grad = torch.randn(n, generator=g), torch.randn(n, generator=g) * 1e-3
    m, v = torch.zeros(n), torch.zeros(n)
    copy = torch.empty(n, dtype=copy_dtype) if copy_dtype is not None else None
    step = [0]

    def run():
        step[0] += 1
        adamw_step(master, grad, m, v, None, step=step[0], backend="cpp", param_copy=copy, **HYPER)

    return run


def _torch(n: int, copy_dtype: torch.dtype | None = None, **impl):
    """One torch.optim.AdamW step; with copy_dtype followed by the copy into that dtype that
    torch needs as a second pass."""
    g = torch.Generator().manual_seed(0)
    param = torch.randn(n, generator=g).requires_grad_(True)
    param.grad = torch.randn(n, generator=g) * 1e-3
    step = torch.optim.AdamW([param], **HYPER, **impl).step
    if copy_dtype is None:
        return step
    copy = torch.empty(n, dtype=copy_dtype)

    def step_and_copy():
        step()
        copy.copy_(param.detach())

    return step_and_copy


def size_rows(n: int, repeat: int, warmup: int):
    shape = f"{n / 1e6:g}M fp32"
    moved = BYTES_PER_PARAM * n
    ours = _ours(n)
    rows = []
    for impl, name in (({"fused": True}, "AdamW fused"), ({"foreach": True}, "AdamW foreach")):
        baseline = _torch(n, **impl)  # one torch optimizer's state alive at a time
        rows.append(compare(f"C++ AdamW vs {name}", shape, ours, baseline, baseline_name=name,
                            bytes_moved=moved, warmup=warmup, repeat=repeat, interleave=True))
        del baseline
    del ours
    # The offload step: parameters also written as the device's bf16 copy. Ours does it in the
    # same pass (+2 bytes per parameter); torch needs its step and then a copy (+6).
    ours, baseline = _ours(n, torch.bfloat16), _torch(n, torch.bfloat16, fused=True)
    rows.append(compare("C++ AdamW+bf16 copy vs fused+copy_", shape, ours, baseline,
                        baseline_name="fused + copy_", bytes_moved=(BYTES_PER_PARAM + 2) * n,
                        warmup=warmup, repeat=repeat, interleave=True))
    return rows


def main(argv: list[str]) -> int:
    try:
        args = parse_args(argv)
    except SystemExit as e:  # --help (0) or bad input (2, already said)
        return int(e.code or 0)
    if args.threads:
        torch.set_num_threads(args.threads)
    print("\n".join(header(["adam", *argv], "triton", None)))
    print(f"threads: {torch.get_num_threads()}; bytes per parameter: {BYTES_PER_PARAM}")
    rows, bandwidth = [], []
    for n in args.sizes:
        triad_s, update_s = bandwidth_seconds(n, args.repeat, args.warmup)
        size_rows_ = size_rows(n, args.repeat, args.warmup)
        rows += size_rows_
        triad_gbs, update_gbs = 12 * n / triad_s / 1e9, 12 * n / update_s / 1e9
        ours_gbs = size_rows_[0].bytes_moved / size_rows_[0].ours_s / 1e9
        bandwidth.append([f"{n / 1e6:g}M", f"{triad_gbs:.1f}", f"{update_gbs:.1f}", f"{ours_gbs:.1f}",
                          f"{100 * ours_gbs / update_gbs:.0f}%"])
    print_table(rows, title="AdamW step, one flat buffer (base/ours > 1: ours is faster)", markdown=args.markdown)
    print("\n".join(["", "measured memory bandwidth (same run: triad a = b + 3c; in-place a += 3b, AdamW's "
                      "read-then-write pattern) vs the C++ AdamW's"]
                    + table_lines(["size", "", "triad GB/s", "in-place GB/s", "C++ AdamW GB/s", "of in-place"],
                                  [[r[0], ""] + r[1:] for r in bandwidth], args.markdown)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
