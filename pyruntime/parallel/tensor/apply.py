"""apply_tp: turn the unmodified reference model (pyruntime/model/llama.py) into its
tensor-parallel version, in place, on every rank of the tp group.

    layers.N.self_attn   -> ParallelAttention: q, k and v in ONE column-parallel GEMM
                            (qkv_proj = [q; k; v] shards, split by heads: query and KV heads
                            each divide by tp), o_proj row-parallel
    layers.N.mlp         -> ParallelMLP: gate and up in ONE column-parallel SwiGLU GEMM
                            (gate_up_proj = [gate; up] shards), down_proj row-parallel
    embed_tokens         -> VocabParallelEmbedding
    lm_head              -> ColumnParallelLinear: vocab-parallel logits (B, T, V_padded / tp),
                            for cross_entropy.vocab_parallel_cross_entropy
    norms                -> unchanged (replicated), or SequenceParallelRMSNorm under
                            sequence parallelism (then hidden states are (B, T/tp, C))

Every sharded weight is sliced from the already-initialised full weight, so the seed alone
fixes the full weights, whatever the tp size. Parameter names stay those of the reference
except the two fused weights (qkv_proj, gate_up_proj), whose local layout is the
concatenation of this rank's shard of each original weight; unshard.full_state_dict gathers
everything back under the reference names.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
import torch.nn as nn

from pyruntime import ops
from pyruntime.comm.overlap import overlap_supported
from pyruntime.mesh import ParallelDims
from pyruntime.model.llama import MLP, Attention, Transformer, causal_attention
from pyruntime.parallel.tensor.layers import (ColumnParallelLinear, ColumnParallelSwiGLU, RowParallelLinear,
                                              SequenceParallelRMSNorm, VocabParallelEmbedding)


@dataclasses.dataclass(frozen=True)
class TPOptions:
    """How the tp layers communicate (see layers.py)."""

    sequence_parallel: bool = False
    overlap: bool = False
    overlap_chunks: int = 4
    kernels: str = "auto"

    def layer_kwargs(self) -> dict:
        return {"sequence_parallel": self.sequence_parallel, "overlap": self.overlap,
                "overlap_chunks": self.overlap_chunks, "kernels": self.kernels}


class ParallelAttention(nn.Module):
    """This rank's attention heads: a fused column-parallel q/k/v GEMM, the reference
    attention math on the local heads (model.llama.causal_attention), a row-parallel output
    projection. Under sequence parallelism the input and output are sequence shards; the
    attention itself always sees whole sequences."""

    def __init__(self, attn: Attention, tp_group: dist.ProcessGroup, opts: TPOptions):
        super().__init__()
        world = tp_group.size()
        projections = (attn.q_proj, attn.k_proj, attn.v_proj)
        self.head_dim, self.window = attn.head_dim, attn.window
        self.split_sizes = [p.out_features // world for p in projections]  # local q, k, v widths
        self.qkv_proj = ColumnParallelLinear.from_linears(projections, tp_group, **opts.layer_kwargs())
        self.o_proj = RowParallelLinear.from_linear(attn.o_proj, tp_group, **opts.layer_kwargs())

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv_proj(x)  # (B, T, (Hq + 2 Hkv) hd / tp): whole sequences even under SP
        B, T = qkv.shape[:2]
        q, k, v = (t.view(B, T, -1, self.head_dim).transpose(1, 2) for t in qkv.split(self.split_sizes, -1))
        return self.o_proj(causal_attention(q, k, v, cos, sin, self.window))


class ParallelMLP(nn.Module):
    """SwiGLU MLP on this rank's hidden units: down(silu(gate(x)) * up(x)) with gate and up
    made by one column-parallel GEMM and down row-parallel. With biases (mlp_bias) the fused
    GEMM is a plain column-parallel one (the SwiGLU GEMM has no bias) and ops.swiglu follows."""

    def __init__(self, mlp: MLP, tp_group: dist.ProcessGroup, opts: TPOptions):
        super().__init__()
        kw = opts.layer_kwargs()
        self.biased, self.kernels = mlp.gate_proj.bias is not None, opts.kernels
        fused = ColumnParallelLinear if self.biased else ColumnParallelSwiGLU
        self.gate_up_proj = fused.from_linears([mlp.gate_proj, mlp.up_proj], tp_group, **kw)
        self.down_proj = RowParallelLinear.from_linear(mlp.down_proj, tp_group, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.gate_up_proj(x)
        if self.biased:  # local [gate shard | up shard]
            gate, up = h.chunk(2, dim=-1)
            h = ops.swiglu(gate, up, backend=self.kernels)
        return self.down_proj(h)


def tp_group_of(dims_or_tp_group: ParallelDims | dist.ProcessGroup) -> dist.ProcessGroup:
    """The tp group itself, or the one a ParallelDims owns."""
    if isinstance(dims_or_tp_group, ParallelDims):
        return dims_or_tp_group.group("tp")
    return dims_or_tp_group


def apply_tp(model: Transformer, dims_or_tp_group: ParallelDims | dist.ProcessGroup, sequence_parallel: bool = False,
             overlap: bool = False, overlap_chunks: int = 4) -> Transformer:
    """Shard `model` (full weights, as built and initialised) over the tp group, in place.

    The model keeps taking tokens (B, T) and returns this rank's vocabulary shard of the
    logits (B, T, V_padded / tp): pair it with vocab_parallel_cross_entropy. A pipeline
    stage without embed_tokens / lm_head takes and returns hidden states (sequence shards
    under sequence parallelism). overlap without sequence_parallel is refused with one
    logged warning (there is no sequence collective to overlap)."""
    group = tp_group_of(dims_or_tp_group)
    from pyruntime.parallel.validate import check_tp_divides  # the tp rules live there, with the others

    check_tp_divides(model.cfg, group.size())
    opts = TPOptions(sequence_parallel=sequence_parallel, overlap=overlap_supported(overlap, sequence_parallel),
                     overlap_chunks=overlap_chunks, kernels=model.cfg.kernels)
    for block in model.layers.values():
        block.self_attn = ParallelAttention(block.self_attn, group, opts)
        block.mlp = ParallelMLP(block.mlp, group, opts)
        if sequence_parallel:
            block.input_layernorm = SequenceParallelRMSNorm.from_norm(block.input_layernorm, group)
            block.post_attention_layernorm = SequenceParallelRMSNorm.from_norm(block.post_attention_layernorm, group)
    if model.embed_tokens is not None:
        model.embed_tokens = VocabParallelEmbedding.from_embedding(model.embed_tokens, group,
                                                                   sequence_parallel=sequence_parallel)
    if model.norm is not None and sequence_parallel:
        model.norm = SequenceParallelRMSNorm.from_norm(model.norm, group)
    if model.lm_head is not None:
        model.lm_head = ColumnParallelLinear.from_linear(model.lm_head, group, **opts.layer_kwargs())
        if model.cfg.tie_embeddings and model.embed_tokens is not None:  # both shard the padded vocab alike
            model.lm_head.weight = model.embed_tokens.weight
    model.sequence_shards = group.size() if sequence_parallel else 1
    return model
