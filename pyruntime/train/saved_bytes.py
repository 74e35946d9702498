"""Measure the bytes autograd saves for backward (the activation memory of a step).

    meter = SavedTensorMeter(exclude=model.parameters())
    with meter:
        loss = model(x).sum()
    meter.bytes   # distinct storages saved for backward, parameters' storages left out

Each storage is counted once however many tensors (views, the same tensor saved by several
ops) refer to it, and by its full size: a saved view keeps its whole storage alive. The
storages of `exclude` (parameters, their gathered ZeRO-3 buffers) are model state, not
activations, so they are left out.
"""
from __future__ import annotations

from typing import Iterable

import torch


def _storage_key(t: torch.Tensor) -> tuple[str, int]:
    s = t.untyped_storage()
    return (str(t.device), s.data_ptr())


class SavedTensorMeter:
    """Context manager counting the distinct storages saved for backward inside it."""

    def __init__(self, exclude: Iterable[torch.Tensor] = ()):
        self._excluded = {_storage_key(t) for t in exclude if t.device.type != "meta"}
        self._seen: dict[tuple[str, int], int] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        if t.device.type != "meta" and t.untyped_storage().nbytes() > 0:
            key = _storage_key(t)
            if key not in self._excluded:
                self._seen.setdefault(key, t.untyped_storage().nbytes())
        return t

    @property
    def bytes(self) -> int:
        return sum(self._seen.values())

    def reset(self) -> None:
        self._seen.clear()

    def __enter__(self) -> "SavedTensorMeter":
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
