"""Measure the bytes autograd saves for backward (the activation memory of a step).

    meter = SavedTensorMeter(exclude=model.parameters())
    with meter:
        loss = model(x).sum()
    meter.bytes   # distinct storages saved for backward, parameters' storages left out

Each storage is counted once however many tensors (views, the same tensor saved by several
ops) refer to it, and by its full size: a saved view keeps its whole storage alive. The
storages of `exclude` (parameters, their gathered ZeRO-3 buffers) are model state, not
activations, so they are left out. Storages are told apart by identity (the StorageImpl),
not by address: a ZeRO-3 unit buffer is released and re-allocated between uses, so its
address changes while it stays the same storage. Meters nest: a tensor saved inside
several is counted by each (the planner's meter around a model whose blocks are metered by
parallel/recompute.py); hooks installed inside them (which replace theirs: recompute's
selective packing) report what they keep with note_saved().
"""
from __future__ import annotations

import threading
from typing import Iterable

import torch

_active = threading.local()  # the meters entered on this thread, innermost last


def _meters() -> list["SavedTensorMeter"]:
    if not hasattr(_active, "meters"):
        _active.meters = []
    return _active.meters


def note_saved(t: torch.Tensor) -> None:
    """Count t in every meter entered on this thread (for hooks that replace theirs)."""
    for meter in _meters():
        meter.note(t)


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata  # the StorageImpl: stable across resize_, unique while alive


class SavedTensorMeter:
    """Context manager counting the distinct storages saved for backward inside it."""

    def __init__(self, exclude: Iterable[torch.Tensor] = ()):
        self._excluded = {_storage_key(t) for t in exclude if t.device.type != "meta"}
        self._seen: dict[int, int] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        note_saved(t)  # this meter and those it is nested in
        return t

    def note(self, t: torch.Tensor) -> None:
        """Count t's storage (once), unless excluded or empty."""
        if t.device.type != "meta" and t.untyped_storage().nbytes() > 0:
            key = _storage_key(t)
            if key not in self._excluded:
                self._seen.setdefault(key, t.untyped_storage().nbytes())

    def exclude_more(self, tensors: Iterable[torch.Tensor]) -> None:
        """Leave these tensors' storages out too (parameters made after the meter was)."""
        self._excluded.update(_storage_key(t) for t in tensors if t.device.type != "meta")

    @property
    def bytes(self) -> int:
        return sum(self._seen.values())

    def reset(self) -> None:
        self._seen.clear()

    def __enter__(self) -> "SavedTensorMeter":
        self._hooks.__enter__()
        _meters().append(self)
        return self

    def __exit__(self, *exc) -> None:
        _meters().remove(self)
        self._hooks.__exit__(*exc)

    def counting(self):
        """Entered without its own hooks: counts what note_saved() reports (the hooks in
        force inside it are someone else's)."""
        meter = self

        class _Counting:
            def __enter__(self):
                _meters().append(meter)

            def __exit__(self, *exc):
                _meters().remove(meter)

        return _Counting()
