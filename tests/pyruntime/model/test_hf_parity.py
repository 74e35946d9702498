"""The reference model computes what transformers' Llama / Mistral / Qwen2 compute: tiny random
models built from config objects (no download), their weights copied in by name, logits
within 1e-4 relative and the mean loss within 1e-5, in fp32 on one process."""
import json

import pytest
import torch
import torch.nn.functional as F

import transformers  # noqa: E402  (requirements-dev.txt)

from pyruntime.hf.config import model_config_from_hf  # noqa: E402
from pyruntime.model import Transformer  # noqa: E402

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


def hf_model(name: str, seed: int = 0):
    """A random fp32 transformers model of case `name`, every parameter (norms and biases
    too) drawn, so no term of the math is hidden by a zero or a one; .config_json: the
    config.json save_pretrained writes for it."""
    cls_name, extra = CASES[name]
    config = getattr(transformers, cls_name)(**BASE, **extra)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).float().eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * (0.3 if n.endswith("norm.weight") else 0.08)
                    + (1.0 if n.endswith("norm.weight") else 0.0))
    model.config.architectures = [type(model).__name__]  # as save_pretrained records it
    model.config_json = json.loads(model.config.to_json_string(use_diff=True))
    return model


def ours_from(hf) -> Transformer:
    """Our model with hf's config and weights (reference name = HF name without "model.")."""
    cfg = model_config_from_hf(hf.config_json, kernels="reference")
    model = Transformer(cfg)
    sd = {k.removeprefix("model."): v for k, v in hf.state_dict().items()}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not missing and set(unexpected) <= {"lm_head.weight"}, (missing, unexpected)
    return model.eval()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("name", list(CASES))
def test_logits_and_loss_match_transformers(name):
    hf = hf_model(name)
    ours = ours_from(hf)
    x = torch.randint(0, BASE["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf(x).logits
        got = ours(x)
    assert rel_err(got, want) < 1e-4
    loss = lambda logits: F.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten())  # noqa: E731
    assert abs(loss(got).item() - loss(want).item()) < 1e-5


def test_features_actually_change_the_function():
    """The cases above would pass vacuously if a feature did nothing: each one moves logits."""
    x = torch.randint(0, BASE["vocab_size"], (1, 12), generator=torch.Generator().manual_seed(2))
    plain = ours_from(hf_model("llama_gqa"))
    for name, field, off in [("llama31_rope_scaling", "rope_scaling", None),
                             ("mistral_sliding_window", "sliding_window", None)]:
        model = ours_from(hf_model(name))
        with torch.no_grad():
            a = model(x)
            object.__setattr__(model.cfg, field, off)
            for layer in model.layers.values():
                layer.self_attn.window = model.cfg.sliding_window
            b = model(x)
        assert rel_err(a, b) > 1e-3, name
    assert plain.lm_head.weight is not plain.embed_tokens.weight
    tied = ours_from(hf_model("qwen2_bias_tied"))
    assert tied.lm_head.weight is tied.embed_tokens.weight
    assert [n for n, _ in tied.named_parameters()].count("embed_tokens.weight") == 1
    assert "lm_head.weight" not in dict(tied.named_parameters())


def test_first_training_step_loss_and_grad_norm_match_transformers():
    hf = hf_model("qwen2_bias_tied").train()
    ours = ours_from(hf).train()
    x = torch.randint(0, BASE["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(3))
    hf_loss = hf(x, labels=x).loss  # HF shifts labels itself
    logits = ours(x)
    our_loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten())
    hf_loss.backward()
    our_loss.backward()
    norm = lambda m: torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in m.parameters()]))  # noqa: E731
    assert abs(our_loss.item() - hf_loss.item()) < 1e-5
    assert abs(norm(ours).item() - norm(hf).item()) / norm(hf).item() < 1e-5
