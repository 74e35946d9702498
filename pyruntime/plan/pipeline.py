"""The planner's view of a pipeline schedule: the C++ simulator's makespan, busy time and
activation peaks, fast enough for a search of thousands of layouts."""
from __future__ import annotations

import functools

from pyruntime.parallel.pipeline.schedule import Costs, simulate


@functools.lru_cache(maxsize=8192)
def pipeline_sim(schedule: str, pp: int, microbatches: int, virtual_stages: int,
                 costs: Costs = Costs()) -> tuple[float, float, tuple[int, ...]]:
    """(makespan, the busiest rank's compute time, per-rank peak live activations) of the C++
    simulator, the whole schedule simulated (no action crosses into Python). Cached: a search
    asks the same pipeline for every ZeRO stage and offload mode. (Extending a long schedule
    from its first rounds is not exact: with message latency, interleaved 1F1B's time per round
    of pp micro-batches can still change after 12 equal rounds.)"""
    sim = simulate(schedule, pp, microbatches, virtual_stages, costs, events=False)
    return sim.makespan, max(sim.busy), sim.peak_activations
