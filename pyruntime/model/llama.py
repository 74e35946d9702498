"""Reference Llama-style decoder. No communication in here: parallelism is applied to this
unmodified model afterwards (parallel/), which relies on these things:

- layers live in a ModuleDict keyed "0".."L-1", so a pipeline stage keeps the names of the
  layers it owns, and drops the rest;
- embed_tokens / norm / lm_head may be None (on pipeline stages that do not own them);
- parameter names follow Hugging Face's Llama, so initialisation (init.py) and checkpoints
  key on names that do not depend on the layout;
- the attention math is one function (causal_attention) that tensor parallelism calls on
  its own heads, and `sequence_shards` tells the model that hidden states are sequence
  shards (sequence parallelism), so the rotary tables still cover whole sequences.
"""
from __future__ import annotations

import functools
import math
import threading
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from pyruntime import ops
from pyruntime.config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, kernels: str):
        super().__init__()
        self.eps, self.kernels = eps, kernels
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(x, self.weight, self.eps, backend=self.kernels)


def rope_frequencies(head_dim: int, theta: float, cfg: ModelConfig | None = None, device=None) -> torch.Tensor:
    """Inverse frequencies (head_dim / 2,), with cfg's rope_scaling applied (as Hugging Face's
    rope init functions: "linear" divides them all by the factor; "llama3" divides only long
    wavelengths and interpolates the middle band, so short-range position signal is kept)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    kind = cfg.rope_scaling if cfg is not None else None
    if kind == "linear":
        return inv_freq / cfg.rope_factor
    if kind == "llama3":
        old_len, factor = cfg.rope_original_max_seq_len, cfg.rope_factor
        low, high = cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
        return torch.where(medium, smoothed, scaled)
    return inv_freq


def rotary_tables(seq_len: int, head_dim: int, theta: float, device, dtype, cfg: ModelConfig | None = None,
                  start: int = 0):
    """cos/sin tables (T, head_dim) for positions start .. start + seq_len - 1, in the
    rotate-half layout used by Hugging Face's Llama; cfg supplies rope scaling."""
    inv_freq = rope_frequencies(head_dim, theta, cfg, device)
    positions = torch.arange(start, start + seq_len, device=device, dtype=torch.float32)
    angles = torch.outer(positions, inv_freq)  # (T, hd/2)
    angles = torch.cat((angles, angles), dim=-1)  # (T, hd)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def model_rotary(cfg: ModelConfig, seq_len: int, device, dtype, start: int = 0):
    """The model's own cos/sin tables (its head dim, base and scaling)."""
    return rotary_tables(seq_len, cfg.head_dim, cfg.rope_theta, device, dtype, cfg, start)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, H, T, hd). Rotates each (i, i + hd/2) pair by its position's angle."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class _Droppable(threading.local):
    """Selective recomputation's ear inside the attention math: parallel/recompute.py sets
    `offer` on this thread while a block runs in that mode, and offer(out, recipe, keep) tells
    it that `out` can be rebuilt in backward by recipe(), which reads only `keep`."""

    offer: Callable | None = None


DROPPABLE = _Droppable()


def repeat_kv(t: torch.Tensor, groups: int) -> torch.Tensor:
    """t (B, Hkv, T, hd) -> (B, Hkv * groups, T, hd): each KV head repeated for the query heads
    of its group (an explicit repeat: enable_gqa is not in every torch the runtime supports).
    Attention saves the repeated copy for backward, groups times t's bytes; offered to
    selective recomputation, which keeps t's own bytes instead (a compact copy: v is a view
    into the fused q/k/v output) and repeats it again in backward."""
    offer = DROPPABLE.offer
    if offer is None or not torch.is_grad_enabled():
        return t.repeat_interleave(groups, dim=1)
    compact = t.contiguous()
    out = compact.repeat_interleave(groups, dim=1)
    offer(out, functools.partial(torch.repeat_interleave, compact, groups, dim=1), (compact,))
    return out


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None = None) -> torch.Tensor:
    """Causal softmax attention of q (B, Hq, Tq, hd) over k, v (B, Hkv, Tk, hd), Tq <= Tk:
    the queries are the last Tq positions (Tk - Tq earlier keys: a KV cache). window: a query
    sees at most this many keys, itself included (Mistral's sliding window). -> (B, Tq, Hq*hd)."""
    B, _, Tq, _ = q.shape
    Tk = k.shape[2]
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k, v = repeat_kv(k, groups), repeat_kv(v, groups)
    if Tq == Tk and (window is None or window >= Tk):
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, Hq, T, hd)
    else:
        qpos = torch.arange(Tk - Tq, Tk, device=q.device)[:, None]
        kpos = torch.arange(Tk, device=q.device)[None, :]
        allowed = kpos <= qpos
        if window is not None:
            allowed &= qpos - kpos < window
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
    return y.transpose(1, 2).reshape(B, Tq, -1)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                     sin: torch.Tensor, window: int | None = None) -> torch.Tensor:
    """q (B, Hq, T, hd), k and v (B, Hkv, T, hd) -> (B, T, Hq * hd): rotary embeddings, grouped
    KV heads, causal softmax attention. Shared with the tensor-parallel attention (which
    passes its own heads), so the math lives in one place."""
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    return attend(q, k, v, window)


class Attention(nn.Module):
    """Causal self-attention with optional grouped KV heads.

    Head counts are read from the projection shapes at run time, so tensor parallelism can
    shard q/k/v by heads without this module knowing about it.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.head_dim, self.window = cfg.head_dim, cfg.sliding_window
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.dim, cfg.kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.dim, cfg.kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=cfg.o_bias)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, Hq, T, hd)
        k = self.k_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, Hkv, T, hd)
        v = self.v_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        return self.o_proj(causal_attention(q, k, v, cos, sin, self.window))


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.kernels = cfg.kernels
        self.gate_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.ffn_dim, cfg.dim, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(ops.swiglu(self.gate_proj(x), self.up_proj(x), backend=self.kernels))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps, cfg.kernels)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps, cfg.kernels)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    """tokens (B, T) -> logits (B, T, V); a pipeline stage maps hidden -> hidden or logits."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens: nn.Embedding | None = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleDict({str(i): Block(cfg) for i in range(cfg.n_layers)})
        self.norm: RMSNorm | None = RMSNorm(cfg.dim, cfg.norm_eps, cfg.kernels)
        self.lm_head: nn.Linear | None = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:  # one Parameter: one gradient, one optimizer state, one name
            self.lm_head.weight = self.embed_tokens.weight
        # Hidden states hold 1/sequence_shards of each sequence: tensor parallelism's sequence
        # parallelism sets it to tp. Attention sees whole sequences, so the rotary tables must.
        self.sequence_shards = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(x, list(self.layers.keys()), embed=self.embed_tokens is not None,
                        head=self.lm_head is not None)

    def run(self, x: torch.Tensor, layer_keys: list[str], *, embed: bool, head: bool) -> torch.Tensor:
        """The one block loop: the embedding (embed), the blocks named by layer_keys, then the
        final norm and the LM head (head). A pipeline stage (parallel/pipeline/split.py) runs
        its slice of the model through it."""
        h = self.embed_tokens(x) if embed else x  # (B, T, C)
        T = h.shape[1] * self.sequence_shards
        cos, sin = model_rotary(self.cfg, T, h.device, h.dtype)
        for key in layer_keys:
            h = self.layers[key](h, cos, sin)
        return self.lm_head(self.norm(h)) if head else h  # (B, T, V) or (B, T, C)


def reference_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """{name: full shape} of every parameter of the reference model (built on the meta
    device: nothing is allocated)."""
    with torch.device("meta"):
        model = Transformer(cfg)
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def count_params(cfg: ModelConfig) -> dict[str, int]:
    """Parameter counts from the shape alone (no model is built); a tied head counts once."""
    q, kv = cfg.n_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
    attn = cfg.dim * (2 * q + 2 * kv) + (q + 2 * kv if cfg.qkv_bias else 0) + (cfg.dim if cfg.o_bias else 0)
    mlp = 3 * cfg.dim * cfg.ffn_dim + ((2 * cfg.ffn_dim + cfg.dim) if cfg.mlp_bias else 0)
    per_layer = attn + mlp + 2 * cfg.dim
    embed = cfg.vocab_size * cfg.dim
    total = cfg.n_layers * per_layer + (1 if cfg.tie_embeddings else 2) * embed + cfg.dim
    # the lookup does no matmul; a tied table still does the head's
    non_embedding = total if cfg.tie_embeddings else total - embed
    return {"total": total, "embedding": embed, "per_layer": per_layer, "non_embedding": non_embedding}


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward): 6 N plus causal attention scores/values.

    The embedding lookup does no matmul, so it is left out of N; the LM head is counted.
    Attention: 12 * L * dim * T / 2 (the causal half of the score and value matmuls).
    """
    n = count_params(cfg)["non_embedding"]
    return 6.0 * n + 6.0 * cfg.n_layers * cfg.dim * seq_len
