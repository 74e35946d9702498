"""What the planner's predictions are checked against, measured on the real trainer: run on
every rank of a spawned world (pyruntime/spawn.py) by the tests and by `bench plan`.

    run_world(4, measure_states, [cfg, ...])   # per config: this rank's planned and held bytes
"""
from __future__ import annotations

import time

import torch

from pyruntime.config import Config
from pyruntime.mesh import ParallelDims
from pyruntime.parallel.recompute import ALL_OPS

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
    """Fastest step time (s) of each config on this rank after `warmup` steps (the least
    disturbed step, as plan --calibrate times the machine; see calibrate._best_time)."""
    corpora: dict = {}
    out = []
    for cfg in configs:
        trainer, _ = build_trainer(cfg, rank, world_size, corpora)
        times = []
        for step in range(warmup + steps):
            t0 = time.perf_counter()
            trainer.train_step(step)
            times.append(time.perf_counter() - t0)
        out.append(min(times[warmup:]))
    return out


def saved_bytes(model, loss_fn, x, y, params=None) -> tuple[int, int]:
    """(bytes the model's forward saves for backward, bytes its loss adds), distinct storages,
    parameters (default: the model's) left out (train/saved_bytes.SavedTensorMeter)."""
    from pyruntime.train.saved_bytes import SavedTensorMeter

    meter = SavedTensorMeter(exclude=model.parameters() if params is None else params)
    with meter:
        out = model(x)
    body = meter.bytes
    with meter:
        loss_fn(out, y)
    return body, meter.bytes - body


def measure_activations(rank: int, world_size: int, configs: list[Config]) -> list[tuple[int, int]]:
    """Per config: saved_bytes of one micro-batch through this rank's whole model (tp layouts,
    recompute modes; the trainer's model and loss). Meters nest, so the blocks' own meter
    (parallel/recompute.py) does not hide what they save from this one."""
    corpora: dict = {}
    out = []
    for cfg in configs:
        trainer, dims = build_trainer(cfg, rank, world_size, corpora)
        x, y = trainer.sampler.micro_batches(0, dims.axis_rank("dp"), dims.dp, cfg.data.micro_batch)[0]
        out.append(saved_bytes(trainer.model, trainer.loss_fn, x, y))
    return out


def measure_chunk(model_cfg, counts: list[int], pp: int, pp_rank: int, batch: int, seq: int,
                  recompute: str = "none", seed: int = 0, recompute_layers: int | None = None,
                  recompute_ops: str = ALL_OPS) -> list[tuple[int, int]]:
    """saved_bytes of one micro-batch through each chunk of pipeline rank pp_rank (a model of
    counts[s] layers per stage, split as the trainer splits it, recomputing as asked: train's
    --recompute, --recompute-layers, --recompute-ops), in one process: a stage only changes
    which layers run and what its input is."""
    import torch.nn.functional as F

    from pyruntime.model.llama import Transformer
    from pyruntime.parallel.pipeline.split import keep_local_stages
    from pyruntime.parallel.recompute import apply_recompute

    torch.manual_seed(seed)
    model = Transformer(model_cfg)
    chunks = keep_local_stages(model, counts, pp, pp_rank, len(counts) // pp)
    apply_recompute(model, recompute, layers=recompute_layers, stage_layers=counts,
                    ops=tuple(recompute_ops.split(",")))
    out = []
    for chunk in chunks:
        if chunk.is_first:
            x = torch.randint(0, model_cfg.vocab_size, (batch, seq))
        else:
            x = torch.randn(batch, seq, model_cfg.dim, requires_grad=True)
        y = torch.randint(0, model_cfg.vocab_size, (batch, seq))
        loss = (lambda o, t: F.cross_entropy(o.flatten(0, 1).float(), t.flatten())) if chunk.is_last \
            else (lambda o, t: o)
        out.append(saved_bytes(chunk, loss, x, y, params=list(model.parameters())))
    return out
