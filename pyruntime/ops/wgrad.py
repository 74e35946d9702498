"""Deferred weight gradients, for zero-bubble pipeline schedules (ZB-H1): the backward of a
chunk is split into B (gradients of the activations: what the previous stage waits for) and
W (gradients of the weights: filler for the pipeline's idle time).

    with deferrable_forward():                 # the step: GEMMs record what W will need
        y = chunk(x)
        store = WeightGradStore()
        with deferring(store):                 # B: an ordinary backward, except that ...
            y.backward(dy)                     # ... each GEMM stashes (W, X, dY), no dW
        ...
        store.flush()                          # W: dW = dY^T X per GEMM, into W.grad

B is one autograd pass (the graph is freed after it, as after any backward); W walks no graph
at all: it runs the stashed weight-gradient GEMMs and accumulates through autograd
(torch.autograd.backward from each weight, so AccumulateGrad's post-accumulate hooks fire
and data parallelism's buckets / ZeRO units see W's gradients like any others; under
autocast the bf16 copy of an fp32 weight passes its gradient back through its cast). Only
the GEMM weights are deferred; the cheap ones (norms, biases) get their gradients in B.

The GEMMs that defer: ops.linear / ops.swiglu_linear (reference and Triton paths) and every
nn.Linear made deferrable with make_linears_deferrable. Outside deferrable_forward() the
reference path is plain F.linear; outside deferring() every GEMM computes dW at once.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from pyruntime.ops.dispatch import autocast_inputs

_state = threading.local()


def forward_is_deferrable() -> bool:
    return getattr(_state, "forward", False)


def current_store() -> "WeightGradStore | None":
    return getattr(_state, "store", None)


@contextlib.contextmanager
def deferrable_forward() -> Iterator[None]:
    """GEMMs run inside build graphs whose weight gradients can be deferred."""
    before = forward_is_deferrable()
    _state.forward = True
    try:
        yield
    finally:
        _state.forward = before


@contextlib.contextmanager
def deferring(store: "WeightGradStore") -> Iterator["WeightGradStore"]:
    """A backward run inside stashes deferrable GEMMs' weight gradients in `store`."""
    before = current_store()
    _state.store = store
    try:
        yield store
    finally:
        _state.store = before


class WeightGradStore:
    """The weight-gradient GEMMs one B deferred, until W (flush) runs them."""

    def __init__(self):
        self.entries: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def add(self, weight: torch.Tensor, x2d: torch.Tensor, dy2d: torch.Tensor) -> None:
        """weight: the GEMM's weight input (the parameter, or its autocast copy); its
        gradient will be dy2d^T @ x2d."""
        if weight.grad_fn is None:
            # The parameter itself, named by its AccumulateGrad (alive while B runs): a weight
            # saved through saved-tensor hooks (activation metering, selective recompute) is
            # unpacked as a new tensor aliasing it, whose link to that node is weak, so W
            # would accumulate into the alias once the graph is gone.
            weight = torch.autograd.graph.get_gradient_edge(weight).node.variable
        self.entries.append((weight, x2d, dy2d))

    def params(self) -> set[int]:
        """ids of the leaf parameters that W's gradients reach (through an autocast copy, a
        slice, ...): every leaf below each stashed weight in the autograd graph."""
        out, seen = set(), set()
        stack = []
        for w, _, _ in self.entries:
            if w.grad_fn is None:
                out.add(id(w))
            else:
                stack.append(w.grad_fn)
        while stack:
            node = stack.pop()
            if node is None or node in seen:
                continue
            seen.add(node)
            leaf = getattr(node, "variable", None)  # AccumulateGrad
            if leaf is not None:
                out.add(id(leaf))
            stack.extend(n for n, _ in node.next_functions)
        return out

    def flush(self) -> None:
        """W: every stashed dW, accumulated into the weights' .grad in one autograd call."""
        if not self.entries:
            return
        weights = [w for w, _, _ in self.entries]
        grads = [dy.t().mm(x).to(w.dtype) for w, x, dy in self.entries]
        self.entries = []
        torch.autograd.backward(weights, grads)


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


class DeferrableLinear(torch.autograd.Function):
    """y = x @ W^T + b whose dW can wait for W (the reference GEMM of the zero-bubble split)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        need_dx, need_dw, need_db = ctx.needs_input_grad
        dx = dy.matmul(weight) if need_dx else None
        dw, store = None, current_store()
        if need_dw and store is not None:  # zero bubble's B: stashed for W
            store.add(weight, _rows(x), _rows(dy))
        elif need_dw:
            dw = _rows(dy).t().mm(_rows(x))
        db = _rows(dy).sum(0) if need_db and ctx.has_bias else None
        return dx, dw, db


def deferrable_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear inside deferrable_forward() (DeferrableLinear), plain F.linear elsewhere.
    Under autocast the inputs are cast first, as F.linear would, so the stashed weight is
    the autocast copy and W's gradient flows back through the cast."""
    if not forward_is_deferrable() or not torch.is_grad_enabled():
        return F.linear(x, weight, bias)
    return DeferrableLinear.apply(*autocast_inputs(x, weight, bias))


def _linear_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return deferrable_linear(x, self.weight, self.bias)


def make_linears_deferrable(model: nn.Module) -> int:
    """Route every plain nn.Linear of `model` through deferrable_linear (a no-op outside
    deferrable_forward()); returns how many."""
    n = 0
    for module in model.modules():
        if type(module) is nn.Linear:
            module.forward = _linear_forward.__get__(module)
            n += 1
    return n
