"""linear / swiglu_linear: the GEMMs of the (tensor-parallel) MLP, on the fused Triton kernels
or the pure-PyTorch reference.

    linear(x, W, b, act)        = act(x @ W^T + b)              act: none | gelu | silu
    swiglu_linear(x, Wg, Wu)    = silu(x @ Wg^T) * (x @ Wu^T)

"gelu" is the tanh approximation, F.gelu(., approximate="tanh"), on both paths.
Backends (fastest first): "triton" (CUDA; CPU only interpreted, for tests) and "reference".
The Triton path keeps bias and activation in the GEMM's fp32 registers (one rounding to the
output dtype) and saves the pre-activations for the backward instead of recomputing the
GEMMs; see triton_kernels/matmul.py and swiglu_matmul.py for the memory accounting.
x may have any leading dims (flattened to rows); the weights are (out_features, in_features)
as in nn.Linear, and x, weights and bias must share one dtype on the Triton path.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from pyruntime.ops import wgrad
from pyruntime.ops.dispatch import autocast_inputs, choose

CANDIDATES = ("triton", "reference")
ACTIVATIONS = ("none", "gelu", "silu")


def _activate(y: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "gelu":
        return F.gelu(y, approximate="tanh")
    if activation == "silu":
        return F.silu(y)
    return y


def linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                     activation: str = "none") -> torch.Tensor:
    """Plain differentiable PyTorch; autograd provides its backward (the GEMM's weight
    gradient deferrable for zero-bubble pipelines: ops/wgrad.py)."""
    return _activate(wgrad.deferrable_linear(x, weight, bias), activation)


def swiglu_linear_reference(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor) -> torch.Tensor:
    """Plain differentiable PyTorch; autograd provides its backward."""
    return F.silu(wgrad.deferrable_linear(x, w_gate)) * wgrad.deferrable_linear(x, w_up)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """(..., K) -> (M, K): a view whenever x allows one; the kernels take any strides."""
    return x.reshape(-1, x.shape[-1])


def _bump_version(t: torch.Tensor) -> None:
    """Tell autograd a saved buffer was overwritten by a kernel (torch only sees its own
    in-place ops): a second backward through a retained graph then fails loudly."""
    if not t.is_inference():
        torch.autograd.graph.increment_version(t)


class LinearFunction(torch.autograd.Function):
    """Forward: y = act(x @ W^T + b) in one Triton GEMM, storing the pre-activation when a
    gradient is needed and act != none. Backward: dy_pre = dy * act'(pre) written over the
    saved pre-activation, then dx = dy_pre @ W and dW = dy_pre^T @ x on the same GEMM
    kernel, db = column sums of dy_pre."""

    @staticmethod
    def forward(ctx, x, weight, bias, activation):
        from pyruntime.triton_kernels.matmul import linear_forward  # lazy: triton is optional

        x2d = _rows(x)
        y, pre = linear_forward(x2d, weight, bias, activation, save_pre=any(ctx.needs_input_grad[:3]))
        ctx.save_for_backward(x2d, weight, pre)
        ctx.activation = activation
        return y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy):
        from pyruntime.triton_kernels.matmul import linear_backward

        x2d, weight, pre = ctx.saved_tensors
        need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
        store = wgrad.current_store() if need_dw else None  # zero bubble's B: dW waits for W
        dx, dw, db = linear_backward(_rows(dy), x2d, weight, pre, ctx.activation,
                                     (need_dx, need_dw and store is None, need_db))
        if store is not None:  # dy_pre: dy itself, or written over the pre-activation
            store.add(weight, x2d, _rows(dy) if ctx.activation == "none" else pre)
        if pre is not None:
            _bump_version(pre)
        if dx is not None:
            dx = dx.view(*dy.shape[:-1], x2d.shape[1])
        return dx, dw, db, None


class SwiGLULinearFunction(torch.autograd.Function):
    """Forward: h = silu(x @ Wg^T) * (x @ Wu^T) in one Triton kernel (two accumulators, one
    read of x), storing g = x @ Wg^T and u = x @ Wu^T. Backward: dg, du written over g, u;
    dx = dg @ Wg + du @ Wu in one GEMM; dWg = dg^T @ x, dWu = du^T @ x."""

    @staticmethod
    def forward(ctx, x, w_gate, w_up):
        from pyruntime.triton_kernels.swiglu_matmul import swiglu_linear_forward

        x2d = _rows(x)
        h, g, u = swiglu_linear_forward(x2d, w_gate, w_up, save_pre=any(ctx.needs_input_grad))
        ctx.save_for_backward(x2d, w_gate, w_up, g, u)
        return h.view(*x.shape[:-1], w_gate.shape[0])

    @staticmethod
    def backward(ctx, dh):
        from pyruntime.triton_kernels.swiglu_matmul import swiglu_linear_backward

        x2d, w_gate, w_up, g, u = ctx.saved_tensors
        need_dx, need_dwg, need_dwu = ctx.needs_input_grad
        store = wgrad.current_store()  # zero bubble's B: dW waits for W
        dx, dwg, dwu = swiglu_linear_backward(
            _rows(dh), x2d, w_gate, w_up, g, u, (need_dx, need_dwg and store is None, need_dwu and store is None)
        )
        if store is not None:  # g, u now hold dg, du
            if need_dwg:
                store.add(w_gate, x2d, g)
            if need_dwu:
                store.add(w_up, x2d, u)
        _bump_version(g)
        _bump_version(u)
        if dx is not None:
            dx = dx.view(*dh.shape[:-1], x2d.shape[1])
        return dx, dwg, dwu


def _check_linear(x, weight, bias, activation) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"linear: unknown activation '{activation}'; expected one of {ACTIVATIONS}")
    if weight.dim() != 2 or x.dim() < 1 or weight.shape[1] != x.shape[-1]:
        raise ValueError(f"linear: x {tuple(x.shape)} does not match weight {tuple(weight.shape)} (out, in)")
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"linear: bias shape {tuple(bias.shape)} != ({weight.shape[0]},)")


def _same_dtype(op: str, *tensors) -> None:
    dtypes = {t.dtype for t in tensors if t is not None}
    if len(dtypes) > 1:
        raise ValueError(f"{op}: the Triton path needs one dtype for all inputs, got {sorted(map(str, dtypes))}")


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           activation: str = "none", backend: str = "auto") -> torch.Tensor:
    """act(x @ weight^T + bias) for x (..., in), weight (out, in), bias (out,) or None.
    backend: "auto" | "triton" | "reference" (see pyruntime.ops.dispatch)."""
    _check_linear(x, weight, bias, activation)
    if choose("linear", backend, x.device, candidates=CANDIDATES) == "triton":
        x, weight, bias = autocast_inputs(x, weight, bias)
        _same_dtype("linear", x, weight, bias)
        return LinearFunction.apply(x, weight, bias, activation)
    return linear_reference(x, weight, bias, activation)


def swiglu_linear(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """silu(x @ w_gate^T) * (x @ w_up^T) for x (..., in) and w_gate, w_up (out, in).
    backend: "auto" | "triton" | "reference" (see pyruntime.ops.dispatch)."""
    if w_gate.dim() != 2 or w_gate.shape != w_up.shape or w_gate.shape[1] != x.shape[-1]:
        raise ValueError(f"swiglu_linear: x {tuple(x.shape)}, w_gate {tuple(w_gate.shape)} and "
                         f"w_up {tuple(w_up.shape)} do not match (weights are (out, in))")
    if choose("swiglu_linear", backend, x.device, candidates=CANDIDATES) == "triton":
        x, w_gate, w_up = autocast_inputs(x, w_gate, w_up)
        _same_dtype("swiglu_linear", x, w_gate, w_up)
        return SwiGLULinearFunction.apply(x, w_gate, w_up)
    return swiglu_linear_reference(x, w_gate, w_up)
