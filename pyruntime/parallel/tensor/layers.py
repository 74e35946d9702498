"""Tensor-parallel layers (Megatron style). Each takes its tp process group explicitly and
holds only its shard of the weights; the communication is pyruntime/comm/tp.py's Functions.

    ColumnParallelLinear     W's rows (output features) split: x (.., C) -> (.., out/tp)
    ColumnParallelSwiGLU     the same for [gate; up] stored as one weight: one GEMM, silu(g) * u
    RowParallelLinear        W's columns (input features) split: (.., in/tp) -> summed (.., out)
    VocabParallelEmbedding   the vocabulary split: masked lookup, then summed over tp
    SequenceParallelRMSNorm  an RMSNorm on sequence shards (its weight's gradient summed over tp)

With sequence_parallel=True the activations outside a column -> row pair are sequence shards
(B, T/tp, C): the column-parallel layer all-gathers the sequence before its GEMM, the
row-parallel layer and the embedding reduce-scatter it after theirs. overlap=True then cuts
those collectives into chunks that run while the GEMM runs (comm/overlap.py); without
sequence parallelism there is nothing to overlap, which is logged once as a warning.

Sizes that do not divide by tp: a column-parallel output (the LM head's vocabulary) and the
embedding's vocabulary are padded with zero rows on the last rank(s); gather_output strips
them, the vocab-parallel cross-entropy excludes them. Other split dims must divide by tp.
Initialisation is layout-invariant: every layer loads its slice of a full weight
(`load_full_`, `from_linear(s)`, `from_embedding`), so a seed gives the same full weights
whatever the tp size.

In a model of your own (README, "Use the fused tensor-parallel layers in your own model"):
`scatter_sequence` / `gather_sequence` enter and leave a sequence-parallel region with a
replicated (B, T, C) activation; a VocabParallelEmbedding(sequence_parallel=True) enters it
from the tokens by itself.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from pyruntime import ops
from pyruntime.comm.overlap import all_gather_gemm, gemm_reduce_scatter, overlap_supported
from pyruntime.comm.tp import (SEQ_DIM, all_gather_sequence, copy_to_tp_region, gather_from_tp_region,
                               reduce_from_tp_region, reduce_scatter_sequence, scatter_to_tp_region)
from pyruntime.model.llama import RMSNorm


def mark_tp_sharded(p: nn.Parameter) -> nn.Parameter:
    """Tag a parameter whose tp ranks hold different slices (see tp_replicas)."""
    p.tp_sharded = True
    return p


def tp_replicas(p: torch.Tensor, tp: int) -> int:
    """How many ranks of a (pp, tp) slice hold an identical copy of p: 1 for a shard, tp for a
    replicated parameter (norm weights, a row-parallel bias); times 2 for a tied embedding
    held by the first and the last pipeline stage (parallel/tied.py)."""
    return (1 if getattr(p, "tp_sharded", False) else tp) * getattr(p, "stage_copies", 1)


def shard_rows(full: torch.Tensor, group: dist.ProcessGroup, pad: bool = False) -> torch.Tensor:
    """This rank's block of full's rows; with pad, full is first zero-padded to a multiple of
    the tp size (the padding lands on the last rank(s))."""
    world, rank = group.size(), group.rank()
    if full.shape[0] % world and not pad:
        raise ValueError(f"{full.shape[0]} rows do not divide by tp {world}")
    per = -(-full.shape[0] // world)
    shard = full.new_zeros((per, *full.shape[1:]))
    valid = max(0, min(per, full.shape[0] - rank * per))
    shard[:valid] = full[rank * per:rank * per + valid]
    return shard


def scatter_sequence(x: torch.Tensor, tp_group: dist.ProcessGroup) -> torch.Tensor:
    """Enter a sequence-parallel region: replicated (B, T, C) -> this rank's (B, T/tp, C).
    T must divide by the tp size (a padded position would change attention's result)."""
    if x.dim() < 2 or x.shape[SEQ_DIM] % tp_group.size():
        raise ValueError(f"scatter_sequence: the sequence (dim {SEQ_DIM} of shape {tuple(x.shape)}) must "
                         f"divide by tp {tp_group.size()}")
    return scatter_to_tp_region(x, tp_group, SEQ_DIM)


def gather_sequence(x: torch.Tensor, tp_group: dist.ProcessGroup) -> torch.Tensor:
    """Leave a sequence-parallel region: (B, T/tp, C) shards -> the replicated (B, T, C)."""
    return gather_from_tp_region(x, tp_group, SEQ_DIM)


def _seeded_normal(shape, std: float, seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * std


class ColumnParallelLinear(nn.Module):
    """y = act(x W^T + b) with W's rows (output features) split over the tp ranks.

    Input: x (B, T, C), replicated over tp; with sequence_parallel, this rank's sequence
    shard (B, T/tp, C), all-gathered before the GEMM (chunked and overlapped with it when
    overlap=True). Output: this rank's features (B, T, ceil(out/tp)); with gather_output the
    full (B, T, out). A weight built from several linears (from_linears: fused q/k/v) holds
    [shard of each] so its local output is [piece 1 | piece 2 | ...] of this rank.
    """

    PIECES = 1  # full weights stacked in the local weight (ColumnParallelSwiGLU: gate and up)

    def __init__(self, in_features: int, out_features: int, tp_group: dist.ProcessGroup, *,
                 bias: bool = False, gather_output: bool = False, sequence_parallel: bool = False,
                 overlap: bool = False, overlap_chunks: int = 4, activation: str = "none",
                 kernels: str = "auto", device=None, dtype=None, initialize: bool = True):
        super().__init__()
        self.in_features, self.out_features, self.tp_group = in_features, out_features, tp_group
        self.gather_output, self.sequence_parallel = gather_output, sequence_parallel
        self.overlap = overlap_supported(overlap, sequence_parallel)
        self.overlap_chunks, self.activation, self.kernels = overlap_chunks, activation, kernels
        world = tp_group.size()
        if self.PIECES > 1 and out_features % world:
            raise ValueError(f"{type(self).__name__}: out_features {out_features} is not divisible by tp {world}")
        rows = self.PIECES * -(-out_features // world)
        self.weight = mark_tp_sharded(nn.Parameter(torch.empty(rows, in_features, device=device, dtype=dtype)))
        self.bias = (mark_tp_sharded(nn.Parameter(torch.zeros(rows, device=device, dtype=dtype)))
                     if bias else None)
        if initialize:  # False: the caller loads full weights next (no throw-away full init)
            self.reset_parameters()

    def reset_parameters(self, seed: int = 0, std: float = 0.02) -> None:
        """Normal(0, std) full weight from `seed` (the same whatever tp), zero bias."""
        full = _seeded_normal((self.PIECES * self.out_features, self.in_features), std, seed)
        self.load_full_(list(full.split(self.out_features)))

    @torch.no_grad()
    def load_full_(self, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor] | None = None) -> None:
        """Copy in this rank's slice of each full weight (out_i, in) (and bias (out_i,)),
        stacked in order. One weight may have any out size (zero-padded); several must each
        divide by tp."""
        pad = len(weights) == 1
        shard = torch.cat([shard_rows(w, self.tp_group, pad) for w in weights])
        if shard.shape != self.weight.shape:
            raise ValueError(f"{type(self).__name__}: full weights {[tuple(w.shape) for w in weights]} "
                             f"shard to {tuple(shard.shape)}, expected {tuple(self.weight.shape)}")
        self.weight.copy_(shard)
        if self.bias is not None:
            full_b = biases or [torch.zeros(w.shape[0]) for w in weights]
            self.bias.copy_(torch.cat([shard_rows(b, self.tp_group, pad) for b in full_b]))

    @classmethod
    def from_linears(cls, linears: Sequence[nn.Linear], tp_group: dist.ProcessGroup, **kw) -> "ColumnParallelLinear":
        """One column-parallel GEMM computing every linear of `linears` (they share the input)."""
        first = linears[0]
        if len(linears) > cls.PIECES and kw.get("gather_output"):
            raise ValueError("gather_output would interleave the pieces of a fused weight by rank")
        out = sum(lin.out_features for lin in linears) // cls.PIECES
        layer = cls(first.in_features, out, tp_group, device=first.weight.device, dtype=first.weight.dtype,
                    initialize=False, **({"bias": True} if first.bias is not None else {}), **kw)
        layer.load_full_([lin.weight for lin in linears],
                         [lin.bias for lin in linears] if first.bias is not None else None)
        return layer

    @classmethod
    def from_linear(cls, linear: nn.Linear, tp_group: dist.ProcessGroup, **kw) -> "ColumnParallelLinear":
        return cls.from_linears([linear], tp_group, **kw)

    def gemm(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """The local, row-wise computation on the (gathered) input."""
        return ops.linear(x, weight, bias, activation=self.activation, backend=self.kernels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        params = (self.weight,) if self.bias is None else (self.weight, self.bias)
        if self.sequence_parallel and self.overlap:
            y = all_gather_gemm(x, self.gemm, params, self.tp_group, self.overlap_chunks)
        elif self.sequence_parallel:
            y = self.gemm(all_gather_sequence(x, self.tp_group), *params)  # (B, T, out/tp)
        else:
            y = self.gemm(copy_to_tp_region(x, self.tp_group), *params)
        if self.gather_output:
            y = gather_from_tp_region(y, self.tp_group)[..., :self.out_features]
        return y

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, local={tuple(self.weight.shape)}, "
                f"sequence_parallel={self.sequence_parallel}, overlap={self.overlap}")


class ColumnParallelSwiGLU(ColumnParallelLinear):
    """h = silu(x Wg^T) * (x Wu^T) with Wg and Wu split by rows; this rank's weight is
    [Wg shard; Wu shard], so ONE GEMM (ops.swiglu_linear) makes this rank's gate and up
    columns and h's shard (B, T, hidden/tp) directly. hidden must divide by tp. No bias."""

    PIECES = 2

    def __init__(self, in_features: int, hidden_features: int, tp_group: dist.ProcessGroup, **kw):
        if kw.get("bias") or kw.get("activation", "none") != "none":
            raise ValueError("ColumnParallelSwiGLU has no bias and no separate activation")
        super().__init__(in_features, hidden_features, tp_group, **kw)

    def gemm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        w_gate, w_up = weight.chunk(2)
        return ops.swiglu_linear(x, w_gate, w_up, backend=self.kernels)


class RowParallelLinear(nn.Module):
    """y = x W^T + b with W's columns (input features) split over the tp ranks.

    Input: this rank's features (B, T, in/tp) (input_is_parallel) or the full input,
    split here. Output: the sum over ranks, (B, T, out) replicated, or, with
    sequence_parallel, reduce-scattered to this rank's sequence shard (B, T/tp, out)
    (chunked and overlapped with the GEMM when overlap=True). The bias is replicated and
    added once, after the sum.
    """

    def __init__(self, in_features: int, out_features: int, tp_group: dist.ProcessGroup, *,
                 bias: bool = False, input_is_parallel: bool = True, sequence_parallel: bool = False,
                 overlap: bool = False, overlap_chunks: int = 4, kernels: str = "auto", device=None, dtype=None,
                 initialize: bool = True):
        super().__init__()
        world = tp_group.size()
        if in_features % world:
            raise ValueError(f"RowParallelLinear: in_features {in_features} is not divisible by tp {world}")
        self.in_features, self.out_features, self.tp_group = in_features, out_features, tp_group
        self.input_is_parallel, self.sequence_parallel = input_is_parallel, sequence_parallel
        self.overlap = overlap_supported(overlap, sequence_parallel)
        self.overlap_chunks, self.kernels = overlap_chunks, kernels
        self.weight = mark_tp_sharded(nn.Parameter(
            torch.empty(out_features, in_features // world, device=device, dtype=dtype)))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None
        if initialize:  # False: the caller loads full weights next
            self.reset_parameters()

    def reset_parameters(self, seed: int = 0, std: float = 0.02) -> None:
        """Normal(0, std) full weight from `seed` (the same whatever tp), zero bias."""
        self.load_full_(_seeded_normal((self.out_features, self.in_features), std, seed))

    @torch.no_grad()
    def load_full_(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        """Copy in this rank's column block of the full weight (out, in), and the full bias."""
        self.weight.copy_(shard_rows(weight.t(), self.tp_group).t())
        if self.bias is not None:
            self.bias.copy_(bias if bias is not None else torch.zeros(self.out_features))

    @classmethod
    def from_linear(cls, linear: nn.Linear, tp_group: dist.ProcessGroup, **kw) -> "RowParallelLinear":
        has_bias = linear.bias is not None
        layer = cls(linear.in_features, linear.out_features, tp_group, bias=has_bias,
                    device=linear.weight.device, dtype=linear.weight.dtype, initialize=False, **kw)
        layer.load_full_(linear.weight, linear.bias)
        return layer

    def gemm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return ops.linear(x, weight, backend=self.kernels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel:
            x = scatter_to_tp_region(x, self.tp_group)
        if self.sequence_parallel and self.overlap:
            y = gemm_reduce_scatter(x, self.gemm, (self.weight,), self.tp_group, self.overlap_chunks)
        elif self.sequence_parallel:
            y = reduce_scatter_sequence(self.gemm(x, self.weight), self.tp_group)  # (B, T/tp, out)
        else:
            y = reduce_from_tp_region(self.gemm(x, self.weight), self.tp_group)
        if self.bias is None:
            return y
        # on a sequence shard each rank sees part of the bias's gradient: sum it over tp
        return y + (copy_to_tp_region(self.bias, self.tp_group) if self.sequence_parallel else self.bias)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, local={tuple(self.weight.shape)}, "
                f"sequence_parallel={self.sequence_parallel}, overlap={self.overlap}")


class VocabParallelEmbedding(nn.Module):
    """Embedding with the vocabulary split over tp (zero-padded to a multiple of tp).

    Each rank looks up the tokens of its vocabulary range (others get zero rows), then the
    partial embeddings are summed: all-reduced to (B, T, C), or, with sequence_parallel,
    reduce-scattered to this rank's sequence shard (B, T/tp, C).
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, tp_group: dist.ProcessGroup, *,
                 sequence_parallel: bool = False, device=None, dtype=None, initialize: bool = True):
        super().__init__()
        world, rank = tp_group.size(), tp_group.rank()
        self.num_embeddings, self.embedding_dim, self.tp_group = num_embeddings, embedding_dim, tp_group
        self.sequence_parallel = sequence_parallel
        per = -(-num_embeddings // world)
        self.vocab_start = rank * per
        self.vocab_valid = max(0, min(per, num_embeddings - self.vocab_start))
        self.weight = mark_tp_sharded(nn.Parameter(torch.empty(per, embedding_dim, device=device, dtype=dtype)))
        if initialize:  # False: the caller loads the full table next
            self.reset_parameters()

    def reset_parameters(self, seed: int = 0, std: float = 0.02) -> None:
        self.load_full_(_seeded_normal((self.num_embeddings, self.embedding_dim), std, seed))

    @torch.no_grad()
    def load_full_(self, weight: torch.Tensor) -> None:
        """Copy in this rank's rows of the full (num_embeddings, dim) table."""
        self.weight.copy_(shard_rows(weight, self.tp_group, pad=True))

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, tp_group: dist.ProcessGroup, **kw) -> "VocabParallelEmbedding":
        layer = cls(emb.num_embeddings, emb.embedding_dim, tp_group, device=emb.weight.device,
                    dtype=emb.weight.dtype, initialize=False, **kw)
        layer.load_full_(emb.weight)
        return layer

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        local = tokens - self.vocab_start
        outside = (local < 0) | (local >= self.vocab_valid)  # another rank's token
        h = F.embedding(local.masked_fill(outside, 0), self.weight)
        h = h.masked_fill(outside.unsqueeze(-1), 0.0)  # (B, T, C); zero also masks the gradient
        if self.sequence_parallel:
            return reduce_scatter_sequence(h, self.tp_group)
        return reduce_from_tp_region(h, self.tp_group)

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, rows=[{self.vocab_start}, "
                f"{self.vocab_start + self.vocab_valid}), sequence_parallel={self.sequence_parallel}")


class SequenceParallelRMSNorm(RMSNorm):
    """RMSNorm on a sequence shard (B, T/tp, C). The weight is replicated, but each rank's
    gradient comes from its own positions only: copy_to_tp_region sums it over tp in the
    backward, so every rank ends with the full-sequence gradient."""

    def __init__(self, dim: int, eps: float, kernels: str, tp_group: dist.ProcessGroup):
        super().__init__(dim, eps, kernels)
        self.tp_group = tp_group

    @classmethod
    @torch.no_grad()
    def from_norm(cls, norm: RMSNorm, tp_group: dist.ProcessGroup) -> "SequenceParallelRMSNorm":
        layer = cls(norm.weight.shape[0], norm.eps, norm.kernels, tp_group).to(norm.weight.device, norm.weight.dtype)
        layer.weight.copy_(norm.weight)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(x, copy_to_tp_region(self.weight, self.tp_group), self.eps, backend=self.kernels)
