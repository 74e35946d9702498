"""Deferred weight gradients for the zero-bubble split (pyruntime/ops/wgrad.py): B is one
backward with every GEMM's dW stashed, W runs the stash; together they give exactly one
ordinary backward's gradients, W walks no graph, and its gradients arrive through
AccumulateGrad (post-accumulate-grad hooks fire, as data parallelism needs). Covered: plain
nn.Linear made deferrable, ops.linear / ops.swiglu_linear on the reference path and on the
Triton path (interpreter, fp32)."""
import dataclasses

import pytest
import torch
import torch.nn as nn

from pyruntime import ops
from pyruntime.model.llama import Block, rotary_tables
from pyruntime.ops import wgrad
from pyruntime.ops.dispatch import unavailable_reason

from support.configs import TEST_MODEL

CFG = dataclasses.replace(TEST_MODEL, kernels="reference")


class CountBackward(torch.autograd.Function):
    """Identity that counts its backward calls: a marker on the activation path."""
    calls = 0

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        CountBackward.calls += 1
        return g


class Chunk(nn.Module):
    """Two decoder blocks (nn.Linear GEMMs, RMSNorm weights), a marker between them, a biased
    nn.Linear used twice, and ops.linear / ops.swiglu_linear GEMMs on `backend`."""

    def __init__(self, backend="reference"):
        super().__init__()
        self.backend = backend
        self.blocks = nn.ModuleList([Block(CFG), Block(CFG)])
        self.proj = nn.Linear(CFG.dim, CFG.dim)
        self.w = nn.Parameter(torch.randn(CFG.dim, CFG.dim) / CFG.dim ** 0.5)
        self.b = nn.Parameter(torch.randn(CFG.dim) / 10)
        self.wg = nn.Parameter(torch.randn(CFG.dim, CFG.dim) / CFG.dim ** 0.5)
        self.wu = nn.Parameter(torch.randn(CFG.dim, CFG.dim) / CFG.dim ** 0.5)

    def forward(self, x):
        cos, sin = rotary_tables(x.shape[1], CFG.head_dim, CFG.rope_theta, x.device, x.dtype)
        x = CountBackward.apply(self.blocks[0](x, cos, sin))
        x = self.blocks[1](x, cos, sin)
        x = self.proj(torch.tanh(self.proj(x))) + x
        x = ops.linear(x, self.w, self.b, activation="gelu", backend=self.backend)
        return ops.swiglu_linear(x, self.wg, self.wu, backend=self.backend)


def grads(chunk):
    return {n: p.grad.clone() for n, p in chunk.named_parameters()}


def one_backward(chunk, xs, gs):
    for p in chunk.parameters():
        p.grad = None
    dxs = []
    for x, g in zip(xs, gs):
        x = x.clone().requires_grad_()
        chunk(x).backward(g)
        dxs.append(x.grad)
    return dxs, grads(chunk)


def split_backward(chunk, xs, gs):
    """Every micro-batch's B first, then their W's (a zero-bubble rank may order them so)."""
    for p in chunk.parameters():
        p.grad = None
    dxs, stores = [], []
    with wgrad.deferrable_forward():
        for x, g in zip(xs, gs):
            x = x.clone().requires_grad_()
            store = wgrad.WeightGradStore()
            with wgrad.deferring(store):
                chunk(x).backward(g)
            dxs.append(x.grad)
            stores.append(store)
    deferred = {n for n, p in chunk.named_parameters() if p.grad is None}
    CountBackward.calls = 0
    for store in stores:
        store.flush()
    assert CountBackward.calls == 0  # W walks no graph
    return dxs, grads(chunk), deferred, stores


def check(backend):
    torch.manual_seed(0)
    chunk = wgrad_chunk(backend)
    xs = [torch.randn(3, 7, CFG.dim) for _ in range(2)]
    gs = [torch.randn(3, 7, CFG.dim) for _ in range(2)]
    dx_ref, grads_ref = one_backward(chunk, xs, gs)
    seen = []
    hooks = [p.register_post_accumulate_grad_hook(lambda p: seen.append(id(p))) for p in chunk.parameters()]
    dxs, got, deferred, stores = split_backward(chunk, xs, gs)
    for h in hooks:
        h.remove()
    for dx, want in zip(dxs, dx_ref):
        torch.testing.assert_close(dx, want, rtol=1e-5, atol=1e-6)
    assert got.keys() == grads_ref.keys()
    for name in got:
        torch.testing.assert_close(got[name], grads_ref[name], rtol=1e-5, atol=1e-6, msg=name)
    # every GEMM weight waited for W; norms and biases had theirs in B
    gemm = {n for n, p in chunk.named_parameters() if p.dim() == 2}
    assert deferred == gemm
    assert set(seen) == {id(p) for p in chunk.parameters()}


def wgrad_chunk(backend):
    chunk = Chunk(backend)
    wgrad.make_linears_deferrable(chunk)
    return chunk


def test_reference_gemms_defer_and_w_matches_one_backward():
    check("reference")


@pytest.mark.skipif(unavailable_reason("triton", torch.device("cpu"), explicit=True) is not None,
                    reason="no Triton (interpreter)")
def test_triton_gemms_defer_and_w_matches_one_backward():
    check("triton")


def test_outside_deferring_every_gemm_computes_its_weight_gradient():
    torch.manual_seed(1)
    chunk = wgrad_chunk("reference")
    x = torch.randn(2, 5, CFG.dim)
    _, want = one_backward(chunk, [x], [torch.ones(2, 5, CFG.dim)])
    with wgrad.deferrable_forward():  # deferrable graph, ordinary backward: nothing waits
        _, got = one_backward(chunk, [x], [torch.ones(2, 5, CFG.dim)])
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-6, atol=1e-7, msg=name)


def test_store_names_the_parameters_it_holds_through_autocast_copies():
    w = nn.Parameter(torch.randn(4, 3))
    x = torch.randn(5, 3)
    store = wgrad.WeightGradStore()
    with wgrad.deferrable_forward(), torch.autocast("cpu", dtype=torch.bfloat16):
        y = wgrad.deferrable_linear(x, w)
    assert y.dtype == torch.bfloat16
    with wgrad.deferring(store):
        y.float().sum().backward()
    assert w.grad is None and store.params() == {id(w)}
    store.flush()
    assert w.grad is not None and w.grad.dtype == torch.float32
    torch.testing.assert_close(w.grad, torch.ones(5, 4).t() @ x, rtol=2e-2, atol=2e-2)
