"""SwiGLU: the Triton path (interpreted on CPU, see tests/conftest.py) against the PyTorch
reference F.silu(a) * b, outputs and gradients; and how swiglu dispatches between them."""

import pytest
import torch

from pyruntime.ops import BackendUnavailable, swiglu
from pyruntime.ops import dispatch
from pyruntime.ops.swiglu import CANDIDATES, SwiGLUFunction, swiglu_reference

from support.kernels import DEVICE, cuda_only, needs_triton, output_and_grads


# Triton computes in fp32 and rounds once; the reference rounds after silu and after the
# product (and autograd after each backward op), so fp16 differs by a few ulps.
DTYPE_TOLS = [
    (torch.float32, 1e-5, 1e-5),
    (torch.float16, 2e-3, 2e-3),
    pytest.param(torch.bfloat16, 2e-2, 2e-2, marks=cuda_only),
]
SHAPES = [(3, 37), (2, 5, 129), (1, 1000), (4097,)]


def _inputs(shape, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    # Scale 3 reaches well into both tails of the sigmoid.
    a, b, dc = (3.0 * torch.randn(shape, generator=gen) for _ in range(3))
    return [t.to(device=DEVICE, dtype=dtype) for t in (a, b, dc)]


def _run(backend, a, b, dc):
    return output_and_grads(lambda a_, b_: swiglu(a_, b_, backend=backend), (a, b), dc)


@needs_triton
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype, atol, rtol", DTYPE_TOLS)
def test_triton_matches_reference(shape, dtype, atol, rtol):
    a, b, dc = _inputs(shape, dtype)
    c_t, da_t, db_t = _run("triton", a, b, dc)
    c_r, da_r, db_r = _run("reference", a, b, dc)

    assert c_t.dtype == dtype and c_t.shape == a.shape
    assert da_t.dtype == dtype and db_t.dtype == dtype
    torch.testing.assert_close(c_t, c_r, atol=atol, rtol=rtol)
    torch.testing.assert_close(da_t, da_r, atol=atol, rtol=rtol)
    torch.testing.assert_close(db_t, db_r, atol=atol, rtol=rtol)


@needs_triton
def test_triton_float64_reference_within_fp32_rounding():
    """Against an fp64 ground truth, not just against the fp32 reference."""
    a, b, dc = _inputs((5, 77), torch.float32, seed=1)
    c_t, da_t, db_t = _run("triton", a, b, dc)
    c_64, da_64, db_64 = _run("reference", a.double(), b.double(), dc.double())
    torch.testing.assert_close(c_t.double(), c_64, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(da_t.double(), da_64, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(db_t.double(), db_64, atol=1e-5, rtol=1e-5)


@needs_triton
def test_triton_non_contiguous_inputs():
    """Transposed views (as a chunked gate/up projection might give) are densified first."""
    a, b, dc = _inputs((24, 10), torch.float32, seed=2)
    a, b = a.t(), b.t()
    dc = dc.t()
    assert not a.is_contiguous()
    c_t, da_t, db_t = _run("triton", a, b, dc)
    c_r, da_r, db_r = _run("reference", a, b, dc)
    torch.testing.assert_close(c_t, c_r)
    torch.testing.assert_close(da_t, da_r)
    torch.testing.assert_close(db_t, db_r)


@needs_triton
def test_launchers_check_inputs_and_handle_empty():
    from pyruntime.triton_kernels.swiglu import swiglu_backward, swiglu_forward

    a = torch.randn(0, 8, device=DEVICE)
    assert swiglu_forward(a, a).shape == (0, 8)
    da, db = swiglu_backward(a, a, a)
    assert da.shape == db.shape == (0, 8)
    x = torch.randn(2, 8, device=DEVICE)
    with pytest.raises(ValueError, match="share shape, dtype"):
        swiglu_forward(x, x.half())


# ----------------------------------------------------------------------------- dispatch


def test_auto_on_cpu_picks_reference(monkeypatch):
    # Even with the interpreter on, "auto" never picks it: it is for explicit test use.
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    cpu = torch.device("cpu")
    assert dispatch.choose("swiglu", "auto", cpu, candidates=CANDIDATES) == "reference"

    def _no_triton(*args):
        raise AssertionError("auto on CPU must not run the Triton kernel")

    monkeypatch.setattr(SwiGLUFunction, "apply", _no_triton)
    a, b = torch.randn(2, 8), torch.randn(2, 8)
    torch.testing.assert_close(swiglu(a, b), swiglu_reference(a, b))


def test_explicit_triton_on_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # read at call time, so this takes effect
    monkeypatch.setattr(dispatch, "_triton_importable", lambda: True)
    cpu = torch.device("cpu")
    assert "TRITON_INTERPRET" in dispatch.unavailable_reason("triton", cpu, explicit=True)
    with pytest.raises(BackendUnavailable, match="swiglu"):
        dispatch.choose("swiglu", "triton", cpu, candidates=CANDIDATES)
    with pytest.raises(BackendUnavailable):
        swiglu(torch.randn(2, 8), torch.randn(2, 8), backend="triton")


def test_unknown_or_missing_backend():
    a, b = torch.randn(2, 8), torch.randn(2, 8)
    with pytest.raises(ValueError, match="unknown kernel backend"):
        swiglu(a, b, backend="cuda")
    with pytest.raises(BackendUnavailable, match="no 'cpp' backend"):
        swiglu(a, b, backend="cpp")


def test_shape_mismatch_is_checked():
    with pytest.raises(ValueError, match="same shape"):
        swiglu(torch.randn(2, 8), torch.randn(2, 7), backend="reference")
