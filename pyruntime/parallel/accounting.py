"""Bytes of model state (parameters, gradients, optimizer states) a rank actually holds, next
to what unsharded single-rank training of the same parameters would hold.

"Held" is measured from the tensors themselves: the storages behind them, each counted once
(ZeRO-3 parameters are views into one gathered buffer per unit, whose storage is resized to
zero while the unit is sharded). "Unsharded" is plain fp32 AdamW training of the rank's own
parameters (under tp / pp: its shard and its stages) with nothing split over dp, i.e. the
same rank without ZeRO: 4 bytes per element for the parameters, 4 for the gradients, 8 for
the two moments.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch


def storage_bytes(tensors: Iterable[torch.Tensor | None]) -> int:
    """Bytes of the distinct storages behind `tensors` (None entries skipped)."""
    seen: dict[int, int] = {}
    for t in tensors:
        if t is None:
            continue
        storage = t.untyped_storage()
        if storage.nbytes():
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def mb(nbytes: float) -> str:
    return f"{nbytes / 2**20:.2f} MB"


@dataclass(frozen=True)
class ModelStateBytes:
    param: int
    grad: int
    optim: int
    unsharded_param: int
    unsharded_grad: int
    unsharded_optim: int

    @staticmethod
    def unsharded(params: Iterable[torch.Tensor], **held: int) -> "ModelStateBytes":
        """Held figures as given; unsharded ones from the parameters' element counts."""
        n = sum(p.numel() for p in params)
        return ModelStateBytes(unsharded_param=4 * n, unsharded_grad=4 * n, unsharded_optim=8 * n, **held)

    @property
    def total(self) -> int:
        return self.param + self.grad + self.optim

    def fields(self) -> dict[str, int]:
        """Metric fields: param_bytes, grad_bytes, optim_bytes and their unsharded_* figures."""
        return {"param_bytes": self.param, "grad_bytes": self.grad, "optim_bytes": self.optim,
                "unsharded_param_bytes": self.unsharded_param, "unsharded_grad_bytes": self.unsharded_grad,
                "unsharded_optim_bytes": self.unsharded_optim}

    def line(self) -> str:
        return (f"params {mb(self.param)}, grads {mb(self.grad)}, optimizer {mb(self.optim)} "
                # "unsharded": this rank's own parameters (its tp shard, its pp stages) with
                # nothing split over dp, i.e. what the same rank would hold without ZeRO
                f"(without ZeRO {mb(self.unsharded_param)} / {mb(self.unsharded_grad)} / "
                f"{mb(self.unsharded_optim)})")
