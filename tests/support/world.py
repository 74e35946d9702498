"""THE spawned-world worker and THE single-process reference builder.

    results = run_world(2, train, [Run(cfg_a), Run(cfg_b, env={...}, inspect=fn)])
    per_rank[0][i].records          # run i's per-step metric records on rank 0
    reference = single_process(cfg) # what every layout of cfg must reproduce

run_world (pyruntime/spawn.py) spawns CPU ranks joined in a gloo group and re-raises any
rank's failure here. Spawning costs about a second per rank on CI's 2 cores: put several
runs into one world.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple

import torch

from pyruntime.config import Config
from pyruntime.mesh import Launch, ParallelDims, init_distributed
from pyruntime.spawn import TIMEOUT_S, run_world  # noqa: F401  (re-exported for the tests)
from pyruntime.train.trainer import Trainer, open_corpus


def build_trainer(cfg: Config, rank: int, world_size: int, corpus=None) -> Trainer:
    """The real Trainer on a fresh mesh of cfg.parallel's layout (CPU, gloo)."""
    dims = ParallelDims.from_config(cfg.parallel, world_size).build_mesh("cpu")
    return Trainer(cfg, dims, torch.device("cpu"), rank=rank, corpus=corpus)


@dataclass
class Run:
    """One training run in a spawned world. env: set around it (e.g. the comm debug delay);
    inspect: a module-level function called with the built trainer before training (its
    result travels back with the records)."""

    cfg: Config
    env: dict[str, str] = field(default_factory=dict)
    inspect: Callable[[Trainer], Any] | None = None


class RunResult(NamedTuple):
    records: list[dict]
    inspected: Any = None


def train(rank: int, world_size: int, runs: list[Run]) -> list[RunResult]:
    """Worker: each run on this rank in turn (one corpus load per data setting)."""
    corpora, out = {}, []
    for run in runs:
        cfg = run.cfg
        key = (cfg.data.path, cfg.data.max_bytes, cfg.data.seq_len)
        corpora[key] = corpora.get(key) or open_corpus(cfg)
        saved = {k: os.environ.get(k) for k in run.env}
        os.environ.update(run.env)
        try:
            trainer = build_trainer(cfg, rank, world_size, corpora[key])
            inspected = run.inspect(trainer) if run.inspect else None
            out.append(RunResult(trainer.fit(), inspected))
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    return out


def run_jobs(rank: int, world_size: int, jobs: list[tuple]) -> list:
    """Worker: each (fn, kwargs) in turn on this rank (e.g. train plus probes); results in order."""
    return [fn(rank, world_size, **kwargs) for fn, kwargs in jobs]


def single_process(cfg: Config) -> list[dict]:
    """The reference: cfg trained by one process (dp = pp = tp = 1, the same seed, data and
    global batch), on a fresh world-1 group (other tests destroy the default group)."""
    init_distributed(Launch(rank=0, world_size=1, local_rank=0), torch.device("cpu"))
    return build_trainer(cfg, 0, 1).fit()


def series(records: list[dict], keys=("loss", "grad_norm", "val_loss")) -> dict[str, list[float]]:
    """{key: [value per record that has it]}."""
    return {k: [r[k] for r in records if k in r] for k in keys}
