"""Run the real Trainer in a spawned gloo world, for parity tests against single-process
training. Several layouts run in one world (one spawn), each with a fresh mesh."""
from __future__ import annotations

import torch

from pyruntime.config import Config
from pyruntime.mesh import ParallelDims
from pyruntime.train.trainer import Trainer


def train_losses(rank: int, world_size: int, configs: list[Config]) -> list[list[float]]:
    """Worker for multiproc.run_world: the per-step losses of each config, in order."""
    out = []
    for cfg in configs:
        p = cfg.parallel
        dims = ParallelDims.from_config(p, world_size).build_mesh("cpu")
        out.append([r["loss"] for r in Trainer(cfg, dims, torch.device("cpu"), rank=rank).fit()])
    return out
