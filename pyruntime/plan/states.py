"""Model-state bytes per rank (parameters, gradients, master weights, optimizer moments),
exactly as the data-parallel engines hold and report them (`parallel/accounting.py`).

Each engine's rule, per rank of n fp32 parameter elements in k tensors:

    dp 1 (any zero)   params 4n; grads 4n (one .grad per parameter); torch AdamW: moments 8n
                      plus its 4-byte `step` counter per parameter
    zero 0, dp > 1    params 4n; grads = the bucket buffers (flat layout, aligned); AdamW as above
    zero 1            params 4n + fp32 master shard S; grads 4n + gradient shard S; moments 2S
    zero 2            params 4n + S; grads S; moments 2S
    zero 3            params S (units gathered only while they run); grads S; moments 2S

S comes from the same C++ flat-layout planner the engines call (buckets or units, laid out
for dp shards with their alignment padding), on shape-only meta tensors, so the prediction is
the engines' own arithmetic rather than a formula that could drift from it.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from pyruntime.ops.flat import plan_flat_layout
from pyruntime.parallel.accounting import ModelStateBytes
from pyruntime.parallel.engine import ALIGN, gradient_buckets
from pyruntime.parallel.tied import isolate
from pyruntime.plan.layout import Layout, Param, Workload, rank_part, rank_params

FP32 = 4
TIED_NAMES = ("embed_tokens.weight", "lm_head.weight")


@dataclass(frozen=True)
class RankStates:
    """One pipeline rank's model states. planned: the engine's start-up figures
    (planned_bytes); held: what step_metrics() reports after a step. buckets: bytes of each
    gradient bucket's flat buffer (zero 0-2, dp > 1); units: bytes of each ZeRO-3 unit gathered
    in the compute dtype."""

    planned: ModelStateBytes
    held: ModelStateBytes
    params: int
    tensors: int
    buckets: tuple[int, ...] = ()
    units: tuple[int, ...] = ()
    host: int = 0
    """Bytes kept in host memory instead (optimizer offload)."""

    @property
    def device_peak(self) -> int:
        """Model-state bytes on the device at the step's peak (held, minus what is offloaded)."""
        return self.held.total - self.host


def _meta(params: list[Param]) -> list[torch.Tensor]:
    return [torch.empty(p.shape, device="meta") for p in params]


def _units(params: list[Param], head_alone: bool) -> list[list[Param]]:
    """ZeRO-3 units as zero/stage3.transformer_units makes them: [embedding], each block,
    [norm, head] (head_alone: [norm], [head], the last stage's tied copy; on one stage a tied
    head is the embedding's parameter, not in the list)."""
    units: dict[str, list[Param]] = {}
    for p in params:
        if p.name.startswith("layers."):
            key = ".".join(p.name.split(".")[:2])
        elif p.name.startswith("embed_tokens"):
            key = "embed"
        else:
            key = "head" if head_alone and p.name == "lm_head.weight" else "tail"
        units.setdefault(key, []).append(p)
    return list(units.values())


def rank_states(work: Workload, layout: Layout, pp_rank: int = 0, compute_bytes: int = FP32) -> RankStates:
    """Model states of every rank of pipeline rank pp_rank (all its dp and tp ranks hold the
    same bytes). compute_bytes: element size of ZeRO-3's gathered units (2 for bf16 on CUDA)."""
    # A search asks for the same few (shape, split) combinations thousands of times.
    key = (repr(work.model), layout.dp, layout.tp, layout.pp, layout.zero, layout.virtual_stages,
           layout.pp_layout, layout.bucket_mb, layout.offload, pp_rank, compute_bytes)
    if key not in _CACHE:
        _CACHE[key] = _rank_states(work, layout, pp_rank, compute_bytes)
    return _CACHE[key]


_CACHE: dict[tuple, RankStates] = {}


def _rank_states(work: Workload, layout: Layout, pp_rank: int, compute_bytes: int) -> RankStates:
    params = rank_params(work, layout, pp_rank)
    part = rank_part(work, layout, pp_rank)
    # a stage holding one use of a tied matrix (pp) keeps its copy in a flat group of its own
    copy = work.model.tie_embeddings and part.embedding != part.head
    n, k = sum(p.numel for p in params), len(params)
    unsharded = dict(unsharded_param=FP32 * n, unsharded_grad=FP32 * n, unsharded_optim=2 * FP32 * n)
    dp, zero = layout.dp, layout.zero
    bucket_bytes = max(1, int(layout.bucket_mb * 2**20))
    buckets: tuple[int, ...] = ()
    units: tuple[int, ...] = ()
    if dp == 1 or zero == 0:
        adam = 2 * FP32 * n + FP32 * k  # torch.optim.AdamW: two moments and a step tensor each
        grad = FP32 * n
        if dp > 1:
            buckets = tuple(FP32 * plan_flat_layout([t.numel() for t in b], 1, ALIGN).total_numel
                            for b in gradient_buckets(_meta(params), bucket_bytes))
            grad = sum(buckets)
        planned = ModelStateBytes(FP32 * n, FP32 * n, 2 * FP32 * n, **unsharded)
        held = ModelStateBytes(FP32 * n, grad, adam, **unsharded)
    else:
        if zero == 3:
            lists = [_meta(u) for u in _units(params, head_alone=copy and part.head)]
        else:
            metas = _meta(params)
            tied = next(t for p, t in zip(params, metas) if p.name in TIED_NAMES) if copy else None
            lists = isolate(gradient_buckets(metas, bucket_bytes), tied)
        layouts = [plan_flat_layout([t.numel() for t in ts], dp, ALIGN) for ts in lists]
        shard = FP32 * sum(lay.shard_numel for lay in layouts)
        if zero == 3:
            units = tuple(compute_bytes * lay.total_numel for lay in layouts)
            param, grad = shard, shard
        else:
            buckets = tuple(FP32 * lay.total_numel for lay in layouts)
            param, grad = FP32 * n + shard, shard + (FP32 * n if zero == 1 else 0)
        planned = held = ModelStateBytes(param, grad, 2 * shard, **unsharded)
    host = 0
    if layout.offload == "optimizer":
        planned, held, host = _offloaded(planned, held, n, dp, zero, buckets, shard if dp > 1 and zero else 0,
                                         compute_bytes)
    return RankStates(planned, held, n, k, buckets, units, host)


def _offloaded(planned: ModelStateBytes, held: ModelStateBytes, n: int, dp: int, zero: int,
               buckets: tuple[int, ...], shard: int, compute_bytes: int) -> tuple[ModelStateBytes, ModelStateBytes, int]:
    """--offload optimizer (parallel/offload.py, zero/sharded.py), as on CUDA: on the host the
    moments, the fp32 master and the gradient the step reads; held grows by what has no device
    counterpart. ZeRO 0 / dp 1: a master per parameter, and the gradients' host copies (each
    bucket's with dp, each parameter's at dp 1).
    ZeRO 1-3: the master, moment and gradient shards; ZeRO-3 also keeps a device copy of the
    shard in the compute dtype (bf16: written through a pinned staging copy of that size);
    ZeRO-1/2's copy back is transient. A CPU run with fp32 parameters has no separate
    device copy or staging (host and device are one memory; the master is the copy)."""
    one_memory = compute_bytes == FP32  # the planner's CPU run: fp32 parameters in the host's memory
    if dp == 1 or zero == 0:
        master, grads = 0 if one_memory else FP32 * n, (sum(buckets) if dp > 1 else FP32 * n)
        held = replace(held, param=held.param + master, grad=held.grad + grads)
        return planned, held, held.optim + master + grads
    copy = compute_bytes * shard // FP32 if zero == 3 and not one_memory else 0
    staging = copy if zero == 3 and compute_bytes != FP32 else 0
    held = replace(held, param=held.param + copy + staging, grad=held.grad + shard)
    return held, held, held.optim + shard + shard + staging


def all_rank_states(work: Workload, layout: Layout, compute_bytes: int = FP32) -> list[RankStates]:
    """rank_states of each pipeline rank, in pp order."""
    return [rank_states(work, layout, r, compute_bytes) for r in range(layout.pp)]
