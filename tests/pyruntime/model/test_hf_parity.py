"""The reference model computes what transformers' Llama / Mistral / Qwen2 compute: tiny random
models built from config objects (no download), their weights copied in by name, logits
within 1e-4 relative and the mean loss within 1e-5, in fp32 on one process."""
import pytest
import torch
import torch.nn.functional as F

import transformers  # noqa: E402  (requirements-dev.txt)

from pyruntime.hf.config import model_config_from_hf  # noqa: E402
from pyruntime.model import Transformer  # noqa: E402
from tests.pyruntime.hf.hf_models import BASE, CASES, hf_model  # noqa: E402


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
