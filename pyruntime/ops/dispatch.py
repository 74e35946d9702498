"""The one dispatch point: picks, per op call, the Triton kernel, the C++ op or the
pure-PyTorch reference.

    backend = choose("rms_norm", requested, x.device, candidates=("triton", "reference"))

Rules (the whole policy lives here, op files only list which backends they have):
- "auto" takes the first available candidate in the order given (fastest first). When that
  is not the first candidate, the fallback is printed once per (op, backend, reason) on
  stderr by rank 0 (pyruntime.log.warn), naming the op, the device and why; except that
  Triton is never expected on CPU (its kernels are for CUDA), so skipping it there is the
  design, not a fallback, and is only logged at DEBUG.
- An explicitly requested backend that cannot run raises BackendUnavailable naming why.
- Triton runs on CUDA tensors; on CPU only under TRITON_INTERPRET=1 and only when asked for
  explicitly (the interpreter is for tests: far too slow to be chosen automatically).
"""
from __future__ import annotations

import functools
import importlib.util
import logging
import os

import torch

from pyruntime.config import KERNEL_BACKENDS
from pyruntime.log import warn

log = logging.getLogger("pyruntime.ops")

BACKENDS = KERNEL_BACKENDS  # the config names them (it is a leaf: nothing imports back)


class BackendUnavailable(RuntimeError):
    """An explicitly requested kernel backend cannot run here."""


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def _triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


@functools.lru_cache(maxsize=None)
def _cpp_import_error() -> str | None:
    try:
        import pyruntime._C  # noqa: F401  (registers torch.ops.pyruntime.*)
    except ImportError as e:  # pragma: no cover - depends on the build
        return f"pyruntime._C is not built ({e}); run `pip install --no-build-isolation -e .`"
    return None


def unavailable_reason(backend: str, device: torch.device, explicit: bool) -> str | None:
    """None when `backend` can run on `device`, else a short reason."""
    if backend == "reference":
        return None
    if backend == "cpp":
        return _cpp_import_error()
    if backend == "triton":
        if not _triton_importable():
            return "triton is not installed"
        if device.type == "cuda":
            return None
        if device.type == "cpu" and triton_interpret() and explicit:
            return None
        return f"no Triton kernel for {device.type} tensors (set TRITON_INTERPRET=1 to run it interpreted)"
    raise ValueError(f"unknown kernel backend '{backend}'; expected one of {BACKENDS}")


@functools.lru_cache(maxsize=None)
def _report_fallback_once(op: str, device_type: str, wanted: str, got: str, reason: str) -> None:
    line = f"{op} on {device_type}: {wanted} kernel unavailable ({reason}); running the {got} one"
    if device_type == "cpu" and wanted == "triton":
        log.debug(line)
        return
    import torch.distributed as dist  # the fallback is the same on every rank: rank 0 says it

    if not dist.is_initialized() or dist.get_rank() == 0:
        warn(line)


def choose(op: str, requested: str, device: torch.device, candidates: tuple[str, ...]) -> str:
    """Return the backend that runs `op` on `device` (see the module docstring)."""
    if requested not in BACKENDS:
        raise ValueError(f"{op}: unknown kernel backend '{requested}'; expected one of {BACKENDS}")
    if requested != "auto":
        if requested not in candidates:
            raise BackendUnavailable(f"{op}: has no '{requested}' backend (it has {', '.join(candidates)})")
        reason = unavailable_reason(requested, device, explicit=True)
        if reason is not None:
            raise BackendUnavailable(f"{op}: backend '{requested}' requested but unavailable: {reason}")
        return requested
    first_reason = None
    for backend in candidates:
        reason = unavailable_reason(backend, device, explicit=False)
        if reason is None:
            if backend != candidates[0]:
                _report_fallback_once(op, device.type, candidates[0], backend, first_reason)
            return backend
        first_reason = first_reason or reason
    raise BackendUnavailable(f"{op}: no backend available on {device.type}")


def autocast_inputs(*tensors):
    """Under autocast, cast floating inputs to the autocast dtype, as F.linear does, for a
    GEMM autocast does not see (the Triton path, ops/wgrad.py's DeferrableLinear): bf16
    activations AND bf16 weights (fp32 master weights keep their gradients: the cast is part
    of the autograd graph)."""
    device_type = next(t for t in tensors if t is not None).device.type
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) if t is not None and t.is_floating_point() else t for t in tensors)
