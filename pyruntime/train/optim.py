"""AdamW, the learning-rate schedule, and global-norm gradient clipping."""
from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.distributed as dist

from pyruntime.config import OptimConfig


def build_adamw(params: Iterable[tuple[str, torch.nn.Parameter]], cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (norm weights are not decayed)."""
    decay, no_decay = [], []
    for _, p in params:
        (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    fused = bool(decay or no_decay) and all(p.is_cuda for p in decay + no_decay)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                             **({"fused": True} if fused else {"foreach": True}))


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
    """Clip `grads` in place to a global L2 norm of max_norm; returns the norm before clipping.

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
    sq = torch.zeros((), dtype=torch.float32, device=grads[0].device if grads else "cpu")
    by_replication: dict[int, list[torch.Tensor]] = {}
    for g, r in zip(grads, replication):
        by_replication.setdefault(r, []).append(g.detach())
    for r, group_grads in by_replication.items():
        # One foreach launch per replication count (not a few ops per tensor: a model has
        # hundreds); each norm reduces in fp32 without materialising g**2.
        norms = torch._foreach_norm(group_grads, 2, dtype=torch.float32)
        sq += torch.stack(norms).square().sum() / r
    if group is not None:
        dist.all_reduce(sq, group=group)
    norm = sq.sqrt()
    if max_norm > 0 and grads:
        scale = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        torch._foreach_mul_([g.detach() for g in grads], scale)
    return norm


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
