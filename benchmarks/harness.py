"""The one benchmark harness: median of many timed runs after warm-up (device events on
CUDA, perf_counter on CPU), side by side with a baseline, printed as a table.

    rows = [compare("rmsnorm fwd", "4096x4096 bf16", ours=lambda: f(x), baseline=lambda: g(x),
                    flops=..., bytes_moved=...)]
    print_table(rows)
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch


def time_fn(fn: Callable[[], object], *, warmup: int = 5, repeat: int = 30, device: str | None = None) -> float:
    """Median seconds per call of fn, warm-up excluded."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
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


@dataclass
class Row:
    name: str
    shape: str
    ours_s: float
    base_s: float | None = None
    flops: float | None = None
    bytes_moved: float | None = None
    baseline: str = "torch"

    @property
    def speedup(self) -> float | None:
        return self.base_s / self.ours_s if self.base_s else None


def compare(name: str, shape: str, ours: Callable, baseline: Callable | None = None, *,
            flops: float | None = None, bytes_moved: float | None = None, baseline_name: str = "torch",
            warmup: int = 5, repeat: int = 30) -> Row:
    ours_s = time_fn(ours, warmup=warmup, repeat=repeat)
    base_s = time_fn(baseline, warmup=warmup, repeat=repeat) if baseline is not None else None
    return Row(name, shape, ours_s, base_s, flops, bytes_moved, baseline_name)


def print_table(rows: list[Row], title: str = "") -> str:
    header = f"{'kernel':<28} {'shape':<30} {'ours ms':>9} {'base ms':>9} {'TFLOP/s':>8} {'GB/s':>8} {'speedup':>8}"
    lines = [title, header, "-" * len(header)] if title else [header, "-" * len(header)]
    for r in rows:
        tflops = f"{r.flops / r.ours_s / 1e12:8.2f}" if r.flops else f"{'':>8}"
        gbs = f"{r.bytes_moved / r.ours_s / 1e9:8.1f}" if r.bytes_moved else f"{'':>8}"
        base = f"{r.base_s * 1e3:9.3f}" if r.base_s else f"{'':>9}"
        speed = f"{r.speedup:7.2f}x" if r.speedup else f"{'':>8}"
        lines.append(f"{r.name:<28} {r.shape:<30} {r.ours_s * 1e3:9.3f} {base} {tflops} {gbs} {speed}")
    text = "\n".join(lines)
    print(text, flush=True)
    return text
