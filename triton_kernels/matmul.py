"""Tiled GEMM with a fused bias + activation epilogue, forward and backward, as Triton kernels.

    y = act(x @ W^T + b),    act in {none, gelu (tanh approximation), silu}

The GeLU is the tanh approximation (`F.gelu(x, approximate="tanh")`, the GPT-2 / Gemma MLP
form), written as gelu(x) = x * sigmoid(2u), u = sqrt(2/pi) * (x + 0.044715 x^3), which is
exactly 0.5 x (1 + tanh(u)) without tanh's cancellation near 0 and uses only tl.sigmoid,
available on every backend and in the interpreter.

One kernel, `_matmul_kernel`, computes C = act(A @ B + bias) (+ A2 @ B2 when HAS_SECOND) for
any strides of A (M, K) and B (K, N), so the backward products run on the same kernel with
transposed *views* and no copies:
    forward   y    = act(x @ W^T + b)     A = x,      B = W.t()
    dx             = dy_pre @ W          A = dy_pre, B = W
    dW             = dy_pre^T @ x        A = dy_pre.t(), B = x
Tiles are visited in GROUP_M-row groups (Triton's "grouped ordering"): consecutive programs
share the same few row-panels of A and sweep the columns of B, so A panels stay in L2.
Accumulation is fp32; bias and activation are applied to the fp32 accumulator in registers,
and only the final store rounds to the output dtype.

Backward needs the pre-activation p = x @ W^T + b (act'(p)). It is *stored* by the forward
epilogue (one extra (M, N) write, in the activation dtype) rather than recomputed: recomputing
would cost a third GEMM, +50% backward FLOPs, while eager PyTorch keeps exactly the same
tensor alive for F.gelu/F.silu's backward, so storing costs no memory over the baseline.
The backward turns that saved buffer into dy_pre = dy * act'(p) *in place* (it is private to
the autograd Function), so the backward allocates no extra (M, N) buffer either.

No autograd here: pyruntime/ops/linear.py wraps these launchers.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

ACTIVATIONS = ("none", "gelu", "silu")

# CUDA: a handful of configs from Triton's matmul tutorial that cover 7B-MLP shapes on
# Ampere/Hopper (large square-ish tiles for big M, N; narrower ones when N/tp is small).
# Autotuning is keyed on (M, N, K) and the epilogue flags (Triton adds the argument dtypes);
# configs that need more shared memory than the GPU has are skipped by the autotuner.
_CUDA_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=3, num_warps=8),
    triton.Config({"BLOCK_M": 256, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=3, num_warps=8),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=4, num_warps=8),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32, "GROUP_M": 8}, num_stages=4, num_warps=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 256, "BLOCK_K": 32, "GROUP_M": 8}, num_stages=4, num_warps=4),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8}, num_stages=4, num_warps=4),
]
# Interpreter (CPU tests): @triton.autotune would run every config, so one small fixed
# config. 32x32 tiles and GROUP_M=2 make test shapes (tens of rows) span several tiles and
# several groups, one of them partial; BLOCK_K=16 (tl.dot's minimum) makes K loop and mask.
INTERPRETER_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 16, "GROUP_M": 2}
# The elementwise activation-backward kernel: see triton_kernels/swiglu.py for the sizes.
_GPU_EW_BLOCK = 1024
_INTERPRETER_EW_BLOCK = 65536


@triton.jit
def _grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of program pid: column-major within groups of GROUP_M tile rows."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    # The last group may have fewer than GROUP_M tile rows.
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def _activation(x, ACTIVATION: tl.constexpr):
    """act(x) on fp32 x; ACTIVATION is resolved at compile time."""
    if ACTIVATION == "gelu":
        u = 0.7978845608028654 * (x + 0.044715 * x * x * x)  # sqrt(2/pi) * (x + 0.044715 x^3)
        y = x * tl.sigmoid(2.0 * u)                          # == 0.5 x (1 + tanh(u))
    elif ACTIVATION == "silu":
        y = x * tl.sigmoid(x)
    else:
        y = x
    return y


# Derivatives of the activations (s = sigmoid):
#   silu(x) = x s(x)                      silu'(x) = s(x) (1 + x (1 - s(x)))
#   gelu(x) = x s(2u), u = c (x + a x^3)  gelu'(x) = s(2u) + x s(2u) (1 - s(2u)) 2c (1 + 3a x^2)
# with c = sqrt(2/pi), a = 0.044715 (equal to d/dx of 0.5 x (1 + tanh(u)), since
# tanh(u) = 2 s(2u) - 1).
@triton.jit
def _activation_grad(x, ACTIVATION: tl.constexpr):
    if ACTIVATION == "gelu":
        u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        s = tl.sigmoid(2.0 * u)
        du = 0.7978845608028654 * (1.0 + 0.134145 * x * x)  # 3 * 0.044715 = 0.134145
        g = s + x * s * (1.0 - s) * 2.0 * du
    elif ACTIVATION == "silu":
        s = tl.sigmoid(x)
        g = s * (1.0 + x * (1.0 - s))
    else:
        g = tl.full(x.shape, 1.0, tl.float32)
    return g


@triton.jit
def _matmul_kernel(
    C_ptr, A_ptr, B_ptr, A2_ptr, B2_ptr, BIAS_ptr, PRE_ptr,
    M, N, K,
    stride_am, stride_ak,
    stride_bk, stride_bn,
    stride_cm, stride_cn,
    ACTIVATION: tl.constexpr, HAS_BIAS: tl.constexpr, STORE_PRE: tl.constexpr,
    HAS_SECOND: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """C = act(A @ B [+ A2 @ B2] + bias); PRE (strided like C) gets the pre-activation.
    A2/B2 share A/B's strides (the SwiGLU backward's dx = dg @ Wg + du @ Wu)."""
    pid = tl.program_id(0)
    pid_m, pid_n = _grouped_tile(pid, M, N, BLOCK_M, BLOCK_N, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # Rows/cols past the edge wrap onto valid ones (their results are never stored), so the
    # loads in the K loop need only the K mask. int64 rows: row * stride can pass 2^31.
    rows_a = (offs_m % M).to(tl.int64)
    cols_b = (offs_n % N).to(tl.int64)
    a_off = rows_a[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_off = offs_k[:, None] * stride_bk + cols_b[None, :] * stride_bn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        a = tl.load(A_ptr + a_off, mask=offs_k[None, :] < k_left, other=0.0)
        b = tl.load(B_ptr + b_off, mask=offs_k[:, None] < k_left, other=0.0)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        if HAS_SECOND:
            a2 = tl.load(A2_ptr + a_off, mask=offs_k[None, :] < k_left, other=0.0)
            b2 = tl.load(B2_ptr + b_off, mask=offs_k[:, None] < k_left, other=0.0)
            acc = tl.dot(a2, b2, acc, input_precision=INPUT_PRECISION)
        a_off += BLOCK_K * stride_ak
        b_off += BLOCK_K * stride_bk

    if HAS_BIAS:
        acc += tl.load(BIAS_ptr + cols_b).to(tl.float32)[None, :]

    c_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    c_off = offs_m.to(tl.int64)[:, None] * stride_cm + offs_n[None, :] * stride_cn
    if STORE_PRE:
        tl.store(PRE_ptr + c_off, acc.to(PRE_ptr.dtype.element_ty), mask=c_mask)
    y = _activation(acc, ACTIVATION)
    tl.store(C_ptr + c_off, y.to(C_ptr.dtype.element_ty), mask=c_mask)


# The epilogue flags are part of the key, not only (M, N, K): HAS_SECOND doubles the shared
# memory a config needs, so a tile tuned for a plain GEMM of the same shape (the MLP's down
# projection has the shape of the SwiGLU backward's dx) could not even launch with it.
_matmul_kernel_tuned = triton.autotune(
    configs=_CUDA_CONFIGS, key=["M", "N", "K", "ACTIVATION", "HAS_BIAS", "STORE_PRE", "HAS_SECOND"],
)(_matmul_kernel)


# dy_pre = dy * act'(pre), elementwise, written over PRE (see the module docstring for why in
# place); act' as in _activation_grad above.
@triton.jit
def _activation_bwd_kernel(
    PRE_ptr, DY_ptr,
    n_elements,
    ACTIVATION: tl.constexpr, BLOCK_SIZE: tl.constexpr,
):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offsets < n_elements
    pre = tl.load(PRE_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    dpre = dy * _activation_grad(pre, ACTIVATION)
    tl.store(PRE_ptr + offsets, dpre.to(PRE_ptr.dtype.element_ty), mask=mask)


def input_precision(dtype: torch.dtype, device: torch.device) -> str:
    """tl.dot precision. fp32 operands: IEEE unless the user allowed TF32 for torch's own
    matmuls, so the Triton and the PyTorch paths round alike (and the interpreter needs
    IEEE). 16-bit operands ignore it; they get Triton's default, "tf32"."""
    if dtype != torch.float32:
        return "tf32"
    if device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def launch_grid(launch, M: int, N: int, device: torch.device, args: tuple, flags: dict) -> None:
    """Run a GEMM-shaped kernel: `launch` is (tuned, fixed); autotuned on CUDA, the fixed
    INTERPRETER_CONFIG elsewhere. One program per (BLOCK_M, BLOCK_N) tile of the output."""
    tuned, fixed = launch
    if device.type == "cuda":
        def grid(meta):
            return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)
        # Triton launches on torch's *current* device; the tensors' one may differ.
        with torch.cuda.device(device):
            tuned[grid](*args, **flags)
    else:
        cfg = INTERPRETER_CONFIG
        fixed[(triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)](*args, **flags, **cfg)


def _check_activation(activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation '{activation}'; expected one of {ACTIVATIONS}")


def gemm(
    a: torch.Tensor, b: torch.Tensor, *,
    bias: torch.Tensor | None = None, activation: str = "none",
    pre: torch.Tensor | None = None,
    a2: torch.Tensor | None = None, b2: torch.Tensor | None = None,
) -> torch.Tensor:
    """act(a @ b [+ a2 @ b2] + bias) for a (M, K), b (K, N) of any strides (pass transposed
    views, not copies); returns a new contiguous (M, N) tensor in a's dtype. `pre`, if given,
    an (M, N) contiguous tensor that receives the pre-activation. a2/b2 must match a/b in
    shape and strides."""
    _check_activation(activation)
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"gemm: shapes {tuple(a.shape)} @ {tuple(b.shape)} do not multiply")
    if a.dtype != b.dtype or (bias is not None and bias.dtype != a.dtype):
        raise ValueError(f"gemm: dtypes differ: a {a.dtype}, b {b.dtype}, bias {None if bias is None else bias.dtype}")
    has_second = a2 is not None
    if has_second and (b2 is None or a2.shape != a.shape or b2.shape != b.shape
                       or a2.stride() != a.stride() or b2.stride() != b.stride()
                       or a2.dtype != a.dtype or b2.dtype != b.dtype):
        raise ValueError("gemm: a2/b2 must match a/b in shape, strides and dtype")
    M, K = a.shape
    N = b.shape[1]
    if bias is not None and bias.shape != (N,):
        raise ValueError(f"gemm: bias shape {tuple(bias.shape)} != ({N},)")
    c = torch.empty((M, N), dtype=a.dtype, device=a.device)
    if pre is not None and (pre.shape != (M, N) or not pre.is_contiguous() or pre.dtype != a.dtype):
        raise ValueError(f"gemm: pre must be a contiguous ({M}, {N}) {a.dtype} tensor")
    if M == 0 or N == 0:
        return c
    if bias is not None:
        bias = bias.contiguous()
    args = (
        c, a, b, a2 if has_second else a, b2 if has_second else b,
        bias if bias is not None else c, pre if pre is not None else c,  # unused when flagged off
        M, N, K,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1),
    )
    flags = dict(
        ACTIVATION=activation, HAS_BIAS=bias is not None, STORE_PRE=pre is not None,
        HAS_SECOND=has_second, INPUT_PRECISION=input_precision(a.dtype, a.device),
    )
    launch_grid((_matmul_kernel_tuned, _matmul_kernel), M, N, a.device, args, flags)
    return c


def activation_backward_(pre: torch.Tensor, dy: torch.Tensor, activation: str) -> torch.Tensor:
    """Overwrite pre (contiguous) with dy * act'(pre) and return it."""
    _check_activation(activation)
    if pre.shape != dy.shape or not pre.is_contiguous():
        raise ValueError(f"activation_backward_: pre {tuple(pre.shape)} must be contiguous and match dy {tuple(dy.shape)}")
    dy = dy.contiguous()
    n = pre.numel()
    if n == 0:
        return pre
    block = _GPU_EW_BLOCK if pre.device.type == "cuda" else min(_INTERPRETER_EW_BLOCK, triton.next_power_of_2(n))
    _activation_bwd_kernel[(triton.cdiv(n, block),)](pre, dy, n, ACTIVATION=activation, BLOCK_SIZE=block)
    return pre


def linear_forward(
    x2d: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: str, save_pre: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """y = act(x2d @ weight^T + bias): x2d (M, K), weight (N, K), bias (N,) or None.
    Returns y (M, N) and, when save_pre and activation != "none", the pre-activation."""
    if weight.dim() != 2 or x2d.dim() != 2 or weight.shape[1] != x2d.shape[1]:
        raise ValueError(f"linear_forward: x {tuple(x2d.shape)} and weight {tuple(weight.shape)} do not match")
    pre = None
    if save_pre and activation != "none":
        pre = torch.empty((x2d.shape[0], weight.shape[0]), dtype=x2d.dtype, device=x2d.device)
    y = gemm(x2d, weight.t(), bias=bias, activation=activation, pre=pre)
    return y, pre


def linear_backward(
    dy: torch.Tensor, x2d: torch.Tensor, weight: torch.Tensor, pre: torch.Tensor | None,
    activation: str, needs: tuple[bool, bool, bool],
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(dx, dW, db) of y = act(x2d @ weight^T + b) for dy (M, N); `needs` says which to
    compute (the others are None). `pre` (from linear_forward) is consumed: overwritten
    with dy_pre."""
    need_dx, need_dw, need_db = needs
    if activation == "none":
        dpre = dy  # any strides: the GEMMs take them as they are
    else:
        if pre is None:
            raise ValueError(f"linear_backward: activation '{activation}' needs the saved pre-activation")
        dpre = activation_backward_(pre, dy, activation)
    dx = gemm(dpre, weight) if need_dx else None        # (M, N) @ (N, K)
    dw = gemm(dpre.t(), x2d) if need_dw else None       # (N, M) @ (M, K)
    # A bandwidth-bound column sum: torch's reduction already runs at memory speed; fp32 so
    # thousands of rows do not lose the small terms.
    db = dpre.sum(0, dtype=torch.float32).to(dy.dtype) if need_db else None
    return dx, dw, db
