"""The raw single-tensor collectives (no autograd, no counting), written once for every torch
the runtime supports: newer torch renamed all_gather_into_tensor / reduce_scatter_tensor to
all_gather_single / reduce_scatter_single (the old names warn), so the name is picked per call.
gloo and nccl both implement these forms."""
from __future__ import annotations

import torch
import torch.distributed as dist


def all_gather_into(out: torch.Tensor, x: torch.Tensor, group: dist.ProcessGroup, async_op: bool = False):
    """out (world * x.shape[0], ...) <- every rank's x, concatenated along dim 0 in rank order."""
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    return gather(out, x, group=group, async_op=async_op)


def reduce_scatter_into(out: torch.Tensor, x: torch.Tensor, group: dist.ProcessGroup, async_op: bool = False,
                        op: dist.ReduceOp = dist.ReduceOp.SUM):
    """out <- the reduction (op) over ranks of block `rank` of x (world * out.shape[0], ...) along dim 0."""
    scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    return scatter(out, x, op=op, group=group, async_op=async_op)
