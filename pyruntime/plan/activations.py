"""Activation bytes: what autograd saves for backward, per micro-batch and per pipeline rank,
term by term as this runtime's model, tp layers and losses save it (each storage once, as
train/saved_bytes.SavedTensorMeter counts; tests/pyruntime/plan/test_activations.py checks
the total against that meter on >= 24 layouts).

Per block and micro-batch (b sequences of s tokens; t = tp; s_n = s / t with sequence
parallelism, else s; the norms and the residual stream run on s_n tokens):
  two RMSNorms      input, 1/rms and normalised input: 2 x (2 b s_n h + b s_n)
  two GEMM inputs   the norms' outputs as the q/k/v and gate/up GEMMs see them: 2 b s h
                    (whole sequences: under sequence parallelism the gathered input is kept)
  attention         rotated q, k (or k repeated for grouped KV heads), v, output: 4 b s q / t
                    (q = heads x head dim); tp > 1 without grouped KV: v is a view into the
                    fused q/k/v output, whose whole storage is kept: + 2 b s kv / t; softmax
                    log-sum-exp b a s / t (fp32)
  SwiGLU MLP        gate, up, silu(gate), their product: 4 b s f / t
Once per rank: the rotary tables (2 s d), the token ids (int64) on the embedding stage (and a
vocabulary mask of b s bytes under tp); on the last: the final norm (2 b s_n h + b s_n), the
head's input b s h, and the loss: its log-softmax (b s V_padded / t, fp32) plus the targets.

Recomputation (parallel/recompute.py): full keeps each block's input only (b s_n h);
selective recomputes the norms' outputs, the SwiGLU activation and, with grouped KV heads,
the repeated k and v in backward (drops the two GEMM inputs, unless sequence parallelism
gathers them first, silu(gate) at tp 1, where it is a tensor of its own, and keeps k and v
unrepeated: 2 b s kv / t instead of 2 b s q / t), keeping the GEMM and attention outputs;
--recompute-ops names a subset of those three (norm, swiglu, kv_repeat) and only it is
dropped. --recompute-layers K: the first K blocks of each chunk recompute, the rest save all.
"""
from __future__ import annotations

from dataclasses import dataclass

from pyruntime.config import ModelConfig
from pyruntime.parallel.recompute import ALL_OPS

FP32 = 4


@dataclass(frozen=True)
class Shape:
    """One micro-batch's shape on one rank; act: element bytes of the activations (4 for fp32,
    2 under bf16 autocast)."""

    model: ModelConfig
    batch: int
    seq: int
    tp: int = 1
    sp: bool = False
    act: int = FP32


def block_bytes(x: Shape, recompute: str = "none", ops: str = ALL_OPS) -> int:
    """Bytes one transformer block saves for one micro-batch; ops: what selective drops."""
    m, b, s, t, e = x.model, x.batch, x.seq, x.tp, x.act
    sn = s // t if x.sp else s
    if recompute == "full":
        return b * sn * m.dim * e
    q, kv, f = m.n_heads * m.head_dim, m.kv_heads * m.head_dim, m.ffn_dim
    norms = 2 * (2 * b * sn * m.dim + b * sn) * FP32
    gemm_in = 2 * b * s * m.dim * e
    attn = 4 * b * s * q // t * e + b * m.n_heads // t * s * FP32
    if t > 1 and m.kv_heads == m.n_heads:
        attn += 2 * b * s * kv // t * e
    mlp = 4 * b * s * f // t * e
    if recompute == "selective":  # the norms' outputs and silu(gate) are recomputed in backward,
        dropped = ops.split(",")
        if "norm" in dropped and not x.sp:  # except a norm output the GEMM gathers first (it saves the copy)
            gemm_in = 0
        if "swiglu" in dropped and t == 1:  # and the fused tp SwiGLU GEMM has no separate activation
            mlp -= b * s * f * e
        if "kv_repeat" in dropped and m.kv_heads < m.n_heads:  # the unrepeated k and v are kept instead
            attn -= (2 * b * s * q // t - 2 * b * s * kv // t) * e
    return norms + gemm_in + attn + mlp


def stage_extra_bytes(x: Shape, embedding: bool, head: bool) -> int:
    """Bytes saved once per micro-batch on a rank, outside its blocks (see the module docstring);
    the loss is separate (loss_bytes)."""
    m, b, s, t, e = x.model, x.batch, x.seq, x.tp, x.act
    sn = s // t if x.sp else s
    total = 2 * s * m.head_dim * e  # rotary cos / sin
    if embedding:
        total += b * s * 8 + (b * s if t > 1 else 0)  # int64 token ids; the vocab-parallel mask
    if head:
        total += (2 * b * sn * m.dim + b * sn) * FP32 + b * s * m.dim * e
    return total


def loss_bytes(x: Shape) -> int:
    """What the cross-entropy saves: log-probabilities over this rank's (padded) vocabulary in
    fp32, the int64 targets, and under tp a few per-token fp32 statistics (else one scalar)."""
    b, s, t = x.batch, x.seq, x.tp
    vocab = -(-x.model.vocab_size // t)
    return b * s * vocab * FP32 + b * s * 8 + (12 * b * s if t > 1 else FP32)  # tp 1: nll_loss keeps a weight total


def logits_peak_bytes(x: Shape) -> int:
    """The transient at the loss: the logits and their log-softmax both live (fp32)."""
    vocab = -(-x.model.vocab_size // x.tp)
    return 2 * x.batch * x.seq * vocab * FP32


def chunk_bytes(x: Shape, layers: int, embedding: bool, head: bool, recompute: str = "none",
                recompute_layers: int | None = None, ops: str = ALL_OPS) -> int:
    """One micro-batch through one pipeline chunk (or a whole rank's model): blocks (the first
    recompute_layers of them recomputed, all when None), the per-chunk extras and, on the last
    stage, the loss."""
    k = layers if recompute_layers is None else min(recompute_layers, layers)
    total = k * block_bytes(x, recompute, ops) + (layers - k) * block_bytes(x) + stage_extra_bytes(x, embedding, head)
    return total + (loss_bytes(x) if head else 0)
