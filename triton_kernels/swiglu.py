"""SwiGLU activation, c = silu(a) * b, as elementwise Triton kernels over flattened tensors.

a is the gate projection and b the up projection of a Llama MLP. The backward recomputes
silu(a) from a rather than saving it: one extra sigmoid per element is cheaper than keeping
another activation-sized tensor alive until the backward. All math is fp32; loads and stores
use the tensors' dtype. No autograd here: pyruntime/ops/swiglu.py wraps these launchers.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# On a GPU 1024 elements per program with 4 warps is 8 per thread: enough to hide load
# latency while keeping many programs per SM. The interpreter (CPU tests) runs programs one
# after another, each vectorised by numpy, so there fewer, larger blocks are much faster.
_GPU_BLOCK_SIZE = 1024
_INTERPRETER_BLOCK_SIZE = 65536


def _block_size(t: torch.Tensor) -> int:
    if t.device.type == "cuda":
        return _GPU_BLOCK_SIZE
    return min(_INTERPRETER_BLOCK_SIZE, triton.next_power_of_2(t.numel()))


@triton.jit
def _swiglu_fwd_kernel(
    C_ptr, A_ptr, B_ptr,
    n_elements,
    BLOCK_SIZE: tl.constexpr,
):
    # int64 offsets: a (tokens, intermediate) activation can exceed 2^31 elements.
    offsets = tl.program_id(0).to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offsets < n_elements
    a = tl.load(A_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(B_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    c = a * tl.sigmoid(a) * b
    tl.store(C_ptr + offsets, c.to(C_ptr.dtype.element_ty), mask=mask)


# Derivative, with s = sigmoid(a) and silu(a) = a * s:
#   d silu / da = s + a * s * (1 - s) = s * (1 + a * (1 - s))
#   da = dc * b * s * (1 + a * (1 - s))
#   db = dc * silu(a)
@triton.jit
def _swiglu_bwd_kernel(
    DA_ptr, DB_ptr,
    DC_ptr, A_ptr, B_ptr,
    n_elements,
    BLOCK_SIZE: tl.constexpr,
):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offsets < n_elements
    dc = tl.load(DC_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    a = tl.load(A_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(B_ptr + offsets, mask=mask, other=0.0).to(tl.float32)

    sig = tl.sigmoid(a)
    silu = a * sig
    da = dc * b * sig * (1.0 + a * (1.0 - sig))
    db = dc * silu
    tl.store(DA_ptr + offsets, da.to(DA_ptr.dtype.element_ty), mask=mask)
    tl.store(DB_ptr + offsets, db.to(DB_ptr.dtype.element_ty), mask=mask)


def _check_same(name: str, *tensors: torch.Tensor) -> None:
    first = tensors[0]
    for t in tensors[1:]:
        if t.shape != first.shape or t.dtype != first.dtype or t.device != first.device:
            raise ValueError(
                f"{name}: inputs must share shape, dtype and device; got "
                + ", ".join(f"{tuple(u.shape)} {u.dtype} {u.device}" for u in tensors)
            )


def swiglu_forward(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """c = silu(a) * b elementwise; a and b of equal shape and dtype. c has their shape/dtype."""
    _check_same("swiglu_forward", a, b)
    a, b = a.contiguous(), b.contiguous()  # flat indexing needs dense storage
    c = torch.empty_like(a)
    n = a.numel()
    if n == 0:
        return c
    block = _block_size(a)
    _swiglu_fwd_kernel[(triton.cdiv(n, block),)](c, a, b, n, BLOCK_SIZE=block)
    return c


def swiglu_backward(dc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients (da, db) of c = silu(a) * b given dc; all three of equal shape and dtype."""
    _check_same("swiglu_backward", dc, a, b)
    dc, a, b = dc.contiguous(), a.contiguous(), b.contiguous()
    # Fresh outputs, not in place over a and b: the caller may still hold them.
    da, db = torch.empty_like(a), torch.empty_like(b)
    n = a.numel()
    if n == 0:
        return da, db
    block = _block_size(a)
    _swiglu_bwd_kernel[(triton.cdiv(n, block),)](da, db, dc, a, b, n, BLOCK_SIZE=block)
    return da, db
