"""rms_norm: Llama's RMSNorm, on the Triton kernel or the pure-PyTorch reference.

    y = weight * (x / sqrt(mean(x^2, -1) + eps))     normalised in fp32, cast to x.dtype,
                                                     then scaled by weight

Backends (fastest first): "triton" (CUDA; CPU only interpreted, for tests) and "reference".
The output has x's dtype on both paths. That is Llama's behaviour whenever weight has x's
dtype, as it does in the model; a weight of a wider dtype would make Llama's product
promote, which both paths here deliberately do not.
"""
from __future__ import annotations

import torch

from pyruntime.ops.dispatch import choose

CANDIDATES = ("triton", "reference")


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Plain differentiable PyTorch; autograd provides its backward."""
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (weight * normed.to(x.dtype)).to(x.dtype)


class RMSNormFunction(torch.autograd.Function):
    """Forward: y = rmsnorm(x) * weight via the Triton kernel, saving the per-row rstd.
    Backward: (dx, dweight) from the Triton backward kernel, reusing that rstd."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        from pyruntime.triton_kernels.rmsnorm import rmsnorm_forward  # lazy: triton is optional

        shape = x.shape
        x2d = x.reshape(-1, shape[-1])  # (rows, N); a view whenever x allows one
        if x2d.stride(-1) != 1:
            x2d = x2d.contiguous()  # once here, not again in both launchers
        y, rstd = rmsnorm_forward(x2d, weight, eps)
        ctx.save_for_backward(x2d, weight, rstd)
        return y.view(shape)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        from pyruntime.triton_kernels.rmsnorm import rmsnorm_backward

        x2d, weight, rstd = ctx.saved_tensors
        dx, dw = rmsnorm_backward(dy.reshape(x2d.shape), x2d, weight, rstd)
        return dx.view(dy.shape), dw, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, backend: str = "auto") -> torch.Tensor:
    """RMS-normalise x over its last dim and scale by weight (shape (x.shape[-1],)).
    backend: "auto" | "triton" | "reference" (see pyruntime.ops.dispatch)."""
    if weight.shape != x.shape[-1:]:
        raise ValueError(f"rms_norm: weight shape {tuple(weight.shape)} != ({x.shape[-1]},)")
    if choose("rms_norm", backend, x.device, candidates=CANDIDATES) == "triton":
        return RMSNormFunction.apply(x, weight, eps)
    return rms_norm_reference(x, weight, eps)
