"""Many tensors <-> one flat buffer: the layout planner and the pack/unpack ops.

    layout = plan_flat_layout([g.numel() for g in grads], world_size=dp, align=16)
    flat = flat_pack(grads, layout)      # (layout.total_numel,), padding zeroed
    flat_unpack(flat, grads, layout)     # copies each slice back into grads, in place
    layout.pieces(rank)                  # which slice of which tensor rank's shard holds (ZeRO)
    plan_buckets(numels, bucket_bytes, element_size)   # gradient buckets for data parallelism

The planner is C++ (csrc/core/flat_layout.h, through pyruntime._C); see its header for the
padding rule: every offset is a multiple of `align`, the total a multiple of
world_size * align, so every tensor and every shard starts aligned.

Backends of the ops (fastest first): "cpp" (torch.ops.pyruntime.flat_pack / flat_unpack: CPU,
and CUDA when pyruntime._C was built with CUDA) and "reference" (pure PyTorch, any device).
flat_pack is differentiable on both (its backward slices the gradient); flat_unpack writes in
place and is not.
"""
from __future__ import annotations

import functools
import math
import operator
from dataclasses import dataclass, field
from typing import NamedTuple, Sequence

import torch

from pyruntime.core import load_core
from pyruntime.ops.dispatch import choose


class Piece(NamedTuple):
    """tensor.view(-1)[tensor_offset : tensor_offset + numel]
    == shard[shard_offset : shard_offset + numel]"""
    tensor_index: int
    tensor_offset: int
    shard_offset: int
    numel: int


class Bucket(NamedTuple):
    """Tensors [begin, end) of the planned list; numel is their aligned flat size."""
    begin: int
    end: int
    numel: int


def _core():
    return load_core("the flat layout planner")


def _ints(name: str, values: Sequence[int]) -> list[int]:
    # operator.index rejects floats (and float tensors) instead of truncating them.
    try:
        return [operator.index(v) for v in values]
    except TypeError as e:
        raise TypeError(f"{name} must be a sequence of ints: {e}") from None


@dataclass(frozen=True)
class FlatLayout:
    """Where each tensor lives in a flat buffer of total_numel elements, split into
    world_size equal shards. Build it with plan_flat_layout(); equal layouts compare equal,
    so ranks can check that they agree."""
    numels: tuple[int, ...]
    offsets: tuple[int, ...]
    world_size: int
    align: int
    total_numel: int
    _plan: object = field(repr=False, compare=False)

    @property
    def num_tensors(self) -> int:
        return len(self.numels)

    @property
    def shard_numel(self) -> int:
        return self.total_numel // self.world_size

    def shard_range(self, rank: int) -> tuple[int, int]:
        """[begin, end) of rank's shard in the flat buffer."""
        return tuple(self._plan.shard_range(rank))

    def pieces(self, rank: int) -> list[Piece]:
        """The non-empty slices of tensors inside rank's shard, in buffer order; over all
        ranks they cover every element of every tensor exactly once."""
        return [Piece(*p) for p in self._plan.pieces(rank)]

    def __reduce__(self):
        # The C++ plan is not picklable; rebuilding from the inputs gives an equal layout.
        return plan_flat_layout, (list(self.numels), self.world_size, self.align)


def plan_flat_layout(numels: Sequence[int], world_size: int = 1, align: int = 16) -> FlatLayout:
    """Lay tensors of the given numels out in order (see the module docstring).
    Raises ValueError for a negative numel, world_size < 1 or align < 1."""
    plan = _core().FlatLayout(_ints("numels", numels), world_size=world_size, align=align)
    return FlatLayout(numels=tuple(plan.numels), offsets=tuple(plan.offsets), world_size=plan.world_size,
                      align=plan.align, total_numel=plan.total_numel, _plan=plan)


def plan_buckets(numels: Sequence[int], bucket_bytes: int, element_size: int, align: int = 1) -> list[Bucket]:
    """Group consecutive tensors into buckets of at most bucket_bytes (aligned flat size times
    element_size); a tensor larger than that gets a bucket of its own. Raises ValueError for a
    negative numel, bucket_bytes < 1, element_size < 1 or align < 1."""
    buckets = _core().plan_buckets(_ints("numels", numels), bucket_bytes, element_size, align)
    return [Bucket(*b) for b in buckets]


# ---- ops ---------------------------------------------------------------------------------

_DISPATCH_KEYS = {"cuda": "CUDA", "meta": "Meta"}


@functools.lru_cache(maxsize=None)
def _cpp_has_kernel(device_type: str) -> bool:
    """CPU kernels are always in pyruntime._C (dispatch reports a missing build); CUDA ones
    only when it was compiled with CUDA."""
    if device_type == "cpu":
        return True
    try:
        import pyruntime._C  # noqa: F401  (registers torch.ops.pyruntime.*)
    except ImportError:
        return False
    key = _DISPATCH_KEYS.get(device_type)
    return key is not None and torch._C._dispatch_has_kernel_for_dispatch_key("pyruntime::flat_pack", key)


def _candidates(device: torch.device) -> tuple[str, ...]:
    return ("cpp", "reference") if _cpp_has_kernel(device.type) else ("reference",)


def _pack_setup_context(ctx, inputs, output) -> None:
    tensors, offsets, _ = inputs
    ctx.shapes = [t.shape for t in tensors]
    ctx.offsets = list(offsets)


def _pack_backward(ctx, grad: torch.Tensor):
    # d flat / d tensors[i] is the identity on its region, so each gradient is a slice.
    grads = [grad[o:o + math.prod(s)].view(s) for o, s in zip(ctx.offsets, ctx.shapes)]
    return grads, None, None


@functools.lru_cache(maxsize=None)
def _load_cpp_ops():
    """torch.ops.pyruntime, with flat_pack's autograd formula registered (once)."""
    _core()
    torch.library.register_autograd("pyruntime::flat_pack", _pack_backward, setup_context=_pack_setup_context)
    return torch.ops.pyruntime


def _check_tensors(op: str, what: str, tensors: Sequence[torch.Tensor], layout: FlatLayout,
                   dtype: torch.dtype, device: torch.device) -> None:
    # Checked here, not only in C++, so the reference backend rejects the same inputs
    # (copy_ would otherwise cast dtypes silently).
    if len(tensors) != layout.num_tensors:
        raise ValueError(f"{op}: got {len(tensors)} {what} but the layout has {layout.num_tensors} tensors")
    for i, (t, numel) in enumerate(zip(tensors, layout.numels)):
        if t.numel() != numel:
            raise ValueError(f"{op}: {what}[{i}] has {t.numel()} elements but the layout expects {numel}")
        if t.dtype != dtype or t.device != device:
            raise ValueError(f"{op}: {what}[{i}] is {t.dtype} on {t.device}, expected {dtype} on {device}")


def flat_pack_reference(tensors: Sequence[torch.Tensor], layout: FlatLayout) -> torch.Tensor:
    """Plain differentiable PyTorch: the tensors and zero gaps concatenated."""
    parts, end = [], 0
    for t, offset in zip(tensors, layout.offsets):
        parts += [tensors[0].new_zeros(offset - end), t.reshape(-1)]
        end = offset + t.numel()
    parts.append(tensors[0].new_zeros(layout.total_numel - end))
    return torch.cat(parts)


def flat_unpack_reference(flat: torch.Tensor, outs: Sequence[torch.Tensor], layout: FlatLayout) -> None:
    for out, offset in zip(outs, layout.offsets):
        out.copy_(flat[offset:offset + out.numel()].reshape(out.shape))


def flat_pack(tensors: Sequence[torch.Tensor], layout: FlatLayout, backend: str = "auto") -> torch.Tensor:
    """A new (layout.total_numel,) tensor holding every tensor at its offset, padding zeroed.
    All tensors share one dtype and device; any strides. backend: "auto" | "cpp" | "reference"."""
    if not tensors:
        raise ValueError("flat_pack: needs at least one tensor (the buffer takes its dtype and device)")
    _check_tensors("flat_pack", "tensors", tensors, layout, tensors[0].dtype, tensors[0].device)
    device = tensors[0].device
    if choose("flat_pack", backend, device, candidates=_candidates(device)) == "cpp":
        return _load_cpp_ops().flat_pack(list(tensors), list(layout.offsets), layout.total_numel)
    return flat_pack_reference(tensors, layout)


def flat_unpack(flat: torch.Tensor, outs: Sequence[torch.Tensor], layout: FlatLayout,
                backend: str = "auto") -> None:
    """Copy each tensor's slice of flat (shape (layout.total_numel,)) into outs, in place.
    backend: "auto" | "cpp" | "reference"."""
    if flat.shape != (layout.total_numel,):
        raise ValueError(f"flat_unpack: flat has shape {tuple(flat.shape)}, the layout needs ({layout.total_numel},)")
    _check_tensors("flat_unpack", "outs", outs, layout, flat.dtype, flat.device)
    if choose("flat_unpack", backend, flat.device, candidates=_candidates(flat.device)) == "cpp":
        _load_cpp_ops().flat_unpack(flat, list(outs), list(layout.offsets))
    else:
        flat_unpack_reference(flat, outs, layout)
