"""Training FLOPs and time to train.

Two forms, both used:
- the rule of thumb for any model given by its parameter count N: 6 N FLOPs per token (forward
  2N, backward 4N), 8 N with full recomputation (one more forward), as in Kaplan et al. (2020)
  and Narayanan et al. (2021, "Efficient large-scale language model training on GPU clusters",
  eq. 3: 8 N per token with recomputation, whose GPT-3 figure of 34 days is reproduced here);
- for a ModelConfig, the trainer's own flops_per_token (the matmuls of every layer and the LM
  head, plus causal attention), plus the forward that recomputation repeats. This is what MFU
  counts (the model's FLOPs, not recomputation's), so MFU and "hardware FLOPs" differ.
"""
from __future__ import annotations

from pyruntime.config import ModelConfig
from pyruntime.model.llama import count_params, flops_per_token

SECONDS_PER_DAY = 86400.0
SECONDS_PER_YEAR = 365.0 * SECONDS_PER_DAY


def rule_of_thumb_flops(n_params: float, tokens: float, recompute: str = "none") -> float:
    """6 N D (8 N D with full recomputation)."""
    return (8.0 if recompute == "full" else 6.0) * n_params * tokens


def model_flops_per_token(model: ModelConfig, seq_len: int) -> float:
    """What MFU counts: the trainer's flops_per_token (forward + backward)."""
    return flops_per_token(model, seq_len)


def hardware_flops_per_token(model: ModelConfig, seq_len: int, recompute: str = "none") -> float:
    """FLOPs actually computed: full recomputation repeats every block's forward (a third of a
    block's forward + backward); selective recomputes elementwise ops only (no matmul FLOPs)."""
    total = flops_per_token(model, seq_len)
    if recompute != "full":
        return total
    per_layer = count_params(model)["per_layer"]
    block_forward = 2.0 * per_layer + 2.0 * model.dim * seq_len  # matmuls + causal attention
    return total + model.n_layers * block_forward


def seconds_to_train(total_flops: float, gpus: int, flops_per_gpu: float) -> float:
    """Wall time at a sustained rate per GPU (FLOP/s actually achieved, not the peak)."""
    return total_flops / (gpus * flops_per_gpu)
