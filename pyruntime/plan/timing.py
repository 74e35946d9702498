"""Time per step, broken down, from FLOPs, bandwidths and the C++ pipeline simulator.

Per micro-batch on one pipeline rank: forward F = its chunks' matmul FLOPs / sustained FLOP/s
+ a fixed per-block overhead (dispatch, launches) + its tp collectives (blocking: on the
critical path); backward 2F (recomputation adds the blocks' forward again; zb splits it into
B = F and W = F). The C++ simulator runs the schedule with those F / B / W costs and the p2p
time of one activation as message latency: its makespan holds the bubble. Data parallelism
adds what its collectives leave exposed: ZeRO-0/1/2 reduce gradients while the last backward
runs (exposed: the part longer than that backward, at least the last bucket), ZeRO-1/2
all-gather the updated parameters after the step (exposed), ZeRO-3 gathers each unit ahead of
its use (exposed: what exceeds the compute, plus the first unit). Then the optimizer, bound by
memory bandwidth (AdamW moves 28 bytes per fp32 element).

Ring collectives over g ranks move (g-1)/g of the buffer per rank (all-reduce twice); a group
runs at the intra-node bandwidth when it fits in one node (mesh order dp, pp, tp: tp
innermost), else at the inter-node one.
"""
from __future__ import annotations

from dataclasses import dataclass

from pyruntime.model.llama import count_params
from pyruntime.parallel.pipeline.schedule import Costs, simulate
from pyruntime.plan.devices import Device
from pyruntime.plan.flops import SECONDS_PER_DAY, model_flops_per_token
from pyruntime.plan.layout import Layout, Workload
from pyruntime.plan.memory import rank_chunks
from pyruntime.plan.states import rank_states

ADAM_BYTES = 28  # fp32 master, gradient, two moments read, three written


@dataclass(frozen=True)
class Cluster:
    device: Device
    gpus: int
    gpus_per_node: int = 8


@dataclass(frozen=True)
class StepTime:
    forward: float
    """Seconds of one micro-batch's forward on the slowest pipeline rank (tp comm included)."""
    backward: float
    tp_comm: float
    """Seconds of tp collectives per step on one rank (inside forward / backward)."""
    pipeline: float
    """Makespan of the schedule (all micro-batches, bubble included)."""
    bubble: float
    """Seconds of the makespan the busiest rank waits."""
    dp_comm: float
    """Seconds of data-parallel communication per step (volume / bandwidth)."""
    dp_exposed: float
    optimizer: float
    step: float
    tokens_per_s: float
    mfu: float

    def days(self, tokens: float) -> float:
        return tokens / self.tokens_per_s / SECONDS_PER_DAY


def _bw(cluster: Cluster, stride: int, size: int) -> float:
    d = cluster.device
    return d.intra_bw if stride * size <= cluster.gpus_per_node else d.inter_bw


def ring(nbytes: float, ranks: int, bw: float, latency: float, all_reduce: bool = False) -> float:
    if ranks == 1:
        return 0.0
    return (2 if all_reduce else 1) * (ranks - 1) / ranks * nbytes / bw + latency


def chunk_forward_flops(work: Workload, layout: Layout, layers: int, head: bool) -> float:
    """Matmul FLOPs of one micro-batch's forward through a chunk, on one tp rank."""
    m, tokens = work.model, layout.micro_batch * work.seq_len
    per_layer = 2.0 * count_params(m)["per_layer"] * tokens + 2.0 * m.dim * work.seq_len * tokens
    flops = layers * per_layer + (2.0 * m.vocab_size * m.dim * tokens if head else 0.0)
    return flops / layout.tp


def _tp_time(work: Workload, layout: Layout, cluster: Cluster, layers: int, act: int, embedding: bool,
             head: bool) -> float:
    """One micro-batch's tp collectives of one chunk, forward (backward: as many): per block two
    all-reduces, or with sequence parallelism two all-gathers and two reduce-scatters; the
    vocab-parallel embedding's reduction; the vocab-parallel loss's three small all-reduces."""
    t = layout.tp
    if t == 1:
        return 0.0
    d, nbytes = cluster.device, layout.micro_batch * work.seq_len * work.model.dim * act
    bw = _bw(cluster, 1, t)
    if layout.sp:
        one = 2 * ring(nbytes, t, bw, d.gather_latency)
    else:
        one = ring(nbytes, t, bw, d.latency, all_reduce=True)
    total = (2 * layers + embedding) * one
    if head:
        total += 3 * d.latency + (ring(nbytes, t, bw, d.gather_latency) if layout.sp else 0.0)
    return total


def _rank_costs(work: Workload, layout: Layout, cluster: Cluster, pp_rank: int) -> tuple[float, float, float, float]:
    """(forward, backward, recompute, tp comm) seconds of one micro-batch on pipeline rank pp_rank."""
    d = cluster.device
    rate = d.peak_flops * d.gemm_efficiency
    act = 2 if d.cuda else 4
    fwd = bwd = rec = comm = 0.0
    for c in rank_chunks(work, layout, pp_rank):
        flops = chunk_forward_flops(work, layout, c.layers, c.head)
        # dispatch: the blocks', the head's (about one block) and the chunk's own (rotary, loss)
        fixed = (c.layers + (1 if c.head else 0)) * d.block_overhead + d.micro_overhead
        tp = _tp_time(work, layout, cluster, c.layers, act, c.embedding, c.head)
        fwd += flops / rate + fixed / 3 + tp
        bwd += 2 * flops / rate + 2 * fixed / 3 + tp
        comm += 2 * tp
        if layout.recompute == "full":
            rec += chunk_forward_flops(work, layout, c.layers, False) / rate + c.layers * d.block_overhead / 3 + tp
    return fwd, bwd, rec, comm


def _dp_time(work: Workload, layout: Layout, cluster: Cluster, backward: float, forward: float,
             micro: int) -> tuple[float, float]:
    """(volume time, exposed time) of the data-parallel collectives of one step."""
    dp, d = layout.dp, cluster.device
    if dp == 1:
        return 0.0, 0.0
    states = rank_states(work, layout, 0, compute_bytes=2 if d.cuda else 4)
    bw = _bw(cluster, layout.tp * layout.pp, dp)
    grads, n = 4 * states.params, states.params
    if layout.zero == 3:
        units = len(states.units)
        gathers = 2 * ring((2 if d.cuda else 4) * n, dp, bw, d.gather_latency * units)
        per_micro = gathers + ring(grads, dp, bw, d.latency * units)  # reduce-scatter: an in-place all-reduce on gloo
        first = ring(max(states.units), dp, bw, d.gather_latency)
        exposed = micro * (max(0.0, per_micro - forward - backward) + 2 * first)
        return micro * per_micro, exposed if d.overlap else micro * per_micro
    reduce = ring(grads, dp, bw, d.latency * len(states.buckets), all_reduce=layout.zero == 0)
    tail = ring(max(states.buckets), dp, bw, d.latency, all_reduce=layout.zero == 0)
    reductions = micro if layout.zero == 2 else 1
    total = reductions * reduce
    exposed = reductions * max(tail, reduce - backward) if d.overlap else total
    if layout.zero in (1, 2):  # the updated parameters, all-gathered after the step
        gather = ring(grads, dp, bw, d.gather_latency * len(states.buckets))
        total, exposed = total + gather, exposed + gather
    return total, exposed


def _step_syncs(layout: Layout, device) -> float:
    """The step's small blocking all-reduces: the loss over dp and over pp, and the global
    gradient norm (skipped by plain data parallelism, where every rank holds the whole norm)."""
    count = (layout.dp > 1) + (layout.pp > 1) + (layout.world > 1 and not (layout.dp == layout.world and layout.zero == 0))
    return count * device.latency


def step_time(work: Workload, layout: Layout, cluster: Cluster) -> StepTime:
    micro = work.microbatches(layout)
    per_rank = [_rank_costs(work, layout, cluster, r) for r in range(layout.pp)]
    fwd, bwd, rec, comm = (max(c[i] for c in per_rank) for i in range(4))
    bwd += rec
    d = cluster.device
    if layout.pp == 1:
        makespan, bubble = micro * (fwd + bwd), 0.0
    else:
        act = 2 if d.cuda else 4
        sn = work.seq_len // layout.tp if layout.sp else work.seq_len
        msg = layout.micro_batch * sn * work.model.dim * act
        p2p = msg / _bw(cluster, layout.tp, layout.pp) + d.p2p_latency
        costs = Costs(forward=fwd, backward=bwd, backward_input=bwd / 2, backward_weight=bwd / 2, comm_latency=p2p)
        sim = simulate(layout.schedule, layout.pp, micro, layout.virtual_stages, costs)
        makespan = sim.makespan
        bubble = makespan - max(sim.busy)
    dp_total, dp_exposed = _dp_time(work, layout, cluster, bwd, fwd, micro)
    states = rank_states(work, layout, 0)
    shard = states.held.optim // 8  # fp32 elements this rank's optimizer updates
    optimizer = ADAM_BYTES * shard / d.mem_bw
    step = makespan + dp_exposed + optimizer + _step_syncs(layout, d) + d.step_overhead
    tokens_per_s = work.global_batch * work.seq_len / step
    mfu = tokens_per_s * model_flops_per_token(work.model, work.seq_len) / (layout.world * d.peak_flops)
    return StepTime(fwd, bwd, micro * comm, makespan, bubble, dp_total, dp_exposed, optimizer, step,
                    tokens_per_s, mfu)
