"""RMSNorm: the Triton path (interpreted on CPU, see tests/conftest.py) against the PyTorch
reference, outputs and gradients; and how rms_norm dispatches between them."""

import pytest
import torch

from pyruntime.ops import BackendUnavailable, rms_norm
from pyruntime.ops import dispatch
from pyruntime.ops.rmsnorm import CANDIDATES, RMSNormFunction, rms_norm_reference

from support.kernels import DEVICE, cuda_only, needs_triton, output_and_grads


# Forward fp16 is bit-exact (both paths round the normalised row to fp16 before scaling);
# the tolerances cover the backward, where Triton stays in fp32 and autograd rounds to fp16
# after each op.
DTYPE_TOLS = [
    (torch.float32, 1e-5, 1e-5),
    (torch.float16, 2e-3, 2e-3),
    pytest.param(torch.bfloat16, 3e-2, 3e-2, marks=cuda_only),
]
# Odd hidden sizes exercise the masking (BLOCK = next power of two); 7 and 10 rows split
# unevenly over the backward's programs.
SHAPES = [(3, 37), (2, 5, 129), (1, 1000), (7, 64), (10, 33)]


def _inputs(shape, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen, dtype=torch.float32)
    w = 1.0 + 0.1 * torch.randn(shape[-1], generator=gen, dtype=torch.float32)
    dy = torch.randn(shape, generator=gen, dtype=torch.float32)
    return [t.to(device=DEVICE, dtype=dtype) for t in (x, w, dy)]


def _run(backend, x, w, dy, eps=1e-6):
    """Output and (dx, dw) of rms_norm on fresh leaves."""
    return output_and_grads(lambda x_, w_: rms_norm(x_, w_, eps=eps, backend=backend), (x, w), dy)


@needs_triton
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype, atol, rtol", DTYPE_TOLS)
def test_triton_matches_reference(shape, dtype, atol, rtol):
    x, w, dy = _inputs(shape, dtype)
    y_t, dx_t, dw_t = _run("triton", x, w, dy)
    y_r, dx_r, dw_r = _run("reference", x, w, dy)

    assert y_t.dtype == dtype and y_t.shape == x.shape
    assert dx_t.dtype == dtype and dw_t.dtype == dtype
    torch.testing.assert_close(y_t, y_r, atol=atol, rtol=rtol)
    torch.testing.assert_close(dx_t, dx_r, atol=atol, rtol=rtol)
    # dw sums over rows, so its absolute error grows with the row count.
    rows = x.numel() // x.shape[-1]
    torch.testing.assert_close(dw_t, dw_r, atol=atol * rows, rtol=rtol)


@needs_triton
def test_triton_float64_reference_within_fp32_rounding():
    """Against an fp64 ground truth, not just against the fp32 reference."""
    x, w, dy = _inputs((4, 100), torch.float32, seed=1)
    y_t, dx_t, dw_t = _run("triton", x, w, dy)
    y_64, dx_64, dw_64 = _run("reference", x.double(), w.double(), dy.double())
    torch.testing.assert_close(y_t.double(), y_64, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dx_t.double(), dx_64, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dw_t.double(), dw_64, atol=1e-5, rtol=1e-5)


@needs_triton
def test_triton_strided_rows_and_large_eps():
    """Rows with a stride wider than the hidden size (a column slice) and a non-default eps."""
    x_full, w, dy = _inputs((6, 80), torch.float32, seed=2)
    x = x_full[:, :50]
    w, dy = w[:50], dy[:, :50].contiguous()
    assert x.stride(0) == 80
    y_t, dx_t, dw_t = _run("triton", x, w, dy, eps=0.5)
    y_r, dx_r, dw_r = _run("reference", x, w, dy, eps=0.5)
    torch.testing.assert_close(y_t, y_r, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dx_t, dx_r, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dw_t, dw_r, atol=1e-5, rtol=1e-5)


@needs_triton
def test_launchers_return_rstd_and_handle_empty():
    from pyruntime.triton_kernels.rmsnorm import rmsnorm_backward, rmsnorm_forward

    x, w, dy = _inputs((3, 37), torch.float32)
    y, rstd = rmsnorm_forward(x, w, 1e-6)
    assert rstd.dtype == torch.float32 and rstd.shape == (3,)
    torch.testing.assert_close(rstd, torch.rsqrt(x.pow(2).mean(-1) + 1e-6))

    empty = x[:0]
    y0, rstd0 = rmsnorm_forward(empty, w, 1e-6)
    dx0, dw0 = rmsnorm_backward(empty, empty, w, rstd0)
    assert y0.shape == (0, 37) and dx0.shape == (0, 37)
    assert torch.equal(dw0, torch.zeros_like(w))


@needs_triton
def test_launcher_rejects_rows_wider_than_one_block():
    from pyruntime.triton_kernels.rmsnorm import MAX_FUSED_SIZE, _block_settings

    assert _block_settings(MAX_FUSED_SIZE)[0] == MAX_FUSED_SIZE
    with pytest.raises(ValueError, match="fused limit"):
        _block_settings(MAX_FUSED_SIZE + 1)


# ----------------------------------------------------------------------------- dispatch


def test_auto_on_cpu_picks_reference(monkeypatch):
    # Even with the interpreter on, "auto" never picks it: it is for explicit test use.
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    cpu = torch.device("cpu")
    assert dispatch.choose("rms_norm", "auto", cpu, candidates=CANDIDATES) == "reference"

    def _no_triton(*args):
        raise AssertionError("auto on CPU must not run the Triton kernel")

    monkeypatch.setattr(RMSNormFunction, "apply", _no_triton)
    x, w = torch.randn(2, 8), torch.ones(8)
    torch.testing.assert_close(rms_norm(x, w), rms_norm_reference(x, w))


def test_explicit_triton_on_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # read at call time, so this takes effect
    monkeypatch.setattr(dispatch, "_triton_importable", lambda: True)
    cpu = torch.device("cpu")
    assert "TRITON_INTERPRET" in dispatch.unavailable_reason("triton", cpu, explicit=True)
    with pytest.raises(BackendUnavailable, match="rms_norm"):
        dispatch.choose("rms_norm", "triton", cpu, candidates=CANDIDATES)
    with pytest.raises(BackendUnavailable):
        rms_norm(torch.randn(2, 8), torch.ones(8), backend="triton")


def test_unknown_or_missing_backend():
    x, w = torch.randn(2, 8), torch.ones(8)
    with pytest.raises(ValueError, match="unknown kernel backend"):
        rms_norm(x, w, backend="cuda")
    with pytest.raises(BackendUnavailable, match="no 'cpp' backend"):
        rms_norm(x, w, backend="cpp")


def test_weight_shape_is_checked():
    with pytest.raises(ValueError, match="weight shape"):
        rms_norm(torch.randn(2, 8), torch.ones(7), backend="reference")


def test_reference_is_llama_rmsnorm():
    """fp32 normalisation, cast back to x.dtype, then the weight product in x.dtype."""
    x = torch.randn(3, 16, dtype=torch.float16)
    w = torch.rand(16, dtype=torch.float16) + 0.5
    xf = x.float()
    expected = w * (xf / xf.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()).to(torch.float16)
    torch.testing.assert_close(rms_norm(x, w, backend="reference"), expected, atol=1e-3, rtol=1e-3)
