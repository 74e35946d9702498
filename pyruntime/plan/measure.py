"""What the planner's predictions are checked against, measured on the real trainer: run on
every rank of a spawned world (pyruntime/spawn.py) by the tests and by `bench plan`.

    run_world(4, measure_states, [cfg, ...])   # per config: this rank's planned and held bytes
"""
from __future__ import annotations

import time

import torch

from pyruntime.config import Config
from pyruntime.mesh import ParallelDims

STATE_FIELDS = ("param_bytes", "grad_bytes", "optim_bytes", "unsharded_param_bytes", "unsharded_grad_bytes",
                "unsharded_optim_bytes", "largest_unit_bytes")


def build_trainer(cfg: Config, rank: int, world_size: int, corpora: dict):
    from pyruntime.train.trainer import Trainer, open_corpus

    key = (cfg.data.path, cfg.data.max_bytes, cfg.data.seq_len)
    if key not in corpora:
        corpora[key] = open_corpus(cfg)
    dims = ParallelDims.from_config(cfg.parallel, world_size).build_mesh("cpu")
    return Trainer(cfg, dims, torch.device("cpu"), rank=rank, corpus=corpora[key]), dims


def measure_states(rank: int, world_size: int, configs: list[Config]) -> list[dict]:
    """For each config: this rank's pp coordinate, the engine's start-up figures (planned_*)
    and the model-state fields of the first step's metrics."""
    corpora: dict = {}
    out = []
    for cfg in configs:
        trainer, dims = build_trainer(cfg, rank, world_size, corpora)
        planned = trainer.data_parallel.planned_bytes().fields()
        rec = trainer.train_step(0)
        out.append({"pp_rank": dims.axis_rank("pp"), **{f"planned_{k}": v for k, v in planned.items()},
                    **{k: rec[k] for k in STATE_FIELDS if k in rec}})
    return out


def measure_step_time(rank: int, world_size: int, configs: list[Config], steps: int, warmup: int) -> list[float]:
    """Median step time (s) of each config on this rank after `warmup` steps."""
    corpora: dict = {}
    out = []
    for cfg in configs:
        trainer, _ = build_trainer(cfg, rank, world_size, corpora)
        times = []
        for step in range(warmup + steps):
            t0 = time.perf_counter()
            trainer.train_step(step)
            times.append(time.perf_counter() - t0)
        times = sorted(times[warmup:])
        out.append(times[len(times) // 2])
    return out
