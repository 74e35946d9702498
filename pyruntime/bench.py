"""Microbenchmarks: `python -m pyruntime bench tp [options]` (or benchmarks/bench_tp.py),
`bench pp [options]` (benchmarks/bench_pipeline.py: pipeline step time vs
torch.distributed.pipelining on 2 gloo ranks), `bench zero` (benchmarks/bench_zero.py: ZeRO
vs DDP / FSDP2), `bench flat` (benchmarks/bench_flat.py), `bench overlap`
(benchmarks/bench_overlap.py: communication the tp overlap leaves exposed, on one device),
`bench tpstep` (benchmarks/bench_tp_step.py: a tp training step vs PyTorch's
parallelize_module on gloo ranks), `bench initmem` (benchmarks/bench_init_memory.py: peak
memory of building a ZeRO-3 model, deferred vs eager), `bench all` (each with defaults), and
the one benchmark harness they share (benchmarks/harness.py re-exports it: benchmarks/ is
not an installed package, so the harness lives in the package that the CLI can import).

    rows = [compare("rmsnorm fwd", "4096x4096 bf16", ours=lambda: f(x), baseline=lambda: g(x),
                    flops=..., bytes_moved=...)]
    print_table(rows)

The `tp` suite times the kernels behind the tensor-parallel layers on one device, at 7B
shapes per tp degree: the fused GEMM + bias + GeLU and the fused SwiGLU projection against
eager PyTorch (matmul, then bias, then activation), the plain GEMM against torch.matmul,
and the vocab-parallel cross-entropy kernels against F.cross_entropy, with peak extra
memory. Without CUDA it runs small shapes on the PyTorch reference paths and says so.
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import importlib.util
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

# ----------------------------------------------------------------------------- harness


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def time_fn(fn: Callable[[], object], *, warmup: int = 5, repeat: int = 30, device: str | None = None) -> float:
    """Median seconds per call of fn, warm-up excluded."""
    device = device or _device()
    for _ in range(warmup):
        fn()
    samples = []
    if device == "cuda":
        torch.cuda.synchronize()
        for _ in range(repeat):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / 1e3)
    else:
        for _ in range(repeat):
            t0 = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def peak_extra_memory(fn: Callable[[], object]) -> float | None:
    """Bytes of device memory one call of fn allocates at its peak above what was allocated
    before it (its result included); None off CUDA, where there is no allocator to ask."""
    if _device() != "cuda":
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    result = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del result
    return float(peak - base)


@dataclass
class Row:
    name: str
    shape: str
    ours_s: float
    base_s: float | None = None
    flops: float | None = None
    bytes_moved: float | None = None
    baseline: str = "torch"
    ours_mem: float | None = None   # peak extra bytes, see peak_extra_memory
    base_mem: float | None = None

    @property
    def speedup(self) -> float | None:
        return self.base_s / self.ours_s if self.base_s else None


def compare(name: str, shape: str, ours: Callable, baseline: Callable | None = None, *,
            flops: float | None = None, bytes_moved: float | None = None, baseline_name: str = "torch",
            warmup: int = 5, repeat: int = 30, memory: bool = False) -> Row:
    """Time ours (and baseline); with memory=True also one call of each for peak memory."""
    ours_s = time_fn(ours, warmup=warmup, repeat=repeat)
    base_s = time_fn(baseline, warmup=warmup, repeat=repeat) if baseline is not None else None
    row = Row(name, shape, ours_s, base_s, flops, bytes_moved, baseline_name)
    if memory:
        row.ours_mem = peak_extra_memory(ours)
        row.base_mem = peak_extra_memory(baseline) if baseline is not None else None
    return row



def table_lines(head: list[str], body: list[list[str]], markdown: bool) -> list[str]:
    """A Markdown table, or a plain one with the first two columns left-aligned and the
    numbers right-aligned."""
    if markdown:
        return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(c) + " |" for c in body]
    widths = [max(len(x) for x in col) for col in zip(head, *body)]

    def fmt(cells: list[str]) -> str:
        return " ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return [fmt(head), "-" * len(fmt(head))] + [fmt(c) for c in body]

def print_table(rows: list[Row], title: str = "", markdown: bool = False) -> str:
    """Print (and return) the rows as a fixed-width table, or a Markdown one for RESULTS.md.
    Memory columns (MiB) appear only when some row measured memory."""
    with_mem = any(r.ours_mem is not None for r in rows)
    head = ["kernel", "shape", "ours ms", "base ms", "TFLOP/s", "GB/s", "speedup"]
    head += ["ours MiB", "base MiB"] if with_mem else []
    body = []
    for r in rows:
        cells = [r.name, r.shape, f"{r.ours_s * 1e3:.3f}", f"{r.base_s * 1e3:.3f}" if r.base_s else "",
                 f"{r.flops / r.ours_s / 1e12:.2f}" if r.flops else "",
                 f"{r.bytes_moved / r.ours_s / 1e9:.1f}" if r.bytes_moved else "",
                 f"{r.speedup:.2f}x" if r.speedup else ""]
        if with_mem:
            cells += [f"{m / 2**20:.1f}" if m is not None else "" for m in (r.ours_mem, r.base_mem)]
        body.append(cells)
    text = "\n".join(([title] if title else []) + table_lines(head, body, markdown))
    print(text, flush=True)
    return text


# ----------------------------------------------------------------------------- tp suite


@dataclass
class TPShapes:
    tokens: int
    hidden: int
    ffn: int
    vocab: int
    tps: tuple[int, ...]
    dtype: torch.dtype


GPU_SHAPES = TPShapes(tokens=8192, hidden=4096, ffn=11008, vocab=128256, tps=(1, 2, 8), dtype=torch.bfloat16)
# CPU: small enough to finish in seconds on two cores; fp32 because CPU bf16 GEMMs are slow.
CPU_SHAPES = TPShapes(tokens=256, hidden=512, ffn=1376, vocab=8192, tps=(1, 2, 8), dtype=torch.float32)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _check_close(name: str, ours, base, tol: float) -> None:
    """Refuse to time a kernel that computes something else than its baseline."""
    err = (ours.float() - base.float()).abs().max().item()
    scale = base.float().abs().max().item()
    if not err <= tol * max(1.0, scale):
        raise AssertionError(f"{name}: max |ours - torch| = {err:.3g} (|torch| <= {scale:.3g})")


def _mlp_rows(s: TPShapes, tp: int, backend: str, timing: dict) -> list[Row]:
    from pyruntime.ops import linear, swiglu_linear

    dev, dt = _device(), s.dtype
    m, k, n = s.tokens, s.hidden, s.ffn // tp
    gen = torch.Generator(device=dev).manual_seed(tp)
    x = torch.randn(m, k, device=dev, dtype=dt, generator=gen)
    w, wu = (torch.randn(n, k, device=dev, dtype=dt, generator=gen) / k**0.5 for _ in range(2))
    b = torch.randn(n, device=dev, dtype=dt, generator=gen)
    dy = torch.randn(m, n, device=dev, dtype=dt, generator=gen)
    shape, flops = f"{m}x{k} @ {k}x{n} {str(dt)[6:]}", 2.0 * m * n * k
    tag = "" if backend == "triton" else " [reference]"
    tol = 1e-4 if dt == torch.float32 else 3e-2

    def fwd_bwd(fn, *leaves):
        leaves = [t.detach().requires_grad_(True) for t in leaves]
        return lambda: torch.autograd.grad(fn(*leaves), leaves, dy)

    cases = [  # name, ours, eager baseline, flops
        ("gemm", lambda: linear(x, w, backend=backend), lambda: torch.matmul(x, w.t()), flops),
        ("linear+bias+gelu fwd", lambda: linear(x, w, b, "gelu", backend=backend),
         lambda: F.gelu(torch.matmul(x, w.t()) + b, approximate="tanh"), flops),
        ("swiglu proj fwd", lambda: swiglu_linear(x, w, wu, backend=backend),
         lambda: F.silu(torch.matmul(x, w.t())) * torch.matmul(x, wu.t()), 2 * flops),
        ("linear+bias+gelu fwd+bwd",
         fwd_bwd(lambda x_, w_, b_: linear(x_, w_, b_, "gelu", backend=backend), x, w, b),
         fwd_bwd(lambda x_, w_, b_: F.gelu(torch.matmul(x_, w_.t()) + b_, approximate="tanh"), x, w, b),
         3 * flops),
        ("swiglu proj fwd+bwd", fwd_bwd(lambda x_, g_, u_: swiglu_linear(x_, g_, u_, backend=backend), x, w, wu),
         fwd_bwd(lambda x_, g_, u_: F.silu(torch.matmul(x_, g_.t())) * torch.matmul(x_, u_.t()), x, w, wu),
         6 * flops),
    ]
    rows = []
    for name, ours, base, fl in cases:
        with torch.no_grad() if "bwd" not in name else torch.enable_grad():
            o, r = ours(), base()
            for oi, ri in zip(o, r) if isinstance(o, tuple) else [(o, r)]:
                _check_close(f"{name} tp={tp}", oi, ri, tol)
            del o, r
            rows.append(compare(name + tag, f"{shape} tp={tp}", ours, base, flops=fl, **timing))
    return rows


def _ce_rows(s: TPShapes, tp: int, backend: str, timing: dict) -> list[Row]:
    from pyruntime.ops import vocab_parallel_ce_grad_, vocab_parallel_ce_stats

    dev, dt = _device(), s.dtype
    n, vs = s.tokens, -(-s.vocab // tp)
    gen = torch.Generator(device=dev).manual_seed(100 + tp)
    logits = 4 * torch.randn(n, vs, device=dev, dtype=dt, generator=gen)
    targets = torch.randint(0, vs, (n,), device=dev, generator=gen)
    leaf = logits.detach().clone().requires_grad_(True)

    def ours():  # the kernels of one rank; the (N,) all-reduces between them are not timed
        m, se, _ = vocab_parallel_ce_stats(logits, targets, 0, vs, backend=backend)
        return vocab_parallel_ce_grad_(logits, targets, 0, vs, m, se, 1.0 / n, backend=backend)

    def base():
        return torch.autograd.grad(F.cross_entropy(leaf, targets), leaf)[0]

    m, se, t = vocab_parallel_ce_stats(logits, targets, 0, vs, backend=backend)
    _check_close(f"ce stats tp={tp}", torch.log(se) + m - t,
                 F.cross_entropy(logits.float(), targets, reduction="none"), 1e-3)
    _check_close(f"ce grad tp={tp}", ours(), base(), 1e-2)  # ours() overwrites logits: last check
    # Ours reads the shard twice and writes it once; F.cross_entropy moves more.
    return [compare("vocab-parallel CE fwd+bwd" + ("" if backend == "triton" else " [reference]"),
                    f"{n}x{vs} {str(dt)[6:]} tp={tp}", ours, base,
                    bytes_moved=3.0 * n * vs * logits.element_size(),
                    baseline_name="F.cross_entropy", memory=True, **timing)]


def _header(argv: list[str], backend: str, reason: str | None) -> list[str]:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (no CUDA)"
    triton_v = "absent"
    if importlib.util.find_spec("triton") is not None:
        import triton

        triton_v = triton.__version__
    lines = [
        f"device: {device}; torch {torch.__version__}; triton {triton_v}",
        f"date: {datetime.date.today().isoformat()}; commit: {commit}",
        f"command: python -m pyruntime bench {' '.join(argv)}",
    ]
    if backend != "triton":
        lines.append(f"NOTE: no Triton rows: they need CUDA. Here: {reason}. 'ours' below is the "
                     "PyTorch reference path at small shapes, only to show the suite runs; its "
                     "speedups mean nothing.")
    return lines


def run_tp(args: argparse.Namespace, argv: list[str]) -> int:
    from pyruntime.ops.dispatch import unavailable_reason

    on_cuda = torch.cuda.is_available()
    s = GPU_SHAPES if on_cuda else CPU_SHAPES
    s = TPShapes(
        tokens=args.tokens or s.tokens, hidden=args.hidden or s.hidden, ffn=args.ffn or s.ffn,
        vocab=args.vocab or s.vocab, tps=tuple(args.tp) if args.tp else s.tps,
        dtype=DTYPES[args.dtype] if args.dtype else s.dtype,
    )
    reason = unavailable_reason("triton", torch.device(_device()), explicit=False)
    backend = "triton" if reason is None else "reference"
    bad = [tp for tp in s.tps if tp < 1 or s.ffn % tp]
    if bad:
        print(f"bench tp: tp {bad} must be >= 1 and divide the MLP width {s.ffn}", file=sys.stderr)
        return 2
    if set(args.only) - {"mlp", "ce"}:
        print(f"bench tp: --only takes mlp and/or ce, got {','.join(args.only)}", file=sys.stderr)
        return 2
    timing = dict(warmup=args.warmup, repeat=args.repeat or (30 if on_cuda else 5))
    header = _header(argv, backend, reason)
    print("\n".join(header), flush=True)
    rows = []
    for tp in s.tps:
        if "mlp" in args.only:
            rows += _mlp_rows(s, tp, backend, timing)
        if "ce" in args.only:
            rows += _ce_rows(s, tp, backend, timing)
        if on_cuda:
            torch.cuda.empty_cache()  # the next tp's shapes differ: do not keep this one's blocks
    print()
    print_table(rows, markdown=args.markdown)
    return 0


def _int_list(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def run_script(name: str, argv: list[str]) -> int:
    """Runs benchmarks/NAME.py's main(argv) from the source checkout: multi-process suites
    (pp) live there, not in the package; the checkout is importable as a plain directory,
    and spawned ranks re-import the script by name from the sys.path they inherit."""
    from pathlib import Path

    folder = Path(__file__).resolve().parent.parent / "benchmarks"
    if not (folder / f"{name}.py").is_file():
        print(f"bench: {folder / name}.py not found; this suite runs from a source checkout "
              "(pip install -e .)", file=sys.stderr)
        return 2
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
    return importlib.import_module(name).main(argv)


# Suites with their own options and processes, run from benchmarks/ (see each script's --help).
SCRIPTS = {"pp": "bench_pipeline", "zero": "bench_zero", "flat": "bench_flat", "overlap": "bench_overlap",
           "tpstep": "bench_tp_step", "initmem": "bench_init_memory"}


def run(argv: list[str]) -> int:
    """Entry of `python -m pyruntime bench SUITE ...` (argv: the words after "bench")."""
    if argv[:1] and argv[0] in SCRIPTS:
        return run_script(SCRIPTS[argv[0]], argv[1:])
    if argv == ["all"]:  # every suite with its defaults, one after another
        codes = [run(["tp"])] + [run([suite]) for suite in SCRIPTS]
        return max(codes)
    parser = argparse.ArgumentParser(prog="pyruntime bench", description=__doc__.splitlines()[0])
    parser.add_argument("suite", choices=["tp", *SCRIPTS, "all"],
                        help="tp: the kernels of the tensor-parallel layers; pp: pipeline step time vs "
                             "torch.distributed.pipelining on 2 gloo ranks; zero: ZeRO-0/3 vs DDP/FSDP2; "
                             "flat: flat-buffer ops and the fused AdamW; overlap: exposed sequence-parallel "
                             "communication on one device, peers stood in for by copies; tpstep: training step "
                             "under tp vs parallelize_module on gloo ranks; initmem: peak memory of building a "
                             "ZeRO-3 model, deferred vs eager; all: every suite with its "
                             "defaults (`bench pp --help` etc. for a suite's options)")
    parser.add_argument("--tp", type=_int_list, help="tp degrees, e.g. 1,2,8 (default 1,2,8)")
    parser.add_argument("--tokens", type=int, help="rows M (default 8192 on CUDA, 256 on CPU)")
    parser.add_argument("--hidden", type=int, help="K (default 4096 on CUDA)")
    parser.add_argument("--ffn", type=int, help="MLP width before the tp split (default 11008)")
    parser.add_argument("--vocab", type=int, help="vocabulary before the tp split (default 128256)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="default bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--only", type=lambda t: t.split(","), default=["mlp", "ce"], help="mlp,ce")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeat", type=int, help="timed runs per row (default 30 on CUDA, 5 on CPU)")
    parser.add_argument("--markdown", action="store_true", help="a Markdown table for benchmarks/RESULTS.md")
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse exits on --help or on bad input; return its code
        return int(e.code or 0)
    return run_tp(args, argv)
