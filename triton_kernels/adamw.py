"""One fused AdamW step over flat buffers: the fp32 master weights, their gradients and the two
moment buffers of a ZeRO shard are updated in a single pass over memory (one launch for the
whole shard instead of ~10 elementwise kernels per parameter tensor).

Per element, exactly the arithmetic of torch.optim.AdamW (decoupled weight decay):
    p  = p * (1 - lr * wd)            only where the decay mask is set (matrices, not norms)
    m  = m + (1 - beta1) * (g - m)    (torch's lerp for weights < 0.5)
    v  = v * beta2 + (1 - beta2) * g * g
    p  = p + step_size * m / (sqrt(v) / sqrt(1 - beta2^t) + eps),  step_size = -lr / (1 - beta1^t)
The scalars that depend only on the step (decay factor, step size, sqrt of the bias
correction) are computed on the host in fp64, as torch does. Gradients may be fp32, fp16 or
bf16 (upcast on load); the master weights and moments are fp32. No autograd here:
pyruntime/ops/adamw.py is the only caller.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# As in swiglu.py: 1024 elements x 4 warps on a GPU; few large blocks under the interpreter.
_GPU_BLOCK_SIZE = 1024
_INTERPRETER_BLOCK_SIZE = 65536


def _block_size(t: torch.Tensor) -> int:
    if t.device.type == "cuda":
        return _GPU_BLOCK_SIZE
    return min(_INTERPRETER_BLOCK_SIZE, triton.next_power_of_2(max(1, t.numel())))


@triton.jit
def _adamw_kernel(
    P_ptr, G_ptr, M_ptr, V_ptr, DECAY_ptr,
    n_elements,
    decay_factor, beta1, beta2, eps, step_size, bias_correction2_sqrt,
    HAS_DECAY_MASK: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    # int64 offsets: a flat shard of a large model exceeds 2^31 elements.
    offsets = tl.program_id(0).to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offsets < n_elements
    p = tl.load(P_ptr + offsets, mask=mask, other=0.0)
    g = tl.load(G_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(M_ptr + offsets, mask=mask, other=0.0)
    v = tl.load(V_ptr + offsets, mask=mask, other=0.0)

    if HAS_DECAY_MASK:
        d = tl.load(DECAY_ptr + offsets, mask=mask, other=0)
        p = tl.where(d != 0, p * decay_factor, p)
    else:  # every element decays (decay_factor is 1.0 when nothing does)
        p = p * decay_factor
    m = m + (1.0 - beta1) * (g - m)
    v = v * beta2 + (1.0 - beta2) * g * g
    denom = tl.sqrt(v) / bias_correction2_sqrt + eps
    p = p + step_size * (m / denom)

    tl.store(P_ptr + offsets, p, mask=mask)
    tl.store(M_ptr + offsets, m, mask=mask)
    tl.store(V_ptr + offsets, v, mask=mask)


def _check(params, grads, exp_avg, exp_avg_sq, decay_mask) -> None:
    n = params.numel()
    for name, t in (("params", params), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        if t.dtype != torch.float32:
            raise ValueError(f"adamw: {name} must be float32, got {t.dtype}")
    tensors = {"params": params, "grads": grads, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}
    if decay_mask is not None:
        tensors["decay_mask"] = decay_mask
    for name, t in tensors.items():
        if t.dim() != 1 or not t.is_contiguous() or t.numel() != n or t.device != params.device:
            raise ValueError(f"adamw: {name} must be a contiguous 1-D tensor of {n} elements on "
                             f"{params.device}, got {tuple(t.shape)} on {t.device}")


def adamw_step_(params: torch.Tensor, grads: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                decay_mask: torch.Tensor | None, *, decay_factor: float, beta1: float, beta2: float,
                eps: float, step_size: float, bias_correction2_sqrt: float) -> None:
    """Update params, exp_avg and exp_avg_sq in place (see the module docstring).
    decay_mask: uint8/bool per element (nonzero: decays), or None for "all elements"."""
    _check(params, grads, exp_avg, exp_avg_sq, decay_mask)
    n = params.numel()
    if n == 0:
        return
    block = _block_size(params)
    mask = decay_mask.view(torch.uint8) if decay_mask is not None else params  # dummy pointer when unused
    _adamw_kernel[(triton.cdiv(n, block),)](
        params, grads, exp_avg, exp_avg_sq, mask, n,
        decay_factor, beta1, beta2, eps, step_size, bias_correction2_sqrt,
        HAS_DECAY_MASK=decay_mask is not None, BLOCK_SIZE=block)
