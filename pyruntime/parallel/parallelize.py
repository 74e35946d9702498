"""The one place that composes the parallelisms, in order, on this rank's model:

    model = meta_model(cfg)                               # the reference model, no storage
    par = parallelize(model, dims, cfg, device)          # pp split -> tp -> dp/ZeRO -> executor
    par.engine.optimizer.step() ...                      # what the trainer drives

1. pipeline: keep only this rank's stages (parameter names never change);
2. tensor (+ sequence) parallelism: shard what is left; the loss becomes vocab-parallel;
3. data parallelism / ZeRO over dp: the engine makes the parameters (deferred init: each
   value is its reference tensors from (seed, name) cut by the tp table, one unit at a time at
   ZeRO-3, so no rank ever holds the full model) and owns the optimizer;
4. the pipeline executor over the stages, the engine and the loss.

Each step only sees what the previous ones left, so the order is the design: tp shards what
pp kept, dp buckets or shards what tp left. Used by the trainer, the tests and the benchmarks.
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from pyruntime.comm.overlap import refuse_overlap
from pyruntime.config import Config
from pyruntime.mesh import ParallelDims
from pyruntime.model import Transformer, init_weights
from pyruntime.model.loss import MaskedLoss, lm_loss
from pyruntime.parallel.data import apply_data_parallel
from pyruntime.parallel.deferred_init import DeferredInit, check_materialized
from pyruntime.parallel.engine import DataParallelEngine
from pyruntime.parallel.pipeline.apply import build_executor, split_model
from pyruntime.parallel.pipeline.executor import PipelineExecutor
from pyruntime.parallel.recompute import apply_recompute
from pyruntime.parallel.tensor import apply_tp, vocab_parallel_cross_entropy


@dataclass
class Parallelized:
    """This rank's share of the model and what drives it."""

    model: nn.Module                 # the rank's stages, tp-sharded; parameters made (ZeRO-3: views)
    engine: DataParallelEngine       # gradient sync, .optimizer, memory accounting, checkpoint state
    executor: PipelineExecutor | None  # pp > 1: runs the schedule's actions
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    autocast: contextlib.AbstractContextManager
    stage_layers: list[int] | None   # pp > 1: layers of each stage


def meta_model(cfg: Config) -> Transformer:
    """The reference model on the meta device: shapes and names only, nothing allocated."""
    with torch.device("meta"):
        return Transformer(cfg.model)


def build_model(cfg: Config, device: torch.device) -> Transformer:
    """The full single-process reference model, initialised from the seed alone (what every
    layout must reproduce)."""
    model = Transformer(cfg.model)
    init_weights(model, cfg.model, cfg.train.seed)
    return model.to(device)


def default_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA (fp32 master weights, bf16 GEMMs); fp32 elsewhere."""
    return (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
            else torch.autocast("cpu", enabled=False))


def parallelize(model: nn.Module, dims: ParallelDims, cfg: Config, device: torch.device, *,
                draw: bool = True, log: Callable[[str], None] = lambda _: None) -> Parallelized:
    """Apply pp, tp, dp/ZeRO and build the executor, in that order, to `model` (in place).

    model: the reference Transformer, on the meta device (its parameters are made by the
    engine: read from cfg.train.init_from or drawn from the seed, or left at zero with
    draw=False when a checkpoint will overwrite every value) or already materialised (kept
    as it is). log: where remarks on
    the settings go (rank 0's console in the trainer)."""
    par = cfg.parallel
    chunks = stage_layers = None
    if dims.pp > 1:
        chunks, stage_layers = split_model(model, cfg, dims)
    loss_fn: Callable = lm_loss
    if dims.tp > 1:  # the model now returns vocab-parallel logits: the loss must match
        overlap = par.tp_overlap
        if overlap and dims.pp > 1 and par.schedule == "zb":
            # The overlapped GEMMs differentiate their chunks inside their own backward, so
            # their weight gradients cannot wait for W (ops/wgrad.py).
            overlap = refuse_overlap("with the zb schedule (the overlapped GEMMs cannot defer their "
                                     "weight gradients to W)")
        apply_tp(model, dims, sequence_parallel=par.sequence_parallel, overlap=overlap)
        loss_fn = functools.partial(vocab_parallel_cross_entropy, tp_group=dims.group("tp"),
                                    vocab_size=cfg.model.vocab_size, backend=cfg.model.kernels)
    loss_fn = MaskedLoss(loss_fn)  # a loss mask in the data (instruction tuning): model/loss.py
    # Recompute wraps each block's forward (and meters what it saves): any engine's hooks
    # and the executor's zero-bubble split work through it (parallel/recompute.py).
    apply_recompute(model, par.recompute, par.recompute_layers, stage_layers, tuple(par.recompute_ops.split(",")))
    init = _values(model, dims, cfg, device, draw)
    engine = apply_data_parallel(model, dims, cfg, init=init, log=log)
    check_materialized(model)
    autocast = default_autocast(device)
    executor = None
    if dims.pp > 1:
        executor = build_executor(chunks, model, cfg, dims, device, loss_fn, engine, autocast)
    return Parallelized(model, engine, executor, loss_fn, autocast, stage_layers)


def _values(model: nn.Module, dims: ParallelDims, cfg: Config, device: torch.device,
            draw: bool) -> DeferredInit | None:
    """Where the parameters' values come from when the engine makes them (model on meta): a
    Hugging Face directory (--init-from: each rank reads only its slices of the files), or
    the seed (every layout draws the same full tensors and cuts its piece)."""
    if not any(p.device.type == "meta" for p in model.parameters()):
        return None
    if cfg.train.init_from and draw:
        from pyruntime.hf.load import hf_init

        return hf_init(model, cfg, dims.group("tp"), device)
    return DeferredInit(model, cfg.model, cfg.train.seed, dims.group("tp"), device, draw=draw)
