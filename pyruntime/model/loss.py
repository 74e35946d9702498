"""The training loss of the unsharded model (tensor parallelism has its vocab-parallel twin:
parallel/tensor/cross_entropy.py), and the loss-mask wrapper both share.

Without a mask each micro-batch's loss is the mean over its tokens, and every layout's mean
of those means is the global mean (micro-batches are equal). With a mask (instruction data)
micro-batches count different numbers of tokens, so a mean per micro-batch would weight
tokens differently at different layouts; MaskedLoss instead divides each micro-batch's sum
by the step's counted tokens (known to every rank from the sampler, data/sampler.py) and
multiplies by the number of micro-batch losses the trainer averages (micro-batches x dp):
the averaged result is exactly sum(counted losses) / counted, at every layout.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy; logits (B, T, V) upcast so bf16 runs compute it in fp32.
    reduction: "mean", "sum" or "none" (per token, flattened)."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction=reduction)


class MaskedLoss:
    """loss_fn(logits, targets) with targets < 0 (data/sampler.IGNORE) not counted.

    scale: None (no mask in the data: the wrapped loss unchanged), or averaged / counted, set
    for each step (set_step) before its micro-batches run."""

    def __init__(self, loss_fn):
        self.loss_fn, self.scale = loss_fn, None

    def set_step(self, counted: int | None, averaged: int) -> None:
        """counted: targets that count in the step's global batch (None: no mask); averaged:
        how many micro-batch losses the trainer averages (micro-batches per rank x dp)."""
        self.scale = None if counted is None else averaged / max(counted, 1)

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self.scale is None:
            return self.loss_fn(logits, targets)
        counts = targets.reshape(-1) >= 0
        per_token = self.loss_fn(logits, targets.clamp(min=0), reduction="none")  # (B*T,)
        return torch.where(counts, per_token, 0.0).sum() * self.scale
