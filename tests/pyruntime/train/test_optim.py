import math

import torch

from pyruntime.config import OptimConfig
from pyruntime.train.optim import clip_grad_norm, lr_at


def test_lr_schedule_warmup_then_cosine():
    cfg = OptimConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert math.isclose(lr_at(0, 100, cfg), 0.1)
    assert math.isclose(lr_at(9, 100, cfg), 1.0)
    assert math.isclose(lr_at(10, 100, cfg), 1.0)
    assert math.isclose(lr_at(55, 100, cfg), 0.55)  # half way down the cosine
    assert math.isclose(lr_at(100, 100, cfg), 0.1)
    lrs = [lr_at(s, 100, cfg) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_clip_grad_norm_matches_torch():
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(s)) for s in [(3, 4), (7,), (2, 2, 2)]]
    qs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    for p, q in zip(ps, qs):
        p.grad = torch.randn_like(p)
        q.grad = p.grad.clone()
    ours = clip_grad_norm([p.grad for p in ps], 0.5)
    ref = torch.nn.utils.clip_grad_norm_(qs, 0.5)
    torch.testing.assert_close(ours, ref)
    for p, q in zip(ps, qs):
        torch.testing.assert_close(p.grad, q.grad)


def test_clip_disabled_returns_norm_only():
    g = torch.full((4,), 3.0)
    norm = clip_grad_norm([g], 0.0)
    assert norm.item() == 6.0 and torch.all(g == 3.0)


def test_host_gradients_are_all_reduced_where_the_backend_takes_them(monkeypatch):
    """--offload optimizer: the gradient shards live in host memory; NCCL refuses CPU tensors,
    so the squared norm goes to the CUDA device for the all-reduce; gloo takes it where it is.
    (Stood in on CPU: the backend name and the current CUDA device are patched.)"""
    import torch.distributed as dist

    from pyruntime.train.optim import collective_device

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    host = torch.zeros(())
    monkeypatch.setattr(dist, "get_backend", lambda group: "nccl")
    assert collective_device(host, object()) == torch.device("cuda", 3)
    assert collective_device(torch.zeros((), device="meta"), object()) == torch.device("meta")
    monkeypatch.setattr(dist, "get_backend", lambda group: "gloo")
    assert collective_device(host, object()) == torch.device("cpu")
