"""Test-wide setup.

Without a GPU, Triton kernels run under the interpreter: TRITON_INTERPRET must be set before
triton is first imported, so it is set here, before any test module is collected. The kernels
are still only chosen when a test asks for backend="triton" explicitly (see ops/dispatch.py).
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(1)  # CI has 2 cores; multi-process tests run several ranks at once
