import dataclasses

import pytest
import torch
import torch.nn.functional as F

from pyruntime.config import PRESETS, ModelConfig
from pyruntime.model import Transformer, count_params, init_weights
from pyruntime.model.llama import apply_rotary, rotary_tables

SMALL = ModelConfig(dim=32, n_layers=3, n_heads=4, n_kv_heads=2, ffn_dim=48, vocab_size=61, max_seq_len=64)


def build(cfg=SMALL, seed=0):
    model = Transformer(cfg)
    init_weights(model, cfg, seed)
    return model


def test_forward_shape_and_causality():
    model = build()
    x = torch.randint(0, SMALL.vocab_size, (2, 11))
    logits = model(x)
    assert logits.shape == (2, 11, SMALL.vocab_size)
    x2 = x.clone()
    x2[:, 7:] = (x2[:, 7:] + 1) % SMALL.vocab_size  # change the future only
    torch.testing.assert_close(model(x2)[:, :7], logits[:, :7], rtol=0, atol=1e-6)
    assert not torch.allclose(model(x2)[:, 7:], logits[:, 7:])


def naive_attention(attn, x, cos, sin):
    """Attention written out by hand: per-head scores, causal mask, softmax, GQA by indexing."""
    B, T, _ = x.shape
    hd = attn.head_dim
    q = attn.q_proj(x).view(B, T, -1, hd).transpose(1, 2)
    k = attn.k_proj(x).view(B, T, -1, hd).transpose(1, 2)
    v = attn.v_proj(x).view(B, T, -1, hd).transpose(1, 2)
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    group = q.shape[1] // k.shape[1]
    outs = []
    for h in range(q.shape[1]):
        s = q[:, h] @ k[:, h // group].transpose(-1, -2) / hd**0.5
        s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
        outs.append(F.softmax(s, -1) @ v[:, h // group])
    return attn.o_proj(torch.stack(outs, 1).transpose(1, 2).reshape(B, T, -1))


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_attention_matches_naive_gqa(kv_heads):
    cfg = dataclasses.replace(SMALL, n_kv_heads=kv_heads)
    attn = build(cfg).layers["0"].self_attn
    x = torch.randn(2, 9, cfg.dim)
    cos, sin = rotary_tables(9, cfg.head_dim, cfg.rope_theta, x.device, x.dtype)
    torch.testing.assert_close(attn(x, cos, sin), naive_attention(attn, x, cos, sin), rtol=1e-5, atol=1e-6)


def test_rotary_is_a_rotation():
    cos, sin = rotary_tables(5, 8, 10000.0, "cpu", torch.float32)
    x = torch.randn(1, 2, 5, 8)
    y = apply_rotary(x, cos, sin)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))
    torch.testing.assert_close(y[:, :, 0], x[:, :, 0])  # position 0 is not rotated


def test_init_depends_only_on_seed_and_name():
    a, b = build(seed=3), build(seed=3)
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n
    c = build(seed=4)
    assert not torch.equal(a.layers["0"].mlp.up_proj.weight, c.layers["0"].mlp.up_proj.weight)
    # A pipeline-style split (only layers 1 and 2, no embedding) gets the same weights by name.
    stage = Transformer(SMALL)
    del stage.layers["0"]
    stage.embed_tokens = None
    init_weights(stage, SMALL, 3)
    full = dict(a.named_parameters())
    for n, p in stage.named_parameters():
        assert torch.equal(p, full[n]), n
    assert torch.all(a.norm.weight == 1)


def test_stage_without_embedding_or_head_maps_hidden_to_hidden():
    model = build()
    model.embed_tokens, model.norm, model.lm_head = None, None, None
    h = torch.randn(2, 5, SMALL.dim)
    assert model(h).shape == (2, 5, SMALL.dim)


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_parameter_counts(name):
    cfg = PRESETS[name]
    cfg.validate()
    with torch.device("meta"):  # the large presets are never materialised on CPU
        model = Transformer(cfg)
    assert sum(p.numel() for p in model.parameters()) == count_params(cfg)["total"]


def test_llama_7b_has_7b_parameters():
    assert 6.6e9 < count_params(PRESETS["7b"])["total"] < 6.8e9  # Llama-2-7B: 6.74 B
