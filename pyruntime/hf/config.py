"""Hugging Face config.json <-> ModelConfig.

    cfg = model_config_from_hf(json.load(open("config.json")))   # HFError names what is refused
    raw = hf_config_from_model(cfg)                               # what export writes

Every key of config.json is either turned into a ModelConfig field, checked to hold the one
value the model computes (hidden_act "silu", no attention dropout, pretraining_tp 1, ...), or
known to have no effect on the function the weights compute (token ids, dtype, provenance).
Any other key is refused: a field silently dropped would give a model that loads and then
computes something else (the reason this file exists: rope_scaling used to be ignored).
Both rope spellings are read: rope_theta + rope_scaling (checkpoints on the Hub) and
transformers 5's rope_parameters.
"""
from __future__ import annotations

import os
from typing import Any

from pyruntime.config import ConfigError, ModelConfig

ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2"}
# Keys that do not change what the weights compute (token ids matter to tokenizers and to
# `generate`, which reads them itself).
INERT = {"architectures", "model_type", "transformers_version", "torch_dtype", "dtype", "initializer_range",
         "use_cache", "bos_token_id", "eos_token_id", "pad_token_id", "_name_or_path", "output_attentions",
         "output_hidden_states", "return_dict", "tie_encoder_decoder", "is_decoder"}
# Keys that must hold the value the model implements.
FIXED = {"hidden_act": ("silu",), "attention_dropout": (0, 0.0), "pretraining_tp": (1, None)}
SIZES = {"vocab_size": "vocab_size", "hidden_size": "dim", "num_hidden_layers": "n_layers",
         "num_attention_heads": "n_heads", "intermediate_size": "ffn_dim", "rms_norm_eps": "norm_eps",
         "max_position_embeddings": "max_seq_len"}
OPTIONAL = {"num_key_value_heads", "head_dim", "rope_theta", "rope_scaling", "rope_parameters",
            "tie_word_embeddings", "attention_bias", "mlp_bias", "sliding_window", "use_sliding_window",
            "max_window_layers", "layer_types"}


class HFError(ConfigError):
    """A Hugging Face directory or config the runtime cannot use as it stands (one line)."""


def architecture_of(raw: dict[str, Any]) -> str:
    archs = raw.get("architectures") or []
    if not isinstance(archs, list):
        raise HFError(f"config.json architectures must be a list such as [\"LlamaForCausalLM\"], got {archs!r}")
    family = ARCHITECTURES.get(archs[0]) if len(archs) == 1 and isinstance(archs[0], str) else None
    if family is None:
        raise HFError(f"config.json architectures {archs} is not supported; use one of {', '.join(ARCHITECTURES)}")
    return family


def _rope(raw: dict[str, Any]) -> dict[str, Any]:
    """rope_theta and the scaling fields, from either spelling."""
    for key in ("rope_parameters", "rope_scaling"):
        if not isinstance(raw.get(key) or {}, dict):
            raise HFError(f"config.json {key} must be a JSON object, got {raw[key]!r}")
    params = dict(raw.get("rope_parameters") or {})
    scaling = dict(raw.get("rope_scaling") or {})
    theta = params.pop("rope_theta", raw.get("rope_theta", 10000.0))
    params.update(scaling)
    kind = params.pop("rope_type", params.pop("type", "default"))
    out: dict[str, Any] = {"rope_theta": _number({"rope_theta": theta}, "rope_theta", float)}
    known = {"linear": {"factor"},
             "llama3": {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"},
             "default": set()}
    if kind not in known:
        raise HFError(f"config.json rope scaling type '{kind}' is not supported; use linear or llama3")
    extra = sorted(set(params) - known[kind])
    if extra:
        raise HFError(f"config.json rope {kind} scaling field '{extra[0]}' is not supported")
    if kind == "default":
        return out
    lacking = sorted(known[kind] - set(params))
    if lacking:
        raise HFError(f"config.json rope {kind} scaling lacks '{lacking[0]}' (it needs {', '.join(sorted(known[kind]))})")
    out.update(rope_scaling=kind, rope_factor=_number(params, "factor", float))
    if kind == "llama3":
        out.update(rope_low_freq_factor=_number(params, "low_freq_factor", float),
                   rope_high_freq_factor=_number(params, "high_freq_factor", float),
                   rope_original_max_seq_len=_number(params, "original_max_position_embeddings", int))
    return out


def _number(table: dict[str, Any], key: str, kind: type):
    """table[key] as `kind` (an int stays exact; a float must be whole for an int field)."""
    value = table[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
        raise HFError(f"config.json {key} must be {'an integer' if kind is int else 'a number'}, got {value!r}")
    return kind(value)


def _sliding_window(raw: dict[str, Any], family: str, n_layers: int) -> int | None:
    window = raw.get("sliding_window")
    if family == "mistral":
        return window
    if family == "llama":
        if window is not None:
            raise HFError("config.json sliding_window is not a Llama field")
        return None
    # qwen2: layers from max_window_layers on slide, and only with use_sliding_window
    types = raw.get("layer_types")
    if types is None:
        first = raw.get("max_window_layers", n_layers) if raw.get("use_sliding_window") else n_layers
        types = ["full_attention" if i < first else "sliding_attention" for i in range(n_layers)]
    if set(types) == {"full_attention"}:
        return None
    if set(types) == {"sliding_attention"} and window:
        return window
    raise HFError(f"config.json layer_types {sorted(set(types))}: only all-full or all-sliding attention is supported")


def model_config_from_file(raw: Any, file: str | os.PathLike, **overrides: Any) -> ModelConfig:
    """model_config_from_hf of `raw`, read from `file`: an HFError names that file."""
    try:
        return model_config_from_hf(raw, **overrides)
    except HFError as e:
        raise HFError(f"{file}{str(e).removeprefix('config.json')}") from None


def model_config_from_hf(raw: dict[str, Any], **overrides: Any) -> ModelConfig:
    """The ModelConfig of a Hugging Face config.json (as a dict); HFError for anything the
    model cannot honour. overrides: runtime-only fields (kernels)."""
    if not isinstance(raw, dict):
        raise HFError(f"config.json must hold a JSON object of model fields, got {type(raw).__name__}")
    family = architecture_of(raw)
    unknown = sorted(set(raw) - INERT - set(FIXED) - set(SIZES) - OPTIONAL)
    if unknown:
        raise HFError(f"config.json field '{unknown[0]}' is not supported by the runtime's model")
    for key, allowed in FIXED.items():
        if key in raw and raw[key] not in allowed:
            raise HFError(f"config.json {key} {raw[key]!r} is not supported; the model implements {allowed[0]!r}")
    missing = [k for k in SIZES if k not in raw]
    if missing:
        raise HFError(f"config.json lacks '{missing[0]}'")
    for key in SIZES:  # the arithmetic below runs before ModelConfig's own checks
        number = (int, float) if key == "rms_norm_eps" else int
        if not isinstance(raw[key], number) or isinstance(raw[key], bool):
            raise HFError(f"config.json {key} must be {'a number' if key == 'rms_norm_eps' else 'an integer'}, "
                          f"got {raw[key]!r}")
    if raw["num_attention_heads"] < 1:
        raise HFError(f"config.json num_attention_heads must be >= 1, got {raw['num_attention_heads']}")
    fields: dict[str, Any] = {ours: raw[theirs] for theirs, ours in SIZES.items()}
    fields["norm_eps"] = float(fields["norm_eps"])
    fields["n_kv_heads"] = raw.get("num_key_value_heads")
    head_dim = raw.get("head_dim")
    fields["head_size"] = None if head_dim in (None, raw["hidden_size"] // raw["num_attention_heads"]) else head_dim
    fields.update(_rope(raw))
    bias = bool(raw.get("attention_bias", False))
    qwen = family == "qwen2"  # Qwen2: q/k/v always biased, o_proj never
    fields.update(qkv_bias=bias or qwen, o_bias=bias and not qwen, mlp_bias=bool(raw.get("mlp_bias", False)),
                  tie_embeddings=bool(raw.get("tie_word_embeddings", False)),
                  sliding_window=_sliding_window(raw, family, raw["num_hidden_layers"]))
    if qwen and (raw.get("attention_bias") or fields["mlp_bias"]):
        raise HFError("config.json attention_bias / mlp_bias are not Qwen2 fields")
    cfg = ModelConfig(**fields, **overrides)
    cfg.validate()
    return cfg


def hf_config_from_model(cfg: ModelConfig, *, dtype: str = "float32", eos_token_id: int | None = None,
                         bos_token_id: int | None = None) -> dict[str, Any]:
    """A config.json transformers loads back into the same function: Qwen2 when the biases are
    Qwen2's (q/k/v only), Mistral when there is a sliding window, Llama otherwise."""
    if cfg.qkv_bias and not cfg.o_bias and not cfg.mlp_bias:
        arch, family = "Qwen2ForCausalLM", "qwen2"
    elif cfg.sliding_window is not None:
        arch, family = "MistralForCausalLM", "mistral"
    else:
        arch, family = "LlamaForCausalLM", "llama"
    if cfg.qkv_bias != cfg.o_bias and family != "qwen2":
        raise HFError("no Hugging Face architecture has q/k/v biases without the output bias and a sliding window")
    if family == "mistral" and (cfg.qkv_bias or cfg.mlp_bias):
        raise HFError("MistralForCausalLM has no biases; this model has both biases and a sliding window")
    raw: dict[str, Any] = {
        "architectures": [arch], "model_type": family, "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim,
        "intermediate_size": cfg.ffn_dim, "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_dim, "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
        "tie_word_embeddings": cfg.tie_embeddings, "torch_dtype": dtype,
        "bos_token_id": bos_token_id, "eos_token_id": eos_token_id}
    if family == "llama":
        raw.update(attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias)
    if family == "mistral":
        raw["sliding_window"] = cfg.sliding_window
    if family == "qwen2":
        window = cfg.sliding_window
        raw.update(use_sliding_window=window is not None, sliding_window=window, max_window_layers=0)
    if cfg.rope_scaling == "linear":
        raw["rope_scaling"] = {"rope_type": "linear", "factor": cfg.rope_factor}
    elif cfg.rope_scaling == "llama3":
        raw["rope_scaling"] = {"rope_type": "llama3", "factor": cfg.rope_factor,
                               "low_freq_factor": cfg.rope_low_freq_factor,
                               "high_freq_factor": cfg.rope_high_freq_factor,
                               "original_max_position_embeddings": cfg.rope_original_max_seq_len}
    return raw
