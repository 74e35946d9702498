"""Fused SwiGLU projection of a Llama MLP, forward and backward, as Triton kernels.

    h = silu(x @ Wg^T) * (x @ Wu^T)

The forward is one kernel with two fp32 accumulators: each K step loads the x tile once and
multiplies it by the matching Wg and Wu tiles, so x is read once for both projections and
the (M, N) gate and up products never round-trip through memory before the SwiGLU.

Backward needs g = x @ Wg^T and u = x @ Wu^T. Like triton_kernels/matmul.py, the forward
epilogue stores them (rounded to the activation dtype) instead of the backward recomputing
both GEMMs: eager PyTorch keeps g, silu(g) and u for its backward, so saving g and u is one
(M, N) tensor *less* than the baseline. The backward then
    1. overwrites g, u in place with dg = dh * u * silu'(g), du = dh * silu(g)
       (triton_kernels/swiglu.py's elementwise backward kernel, pointed at the same buffers),
    2. dx  = dg @ Wg + du @ Wu   as ONE GEMM with two products summed in the fp32
                                 accumulator (_matmul_kernel's HAS_SECOND), no double rounding,
    3. dWg = dg^T @ x, dWu = du^T @ x   on the same GEMM kernel with transposed views.
No autograd here: pyruntime/ops/linear.py wraps these launchers.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .matmul import INTERPRETER_CONFIG, _grouped_tile, gemm, input_precision, launch_grid
from .swiglu import _block_size, _swiglu_bwd_kernel

# Two (BLOCK_M, BLOCK_N) fp32 accumulators live in registers at once, so tiles stop at
# 128 x 128 (128 x 256 would need 256 accumulator registers per thread with 8 warps).
_CUDA_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=3, num_warps=8),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32, "GROUP_M": 8}, num_stages=4, num_warps=8),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=4, num_warps=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=4, num_warps=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=4, num_warps=4),
]


@triton.jit
def _swiglu_matmul_kernel(
    H_ptr, X_ptr, WG_ptr, WU_ptr, G_ptr, U_ptr,
    M, N, K,
    stride_xm, stride_xk,
    stride_wn, stride_wk,
    stride_hm, stride_hn,
    STORE_PRE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """H = silu(X @ WG^T) * (X @ WU^T); WG and WU share strides; G, U (strided like H) get
    the two pre-activations when STORE_PRE."""
    pid = tl.program_id(0)
    pid_m, pid_n = _grouped_tile(pid, M, N, BLOCK_M, BLOCK_N, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # Out-of-range rows/cols wrap onto valid ones and are masked at the store (see matmul.py).
    rows = (offs_m % M).to(tl.int64)
    cols = (offs_n % N).to(tl.int64)
    x_off = rows[:, None] * stride_xm + offs_k[None, :] * stride_xk
    w_off = offs_k[:, None] * stride_wk + cols[None, :] * stride_wn  # the (K, N) view W^T

    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        x = tl.load(X_ptr + x_off, mask=offs_k[None, :] < k_left, other=0.0)  # shared by both
        wg = tl.load(WG_ptr + w_off, mask=offs_k[:, None] < k_left, other=0.0)
        wu = tl.load(WU_ptr + w_off, mask=offs_k[:, None] < k_left, other=0.0)
        acc_g = tl.dot(x, wg, acc_g, input_precision=INPUT_PRECISION)
        acc_u = tl.dot(x, wu, acc_u, input_precision=INPUT_PRECISION)
        x_off += BLOCK_K * stride_xk
        w_off += BLOCK_K * stride_wk

    h_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    h_off = offs_m.to(tl.int64)[:, None] * stride_hm + offs_n[None, :] * stride_hn
    if STORE_PRE:
        tl.store(G_ptr + h_off, acc_g.to(G_ptr.dtype.element_ty), mask=h_mask)
        tl.store(U_ptr + h_off, acc_u.to(U_ptr.dtype.element_ty), mask=h_mask)
    h = acc_g * tl.sigmoid(acc_g) * acc_u
    tl.store(H_ptr + h_off, h.to(H_ptr.dtype.element_ty), mask=h_mask)


_swiglu_matmul_kernel_tuned = triton.autotune(configs=_CUDA_CONFIGS, key=["M", "N", "K", "STORE_PRE"])(
    _swiglu_matmul_kernel)


def _check(x2d: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor) -> None:
    if x2d.dim() != 2 or w_gate.dim() != 2 or w_gate.shape != w_up.shape or w_gate.shape[1] != x2d.shape[1]:
        raise ValueError(
            f"swiglu_linear: x {tuple(x2d.shape)}, w_gate {tuple(w_gate.shape)} and w_up "
            f"{tuple(w_up.shape)} must be (M, K), (N, K), (N, K)"
        )
    if not (x2d.dtype == w_gate.dtype == w_up.dtype):
        raise ValueError(f"swiglu_linear: dtypes differ: x {x2d.dtype}, w_gate {w_gate.dtype}, w_up {w_up.dtype}")


def swiglu_linear_forward(
    x2d: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, save_pre: bool
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """h = silu(x2d @ w_gate^T) * (x2d @ w_up^T): x2d (M, K), weights (N, K), any strides.
    Returns h (M, N) and, when save_pre, g and u (else None)."""
    _check(x2d, w_gate, w_up)
    if w_up.stride() != w_gate.stride():
        w_up = w_up.contiguous()  # the kernel walks both weights with one set of strides
        w_gate = w_gate.contiguous()
    M, K = x2d.shape
    N = w_gate.shape[0]
    h = torch.empty((M, N), dtype=x2d.dtype, device=x2d.device)
    g = torch.empty_like(h) if save_pre else None
    u = torch.empty_like(h) if save_pre else None
    if M == 0 or N == 0:
        return h, g, u
    args = (
        h, x2d, w_gate, w_up, g if save_pre else h, u if save_pre else h,
        M, N, K,
        x2d.stride(0), x2d.stride(1), w_gate.stride(0), w_gate.stride(1), h.stride(0), h.stride(1),
    )
    flags = dict(STORE_PRE=save_pre, INPUT_PRECISION=input_precision(x2d.dtype, x2d.device))
    launch_grid((_swiglu_matmul_kernel_tuned, _swiglu_matmul_kernel), M, N, x2d.device, args, flags)
    return h, g, u


def swiglu_linear_backward(
    dh: torch.Tensor, x2d: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor,
    g: torch.Tensor, u: torch.Tensor, needs: tuple[bool, bool, bool],
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(dx, dWg, dWu) for dh (M, N); `needs` says which to compute. g and u (from
    swiglu_linear_forward, contiguous) are consumed: overwritten with dg and du."""
    need_dx, need_dwg, need_dwu = needs
    if g.shape != dh.shape or u.shape != dh.shape or not (g.is_contiguous() and u.is_contiguous()):
        raise ValueError(f"swiglu_linear_backward: g, u must be contiguous and match dh {tuple(dh.shape)}")
    dh = dh.contiguous()
    n = g.numel()
    if n:
        # In place is safe: each element's a, b are loaded before da, db are stored over them.
        block = _block_size(g)
        _swiglu_bwd_kernel[(triton.cdiv(n, block),)](g, u, dh, g, u, n, BLOCK_SIZE=block)
    dg, du = g, u
    if w_up.stride() != w_gate.stride():
        w_up, w_gate = w_up.contiguous(), w_gate.contiguous()
    dx = gemm(dg, w_gate, a2=du, b2=w_up) if need_dx else None   # (M, N) @ (N, K), twice
    dwg = gemm(dg.t(), x2d) if need_dwg else None                # (N, M) @ (M, K)
    dwu = gemm(du.t(), x2d) if need_dwu else None
    return dx, dwg, dwu
