"""The planner's view of a pipeline schedule: the C++ simulator's makespan and busy time, and
the activation peaks of its compute order, fast enough for a search of thousands of layouts."""
from __future__ import annotations

import functools

from pyruntime.parallel.pipeline.schedule import Costs, live_peaks, simulate


@functools.lru_cache(maxsize=8192)
def pipeline_sim(schedule: str, pp: int, microbatches: int, virtual_stages: int,
                 costs: Costs = Costs()) -> tuple[float, float]:
    """(makespan, the busiest rank's compute time) of the C++ simulator, the whole schedule
    simulated (no action crosses into Python). Cached: a search asks the same pipeline for
    every ZeRO stage and offload mode. (Extending a long schedule from its first rounds is not
    exact: with message latency, interleaved 1F1B's time per round of pp micro-batches can
    still change after 12 equal rounds.)"""
    sim = simulate(schedule, pp, microbatches, virtual_stages, costs, events=False)
    return sim.makespan, max(sim.busy)


@functools.lru_cache(maxsize=8192)
def activation_peaks(schedule: str, pp: int, microbatches: int, virtual_stages: int) -> tuple[int, ...]:
    """Per pipeline rank, the most (chunk, micro-batch) pairs whose activations it holds at
    once: the simulator's peak, which depends on the order alone, so no simulation (the
    memory check of every layout a search tries needs only this; timing, far fewer)."""
    return live_peaks(schedule, pp, microbatches, virtual_stages)[0]
