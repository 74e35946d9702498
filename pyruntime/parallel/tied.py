"""Tied input embedding and LM head (model.tie_embeddings) under the parallelisms.

On one pipeline stage the two are one Parameter (model/llama.py; apply_tp re-ties the vocab
shards), so it has one gradient and one optimizer state with no help. Under pp the
embedding sits on the first stage and the head on the last: each holds a copy, initialised
from the same reference tensor, and, as Megatron does, their gradients are summed across the
two stages after the dp reduction and before clipping, so both copies take the same step and
stay equal. The norm counts the tensor once (`stage_copies`, read by tp_replicas).
Checkpoints and exports keep one tensor: the head's copy maps to embed_tokens.weight
(tensor/unshard.py).

ZeRO shards the copy on each stage by its own flat layout, so the two shards do not line up;
pp with ZeRO >= 1 and ZeRO-3 (whose embedding and head are separate units) are refused.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

from pyruntime.config import Config, ConfigError


def check_tied_layout(cfg: Config) -> None:
    """One line for a layout the tied embedding cannot run at."""
    if not cfg.model.tie_embeddings:
        return
    par = cfg.parallel
    if par.dp > 1 and par.zero == 3:
        raise ConfigError("tied embeddings (model.tie_embeddings) are not supported with ZeRO-3; use zero 0, 1 or 2")
    if par.pp > 1 and par.dp > 1 and par.zero > 0:
        raise ConfigError(f"tied embeddings with pp {par.pp} need zero 0 (the stages' ZeRO shards of the "
                          f"tied matrix do not line up), got zero {par.zero}")


class TiedGradientSync:
    """Sums the tied matrix's gradient over the pp group (middle stages add zeros)."""

    def __init__(self, model: nn.Module, cfg: Config, pp_group: dist.ProcessGroup | None, tp: int,
                 device: torch.device):
        self.group, self.param, self.device = pp_group, None, device
        if pp_group is None or pp_group.size() == 1 or not cfg.model.tie_embeddings:
            self.group = None
            return
        if getattr(model, "embed_tokens", None) is not None:
            self.param = model.embed_tokens.weight
        elif getattr(model, "lm_head", None) is not None:
            self.param = model.lm_head.weight
        if self.param is not None:
            self.param.stage_copies = 2
        self.shape = (-(-cfg.model.vocab_size // tp), cfg.model.dim)  # a tp shard, padded

    @torch.no_grad()
    def __call__(self) -> None:
        if self.group is None:
            return
        if self.param is None:
            buf = torch.zeros(self.shape, device=self.device)
        else:
            if self.param.grad is None:
                self.param.grad = torch.zeros_like(self.param)
            buf = self.param.grad
        dist.all_reduce(buf, group=self.group)
