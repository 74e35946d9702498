"""The one benchmark harness every suite shares: median of many timed runs after warm-up
(device events on CUDA, perf_counter on CPU), side by side with a named baseline, printed as a
table, and the header (device, date, commit, command) every suite prints first.

    rows = [compare("rmsnorm fwd", "4096x4096 bf16", ours=lambda: f(x), baseline=lambda: g(x),
                    flops=..., bytes_moved=...)]
    print_table(rows)
"""
from __future__ import annotations

import argparse
import datetime
import sys
import importlib.util
import math
import statistics
import subprocess
import time
from dataclasses import dataclass
from typing import Callable

import torch


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


def time_interleaved(a: Callable[[], object], b: Callable[[], object], *, warmup: int = 5,
                     repeat: int = 30) -> tuple[float, float]:
    """Median seconds per call of a and of b, timed in alternating single calls (CPU)."""
    for _ in range(warmup):
        a()
        b()
    samples: dict[int, list[float]] = {0: [], 1: []}
    fns = (a, b)
    for i in range(repeat):
        for k in ((0, 1) if i % 2 == 0 else (1, 0)):
            t0 = time.perf_counter()
            fns[k]()
            samples[k].append(time.perf_counter() - t0)
    return statistics.median(samples[0]), statistics.median(samples[1])


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
            warmup: int = 5, repeat: int = 30, memory: bool = False, interleave: bool = False) -> Row:
    """Time ours (and baseline); with memory=True also one call of each for peak memory.
    interleave=True alternates single calls of the two (which goes first alternating too), so
    a drift of the machine's speed during the run (memory bandwidth shared with other tenants)
    falls on both sides alike; otherwise each is timed in one block."""
    if interleave and baseline is not None:
        ours_s, base_s = time_interleaved(ours, baseline, warmup=warmup, repeat=repeat)
    else:
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
    # The baseline named on every row; the ratio right of the two times it divides.
    head = ["kernel", "shape", "ours TFLOP/s", "ours GB/s", "baseline", "ours ms", "base ms", "base/ours"]
    head += ["ours MiB", "base MiB"] if with_mem else []
    body = []
    for r in rows:
        cells = [r.name, r.shape, f"{r.flops / r.ours_s / 1e12:.2f}" if r.flops else "",
                 f"{r.bytes_moved / r.ours_s / 1e9:.1f}" if r.bytes_moved else "", r.baseline if r.base_s else "",
                 f"{r.ours_s * 1e3:.3f}", f"{r.base_s * 1e3:.3f}" if r.base_s else "",
                 f"{r.speedup:.2f}x" if r.speedup else ""]
        if with_mem:
            cells += [f"{m / 2**20:.1f}" if m is not None else "" for m in (r.ours_mem, r.base_mem)]
        body.append(cells)
    text = "\n".join(([title] if title else []) + table_lines(head, body, markdown))
    print(text, flush=True)
    return text


def header(argv: list[str], backend: str, reason: str | None) -> list[str]:
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


class _SuiteParser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse prints usage + message: one line instead, exit 2
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def require(parser: argparse.ArgumentParser, args: argparse.Namespace, positive=(), non_negative=()) -> None:
    """Counts and sizes a suite divides by, takes a median over or builds a model from: each
    (every item of a list) finite and > 0 / >= 0, else one line through parser.error, exit 2."""
    for names, strict in ((positive, True), (non_negative, False)):
        for name in names:
            value = getattr(args, name)
            for v in value if isinstance(value, (list, tuple)) else [value]:
                if v is not None and not (math.isfinite(v) and (v > 0 if strict else v >= 0)):
                    rule = (f">= {int(strict)}" if isinstance(v, int) else
                            f"a finite number {'>' if strict else '>='} 0")
                    parser.error(f"--{name.replace('_', '-')} must be {rule}, got {v}")


def suite_parser(suite: str, doc: str) -> argparse.ArgumentParser:
    """The argument parser of `bench SUITE`: the suite module's first docstring paragraph as
    its description, bad options as one line on stderr with exit 2."""
    return _SuiteParser(prog=f"pyruntime bench {suite}", description=doc.split("\n\n")[0],
                        formatter_class=argparse.RawDescriptionHelpFormatter)
