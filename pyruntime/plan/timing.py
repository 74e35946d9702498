"""Time per step, broken down, from FLOPs, bandwidths and the C++ pipeline simulator.

Per micro-batch on one pipeline rank: forward F = its chunks' matmul FLOPs / sustained FLOP/s
+ a fixed per-block overhead (dispatch, launches) + its tp collectives (blocking: on the
critical path); backward 2F (full recomputation adds the blocks' forward again, selective
the memory traffic of the elementwise ops it reruns; zb splits it into B = F and W = F). The
C++ simulator runs the schedule with those F / B / W costs and the p2p time of one activation
as message latency: its makespan holds the bubble. Data parallelism adds what its collectives
leave exposed: ZeRO-0/1/2 reduce gradients while the last backward
runs (exposed: the part longer than that backward, at least the last bucket), ZeRO-1/2
all-gather the updated parameters after the step (exposed), ZeRO-3 gathers each unit ahead of
its use (exposed: what exceeds the compute, plus the first unit). Then the optimizer, bound by
memory bandwidth (AdamW moves 28 bytes per fp32 element): the device's, or with --offload
optimizer the host's, plus the copies between them that the backward does not hide.

Ring collectives over g ranks move (g-1)/g of the buffer per rank (all-reduce twice); a group
runs at the intra-node bandwidth when it fits in one node (mesh order dp, pp, tp: tp
innermost), else at the inter-node one.
"""
from __future__ import annotations

from dataclasses import dataclass

from pyruntime.model.llama import count_params
from pyruntime.parallel.pipeline.schedule import Costs
from pyruntime.plan.devices import Device, fit_key
from pyruntime.plan.flops import SECONDS_PER_DAY, model_flops_per_token
from pyruntime.plan.layout import Layout, Workload
from pyruntime.plan.memory import rank_chunks
from pyruntime.plan.pipeline import pipeline_sim
from pyruntime.plan.states import rank_states

ADAM_BYTES = 28  # fp32 master, gradient, two moments read, three written
FP32 = 4


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
    measured_blocks: bool = False
    """Compute came from the profile's timing of this model's blocks (Device.block_fits), not
    from FLOPs over the sustained rate."""

    def days(self, tokens: float) -> float:
        return tokens / self.tokens_per_s / SECONDS_PER_DAY


def _intra(cluster: Cluster, stride: int, size: int) -> bool:
    return stride * size <= cluster.gpus_per_node


def _bw(cluster: Cluster, stride: int, size: int) -> float:
    d = cluster.device
    return d.intra_bw if _intra(cluster, stride, size) else d.inter_bw


def ring(nbytes: float, ranks: int, bw: float, latency: float, all_reduce: bool = False) -> float:
    if ranks == 1:
        return 0.0
    return (2 if all_reduce else 1) * (ranks - 1) / ranks * nbytes / bw + latency


_LATENCY = {"allreduce": "latency", "gather": "gather_latency", "p2p": "p2p_latency"}


def collective(cluster: Cluster, kind: str, nbytes: float, stride: int, ranks: int) -> float:
    """Seconds of one collective over `ranks` ranks `stride` apart in the mesh: kind
    "allreduce" (nbytes reduced), "gather" (an all-gather into, or a reduce-scatter from,
    nbytes) or "p2p" (nbytes sent). A profile's measured 2-rank time of that size inside a
    node, scaled by a ring's (ranks - 1) / ranks of the volume; else latency + bytes / bandwidth."""
    if ranks == 1:
        return 0.0
    d = cluster.device
    measured = d.comm_seconds(kind, nbytes) if _intra(cluster, stride, ranks) else None
    if measured is not None:
        return measured if kind == "p2p" else measured * 2 * (ranks - 1) / ranks
    if kind == "p2p":
        return nbytes / _bw(cluster, stride, ranks) + d.p2p_latency
    return ring(nbytes, ranks, _bw(cluster, stride, ranks), getattr(d, _LATENCY[kind]), all_reduce=kind == "allreduce")


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
    tokens = layout.micro_batch * work.seq_len
    nbytes = tokens * work.model.dim * act
    st = layout.stride("tp")
    one = (2 * collective(cluster, "gather", nbytes, st, t) if layout.sp
           else collective(cluster, "allreduce", nbytes, st, t))
    total = (2 * layers + embedding) * one
    if head:  # the loss's max, sum-exp and target-logit all-reduces, one fp32 per token
        total += 3 * collective(cluster, "allreduce", 4 * tokens, st, t)
        total += collective(cluster, "gather", nbytes, st, t) if layout.sp else 0.0
    return total


def _rank_costs(work: Workload, layout: Layout, cluster: Cluster, pp_rank: int,
                fit: tuple[float, float, float, float] | None) -> tuple[float, float, float, float]:
    """(forward, backward, recompute, tp comm) seconds of one micro-batch on pipeline rank pp_rank."""
    d = cluster.device
    rate = d.peak_flops * d.gemm_efficiency
    act = 2 if d.cuda else 4
    fwd = bwd = rec = comm = 0.0
    for c in rank_chunks(work, layout, pp_rank):
        k = c.layers if layout.recompute_layers is None else min(layout.recompute_layers, c.layers)  # blocks recomputed
        if fit is not None:  # measured on this machine for this model (calibrate.model_fits)
            mb = layout.micro_batch
            block = fit[0] + fit[1] * mb
            compute = c.layers * block + (fit[2] + fit[3] * mb if c.head else d.micro_overhead)
            recompute = k * block / 3
        else:
            flops = chunk_forward_flops(work, layout, c.layers, c.head)
            # dispatch: the blocks', the head's (about one block) and the chunk's own (rotary, loss)
            fixed = (c.layers + (1 if c.head else 0)) * d.block_overhead + d.micro_overhead
            compute = 3 * flops / rate + fixed
            recompute = chunk_forward_flops(work, layout, k, False) / rate + k * d.block_overhead / 3
        tp = _tp_time(work, layout, cluster, c.layers, act, c.embedding, c.head)
        fwd += compute / 3 + tp  # backward = 2 x forward: a matmul's two gradients
        bwd += 2 * compute / 3 + tp
        comm += 2 * tp
        if layout.recompute == "full":
            rec += recompute + _tp_time(work, layout, cluster, k, act, False, False)  # the blocks' collectives again
        elif layout.recompute == "selective":
            rec += k * selective_bytes(work, layout, act) / d.mem_bw
    return fwd, bwd, rec, comm


def selective_bytes(work: Workload, layout: Layout, act: int) -> int:
    """Memory traffic of one block's selective recompute, per micro-batch on one tp rank (the
    ops plan/activations.py's selective formula drops, each read and written once more in
    backward; elementwise, so bound by memory bandwidth): the two norms (not under sequence
    parallelism, where the GEMMs keep the gathered outputs), the SwiGLU activation (tp 1), the
    repeated k and v (grouped KV heads); of those, the ones --recompute-ops names."""
    m, b, s, t = work.model, layout.micro_batch, work.seq_len, layout.tp
    ops = layout.recompute_ops.split(",")
    total = 2 * 2 * b * s * m.dim * act if "norm" in ops and not layout.sp else 0
    if "swiglu" in ops and t == 1:
        total += 3 * b * s * m.ffn_dim * act
    if "kv_repeat" in ops and m.kv_heads < m.n_heads:
        total += 2 * b * s * (m.kv_heads + m.n_heads) * m.head_dim // t * act
    return total


def _dp_time(work: Workload, layout: Layout, cluster: Cluster, backward: float, forward: float,
             micro: int) -> tuple[float, float]:
    """(volume time, exposed time) of the data-parallel collectives of one step."""
    dp, d = layout.dp, cluster.device
    if dp == 1:
        return 0.0, 0.0
    compute_bytes = 2 if d.cuda else 4
    states = rank_states(work, layout, 0, compute_bytes=compute_bytes)
    stride = layout.stride("dp")

    def each(kind: str, sizes) -> float:
        return sum(collective(cluster, kind, b, stride, dp) for b in sizes)

    if layout.zero == 3:
        gathers = 2 * each("gather", states.units)  # forward, and again for backward
        # the gradients' reduce-scatter of the fp32 unit (on gloo an in-place all-reduce)
        per_micro = gathers + each("gather" if d.cuda else "allreduce", [4 * u // compute_bytes for u in states.units])
        first = collective(cluster, "gather", max(states.units), stride, dp)
        exposed = micro * (max(0.0, per_micro - forward - backward) + 2 * first)
        return micro * per_micro, exposed if d.overlap else micro * per_micro
    kind = "allreduce" if layout.zero == 0 else "gather"  # ZeRO-1/2 reduce-scatter the buckets
    reduce = each(kind, states.buckets)
    tail = collective(cluster, kind, max(states.buckets), stride, dp)
    reductions = micro if layout.zero == 2 else 1
    total = reductions * reduce
    exposed = reductions * max(tail, reduce - backward) if d.overlap else total
    if layout.zero in (1, 2):  # the updated parameters, all-gathered after the step
        gather = each("gather", states.buckets)
        total, exposed = total + gather, exposed + gather
    return total, exposed


def _step_syncs(layout: Layout, cluster: Cluster) -> float:
    """The step's small blocking all-reduces: the loss over dp and over pp, and the global
    gradient norm (skipped by plain data parallelism, where every rank holds the whole norm)."""
    small = lambda stride, ranks: collective(cluster, "allreduce", 8, stride, ranks)  # noqa: E731
    total = small(layout.stride("dp"), layout.dp) + small(layout.stride("pp"), layout.pp)
    if layout.world > 1 and not (layout.dp == layout.world and layout.zero == 0):
        total += small(1, layout.world)
    return total


def _optimizer_time(layout: Layout, cluster: Cluster, elements: int, backward: float, micro: int) -> float:
    """Seconds the optimizer adds to a step, updating `elements` fp32 values. On the device:
    AdamW's 28 bytes per element at device memory bandwidth. --offload optimizer
    (parallel/offload.py): the C++ step at host bandwidth (the node's, shared by the ranks on
    it); each gradient's copy to the host runs beside the backward that finishes it (exposed:
    what exceeds one micro-batch's backward; ZeRO-2/3 copy after each micro-batch's
    reduction, the others once), and the
    parameters' copies back start part by part as the host steps them (the longer of the two
    counts). A CPU device is its own host: its copies are memory copies on the same cores, and
    its fp32 parameters are written in place by the step."""
    d = cluster.device
    if layout.offload != "optimizer":
        return ADAM_BYTES * elements / d.mem_bw
    ranks_on_node = min(layout.world, cluster.gpus_per_node)
    host_bw, link_bw = (d.host_bw / ranks_on_node, d.link_bw) if d.cuda else (d.mem_bw, d.mem_bw / 2)
    host_step = ADAM_BYTES * elements / host_bw
    sharded = layout.dp > 1 and layout.zero > 0
    to_host = FP32 * elements / link_bw
    copies = micro if sharded and layout.zero >= 2 else 1
    exposed = copies * (max(0.0, to_host - backward) if d.overlap else to_host)
    if not d.cuda:
        return host_step + exposed
    back = (2 if sharded and layout.zero == 3 else FP32) * elements / link_bw  # ZeRO-3: its bf16 copy
    return max(host_step, back) + exposed


def step_time(work: Workload, layout: Layout, cluster: Cluster, *, bubble: bool = True) -> StepTime:
    """bubble=False: the pipeline's makespan taken as the busiest rank's compute, the bubble as
    0, without simulating the schedule: a lower bound of the step (the search simulates only
    layouts whose bound can still beat the fastest it has)."""
    micro = work.microbatches(layout)
    fit = cluster.device.block_fit(fit_key(work.model, work.seq_len, layout.tp))  # None: FLOPs / rate
    per_rank = [_rank_costs(work, layout, cluster, r, fit) for r in range(layout.pp)]
    fwd, bwd, rec, comm = (max(c[i] for c in per_rank) for i in range(4))
    bwd += rec
    d = cluster.device
    if layout.pp == 1 or not bubble:
        makespan, waiting = micro * (fwd + bwd), 0.0
    else:
        act = 2 if d.cuda else 4
        sn = work.seq_len // layout.tp if layout.sp else work.seq_len
        msg = layout.micro_batch * sn * work.model.dim * act
        p2p = collective(cluster, "p2p", msg, layout.stride("pp"), layout.pp)
        costs = Costs(forward=fwd, backward=bwd, backward_input=bwd / 2, backward_weight=bwd / 2, comm_latency=p2p)
        makespan, busy = pipeline_sim(layout.schedule, layout.pp, micro, layout.virtual_stages, costs)
        waiting = makespan - busy
    dp_total, dp_exposed = _dp_time(work, layout, cluster, bwd, fwd, micro)
    optimizer = _optimizer_time(layout, cluster, rank_states(work, layout, 0).held.optim // 8, bwd, micro)
    step = makespan + dp_exposed + optimizer + _step_syncs(layout, cluster) + d.step_overhead
    tokens_per_s = work.global_batch * work.seq_len / step
    mfu = tokens_per_s * model_flops_per_token(work.model, work.seq_len) / (layout.world * d.peak_flops)
    return StepTime(fwd, bwd, micro * comm, makespan, waiting, dp_total, dp_exposed, optimizer, step,
                    tokens_per_s, mfu, fit is not None)
