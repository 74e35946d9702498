"""Workers for the data-parallel / ZeRO tests, run on spawned ranks by multiproc.run_world (they
must live in an importable module, not in a test file). One world runs many jobs:

    run_world(2, run_jobs, [(train_records, {"runs": [Run(cfg), ...]}), (overlap_probe, {"zero": 3})])
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

import torch

from pyruntime.config import Config
from pyruntime.mesh import ParallelDims
from pyruntime.parallel.data import apply_data_parallel
from pyruntime.train.trainer import Trainer, build_model, open_corpus

from helpers import tiny_config


def with_parallel(cfg: Config, **parallel) -> Config:
    return dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, **parallel))


@dataclass
class Run:
    """One training run; env is set around it (e.g. the comm debug delay)."""

    cfg: Config
    env: dict[str, str] = field(default_factory=dict)


def run_jobs(rank: int, world_size: int, jobs: list[tuple]) -> list:
    """Worker: each (fn, kwargs) in turn, on this rank; their results in order."""
    return [fn(rank, world_size, **kwargs) for fn, kwargs in jobs]


def train_records(rank: int, world_size: int, runs: list[Run]) -> list[list[dict]]:
    """Each run's per-step metric records on this rank (one corpus load per data setting)."""
    corpora, out = {}, []
    for run in runs:
        cfg = run.cfg
        key = (cfg.data.path, cfg.data.max_bytes, cfg.data.seq_len)
        corpora[key] = corpora.get(key) or open_corpus(cfg)
        p = cfg.parallel
        dims = ParallelDims(p.dp, p.pp, p.tp, world_size).build_mesh("cpu")
        saved = {k: os.environ.get(k) for k in run.env}
        os.environ.update(run.env)
        try:
            out.append(Trainer(cfg, dims, torch.device("cpu"), rank=rank, corpus=corpora[key]).fit())
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    return out


def overlap_probe(rank: int, world_size: int, zero: int, out_dir: str) -> dict[str, int]:
    """Collectives issued by the time the backward reaches the embedding (the last thing it
    computes) versus by the end of the backward: overlap means most were issued before."""
    cfg = with_parallel(tiny_config(out_dir, global_batch=2 * world_size, micro_batch=2), dp=world_size,
                        zero=zero, bucket_mb=0.01)
    dims = ParallelDims(world_size, 1, 1, world_size).build_mesh("cpu")
    model = build_model(cfg, torch.device("cpu"))
    engine = apply_data_parallel(model, dims, cfg)
    stats = engine.comm.stats
    seen: dict[str, int] = {}

    def snapshot(_grad):
        seen.update({f"mid_{k}": v for k, v in stats.calls.items()})

    def on_embedding_output(_module, _args, out):
        out.register_hook(snapshot)

    model.embed_tokens.register_forward_hook(on_embedding_output)
    x = torch.randint(0, cfg.model.vocab_size, (2, cfg.data.seq_len), generator=torch.Generator().manual_seed(rank))
    with engine.micro_batch(last=True):
        model(x).float().logsumexp(-1).mean().backward()
    engine.finish_gradient_sync()
    seen.update({f"end_{k}": v for k, v in stats.calls.items()})
    return seen
