"""swiglu: the SwiGLU activation c = silu(a) * b of a Llama MLP (a = gate, b = up projection),
on the Triton kernel or the pure-PyTorch reference.

Backends (fastest first): "triton" (CUDA; CPU only interpreted, for tests) and "reference".
The Triton path fuses the activation and the product into one pass over memory and saves
only a and b for the backward (silu(a) is recomputed there).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from pyruntime.ops.dispatch import choose

CANDIDATES = ("triton", "reference")


def swiglu_reference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Plain differentiable PyTorch; autograd provides its backward."""
    return F.silu(a) * b


class SwiGLUFunction(torch.autograd.Function):
    """Forward: c = silu(a) * b via the Triton kernel, saving a and b.
    Backward: da = dc * b * dsilu(a), db = dc * silu(a) via the Triton backward kernel."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        from pyruntime.triton_kernels.swiglu import swiglu_forward  # lazy: triton is optional

        ctx.save_for_backward(a, b)
        return swiglu_forward(a, b)

    @staticmethod
    def backward(ctx, dc: torch.Tensor):
        from pyruntime.triton_kernels.swiglu import swiglu_backward

        a, b = ctx.saved_tensors
        return swiglu_backward(dc, a, b)


def swiglu(a: torch.Tensor, b: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """silu(a) * b for a and b of equal shape and dtype.
    backend: "auto" | "triton" | "reference" (see pyruntime.ops.dispatch)."""
    if a.shape != b.shape:
        raise ValueError(f"swiglu: a {tuple(a.shape)} and b {tuple(b.shape)} must have the same shape")
    if choose("swiglu", backend, a.device, candidates=CANDIDATES) == "triton":
        return SwiGLUFunction.apply(a, b)
    return swiglu_reference(a, b)
