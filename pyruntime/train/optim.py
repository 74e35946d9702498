"""The learning-rate schedule and global-norm gradient clipping (the optimizer itself:
parallel/optimizer.py, built by each data-parallel engine)."""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from pyruntime.config import OptimConfig


def lr_at(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Linear warm-up to cfg.lr over warmup_steps, then cosine down to lr * min_lr_ratio.

    `step` counts from 0; step 0 already gets a non-zero rate (lr / warmup_steps).
    """
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    decay_steps = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
    min_lr = cfg.lr * cfg.min_lr_ratio
    return min_lr + 0.5 * (cfg.lr - min_lr) * (1.0 + math.cos(math.pi * progress))


@torch.no_grad()
def clip_grad_norm(grads: list[torch.Tensor], max_norm: float, group: dist.ProcessGroup | None = None,
                   replication: list[int] | None = None) -> torch.Tensor:
    """Clip `grads` in place to a global L2 norm of max_norm; returns the norm before clipping
    (summed in fp64, returned in fp32).

    Works for any composition of layouts with ONE all-reduce over `group` (the whole world):
    each rank passes the gradient tensors it holds, and for each the number of ranks that
    hold an identical copy of it (`replication`: dp under plain data parallelism, 1 for a
    ZeRO shard, times tp for a parameter replicated over tp, ...). Dividing each squared norm
    by its replication counts every distinct piece of the global gradient exactly once.
    group=None: the grads are the whole gradient (single process), no communication.
    """
    replication = replication or [1] * len(grads)
    if len(replication) != len(grads):
        raise ValueError(f"clip_grad_norm: {len(grads)} grads but {len(replication)} replication counts")
    sq = torch.zeros((), dtype=torch.float64, device=grads[0].device if grads else "cpu")
    by_replication: dict[int, list[torch.Tensor]] = {}
    for g, r in zip(grads, replication):
        by_replication.setdefault(r, []).append(g.detach())
    for r, group_grads in by_replication.items():
        sq += _squared_norm(group_grads) / r
    if group is not None:
        reduced = sq.to(collective_device(sq, group))
        dist.all_reduce(reduced, group=group)
        sq = reduced.to(sq.device)
    norm = sq.sqrt()
    if max_norm > 0 and grads:
        scale = torch.clamp(max_norm / (norm + 1e-6), max=1.0).float()
        torch._foreach_mul_([g.detach() for g in grads], scale)
    return norm.float()  # as torch.nn.utils.clip_grad_norm_ returns it


# Tensors up to this many elements get their fp64 norm in one foreach launch (which makes an
# fp64 copy of its inputs); larger ones one at a time, reduced in fp64 as they are read.
_FOREACH_NUMEL = 1 << 16


def _squared_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """Sum of squares of `grads`, accumulated in fp64. An fp32 reduction of a long flat shard
    (ZeRO's millions of elements in one tensor) loses ~1e-5 relative on CPU, and the norm
    scales every step's update through clipping, so layouts that cut the gradient differently
    would drift apart; fp64 makes the norm independent of how it is cut."""
    small = [g for g in grads if g.numel() <= _FOREACH_NUMEL]
    total = torch.zeros((), dtype=torch.float64, device=grads[0].device)
    if small:
        total += torch.stack(torch._foreach_norm(small, 2, dtype=torch.float64)).square().sum()
    for g in grads:
        if g.numel() > _FOREACH_NUMEL:
            total += torch.linalg.vector_norm(g, dtype=torch.float64).square()
    return total


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def collective_device(t: torch.Tensor, group: dist.ProcessGroup) -> torch.device:
    """Where a collective over `group` can take t: NCCL takes only CUDA tensors, and with
    --offload optimizer the gradient shards (so the squared norm) are in host memory."""
    if t.device.type == "cpu" and dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return t.device
