"""What the kernel tests share: the device they run on (CUDA, else CPU with the Triton
interpreter, see conftest.py), their skip marks, and running an op on fresh leaves."""
from __future__ import annotations

import importlib.util
from typing import Callable

import pytest
import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton interpreter has no bf16")


def output_and_grads(fn: Callable[..., torch.Tensor], inputs, grad_out: torch.Tensor):
    """fn(*leaves) on fresh leaf copies of `inputs`, back-propagated with grad_out:
    (output, gradient of each input)."""
    leaves = [t.clone().requires_grad_(True) for t in inputs]
    out = fn(*leaves)
    out.backward(grad_out)
    return (out.detach(), *(leaf.grad for leaf in leaves))
