"""RMSNorm forward and backward as Triton kernels (Llama semantics).

    y = cast(x * rstd, x.dtype) * w,    rstd = 1 / sqrt(mean(x^2) + eps)

One program normalises one row of the (rows, N) input; all math is fp32 and only the stores
round to the tensors' dtypes. The backward keeps the per-row rstd saved by the forward
instead of recomputing the reduction. No autograd here: pyruntime/ops/rmsnorm.py wraps these
launchers in an autograd Function.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# One row must fit one block: the kernels load a whole row at once. 64K fp32 elements is
# already 256 KiB of registers spread over a CTA; larger rows would need a looped kernel.
MAX_FUSED_SIZE = 65536


def _block_settings(n_cols: int) -> tuple[int, int]:
    """BLOCK covering a whole row (masked past n_cols) and a warp count scaled to it."""
    block = triton.next_power_of_2(n_cols)
    if block > MAX_FUSED_SIZE:
        raise ValueError(f"rmsnorm: hidden size {n_cols} exceeds the fused limit {MAX_FUSED_SIZE}")
    # More warps for wider rows so each thread holds a bounded number of elements.
    if block >= 32768:
        num_warps = 32
    elif block >= 8192:
        num_warps = 16
    elif block >= 2048:
        num_warps = 8
    else:
        num_warps = 4
    return block, num_warps


def _num_programs(n_rows: int, device: torch.device) -> int:
    """Programs for the backward: one per SM on CUDA, so each accumulates dw over many rows
    and the partial-dw buffer stays (SMs, N) instead of (rows, N)."""
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
    else:
        # Interpreter: programs run one after another, so the count only sizes the buffer;
        # a few programs still exercise the multi-program reduction path in tests.
        sms = 4
    return max(1, min(n_rows, sms))


@triton.jit
def _rmsnorm_fwd_kernel(
    Y_ptr, Y_row_stride,
    X_ptr, X_row_stride,
    W_ptr,
    RSTD_ptr,
    n_cols, eps,
    BLOCK_SIZE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # int64: row * stride can pass 2^31 on big batches
    cols = tl.arange(0, BLOCK_SIZE)
    mask = cols < n_cols

    x_raw = tl.load(X_ptr + row * X_row_stride + cols, mask=mask, other=0.0)
    x = x_raw.to(tl.float32)
    w = tl.load(W_ptr + cols, mask=mask, other=0.0).to(tl.float32)

    # Masked lanes load 0, so they add nothing to the sum; divide by the true width.
    mean_sq = tl.sum(x * x, axis=0) / n_cols
    rstd = 1.0 / tl.sqrt(mean_sq + eps)
    tl.store(RSTD_ptr + row, rstd)

    # Round the normalised row to the input dtype before scaling, as Llama's RMSNorm does
    # (`weight * hidden.to(input_dtype)`), so fp16 results match the reference bit for bit.
    x_hat = (x * rstd).to(x_raw.dtype).to(tl.float32)
    y = x_hat * w
    tl.store(Y_ptr + row * Y_row_stride + cols, y.to(Y_ptr.dtype.element_ty), mask=mask)


# Derivative, per row, with g = dy * w and x_hat = x * rstd:
#   dx = rstd * (g - x_hat * mean(g * x_hat))
#      = rstd * g - rstd^3 * x * sum(g * x) / N
#   dw = sum over rows of dy * x_hat
# (the cast of x_hat to the input dtype in the forward is treated as identity, as autograd
# does for .to()). Program p handles rows [p * ROWS, (p + 1) * ROWS) and writes its partial
# dw row to DW_ptr[p]; the launcher sums the partials.
@triton.jit
def _rmsnorm_bwd_kernel(
    DX_ptr, DX_row_stride,
    DY_ptr, DY_row_stride,
    X_ptr, X_row_stride,
    W_ptr,
    RSTD_ptr,
    DW_ptr, DW_row_stride,
    n_rows, n_cols, rows_per_program,
    BLOCK_SIZE: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    cols = tl.arange(0, BLOCK_SIZE)
    mask = cols < n_cols

    w = tl.load(W_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    dw_acc = tl.zeros((BLOCK_SIZE,), dtype=tl.float32)

    for row in range(row_start, row_end):
        x = tl.load(X_ptr + row * X_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY_ptr + row * DY_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD_ptr + row)

        x_hat = x * rstd
        g = dy * w
        # Masked lanes have x = dy = 0, so they contribute nothing to the mean.
        mean_gx = tl.sum(g * x_hat, axis=0) / n_cols
        dx = rstd * (g - x_hat * mean_gx)
        tl.store(DX_ptr + row * DX_row_stride + cols, dx.to(DX_ptr.dtype.element_ty), mask=mask)

        dw_acc += dy * x_hat

    tl.store(DW_ptr + pid * DW_row_stride + cols, dw_acc, mask=mask)


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    """The kernels index columns with unit stride; rows may be strided."""
    return t if t.stride(-1) == 1 else t.contiguous()


def rmsnorm_forward(x2d: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x2d: (rows, N), weight: (N,). Returns y (rows, N) in x2d's dtype and rstd (rows,) fp32."""
    if x2d.dim() != 2:
        raise ValueError(f"rmsnorm_forward: expected a 2-D input, got shape {tuple(x2d.shape)}")
    n_rows, n_cols = x2d.shape
    if weight.shape != (n_cols,):
        raise ValueError(f"rmsnorm_forward: weight shape {tuple(weight.shape)} != ({n_cols},)")
    x2d = _as_rows(x2d)
    weight = weight.contiguous()
    y = torch.empty_like(x2d, memory_format=torch.contiguous_format)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x2d.device)
    if n_rows == 0:
        return y, rstd

    block, num_warps = _block_settings(n_cols)
    _rmsnorm_fwd_kernel[(n_rows,)](
        y, y.stride(0),
        x2d, x2d.stride(0),
        weight,
        rstd,
        n_cols, eps,
        BLOCK_SIZE=block, num_warps=num_warps,
    )
    return y, rstd


def rmsnorm_backward(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """dy, x: (rows, N); weight: (N,); rstd: (rows,) from rmsnorm_forward.
    Returns dx (rows, N) in x's dtype and dw (N,) in weight's dtype."""
    if dy.shape != x.shape or x.dim() != 2:
        raise ValueError(f"rmsnorm_backward: dy {tuple(dy.shape)} and x {tuple(x.shape)} must be equal 2-D shapes")
    n_rows, n_cols = x.shape
    dy, x = _as_rows(dy), _as_rows(x)
    weight = weight.contiguous()
    rstd = rstd.contiguous()
    dx = torch.empty_like(x, memory_format=torch.contiguous_format)
    if n_rows == 0:
        return dx, torch.zeros_like(weight)

    block, num_warps = _block_settings(n_cols)
    rows_per_program = triton.cdiv(n_rows, _num_programs(n_rows, x.device))
    # Recount so that no program gets an empty row range (e.g. 5 rows over 4 programs).
    n_programs = triton.cdiv(n_rows, rows_per_program)
    # fp32 partials: summing dw over thousands of rows in fp16 would lose the small terms.
    dw_partial = torch.empty((n_programs, n_cols), dtype=torch.float32, device=x.device)
    _rmsnorm_bwd_kernel[(n_programs,)](
        dx, dx.stride(0),
        dy, dy.stride(0),
        x, x.stride(0),
        weight,
        rstd,
        dw_partial, dw_partial.stride(0),
        n_rows, n_cols, rows_per_program,
        BLOCK_SIZE=block, num_warps=num_warps,
    )
    return dx, dw_partial.sum(dim=0).to(weight.dtype)
