"""Workers for the pipeline executor's failure tests (tests/pyruntime/parallel/test_pipeline_errors.py)."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

from pyruntime.config import Config
from pyruntime.mesh import ParallelDims
from pyruntime.parallel.pipeline.executor import DEBUG_ENV, PipelineError
from pyruntime.train.trainer import Trainer


def _trainer(rank: int, world_size: int, cfg: Config) -> Trainer:
    dims = ParallelDims.from_config(cfg.parallel, world_size).build_mesh("cpu")
    return Trainer(cfg, dims, torch.device("cpu"), rank=rank)


def shape_mismatch(rank: int, world_size: int, cfg: Config) -> str:
    """Debug headers on; rank 1 believes in a different sequence length than rank 0 sends:
    the receiver must name the mismatch instead of reading garbage or hanging."""
    os.environ[DEBUG_ENV] = "1"
    trainer = _trainer(rank, world_size, cfg)
    if rank == 1:
        spec = trainer.pipeline.spec
        bad = (spec.activation_shape[0], spec.activation_shape[1] + 1, spec.activation_shape[2])
        trainer.pipeline.spec = type(spec)(**{**spec.__dict__, "activation_shape": bad})
    try:
        trainer.train_step(0)
    except PipelineError as e:
        return str(e)
    finally:
        os.environ.pop(DEBUG_ENV, None)
    return ""


def silent_peer(rank: int, world_size: int, cfg: Config) -> str:
    """Rank 1 never runs its step: rank 0 must give up after the timeout, naming rank 1.
    (gloo drops the connection after a timed-out receive, so rank 1 waits on the store.)"""
    trainer = _trainer(rank, world_size, cfg)
    store = dist.distributed_c10d._get_default_store()
    if rank == 1:
        store.wait(["silent_peer_verdict"])
        return ""
    try:
        trainer.train_step(0)
    except PipelineError as e:
        return str(e)
    finally:
        store.set("silent_peer_verdict", "1")
    return ""
