"""Fused GEMM + bias + activation and fused SwiGLU projection: the Triton path (interpreted on
CPU, see tests/conftest.py) against the PyTorch reference, outputs and gradients; the GEMM
on transposed views; dispatch; and an sm_90 compile check of every kernel."""

import pytest
import torch

from pyruntime.ops import BackendUnavailable, linear, swiglu_linear
from pyruntime.ops import dispatch
from pyruntime.ops.linear import CANDIDATES, LinearFunction, linear_reference, swiglu_linear_reference

from support.kernels import DEVICE, cuda_only, needs_triton


# Both paths see the same fp32 products of the same inputs; Triton rounds once at the store
# while the reference rounds after the GEMM, the bias and the activation, so fp16 differs by
# a few ulps (1e-3 relative). Gradient sums over rows scale the absolute error (see _rows).
DTYPE_TOLS = [
    (torch.float32, 1e-4, 1e-4),
    (torch.float16, 1e-2, 1e-2),
    pytest.param(torch.bfloat16, 5e-2, 5e-2, marks=cuda_only),
]
# (x shape, out features). Odd sizes exercise every mask; (130, 40) -> 70 spans 5 x 3 tiles
# of the interpreter's 32 x 32 config, so GROUP_M=2 leaves a partial last group, and K=40
# takes three BLOCK_K=16 steps with a ragged last one.
SHAPES = [((37, 29), 43), ((2, 5, 29), 43), ((130, 40), 70)]
ACTIVATIONS = ["none", "gelu", "silu"]


def _inputs(x_shape, n_out, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    k = x_shape[-1]
    x = torch.randn(x_shape, generator=gen)
    w = torch.randn(n_out, k, generator=gen) / k**0.5  # keeps pre-activations O(1)
    b = torch.randn(n_out, generator=gen)
    dy = torch.randn(*x_shape[:-1], n_out, generator=gen)
    return [t.to(device=DEVICE, dtype=dtype) for t in (x, w, b, dy)]


def _leaves(*tensors):
    return [None if t is None else t.clone().requires_grad_(True) for t in tensors]


def _rows(x):
    return x.numel() // x.shape[-1]


def _run_linear(backend, x, w, b, dy, activation):
    x, w, b = _leaves(x, w, b)
    y = linear(x, w, b, activation=activation, backend=backend)
    y.backward(dy)
    return y.detach(), x.grad, w.grad, None if b is None else b.grad


@needs_triton
@pytest.mark.parametrize("x_shape, n_out", SHAPES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("dtype, atol, rtol", DTYPE_TOLS)
def test_linear_matches_reference(x_shape, n_out, activation, with_bias, dtype, atol, rtol):
    x, w, b, dy = _inputs(x_shape, n_out, dtype)
    b = b if with_bias else None
    got = _run_linear("triton", x, w, b, dy, activation)
    want = _run_linear("reference", x, w, b, dy, activation)

    assert got[0].shape == (*x_shape[:-1], n_out) and got[0].dtype == dtype
    torch.testing.assert_close(got[0], want[0], atol=atol, rtol=rtol)   # y
    torch.testing.assert_close(got[1], want[1], atol=atol, rtol=rtol)   # dx
    torch.testing.assert_close(got[2], want[2], atol=atol * _rows(x), rtol=rtol)  # dW sums rows
    if with_bias:
        torch.testing.assert_close(got[3], want[3], atol=atol * _rows(x), rtol=rtol)


@needs_triton
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_linear_fp32_against_float64_ground_truth(activation):
    """Not only against the fp32 reference: both could share an error."""
    x, w, b, dy = _inputs((37, 29), 43, torch.float32, seed=1)
    got = _run_linear("triton", x, w, b, dy, activation)
    want = _run_linear("reference", x.double(), w.double(), b.double(), dy.double(), activation)
    for g, r in zip(got, want):
        torch.testing.assert_close(g.double(), r, atol=2e-5, rtol=2e-5)


def _run_swiglu(backend, x, wg, wu, dh):
    x, wg, wu = _leaves(x, wg, wu)
    h = swiglu_linear(x, wg, wu, backend=backend)
    h.backward(dh)
    return h.detach(), x.grad, wg.grad, wu.grad


@needs_triton
@pytest.mark.parametrize("x_shape, n_out", SHAPES)
@pytest.mark.parametrize("dtype, atol, rtol", DTYPE_TOLS)
def test_swiglu_linear_matches_reference(x_shape, n_out, dtype, atol, rtol):
    x, wg, _, dh = _inputs(x_shape, n_out, dtype)
    _, wu, _, _ = _inputs(x_shape, n_out, dtype, seed=7)
    got = _run_swiglu("triton", x, wg, wu, dh)
    want = _run_swiglu("reference", x, wg, wu, dh)

    assert got[0].shape == (*x_shape[:-1], n_out) and got[0].dtype == dtype
    torch.testing.assert_close(got[0], want[0], atol=atol, rtol=rtol)   # h
    torch.testing.assert_close(got[1], want[1], atol=atol, rtol=rtol)   # dx = dg Wg + du Wu
    torch.testing.assert_close(got[2], want[2], atol=atol * _rows(x), rtol=rtol)  # dWg
    torch.testing.assert_close(got[3], want[3], atol=atol * _rows(x), rtol=rtol)  # dWu


@needs_triton
def test_gemm_on_strided_views_and_second_product():
    """The backward's trick: transposed views, no copies, and two products in one accumulator."""
    from pyruntime.triton_kernels.matmul import gemm

    gen = torch.Generator().manual_seed(3)
    a = torch.randn(29, 37, generator=gen).t()          # (37, 29), column-major
    b = torch.randn(60, 43, generator=gen)[::2, :]       # (30, 43) -> take (29, 43), row stride 86
    b = b[:29]
    a2, b2 = torch.randn(29, 37, generator=gen).t(), torch.randn(60, 43, generator=gen)[::2, :][:29]
    assert a.stride() == (1, 37) and b.stride() == (86, 1)
    torch.testing.assert_close(gemm(a, b), a @ b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gemm(a, b, a2=a2, b2=b2), a @ b + a2 @ b2, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="a2/b2"):
        gemm(a, b, a2=a2.contiguous(), b2=b2)  # different strides than a


@needs_triton
def test_linear_on_a_column_slice_and_partial_grads():
    """x with a row stride wider than K (no copy on the Triton path); only dW requested."""
    x_full, w, b, dy = _inputs((37, 50), 43, torch.float32, seed=4)
    x = x_full[:, :29]
    w = w[:, :29].contiguous().requires_grad_(True)
    y = linear(x, w, b, activation="silu", backend="triton")
    (dw,) = torch.autograd.grad(y, w, dy)
    w_ref = w.detach().clone().requires_grad_(True)
    (dw_ref,) = torch.autograd.grad(linear_reference(x, w_ref, b, "silu"), w_ref, dy)
    torch.testing.assert_close(dw, dw_ref, atol=1e-4, rtol=1e-4)


@needs_triton
@pytest.mark.parametrize("activation", ["none", "silu"])
def test_broadcast_upstream_gradient(activation):
    """y.sum().backward() hands the backward an expanded dy with zero strides."""
    x, w, b, _ = _inputs((2, 5, 29), 43, torch.float32, seed=5)
    grads = []
    for backend in ("triton", "reference"):
        xl, wl, bl = _leaves(x, w, b)
        linear(xl, wl, bl, activation, backend=backend).sum().backward()
        grads.append((xl.grad, wl.grad, bl.grad))
    for g, r in zip(*grads):
        torch.testing.assert_close(g, r, atol=1e-4, rtol=1e-4)


@needs_triton
def test_no_grad_forward_and_empty_rows():
    x, w, b, _ = _inputs((37, 29), 43, torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(linear(x, w, b, "gelu", backend="triton"), linear_reference(x, w, b, "gelu"),
                                   atol=1e-4, rtol=1e-4)
    x0, w0, b0 = _leaves(x[:0], w, b)
    y0 = linear(x0, w0, b0, "gelu", backend="triton")
    y0.sum().backward()
    assert y0.shape == (0, 43) and x0.grad.shape == (0, 29)
    assert torch.equal(w0.grad, torch.zeros_like(w)) and torch.equal(b0.grad, torch.zeros_like(b))


@needs_triton
@pytest.mark.parametrize("op", ["linear", "swiglu_linear"])
def test_second_backward_through_retained_graph_fails_loudly(op):
    """The backward overwrites the saved pre-activations; a second pass must not read them."""
    x, w, b, dy = _inputs((5, 16), 16, torch.float32)
    x, w = _leaves(x, w)
    y = linear(x, w, b, "gelu", backend="triton") if op == "linear" else swiglu_linear(x, w, w, backend="triton")
    y.backward(dy, retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward(dy)


# ----------------------------------------------------------------------------- dispatch


def test_auto_on_cpu_picks_reference(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert dispatch.choose("linear", "auto", torch.device("cpu"), candidates=CANDIDATES) == "reference"

    def _no_triton(*args):
        raise AssertionError("auto on CPU must not run the Triton kernel")

    monkeypatch.setattr(LinearFunction, "apply", _no_triton)
    x, w = torch.randn(2, 8), torch.randn(4, 8)
    torch.testing.assert_close(linear(x, w, activation="silu"), linear_reference(x, w, None, "silu"))
    torch.testing.assert_close(swiglu_linear(x, w, w), swiglu_linear_reference(x, w, w))


def test_explicit_triton_without_interpreter_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(dispatch, "_triton_importable", lambda: True)
    with pytest.raises(BackendUnavailable, match="linear"):
        linear(torch.randn(2, 8), torch.randn(4, 8), backend="triton")


def test_bad_arguments_raise():
    x, w = torch.randn(2, 8), torch.randn(4, 8)
    with pytest.raises(ValueError, match="unknown activation"):
        linear(x, w, activation="relu")
    with pytest.raises(ValueError, match="does not match weight"):
        linear(x, torch.randn(4, 7))
    with pytest.raises(ValueError, match="bias shape"):
        linear(x, w, torch.randn(3))
    with pytest.raises(ValueError, match="do not match"):
        swiglu_linear(x, w, torch.randn(5, 8))


@needs_triton
def test_triton_path_refuses_mixed_dtypes():
    with pytest.raises(ValueError, match="one dtype"):
        linear(torch.randn(2, 16), torch.randn(4, 16, dtype=torch.float16), backend="triton")


def test_reference_gelu_is_the_tanh_approximation():
    """The kernels implement tanh-GeLU; the reference must be that one, not erf-GeLU."""
    y = torch.linspace(-4, 4, 101)
    x, w = y[:, None], torch.ones(1, 1)
    tanh_gelu = 0.5 * y * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (y + 0.044715 * y**3)))
    torch.testing.assert_close(linear_reference(x, w, None, "gelu")[:, 0], tanh_gelu)


def test_triton_linear_follows_autocast_like_f_linear():
    """Under autocast, fp32 weights with low-precision activations must work (as F.linear
    does) and the fp32 weights must still receive fp32 gradients. fp16: the interpreter has
    no bf16."""
    from pyruntime.ops import linear, swiglu_linear

    torch.manual_seed(0)
    x = torch.randn(5, 24)
    w = torch.randn(16, 24, requires_grad=True)
    wg, wu = torch.randn(16, 24, requires_grad=True), torch.randn(16, 24, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.float16):
        y = linear(x, w, backend="triton")
        z = swiglu_linear(x, wg, wu, backend="triton")
        ref = torch.nn.functional.linear(x, w)
    assert y.dtype == torch.float16 and z.dtype == torch.float16
    torch.testing.assert_close(y, ref, atol=2e-2, rtol=2e-2)
    (y.float().sum() + z.float().sum()).backward()
    assert w.grad.dtype == torch.float32 and wg.grad.dtype == torch.float32
