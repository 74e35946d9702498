"""Tiny random transformers models saved as local Hugging Face directories (no download)."""
from __future__ import annotations

import torch

BASE = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}
# name -> (transformers config class, extra fields)
CASES = {
    "llama_gqa": ("LlamaConfig", {}),
    "llama31_rope_scaling": ("LlamaConfig", {"rope_scaling": LLAMA3_ROPE, "rope_theta": 500000.0}),
    "llama_linear_rope": ("LlamaConfig", {"rope_scaling": {"rope_type": "linear", "factor": 4.0}}),
    "llama_tied": ("LlamaConfig", {"tie_word_embeddings": True}),
    "llama_biases": ("LlamaConfig", {"attention_bias": True, "mlp_bias": True}),
    "llama_head_dim": ("LlamaConfig", {"head_dim": 16}),
    "mistral_sliding_window": ("MistralConfig", {"sliding_window": 5, "head_dim": 8}),
    "qwen2_bias_tied": ("Qwen2Config", {"tie_word_embeddings": True}),
}


def hf_model(name: str, seed: int = 0, **overrides):
    """A random fp32 transformers model of case `name`, every parameter (norms and biases
    too) drawn, so no term of the math is hidden by a zero or a one; .config_json: the
    config.json save_pretrained writes for it."""
    import json

    import transformers

    cls_name, extra = CASES[name]
    config = getattr(transformers, cls_name)(**{**BASE, **extra, **overrides})
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).float().eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            norm = n.endswith("norm.weight")
            p.copy_(torch.randn_like(p) * (0.3 if norm else 0.08) + (1.0 if norm else 0.0))
    model.config.architectures = [type(model).__name__]  # as save_pretrained records it
    model.config_json = json.loads(model.config.to_json_string(use_diff=True))
    return model


def save_hf(name: str, path, *, shard_kb: int | None = None, dtype=torch.float32, seed: int = 0, **overrides):
    """hf_model(name) saved into `path` (shards of at most shard_kb KB when given); returns the model."""
    model = hf_model(name, seed, **overrides)
    kw = {"max_shard_size": f"{shard_kb}KB"} if shard_kb else {}
    model.to(dtype).save_pretrained(path, **kw)
    return model.float()
