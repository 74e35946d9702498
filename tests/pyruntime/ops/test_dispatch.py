"""The one dispatch point (pyruntime/ops/dispatch.py): an automatic fallback is reported once
on stderr, naming the op, the device and why; an explicit choice that cannot run raises."""
import pytest
import torch

from pyruntime.ops import dispatch


@pytest.fixture
def fresh_reports():
    dispatch._report_fallback_once.cache_clear()
    yield
    dispatch._report_fallback_once.cache_clear()


def test_cuda_fallback_is_reported_once_on_stderr(monkeypatch, capsys, fresh_reports):
    # A CUDA device without Triton (the case the README promises to report): stand it in by
    # making Triton unimportable; the choice itself needs no GPU.
    monkeypatch.setattr(dispatch, "_triton_importable", lambda: False)
    cuda = torch.device("cuda")
    for _ in range(3):
        assert dispatch.choose("rms_norm", "auto", cuda, ("triton", "reference")) == "reference"
    err = capsys.readouterr().err.splitlines()
    assert err == ["pyruntime: warning: rms_norm on cuda: triton kernel unavailable (triton is not installed); "
                   "running the reference one"]


def test_missing_extension_is_reported_on_cpu(monkeypatch, capsys, fresh_reports):
    monkeypatch.setattr(dispatch, "_cpp_import_error", lambda: "pyruntime._C is not built")
    assert dispatch.choose("flat_pack", "auto", torch.device("cpu"), ("cpp", "reference")) == "reference"
    assert "flat_pack on cpu: cpp kernel unavailable (pyruntime._C is not built)" in capsys.readouterr().err


def test_triton_skipped_on_cpu_by_design_is_silent(capsys, fresh_reports):
    assert dispatch.choose("rms_norm", "auto", torch.device("cpu"), ("triton", "reference")) == "reference"
    assert capsys.readouterr().err == ""


def test_explicit_backend_that_cannot_run_raises(monkeypatch):
    monkeypatch.setattr(dispatch, "_triton_importable", lambda: False)
    with pytest.raises(dispatch.BackendUnavailable, match="rms_norm: backend 'triton' requested but unavailable"):
        dispatch.choose("rms_norm", "triton", torch.device("cuda"), ("triton", "reference"))
