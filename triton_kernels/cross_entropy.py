"""Vocab-parallel cross-entropy over a local logits shard (N, Vs), as two Triton kernels.

Rank r holds columns [vocab_start, vocab_start + vocab_valid) of the vocabulary in the first
vocab_valid columns of its shard; columns [vocab_valid, Vs) are padding (the vocabulary
rounded up to a multiple of tp) and are never read as logits.

    stats:  m_r = max_c x[c],  s_r = sum_c exp(x[c] - m_r),  t_r = x[target] or 0 if the
            target is not in this shard                              (c over valid columns)
    (caller: M = allreduce_max(m_r), S = allreduce_sum(s_r * exp(m_r - M)),
             T = allreduce_sum(t_r);  loss = log(S) + M - T)
    grad:   x[c] <- (exp(x[c] - M) / S - [c == target]) * scale     in place; 0 in padding

The stats kernel is one pass with an online softmax: per block of columns it takes the
block max, rescales the running sum by exp(old_max - new_max) and adds the block's
exp-sum, so any Vs is handled in one read of the row. The grad kernel writes over the
logits, so the backward needs no second (N, Vs) buffer. One program per row; all math fp32.
No autograd or collectives here: pyruntime/ops/cross_entropy.py wraps these launchers.
"""
from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

# GPU: 4096 columns x 8 warps = 16 elements per thread per step, ~32 steps per row of a 128K
# vocabulary: long enough rows to hide latency, few enough registers for full occupancy.
# Interpreter: a small block so test rows of a few hundred columns take several online-
# softmax steps (the rescaling is what needs testing).
_GPU_BLOCK, _GPU_WARPS = 4096, 8
_INTERPRETER_BLOCK = 64


def _block_settings(device: torch.device, n_cols: int) -> tuple[int, int]:
    if device.type == "cuda":
        return min(_GPU_BLOCK, max(16, triton.next_power_of_2(n_cols))), _GPU_WARPS
    return _INTERPRETER_BLOCK, 1


def _on(device: torch.device):
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


@triton.jit
def _ce_stats_kernel(
    X_ptr, X_row_stride,
    T_ptr,
    MAX_ptr, SUMEXP_ptr, TGT_ptr,
    vocab_start, vocab_valid,
    BLOCK_SIZE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = X_ptr + row * X_row_stride
    cols = tl.arange(0, BLOCK_SIZE)

    # Only valid columns are visited, so every block holds at least one finite logit and
    # m is finite after the first step: exp(-inf - m) = 0, never exp(-inf + inf) = nan.
    # With vocab_valid == 0 the loop is empty and the row reports (-inf, 0).
    m = tl.full([], -float("inf"), tl.float32)
    s = tl.full([], 0.0, tl.float32)
    for start in range(0, vocab_valid, BLOCK_SIZE):
        c = start + cols
        x = tl.load(x_row + c, mask=c < vocab_valid, other=-float("inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new

    local = tl.load(T_ptr + row).to(tl.int64) - vocab_start
    inside = (local >= 0) & (local < vocab_valid)
    t = tl.load(x_row + local, mask=inside, other=0.0).to(tl.float32)

    tl.store(MAX_ptr + row, m)
    tl.store(SUMEXP_ptr + row, s)
    tl.store(TGT_ptr + row, t)


# Derivative of loss = log(S) + M - x[target] (the global softmax over all shards):
#   d loss / d x[c] = exp(x[c] - M) / S - [c == target]
# times the upstream scale (1/N for a mean, or per row). Padding columns are not logits:
# their gradient is 0.
@triton.jit
def _ce_grad_kernel(
    X_ptr, X_row_stride,
    T_ptr,
    GMAX_ptr, GSUM_ptr,
    SCALE_ptr, scale_stride,
    vocab_start, vocab_valid, n_cols,
    BLOCK_SIZE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = X_ptr + row * X_row_stride
    cols = tl.arange(0, BLOCK_SIZE)

    gmax = tl.load(GMAX_ptr + row)
    inv_sum = 1.0 / tl.load(GSUM_ptr + row)
    scale = tl.load(SCALE_ptr + row * scale_stride).to(tl.float32)
    local = tl.load(T_ptr + row).to(tl.int64) - vocab_start
    # A target outside this shard (or in its padding) must not match any column.
    local = tl.where((local >= 0) & (local < vocab_valid), local, -1)

    for start in range(0, n_cols, BLOCK_SIZE):
        c = start + cols
        # Padding loads -inf, so p = 0 there and the store writes an exact 0.
        x = tl.load(x_row + c, mask=c < vocab_valid, other=-float("inf")).to(tl.float32)
        p = tl.exp(x - gmax) * inv_sum
        grad = tl.where(c == local, p - 1.0, p) * scale
        tl.store(x_row + c, grad.to(X_ptr.dtype.element_ty), mask=c < n_cols)


def _check(name: str, logits: torch.Tensor, targets: torch.Tensor, vocab_valid: int) -> None:
    if logits.dim() != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(f"{name}: logits {tuple(logits.shape)} must be (N, Vs) and targets {tuple(targets.shape)} (N,)")
    if not 0 <= vocab_valid <= logits.shape[1]:
        raise ValueError(f"{name}: vocab_valid {vocab_valid} outside [0, {logits.shape[1]}]")
    if targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise ValueError(f"{name}: targets must be integers, got {targets.dtype}")


def ce_stats(
    logits: torch.Tensor, targets: torch.Tensor, vocab_start: int, vocab_valid: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(row_max, sum_exp, target_logit), each fp32 (N,), of the shard's valid columns; see the
    module docstring. logits (N, Vs) with unit column stride (rows may be strided)."""
    _check("ce_stats", logits, targets, vocab_valid)
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    n_rows = logits.shape[0]
    out = torch.empty((3, n_rows), dtype=torch.float32, device=logits.device)
    row_max, sum_exp, target_logit = out[0], out[1], out[2]
    if n_rows == 0:
        return row_max, sum_exp, target_logit
    block, warps = _block_settings(logits.device, vocab_valid)
    with _on(logits.device):  # Triton launches on torch's current device
        _ce_stats_kernel[(n_rows,)](
            logits, logits.stride(0), targets.contiguous(),
            row_max, sum_exp, target_logit,
            vocab_start, vocab_valid,
            BLOCK_SIZE=block, num_warps=warps,
        )
    return row_max, sum_exp, target_logit


def ce_grad_(
    logits: torch.Tensor, targets: torch.Tensor, vocab_start: int, vocab_valid: int,
    global_max: torch.Tensor, global_sum_exp: torch.Tensor, grad_scale: float | torch.Tensor,
) -> torch.Tensor:
    """Overwrite logits (N, Vs) with (softmax - onehot) * grad_scale (0 in padding columns)
    and return it. global_max / global_sum_exp: (N,) over the whole vocabulary; grad_scale a
    scalar (number or 0-d tensor) or an (N,) tensor."""
    _check("ce_grad_", logits, targets, vocab_valid)
    if logits.stride(1) != 1:
        raise ValueError("ce_grad_: logits must have unit column stride (the gradient is written in place)")
    n_rows = logits.shape[0]
    if global_max.shape != (n_rows,) or global_sum_exp.shape != (n_rows,):
        raise ValueError(f"ce_grad_: global_max {tuple(global_max.shape)} / global_sum_exp "
                         f"{tuple(global_sum_exp.shape)} must be ({n_rows},)")
    scale = torch.as_tensor(grad_scale, dtype=torch.float32, device=logits.device)
    if scale.dim() == 0:
        scale, scale_stride = scale.reshape(1), 0  # one value broadcast to every row
    elif scale.shape == (n_rows,):
        scale_stride = scale.stride(0)
    else:
        raise ValueError(f"ce_grad_: grad_scale shape {tuple(scale.shape)} must be () or ({n_rows},)")
    if n_rows == 0:
        return logits
    block, warps = _block_settings(logits.device, logits.shape[1])
    with _on(logits.device):  # Triton launches on torch's current device
        _ce_grad_kernel[(n_rows,)](
            logits, logits.stride(0), targets.contiguous(),
            global_max.float().contiguous(), global_sum_exp.float().contiguous(),
            scale, scale_stride,
            vocab_start, vocab_valid, logits.shape[1],
            BLOCK_SIZE=block, num_warps=warps,
        )
    return logits
