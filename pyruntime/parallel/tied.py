"""Tied input embedding and LM head (model.tie_embeddings) under the parallelisms.

On one pipeline stage the two are one Parameter (model/llama.py; apply_tp re-ties the vocab
shards), so it has one gradient and one optimizer state. At ZeRO-3 it belongs to the
embedding's unit and the head's unit gathers that unit with its own (zero/stage3.py), so
autograd sums both uses into the one gradient before the unit's reduce-scatter.

Under pp the embedding sits on the first stage and the head on the last: each holds a copy
(`tied_copy`), initialised from the same reference tensor, and, as Megatron does, their
gradients are summed across the two stages after the dp reduction and before clipping, so
both copies take the same step and stay equal. The norm counts the tensor once
(`stage_copies`, read by tp_replicas). With ZeRO 1-3 the reduced gradient lives in each
rank's flat fp32 shard: the engines give the copy a flat group (bucket / unit) of its own
(`isolate`), so both stages' dp groups shard it by the same layout and dp rank k of the first
stage holds exactly the slice dp rank k of the last does; the sum is then one all-reduce
over pp of that shard slice. Checkpoints and exports keep one tensor: the head's copy maps
to embed_tokens.weight (tensor/unshard.py).
"""
from __future__ import annotations

from typing import Sequence, TypeVar

import torch
import torch.distributed as dist
import torch.nn as nn

from pyruntime.config import Config
from pyruntime.ops.flat import plan_flat_layout
from pyruntime.parallel.engine import ALIGN

T = TypeVar("T")


def tied_copy(model: nn.Module) -> nn.Parameter | None:
    """The tied matrix where this rank's model holds one of its two uses only (a pipeline
    stage with the embedding but not the head, or the reverse); None otherwise."""
    if not getattr(getattr(model, "cfg", None), "tie_embeddings", False):
        return None
    embed, head = getattr(model, "embed_tokens", None), getattr(model, "lm_head", None)
    if (embed is None) == (head is None):
        return None
    return (embed if embed is not None else head).weight


def isolate(lists: Sequence[Sequence[T]], item: object) -> list[list[T]]:
    """lists with `item` (by identity) moved into a list of its own, in place of where it was
    (the lists before and after it keep their order); unchanged when item is None."""
    out: list[list[T]] = []
    for entries in lists:
        at = next((k for k, e in enumerate(entries) if e is item), None) if item is not None else None
        if at is None:
            out.append(list(entries))
            continue
        out += [part for part in (list(entries[:at]), [entries[at]], list(entries[at + 1:])) if part]
    return out


class TiedGradientSync:
    """Sums the tied matrix's reduced gradient over the pp group (middle stages add zeros):
    the parameter's .grad (dp 1, ZeRO 0) or, at ZeRO 1-3, its flat group's gradient shard."""

    def __init__(self, model: nn.Module, cfg: Config, pp_group: dist.ProcessGroup | None, tp: int,
                 device: torch.device, engine=None):
        self.group, self.param, self.device, self.engine = pp_group, None, device, engine
        if pp_group is None or pp_group.size() == 1 or not cfg.model.tie_embeddings:
            self.group = None
            return
        self.param = tied_copy(model)
        if self.param is not None:
            self.param.stage_copies = 2
        numel = -(-cfg.model.vocab_size // tp) * cfg.model.dim  # a tp shard, padded
        self.sharded = engine is not None and hasattr(engine.optimizer, "groups")  # ShardedAdamW
        if self.sharded:  # every stage's engine shards alike: the shard of a group of its own
            self.shape: tuple[int, ...] = (plan_flat_layout([numel], world_size=engine.comm.size,
                                                            align=ALIGN).shard_numel,)
        else:
            self.shape = (numel // cfg.model.dim, cfg.model.dim)

    def _gradient(self) -> torch.Tensor:
        """The tensor to sum in place: the reduced gradient this rank holds of the copy."""
        if self.param is None:
            return torch.zeros(self.shape, device=self.device)
        if self.sharded:
            optimizer = self.engine.optimizer
            i = next(i for i, g in enumerate(optimizer.groups) if any(p is self.param for p in g.params))
            if len(optimizer.groups[i].params) != 1:
                raise RuntimeError("tied embedding: its ZeRO flat group holds other parameters too (parallel/tied.py)")
            return optimizer.group_grad(i)
        if self.param.grad is None:
            self.param.grad = torch.zeros_like(self.param)
        return self.param.grad

    @torch.no_grad()
    def __call__(self) -> None:
        if self.group is None:
            return
        buf = self._gradient()
        if buf.shape != self.shape:
            raise RuntimeError(f"tied embedding: gradient of shape {tuple(buf.shape)}, expected {self.shape}")
        if buf.device == self.device:
            dist.all_reduce(buf, group=self.group)
            return
        # --offload optimizer: the shard the step reads is in host memory; sum it on the device
        # (NCCL reduces device memory only) and put the sum back
        summed = buf.to(self.device)
        dist.all_reduce(summed, group=self.group)
        buf.copy_(summed)
