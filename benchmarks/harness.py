"""The one benchmark harness: median of many timed runs after warm-up (device events on
CUDA, perf_counter on CPU), side by side with a baseline, printed as a table.

    rows = [compare("rmsnorm fwd", "4096x4096 bf16", ours=lambda: f(x), baseline=lambda: g(x),
                    flops=..., bytes_moved=...)]
    print_table(rows)

It lives in pyruntime/bench.py, so that `python -m pyruntime bench ...` (the installed
package) can use it; benchmarks/ is not a package. This module re-exports it for the scripts
here.
"""
from pyruntime.bench import Row, compare, peak_extra_memory, print_table, time_fn

__all__ = ["Row", "compare", "peak_extra_memory", "print_table", "time_fn"]
