"""Rank functions of the tensor-parallel tests (spawned ranks import them from here).

Layer checks: every rank seeds the same RNG, builds the same full (unsharded) reference,
runs its shard of the tensor-parallel layer, and compares with its slice of the reference.
A failing comparison raises on the rank; multiproc.run_world re-raises it with the rank's
traceback. shard_report checks a real Trainer's model
(support/layouts.py's tp layouts).
"""
from __future__ import annotations

import logging

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from pyruntime.comm.overlap import all_gather_gemm, gemm_reduce_scatter
from pyruntime.comm.tp import all_gather_sequence, reduce_scatter_sequence
from pyruntime.mesh import ParallelDims
from pyruntime.model.llama import RMSNorm
from pyruntime.parallel.tensor import (ColumnParallelLinear, ColumnParallelSwiGLU, RowParallelLinear,
                                       SequenceParallelRMSNorm, VocabParallelEmbedding, full_state_dict,
                                       vocab_parallel_cross_entropy)
from pyruntime.parallel.parallelize import build_model

B, T = 3, 8  # batch 3 (odd); sequence 8 divides by tp 2 and 4
IN, OUT, VOCAB, HIDDEN = 13, 11, 11, 12  # 11 does not divide by 2 or 4: padded shards


def close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """Within 1e-5 relative to the reference's scale (fp32, different summation orders)."""
    scale = expected.abs().max().item() or 1.0
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * scale, msg=lambda m: f"{what}: {m}")


def rows(full: torch.Tensor, group, dim: int = 0) -> torch.Tensor:
    """This rank's block along dim of full zero-padded to a multiple of the tp size."""
    world, rank = group.size(), group.rank()
    per = -(-full.shape[dim] // world)
    padded = F.pad(full.movedim(dim, -1), (0, per * world - full.shape[dim])).movedim(-1, dim)
    return padded.narrow(dim, rank * per, per)


def seq(full: torch.Tensor, group) -> torch.Tensor:
    return rows(full, group, dim=1)


def leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_()


def tp_groups(world_size: int) -> dict[int, dist.ProcessGroup]:
    """This rank's tp group for tp = 2 (pairs of ranks) and tp = world_size."""
    groups = {world_size: dist.new_group(list(range(world_size)))}
    rank = dist.get_rank()
    for start in range(0, world_size, 2):
        g = dist.new_group([start, start + 1])
        if rank in (start, start + 1):
            groups[2] = g
    return groups


def check_column(group, *, sequence_parallel=False, overlap=False, gather_output=False, kernels="auto") -> None:
    torch.manual_seed(1)
    ref = nn.Linear(IN, OUT, bias=True)
    x, dy = torch.randn(B, T, IN), torch.randn(B, T, OUT)
    xr = leaf(x)
    F.gelu(ref(xr), approximate="tanh").backward(dy)
    layer = ColumnParallelLinear.from_linear(ref, group, activation="gelu", gather_output=gather_output,
                                             sequence_parallel=sequence_parallel, overlap=overlap, overlap_chunks=4,
                                             kernels=kernels)
    xs = leaf(seq(x, group) if sequence_parallel else x)
    y = layer(xs)
    expected = F.gelu(ref(x), approximate="tanh")
    if not gather_output:
        expected, dy = rows(expected, group, -1), rows(dy, group, -1)
    close(y, expected.detach(), "column output")
    y.backward(dy)
    close(xs.grad, seq(xr.grad, group) if sequence_parallel else xr.grad, "column input grad")
    close(layer.weight.grad, rows(ref.weight.grad, group), "column weight grad")
    close(layer.bias.grad, rows(ref.bias.grad, group), "column bias grad")


def check_row(group, *, sequence_parallel=False, overlap=False, input_is_parallel=True, kernels="auto") -> None:
    torch.manual_seed(2)
    ref = nn.Linear(HIDDEN, OUT, bias=True)
    x, dy = torch.randn(B, T, HIDDEN), torch.randn(B, T, OUT)
    xr = leaf(x)
    ref(xr).backward(dy)
    layer = RowParallelLinear.from_linear(ref, group, input_is_parallel=input_is_parallel, kernels=kernels,
                                          sequence_parallel=sequence_parallel, overlap=overlap, overlap_chunks=4)
    xs = leaf(rows(x, group, -1) if input_is_parallel else x)
    y = layer(xs)
    expected = ref(x).detach()
    if sequence_parallel:
        expected, dy = seq(expected, group), seq(dy, group)
    close(y, expected, "row output")
    y.backward(dy)
    close(xs.grad, rows(xr.grad, group, -1) if input_is_parallel else xr.grad, "row input grad")
    close(layer.weight.grad, rows(ref.weight.grad, group, 1), "row weight grad")
    close(layer.bias.grad, ref.bias.grad, "row bias grad")


def check_swiglu(group, *, sequence_parallel=False, overlap=False, kernels="auto") -> None:
    torch.manual_seed(3)
    gate, up = nn.Linear(IN, HIDDEN, bias=False), nn.Linear(IN, HIDDEN, bias=False)
    x, dy = torch.randn(B, T, IN), torch.randn(B, T, HIDDEN)
    xr = leaf(x)
    (F.silu(gate(xr)) * up(xr)).backward(dy)
    layer = ColumnParallelSwiGLU.from_linears([gate, up], group, sequence_parallel=sequence_parallel,
                                              overlap=overlap, overlap_chunks=3, kernels=kernels)
    xs = leaf(seq(x, group) if sequence_parallel else x)
    y = layer(xs)
    close(y, rows(F.silu(gate(x)) * up(x), group, -1).detach(), "swiglu output")
    y.backward(rows(dy, group, -1))
    close(xs.grad, seq(xr.grad, group) if sequence_parallel else xr.grad, "swiglu input grad")
    g_grad, u_grad = layer.weight.grad.chunk(2)
    close(g_grad, rows(gate.weight.grad, group), "swiglu gate grad")
    close(u_grad, rows(up.weight.grad, group), "swiglu up grad")


def check_embedding(group, *, sequence_parallel=False) -> None:
    torch.manual_seed(4)
    ref = nn.Embedding(VOCAB, IN)
    tokens, dy = torch.randint(0, VOCAB, (B, T)), torch.randn(B, T, IN)
    ref(tokens).backward(dy)
    layer = VocabParallelEmbedding.from_embedding(ref, group, sequence_parallel=sequence_parallel)
    y = layer(tokens)
    expected = ref(tokens).detach()
    if sequence_parallel:
        expected, dy = seq(expected, group), seq(dy, group)
    close(y, expected, "embedding output")
    y.backward(dy)
    close(layer.weight.grad, rows(ref.weight.grad, group), "embedding weight grad")


def check_cross_entropy(group, backend="auto") -> None:
    torch.manual_seed(5)
    logits, targets = torch.randn(B, T, VOCAB) * 3, torch.randint(0, VOCAB, (B, T))
    full = leaf(logits)
    F.cross_entropy(full.flatten(0, 1), targets.flatten()).backward()
    shard = rows(logits, group, -1).clone()
    if shard.shape[-1] * (group.rank() + 1) > VOCAB:  # padding columns: huge, must be ignored
        shard[..., max(0, VOCAB - shard.shape[-1] * group.rank()):] = 1e4
    shard = leaf(shard)
    loss = vocab_parallel_cross_entropy(shard, targets, group, VOCAB, backend=backend)
    close(loss, F.cross_entropy(logits.flatten(0, 1), targets.flatten()), "cross-entropy loss")
    loss.backward()
    close(shard.grad, rows(full.grad, group, -1), "cross-entropy grad")


def check_sp_norm(group) -> None:
    torch.manual_seed(6)
    ref = RMSNorm(IN, 1e-5, "reference")
    with torch.no_grad():
        ref.weight.copy_(torch.randn(IN))
    x, dy = torch.randn(B, T, IN), torch.randn(B, T, IN)
    ref(x).backward(dy)
    layer = SequenceParallelRMSNorm.from_norm(ref, group)
    layer(seq(x, group)).backward(seq(dy, group))
    close(layer.weight.grad, ref.weight.grad, "sequence-parallel norm weight grad")


def _run(op, x, w):
    """op(x, w)'s output and its input and weight gradients for an all-ones output gradient."""
    xs = leaf(x)
    w.grad = None
    y = op(xs, w)
    y.backward(torch.ones_like(y))
    return y.detach(), xs.grad, w.grad.clone()


def check_overlap_equals_plain(group) -> None:
    """The chunked, overlapped ops against the plain collective + GEMM: outputs and gradients."""
    torch.manual_seed(7)
    w = torch.randn(OUT, IN, requires_grad=True)
    gemm = lambda x, weight: x @ weight.t()  # noqa: E731
    cases = [  # (name, input, overlapped op, plain op); 4 and 5 chunks: uneven chunks of B * T/tp rows
        ("all_gather_gemm", torch.randn(B, T // group.size(), IN),
         lambda x, w: all_gather_gemm(x, gemm, (w,), group, 4),
         lambda x, w: gemm(all_gather_sequence(x, group), w)),
        ("gemm_reduce_scatter", torch.randn(B, T, IN),
         lambda x, w: gemm_reduce_scatter(x, gemm, (w,), group, 5),
         lambda x, w: reduce_scatter_sequence(gemm(x, w), group)),
    ]
    for name, x, overlapped, plain in cases:
        for a, b, what in zip(_run(overlapped, x, w), _run(plain, x, w), ("output", "input grad", "weight grad")):
            close(a, b, f"{name} {what}")


def check_overlap_frees_chunk_outputs(group) -> None:
    """After the forward, the chunk graphs kept for the backward hold no GEMM outputs."""
    x = leaf(torch.randn(B, T, IN))
    w = torch.randn(OUT, IN, requires_grad=True)
    y = gemm_reduce_scatter(x, lambda rows, weight: rows @ weight.t(), (w,), group, 3)
    kept = [out.untyped_storage().nbytes() for _, out in y.grad_fn.graphs]
    assert len(kept) == 3 and max(kept) <= 4, kept  # an expanded fp32 scalar each
    y.sum().backward()
    assert y.grad_fn.graphs is None and x.grad is not None


def layer_checks(rank: int, world_size: int) -> list[str]:
    """Worker: every layer check for tp = 2 and tp = world_size; returns what it checked."""
    groups = tp_groups(world_size)
    check_overlap_refused_once(groups[2])
    check_sequence_must_divide(groups[2])
    done = ["overlap refused once, indivisible sequence refused"]
    for tp, group in sorted(groups.items()):
        for sp, overlap in ((False, False), (True, False), (True, True)):
            check_column(group, sequence_parallel=sp, overlap=overlap)
            check_row(group, sequence_parallel=sp, overlap=overlap)
            check_swiglu(group, sequence_parallel=sp, overlap=overlap)
            check_embedding(group, sequence_parallel=sp)
            done.append(f"tp{tp} sp={sp} overlap={overlap}")
        check_column(group, gather_output=True)
        check_row(group, input_is_parallel=False)
        check_cross_entropy(group)
        check_sp_norm(group)
        check_overlap_equals_plain(group)
        check_overlap_frees_chunk_outputs(group)
        done.append(f"tp{tp} gather/scatter/ce/norm/chunks")
    # the Triton ops (interpreted on CPU) under the overlapped layers and the CE Function
    kw = {"sequence_parallel": True, "overlap": True, "kernels": "triton"}
    check_column(groups[2], **kw)
    check_row(groups[2], **kw)
    check_swiglu(groups[2], **kw)
    check_cross_entropy(groups[2], backend="triton")
    done.append("tp2 triton kernels")
    check_bf16_autocast_model(groups[2])
    done.append("tp2 sp overlap model under bf16 autocast")
    return done


def check_overlap_refused_once(group) -> None:
    """overlap without sequence parallelism: refused, with exactly one logged warning."""
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    log = logging.getLogger("pyruntime.comm")
    log.addHandler(handler)
    try:
        layers = [ColumnParallelLinear(IN, OUT, group, overlap=True) for _ in range(2)]
        layers.append(RowParallelLinear(HIDDEN, OUT, group, overlap=True))
    finally:
        log.removeHandler(handler)
    assert not any(layer.overlap for layer in layers)
    assert len(records) == 1 and records[0].levelno == logging.WARNING, records
    assert "WITHOUT overlap" in records[0].getMessage()


def check_sequence_must_divide(group) -> None:
    """Under sequence parallelism a sequence that does not divide by tp fails on every rank
    with one line, before any collective (so no rank is left waiting)."""
    layer = VocabParallelEmbedding(VOCAB, IN, group, sequence_parallel=True)
    try:
        layer(torch.zeros(B, T - 1, dtype=torch.long))
    except ValueError as e:
        assert str(e) == f"sequence parallelism: sequence length {T - 1} is not divisible by tp {group.size()}"
    else:
        raise AssertionError("an indivisible sequence was accepted")


def check_full_weights(model, reference, dims) -> None:
    """Same seed, same full weights: the shards gathered back equal the unsharded model."""
    full = full_state_dict(model, dims)
    expected = reference.state_dict()
    assert sorted(full) == sorted(expected), sorted(set(full) ^ set(expected))
    for name, t in expected.items():
        assert torch.equal(full[name], t), name


def shard_report(trainer) -> list[int]:
    """Run.inspect for the tp layouts: the shards gathered back must equal the unsharded model
    built from the same seed; returns [local parameter count, sequence shards] (proof that
    the model was sharded)."""
    check_full_weights(trainer.model, build_model(trainer.cfg, torch.device("cpu")), trainer.dims)
    return [sum(q.numel() for q in trainer.model.parameters()), trainer.model.sequence_shards]


def check_bf16_autocast_model(group) -> None:
    """Mixed precision as on CUDA (bf16 autocast over fp32 weights), run on CPU: a model under
    apply_tp with sequence parallelism and overlapped GEMMs (bf16 activations through every
    tp collective, vocab padded) against the unsharded model under the same autocast. The
    loss and every weight gradient (fp32) agree to bf16 rounding."""
    from pyruntime.config import ModelConfig
    from pyruntime.model import Transformer, init_weights
    from pyruntime.parallel.tensor import apply_tp
    from pyruntime.parallel.tensor.unshard import full_tensors

    cfg = ModelConfig(vocab_size=101, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96)
    reference = Transformer(cfg)
    init_weights(reference, cfg, seed=0)
    model = Transformer(cfg)
    model.load_state_dict(reference.state_dict())
    apply_tp(model, group, sequence_parallel=True, overlap=True)
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randint(0, 101, (2, 16), generator=gen), torch.randint(0, 101, (2, 16), generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(x)
        assert logits.dtype == torch.bfloat16, logits.dtype
        loss = vocab_parallel_cross_entropy(logits, y, group, cfg.vocab_size)
        want = F.cross_entropy(reference(x).float().flatten(0, 1), y.flatten())
    loss.backward()
    want.backward()
    torch.testing.assert_close(loss, want, rtol=2e-3, atol=0)  # measured 4e-5
    grads = full_tensors(model, group, {n: p.grad for n, p in model.named_parameters()})
    for name, p in reference.named_parameters():
        assert grads[name].dtype == torch.float32, (name, grads[name].dtype)
        error = (grads[name] - p.grad).norm() / p.grad.norm()
        assert error < 3e-2, (name, error.item())  # measured <= 1e-2 (bf16 keeps 8 bits)
