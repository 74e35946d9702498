"""Layout-invariant initialisation.

Every parameter is drawn from its own generator, seeded from (seed, parameter name). So the
full weights depend on the seed alone: not on construction order, not on which layers a
pipeline stage owns, and not on how tensor parallelism shards them (a sharded parameter draws
the full tensor, then keeps its slice; see `full_init`).
"""
from __future__ import annotations

import math
import zlib

import torch
import torch.nn as nn

from pyruntime.config import ModelConfig


def param_generator(seed: int, name: str) -> torch.Generator:
    # crc32 is stable across processes and Python versions (hash() is salted per process).
    return torch.Generator().manual_seed((seed * 0x9E3779B1 + zlib.crc32(name.encode())) % (2**63))


def init_std(name: str, cfg: ModelConfig) -> float | None:
    """Standard deviation for a parameter by name; None means ones (norm weights)."""
    if name.endswith("layernorm.weight") or name == "norm.weight":
        return None
    if name.endswith(("o_proj.weight", "down_proj.weight")):
        return 0.02 / math.sqrt(2 * cfg.n_layers)  # residual-branch outputs, GPT-2 style
    return 0.02


def full_init(name: str, shape: torch.Size, cfg: ModelConfig, seed: int) -> torch.Tensor:
    """The full (unsharded) fp32 initial value of parameter `name`, on CPU."""
    std = init_std(name, cfg)
    if std is None:
        return torch.ones(shape)
    return torch.randn(shape, generator=param_generator(seed, name)).mul_(std)  # in place: no second full-size tensor


@torch.no_grad()
def init_weights(model: nn.Module, cfg: ModelConfig, seed: int) -> None:
    """Fill every parameter of an unsharded (possibly pipeline-split) model."""
    for name, p in model.named_parameters():
        p.copy_(full_init(name, p.shape, cfg, seed))
