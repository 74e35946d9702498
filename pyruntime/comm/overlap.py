"""Chunked communication/GEMM overlap for sequence-parallel tensor parallelism.

    all_gather_gemm(x, gemm, params, group)   == gemm(all_gather_sequence(x, group), *params)
    gemm_reduce_scatter(x, gemm, params, group) == reduce_scatter_sequence(gemm(x, *params), group)

`gemm(rows, *params)` is any row-wise function of a 2-D (rows, K) input (a GEMM, a GEMM with a
fused activation, the fused SwiGLU GEMM): output row i depends on input row i alone. That is
what lets the rows be cut into chunks: the collective of one chunk runs while another chunk
is multiplied.

- all-gather + GEMM, forward: the all-gather of chunk j+1 is in flight while chunk j is
  multiplied; backward: the reduce-scatter of chunk j's input gradient is in flight while
  chunk j+1's gradient is computed.
- GEMM + reduce-scatter, forward: chunk j's reduce-scatter runs while chunk j+1 is
  multiplied; backward: the all-gather of chunk j+1's output gradient is in flight while
  chunk j's gradient is computed.

The collectives are issued with async_op=True: gloo runs them on its worker threads (CPU),
nccl on its own CUDA stream, so the GEMMs on the compute stream overlap with them.

Chunks are row ranges of this rank's (B * T/tp) shard rows, so every send is a contiguous
slice. Per chunk, the forward records the GEMM's autograd graph on a detached input and the
backward differentiates that graph (torch.autograd.grad), so the GEMM keeps whatever
backward its op defines (Triton or reference). Double backward is not supported.
"""
from __future__ import annotations

import functools
import logging
from typing import Callable, Sequence

import torch
import torch.distributed as dist

from pyruntime.comm.raw import all_gather_into, reduce_scatter_into

Gemm = Callable[..., torch.Tensor]
log = logging.getLogger("pyruntime.comm")


@functools.lru_cache(maxsize=None)
def _warn_once(message: str) -> None:
    log.warning(message)


def refuse_overlap(reason: str) -> bool:
    """Overlap was requested but cannot run here: one logged warning, and False."""
    _warn_once(f"tp overlap is not possible {reason}: tensor-parallel layers run WITHOUT overlap")
    return False


def overlap_supported(requested: bool, sequence_parallel: bool) -> bool:
    """The overlap setting a tensor-parallel layer can honour. Overlap hides the sequence
    all-gather / reduce-scatter of sequence parallelism; without it there are only
    all-reduces on the critical path, so a request is refused with one logged warning."""
    if requested and not sequence_parallel:
        _warn_once("tp overlap needs sequence parallelism (it overlaps the sequence all-gather and "
                   "reduce-scatter with the GEMMs): tensor-parallel layers run WITHOUT overlap")
        return False
    return requested


def chunk_sizes(rows: int, chunks: int) -> list[int]:
    """`chunks` near-equal row counts summing to rows (fewer when there are fewer rows)."""
    n = max(1, min(chunks, rows))
    base, extra = divmod(rows, n)
    return [base + (i < extra) for i in range(n)]


def _graphs(ctx) -> list:
    if ctx.graphs is None:
        raise RuntimeError("overlapped tp GEMM: backward ran twice (retain_graph is not supported)")
    return ctx.graphs


def _differentiate(graph, params: Sequence[torch.Tensor], grad_out: torch.Tensor):
    """(d input, [d param or None]) of one chunk's recorded GEMM for the output gradient."""
    leaf, out = graph
    wanted = [p for p in params if p.requires_grad]
    grads = torch.autograd.grad(out, [leaf, *wanted], grad_out)
    it = iter(grads[1:])
    return grads[0], [next(it) if p.requires_grad else None for p in params]


def _accumulate(total: list | None, grads: list) -> list:
    if total is None:
        return list(grads)
    return [t if g is None else t + g for t, g in zip(total, grads)]


def _run_gemm(gemm: Gemm, rows: torch.Tensor, params, keep_graph: bool):
    """gemm(rows, *params); with keep_graph, its graph is recorded on a detached input."""
    if not keep_graph:
        return None, gemm(rows, *params)
    leaf = rows.detach().requires_grad_()
    with torch.enable_grad():
        out = gemm(leaf, *params)
    return (leaf, out), out.detach()


def _release_output(graph) -> None:
    """Free a recorded GEMM output once it has been copied out or sent: the backward needs
    only its grad_fn, and holding it would keep a second copy of every chunk's output (the
    whole pre-reduce-scatter output of a row-parallel GEMM) until the backward. The tensor
    keeps its shape (an expanded scalar) for autograd's shape checks; an op that saved its
    own output holds its own reference, so nothing it needs is lost."""
    if graph is not None:
        out = graph[1]
        out.data = out.new_empty(()).expand(out.shape)


class _AllGatherGemm(torch.autograd.Function):
    """Forward: y = gemm(all-gather along the sequence of x), chunk j+1's all-gather in flight
    while chunk j is multiplied. Backward: the input gradient reduce-scattered along the
    sequence chunk by chunk, each reduce-scatter in flight while the next chunk's gradient
    is computed; parameter gradients summed over chunks."""

    @staticmethod
    def forward(ctx, x, gemm, group, chunks, keep_graph, *params):
        world, (B, t) = group.size(), x.shape[:2]
        rows = x.reshape(B * t, x.shape[-1])  # this rank's rows, batch-major
        sizes = chunk_sizes(B * t, chunks)
        pieces = [p.contiguous() for p in rows.split(sizes)]
        bufs = [rows.new_empty((world * n, rows.shape[1])) for n in sizes]
        pending = all_gather_into(bufs[0], pieces[0], group, async_op=True)
        graphs, out, start = [], None, 0
        for j, n in enumerate(sizes):
            pending.wait()
            if j + 1 < len(sizes):  # chunk j+1 travels while chunk j is multiplied
                pending = all_gather_into(bufs[j + 1], pieces[j + 1], group, async_op=True)
            graph, y = _run_gemm(gemm, bufs[j], params, keep_graph)  # (world * n, N)
            if out is None:
                out = y.new_empty((world, B * t, y.shape[-1]))  # rank-major rows
            out[:, start:start + n] = y.view(world, n, -1)
            _release_output(graph)
            graphs.append(graph)
            start += n
        ctx.graphs, ctx.group, ctx.sizes, ctx.x_meta = graphs, group, sizes, (x.shape, x.dtype)
        ctx.params = params
        # rank r's rows hold sequence positions [r t, (r + 1) t) of every sequence
        return out.view(world, B, t, -1).transpose(0, 1).reshape(B, world * t, -1)

    @staticmethod
    def backward(ctx, grad):
        world, (shape, dtype) = ctx.group.size(), ctx.x_meta
        B, t = shape[:2]
        grad_rm = grad.reshape(B, world, t, -1).transpose(0, 1).reshape(world, B * t, -1)
        dx = torch.empty((B * t, shape[-1]), dtype=dtype, device=grad.device)
        works, dparams, start = [], None, 0
        for graph, n, dx_piece in zip(_graphs(ctx), ctx.sizes, dx.split(ctx.sizes)):
            gy = grad_rm[:, start:start + n].reshape(world * n, -1)
            gx, gp = _differentiate(graph, ctx.params, gy)
            # chunk j's input gradient is summed over ranks while chunk j+1's is computed
            works.append((reduce_scatter_into(dx_piece, gx, ctx.group, async_op=True), gx))
            dparams = _accumulate(dparams, gp)
            start += n
        for work, _ in works:  # the input of a collective in flight is kept alive until it ends
            work.wait()
        ctx.graphs = None  # free the chunk graphs now
        return (dx.view(shape), None, None, None, None, *dparams)


class _GemmReduceScatter(torch.autograd.Function):
    """Forward: y = reduce-scatter along the sequence of gemm(x), chunk j's reduce-scatter in
    flight while chunk j+1 is multiplied. Backward: the output gradient all-gathered along
    the sequence chunk by chunk, chunk j+1's all-gather in flight while chunk j's gradient is
    computed; parameter gradients summed over chunks."""

    @staticmethod
    def forward(ctx, x, gemm, group, chunks, keep_graph, *params):
        world, (B, T, K) = group.size(), x.shape
        if T % world:
            raise ValueError(f"sequence parallelism: sequence length {T} is not divisible by tp {world}")
        t = T // world
        # rows grouped by the rank that keeps them: rank r keeps positions [r t, (r + 1) t)
        x_rm = x.reshape(B, world, t, K).transpose(0, 1).reshape(world, B * t, K)
        sizes = chunk_sizes(B * t, chunks)
        graphs, works, out, start = [], [], None, 0
        for n in sizes:
            graph, y = _run_gemm(gemm, x_rm[:, start:start + n].reshape(world * n, K), params, keep_graph)
            if out is None:
                out = y.new_empty((B * t, y.shape[-1]))
            works.append((reduce_scatter_into(out[start:start + n], y, group, async_op=True), y))
            graphs.append(graph)
            start += n
        for work, _ in works:  # the input of a collective in flight is kept alive until it ends
            work.wait()
        for graph in graphs:
            _release_output(graph)
        ctx.graphs, ctx.group, ctx.sizes, ctx.x_meta, ctx.params = graphs, group, sizes, (x.shape, x.dtype), params
        return out.view(B, t, -1)

    @staticmethod
    def backward(ctx, grad):
        world, (shape, dtype) = ctx.group.size(), ctx.x_meta
        B, T, K = shape
        pieces = [p.contiguous() for p in grad.reshape(-1, grad.shape[-1]).split(ctx.sizes)]
        bufs = [grad.new_empty((world * n, grad.shape[-1])) for n in ctx.sizes]
        dx_rm = torch.empty((world, B * T // world, K), dtype=dtype, device=grad.device)
        pending = all_gather_into(bufs[0], pieces[0], ctx.group, async_op=True)
        dparams, start = None, 0
        for j, (graph, n) in enumerate(zip(_graphs(ctx), ctx.sizes)):
            pending.wait()
            if j + 1 < len(ctx.sizes):  # chunk j+1's gradient travels while chunk j's is computed
                pending = all_gather_into(bufs[j + 1], pieces[j + 1], ctx.group, async_op=True)
            gx, gp = _differentiate(graph, ctx.params, bufs[j])
            dx_rm[:, start:start + n] = gx.view(world, n, K)
            dparams = _accumulate(dparams, gp)
            start += n
        ctx.graphs = None  # free the chunk graphs now
        dx = dx_rm.view(world, B, T // world, K).transpose(0, 1).reshape(shape)
        return (dx, None, None, None, None, *dparams)


def _keep_graph(x: torch.Tensor, params: Sequence[torch.Tensor]) -> bool:
    return torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params))


def all_gather_gemm(x: torch.Tensor, gemm: Gemm, params: Sequence[torch.Tensor],
                    group: dist.ProcessGroup, chunks: int = 4) -> torch.Tensor:
    """gemm(all_gather_sequence(x), *params) for a sequence shard x (B, T/tp, K) -> (B, T, N),
    with the all-gather cut into `chunks` and overlapped with the GEMM (module docstring)."""
    if group.size() == 1:
        return gemm(x, *params)
    return _AllGatherGemm.apply(x, gemm, group, chunks, _keep_graph(x, params), *params)


def gemm_reduce_scatter(x: torch.Tensor, gemm: Gemm, params: Sequence[torch.Tensor],
                        group: dist.ProcessGroup, chunks: int = 4) -> torch.Tensor:
    """reduce_scatter_sequence(gemm(x, *params)) for x (B, T, K) -> (B, T/tp, N), with the
    reduce-scatter cut into `chunks` and overlapped with the GEMM (module docstring)."""
    if group.size() == 1:
        return gemm(x, *params)
    return _GemmReduceScatter.apply(x, gemm, group, chunks, _keep_graph(x, params), *params)
