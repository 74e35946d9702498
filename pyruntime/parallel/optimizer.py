"""The optimizer every replicated engine uses, and the one weight-decay rule every engine
(replicated or sharded: parallel/zero/sharded.py) applies."""
from __future__ import annotations

from typing import Iterable

import torch

from pyruntime.config import OptimConfig


def is_decayed(p: torch.Tensor) -> bool:
    """Weight decay applies to matrices (GEMM weights, embeddings), not to vectors (norm weights,
    biases): decaying a norm's scale towards 0 would fight the normalisation it undoes."""
    return p.dim() >= 2


def build_adamw(params: Iterable[tuple[str, torch.nn.Parameter]], cfg: OptimConfig) -> torch.optim.AdamW:
    """torch.optim.AdamW with the decay rule above (fused on CUDA, foreach elsewhere)."""
    decay, no_decay = [], []
    for _, p in params:
        (decay if is_decayed(p) else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    if cfg.offload == "optimizer":  # state on the host, the C++ step (parallel/offload.py)
        from pyruntime.parallel.offload import HostAdamW

        return HostAdamW(groups, cfg)
    fused = bool(decay or no_decay) and all(p.is_cuda for p in decay + no_decay)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                             **({"fused": True} if fused else {"foreach": True}))
