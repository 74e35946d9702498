"""Fixtures shared by the tests of pyruntime's commands."""
import pytest
import torch.distributed as dist

import pyruntime.mesh


@pytest.fixture
def no_process_group(monkeypatch):
    """Records every attempt to create a process group (the bad-input tests assert there was none)."""
    calls = []
    monkeypatch.setattr(pyruntime.mesh, "init_distributed", lambda *a, **k: calls.append(a))
    monkeypatch.setattr(dist, "init_process_group", lambda *a, **k: calls.append(a))
    return calls
