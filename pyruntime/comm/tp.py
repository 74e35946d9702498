"""Tensor-parallel communication as small autograd Functions (Megatron's f and g), each named
after what it does, each docstring stating its forward and its backward collective.

Two ways an activation can be split over the tp ranks:
- by features (its last dim): the inside of a column-parallel -> row-parallel pair;
- by sequence (dim 1 of a (B, T, C) activation), under sequence parallelism: everything
  between those pairs (norms, residual adds) runs on a (B, T/tp, C) shard.

    replicated --copy_to_tp_region--> [column GEMM] ... [row GEMM] --reduce_from_tp_region--> replicated
    seq shard --all_gather_sequence--> [column GEMM] ... [row GEMM] --reduce_scatter_sequence--> seq shard

Every function takes the tp process group explicitly; with a group of one rank each is the
identity. The raw collectives underneath are comm/raw.py's.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from pyruntime.comm.raw import all_gather_into, reduce_scatter_into

SEQ_DIM = 1  # (B, T, C) activations: the sequence is dim 1


def gather_along(x: torch.Tensor, group: dist.ProcessGroup, dim: int) -> torch.Tensor:
    """Concatenation of every rank's x along `dim`, in rank order."""
    world = group.size()
    if world == 1:
        return x
    x = x.contiguous()
    buf = x.new_empty((world * x.shape[0], *x.shape[1:]))
    all_gather_into(buf, x, group)
    d = dim % x.dim()
    return buf.view(world, *x.shape).movedim(0, d).flatten(d, d + 1)


def reduce_scatter_along(x: torch.Tensor, group: dist.ProcessGroup, dim: int) -> torch.Tensor:
    """This rank's block (in rank order) along `dim` of the sum of every rank's x."""
    world, d = group.size(), dim % x.dim()
    if x.shape[d] % world:
        raise ValueError(f"reduce-scatter: dim {d} of size {x.shape[d]} is not divisible by tp {world}")
    if world == 1:
        return x
    blocks = x.unflatten(d, (world, x.shape[d] // world)).movedim(d, 0).contiguous()  # (world, ...)
    out = x.new_empty(blocks.shape[1:])
    reduce_scatter_into(out, blocks.flatten(0, 1), group)
    return out


def split_along(x: torch.Tensor, group: dist.ProcessGroup, dim: int) -> torch.Tensor:
    """This rank's block along `dim` (no communication)."""
    world = group.size()
    if x.shape[dim] % world:
        raise ValueError(f"split: dim {dim % x.dim()} of size {x.shape[dim]} is not divisible by tp {world}")
    return x.chunk(world, dim=dim)[group.rank()].contiguous()


def all_reduce_sum(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """A new tensor holding the sum of every rank's x (x itself is left alone)."""
    if group.size() == 1:
        return x
    out = x.clone(memory_format=torch.contiguous_format)
    dist.all_reduce(out, group=group)
    return out


# -- autograd Functions ----------------------------------------------------------------------
class _CopyToTPRegion(torch.autograd.Function):
    """Forward: identity (x is replicated). Backward: all-reduce (sum) of the gradient, since
    each rank's branch contributed only its shard's part of it."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return all_reduce_sum(grad, ctx.group), None


class _ReduceFromTPRegion(torch.autograd.Function):
    """Forward: all-reduce (sum) of the partial results. Backward: identity (the summed
    output's gradient is the gradient of every partial)."""

    @staticmethod
    def forward(ctx, x, group):
        return all_reduce_sum(x, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _GatherFromTPRegion(torch.autograd.Function):
    """Forward: all-gather along `dim` (shards -> the whole, replicated after).
    Backward: keep this rank's slice of the gradient (no communication: every rank computed
    the same gradient of the replicated output)."""

    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return gather_along(x, group, dim)

    @staticmethod
    def backward(ctx, grad):
        return split_along(grad, ctx.group, ctx.dim), None, None


class _ScatterToTPRegion(torch.autograd.Function):
    """Forward: keep this rank's slice along `dim` (no communication).
    Backward: all-gather the gradient along `dim`."""

    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return split_along(x, group, dim)

    @staticmethod
    def backward(ctx, grad):
        return gather_along(grad, ctx.group, ctx.dim), None, None


class _AllGatherSequence(torch.autograd.Function):
    """Forward: all-gather along the sequence, (B, T/tp, C) -> (B, T, C).
    Backward: reduce-scatter along the sequence (each rank's GEMM produced a partial
    gradient for every position; a rank keeps the sum for its own positions)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return gather_along(x, group, SEQ_DIM)

    @staticmethod
    def backward(ctx, grad):
        return reduce_scatter_along(grad, ctx.group, SEQ_DIM), None


class _ReduceScatterSequence(torch.autograd.Function):
    """Forward: reduce-scatter along the sequence, partial (B, T, C) -> summed (B, T/tp, C).
    Backward: all-gather the gradient along the sequence."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return reduce_scatter_along(x, group, SEQ_DIM)

    @staticmethod
    def backward(ctx, grad):
        return gather_along(grad, ctx.group, SEQ_DIM), None


def copy_to_tp_region(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Enter a tp region with a replicated x. Fwd: identity. Bwd: all-reduce."""
    return _CopyToTPRegion.apply(x, group)


def reduce_from_tp_region(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Leave a tp region by summing partial results. Fwd: all-reduce. Bwd: identity."""
    return _ReduceFromTPRegion.apply(x, group)


def gather_from_tp_region(x: torch.Tensor, group: dist.ProcessGroup, dim: int = -1) -> torch.Tensor:
    """Shards -> the whole, replicated: feature shards (dim -1), or leaving a sequence-parallel
    region with a replicated activation (dim SEQ_DIM). Fwd: all-gather on dim. Bwd: split."""
    return _GatherFromTPRegion.apply(x, group, dim)


def scatter_to_tp_region(x: torch.Tensor, group: dist.ProcessGroup, dim: int = -1) -> torch.Tensor:
    """Replicated -> this rank's shard along dim (features, or the sequence: entering a
    sequence-parallel region). Fwd: split on dim. Bwd: all-gather."""
    return _ScatterToTPRegion.apply(x, group, dim)


def all_gather_sequence(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Sequence shard -> full sequence. Fwd: all-gather on dim 1. Bwd: reduce-scatter."""
    return _AllGatherSequence.apply(x, group)


def reduce_scatter_sequence(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Partial full-sequence results -> summed sequence shard. Fwd: reduce-scatter on dim 1.
    Bwd: all-gather. T must be divisible by the tp size."""
    if x.shape[SEQ_DIM] % group.size():
        raise ValueError(f"sequence parallelism: sequence length {x.shape[SEQ_DIM]} is not divisible "
                         f"by tp {group.size()}")
    return _ReduceScatterSequence.apply(x, group)
