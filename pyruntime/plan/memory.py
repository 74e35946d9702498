"""Memory per rank, broken down, and whether it fits.

    steady peak = model states on the device (states.py)
                + saved activations x the micro-batches in flight on the rank, from the C++
                  schedule simulator's peak live (chunk, micro-batch) pairs (activations.py)
                + the transient at the loss (the logits next to their log-softmax)
                + ZeRO-3: the gathered unit, the prefetched one and a unit's fp32 flat
                  gradient copy in flight; ZeRO-1/2: one bucket's flat copy in flight
                + an allocator / CUDA-context allowance (stated as such: not measured here)
    first-step peak: the same without optimizer moments that do not exist yet (torch AdamW,
    used at dp 1 and ZeRO-0, creates its moments in the first step, after the backward).
"""
from __future__ import annotations

from dataclasses import dataclass

from pyruntime.parallel.pipeline.split import plan_stage_layers
from pyruntime.plan.activations import Shape, chunk_bytes, loss_bytes, logits_peak_bytes
from pyruntime.plan.layout import Layout, Workload
from pyruntime.plan.pipeline import activation_peaks
from pyruntime.plan.states import RankStates, rank_states

CUDA_CONTEXT = 512 * 2**20  # what the CUDA context and NCCL take before any tensor (typical, not measured)
FRAGMENTATION = 0.05        # caching-allocator slack as a share of the tensors' bytes (an allowance)


@dataclass(frozen=True)
class Chunk:
    layers: int
    embedding: bool
    head: bool


def rank_chunks(work: Workload, layout: Layout, pp_rank: int) -> list[Chunk]:
    """The chunks of pipeline rank pp_rank (stage c * pp + pp_rank for c < virtual stages)."""
    stages = layout.pp * layout.virtual_stages
    if stages == 1:
        return [Chunk(work.model.n_layers, True, True)]
    counts = plan_stage_layers(work.model, stages, layout.pp_layout)
    return [Chunk(counts[s], s == 0, s == stages - 1)
            for s in (c * layout.pp + pp_rank for c in range(layout.virtual_stages))]


def micro_shape(work: Workload, layout: Layout, act: int) -> Shape:
    return Shape(work.model, layout.micro_batch, work.seq_len, layout.tp, layout.sp, act)


def chunk_activation_bytes(work: Workload, layout: Layout, pp_rank: int, act: int = 4) -> list[int]:
    """Bytes one micro-batch saves in each chunk of pipeline rank pp_rank."""
    x = micro_shape(work, layout, act)
    return [chunk_bytes(x, c.layers, c.embedding, c.head, layout.recompute, layout.recompute_layers,
                        layout.recompute_ops)
            for c in rank_chunks(work, layout, pp_rank)]


def in_flight(work: Workload, layout: Layout) -> list[int]:
    """Most (chunk, micro-batch) pairs whose activations a rank holds at once, per pp rank:
    the schedule's peak live activations, as the C++ simulator reports them (1 without a
    pipeline)."""
    if layout.pp == 1:
        return [1]
    return list(activation_peaks(layout.schedule, layout.pp, work.microbatches(layout), layout.virtual_stages))


@dataclass(frozen=True)
class RankMemory:
    pp_rank: int
    states: RankStates
    activation_per_micro: tuple[int, ...]
    """Bytes one micro-batch saves in each of the rank's chunks."""
    in_flight: int
    activations: int
    loss_transient: int
    gathered: int
    """ZeRO-3: two gathered units (current + prefetched) and one fp32 flat gradient copy."""
    buckets: int
    """ZeRO-1/2: one bucket's flat gradient copy in flight."""
    allowance: int
    first_step_peak: int
    steady_peak: int

    def fits(self, capacity: float) -> bool:
        return self.steady_peak <= capacity and self.first_step_peak <= capacity


def rank_memory(work: Workload, layout: Layout, pp_rank: int, *, cuda: bool = True,
                flights: list[int] | None = None) -> RankMemory:
    act = 2 if cuda else 4  # bf16 autocast on CUDA
    states = rank_states(work, layout, pp_rank, compute_bytes=2 if cuda else 4)
    per_micro = chunk_activation_bytes(work, layout, pp_rank, act)
    pairs = (flights or in_flight(work, layout))[pp_rank]
    # each live pair holds one chunk's activations; with v chunks, the mean chunk (they alternate)
    activations = pairs * sum(per_micro) // len(per_micro)
    chunks = rank_chunks(work, layout, pp_rank)
    x = micro_shape(work, layout, act)
    loss = logits_peak_bytes(x) - loss_bytes(x) if any(c.head for c in chunks) else 0
    gathered = buckets = 0
    if layout.dp > 1 and layout.zero == 3:
        unit = max(states.units)
        gathered = 2 * unit + unit * 4 // (2 if cuda else 4)  # the flat gradient copy is fp32
    elif layout.dp > 1 and layout.zero in (1, 2):
        buckets = max(states.buckets)
    model = states.device_peak
    tensors = model + activations + loss + gathered + buckets
    allowance = int(CUDA_CONTEXT + FRAGMENTATION * tensors) if cuda else 0
    steady = tensors + allowance
    lazy_moments = states.held.optim if (layout.dp == 1 or layout.zero == 0) and layout.offload == "none" else 0
    first = steady - lazy_moments
    return RankMemory(pp_rank, states, tuple(per_micro), pairs, activations, loss, gathered, buckets, allowance,
                      first, steady)


def all_rank_memory(work: Workload, layout: Layout, *, cuda: bool = True) -> list[RankMemory]:
    flights = in_flight(work, layout)
    return [rank_memory(work, layout, r, cuda=cuda, flights=flights) for r in range(layout.pp)]
