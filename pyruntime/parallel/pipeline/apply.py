"""Pipeline parallelism for the trainer: split the model, build this rank's executor,
evaluate through the stages, and draw / explain the measured timeline.

    chunks = split_model(model, cfg, dims)              # before tensor parallelism and ZeRO
    ...apply_tp / apply_data_parallel on the pruned model...
    executor = build_executor(chunks, model, cfg, dims, device, loss_fn, engine, autocast)
    loss_sum = executor.run_step(micro_batches)
"""
from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn

from pyruntime.config import Config
from pyruntime.mesh import ParallelDims
from pyruntime.parallel.pipeline.executor import PipelineExecutor, PipelineSpec, debug_from_env
from pyruntime.parallel.pipeline.schedule import Costs, TimedEvent, build_schedule, simulate
from pyruntime.parallel.pipeline.split import StageChunk, keep_local_stages, plan_stage_layers


def microbatch_count(cfg: Config) -> int:
    return cfg.data.global_batch // (cfg.parallel.dp * cfg.data.micro_batch)


def split_model(model: nn.Module, cfg: Config, dims: ParallelDims) -> tuple[list[StageChunk], list[int]]:
    """Prunes `model` to this rank's stages; returns its chunks and the layers per stage."""
    par = cfg.parallel
    counts = plan_stage_layers(cfg.model, dims.pp * par.virtual_stages, par.pp_layout)
    chunks = keep_local_stages(model, counts, dims.pp, dims.axis_rank("pp"), par.virtual_stages)
    return chunks, counts


def activation_shape(cfg: Config) -> tuple[int, int, int]:
    """(micro-batch, tokens per rank, hidden): a sequence shard under sequence parallelism."""
    shards = cfg.parallel.tp if cfg.parallel.sequence_parallel else 1
    return (cfg.data.micro_batch, cfg.data.seq_len // shards, cfg.model.dim)


def build_executor(chunks: Sequence[StageChunk], model: nn.Module, cfg: Config, dims: ParallelDims,
                   device: torch.device, loss_fn: Callable, engine,
                   autocast: contextlib.AbstractContextManager) -> PipelineExecutor:
    par = cfg.parallel
    actions = build_schedule(par.schedule, dims.pp, microbatch_count(cfg), par.virtual_stages)
    # The residual stream has the parameters' dtype (fp32 master weights, or ZeRO-3's
    # compute copies): autocast only lowers the GEMM outputs, which the residual add promotes.
    dtype = next(p.dtype for p in model.parameters())
    spec = PipelineSpec(pp=dims.pp, pp_rank=dims.axis_rank("pp"), virtual_stages=par.virtual_stages,
                        microbatches=microbatch_count(cfg), activation_shape=activation_shape(cfg),
                        activation_dtype=dtype, timeout_s=cfg.train.peer_timeout_s, debug=debug_from_env())
    return PipelineExecutor(chunks, actions[spec.pp_rank], spec, pp_group=dims.group("pp"), device=device,
                            loss_fn=loss_fn, engine=engine, autocast=autocast)


@torch.no_grad()
def pipeline_losses(executor: PipelineExecutor, batches, autocast) -> list[torch.Tensor]:
    """Forward-only pass of each batch through the stages, in stage order with blocking
    send/recv (rank r runs its chunks in stage order; each hop goes to the next rank, so the
    chain cannot cycle). Returns the losses on the last stage's rank, zeros elsewhere."""
    spec, losses = executor.spec, []
    prev = executor.peer_global[(spec.pp_rank - 1) % spec.pp]
    nxt = executor.peer_global[(spec.pp_rank + 1) % spec.pp]
    for x, y in batches:
        shape = (x.shape[0], *spec.activation_shape[1:])  # validation batches may differ in size
        loss = torch.zeros((), device=executor.device)
        for chunk in executor.chunks:
            if chunk.is_first:
                h = x.to(executor.device)
            else:
                h = torch.empty(shape, dtype=spec.activation_dtype, device=executor.device)
                dist.recv(h, prev)
            with autocast:
                out = chunk(h)
                if chunk.is_last:
                    loss = executor.loss_fn(out, y.to(executor.device))
                else:
                    dist.send(out.contiguous(), nxt)
        losses.append(loss)
    return losses


def gather_timeline(executor: PipelineExecutor, dims: ParallelDims) -> list[list[TimedEvent]] | None:
    """The last step's timed actions of every pp rank of this rank's (dp, tp) = (0, 0) pipeline,
    on global rank 0 (a collective over the world: every rank calls it)."""
    mine = executor.record if dims.axis_rank("dp") == 0 and dims.axis_rank("tp") == 0 else None
    everything: list = [None] * dims.world_size
    dist.all_gather_object(everything, mine)
    if dist.get_rank() != 0:
        return None
    records = [r for r in everything if r is not None]
    # Each rank timed its actions from its own start of the step; shift them onto one clock
    # (wall time: exact on one host, NTP-close across hosts).
    t0 = min(r.wall_start for r in records)
    per_rank = [[dataclasses.replace(e, start=e.start + r.wall_start - t0, end=e.end + r.wall_start - t0)
                 for e in r.events] for r in records]
    return sorted(per_rank, key=lambda evs: evs[0].rank if evs else 0)


def measured_costs(events: Sequence[TimedEvent], virtual_stages: int) -> Costs:
    """Mean measured duration per action kind, as simulator costs (whole-rank units)."""
    def mean(kind: str) -> float:
        d = [e.duration for e in events if e.kind == kind]
        return virtual_stages * sum(d) / len(d) if d else 0.0
    has_w = any(e.kind == "W" for e in events)
    if has_w:
        return Costs(forward=mean("F"), backward_input=mean("B"), backward_weight=mean("W"))
    return Costs(forward=mean("F"), backward=mean("B"))


def report_timeline(per_rank: list[list[TimedEvent]], cfg: Config, dims: ParallelDims,
                    out_dir: str | None) -> str:
    """Measured bubble per rank beside the simulated one (same schedule, measured mean costs);
    with out_dir also the PNG Gantt chart and the Chrome trace of the measured step."""
    from pyruntime.parallel.pipeline.timeline import draw_timeline, first_pipeline_ranks, write_chrome_trace

    par = cfg.parallel
    events = [e for evs in per_rank for e in evs]
    span = max(e.end for e in events)
    measured = []
    for evs in per_rank:
        busy = sum(e.duration for e in evs if e.kind in ("F", "B", "W"))
        measured.append(1.0 - busy / span)
    sim = simulate(par.schedule, dims.pp, microbatch_count(cfg), par.virtual_stages,
                   measured_costs(events, par.virtual_stages))
    line = (f"pipeline {par.schedule}: bubble per rank measured "
            + " ".join(f"{b:.3f}" for b in measured) + " | simulated with measured F/B/W times "
            + " ".join(f"{b:.3f}" for b in sim.bubble_fractions)
            + f" | step {span * 1e3:.1f} ms vs simulated {sim.makespan * 1e3:.1f} ms"
            " (the gap: message latency, waits and the loss / optimizer work outside the actions)")
    if out_dir:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        title = (f"measured {par.schedule}: pp={dims.pp}, microbatches={microbatch_count(cfg)}, "
                 f"virtual_stages={par.virtual_stages}")
        draw_timeline(events, Path(out_dir) / "pipeline.png", pp=dims.pp, title=title, unit="s",
                      global_ranks=first_pipeline_ranks(dims))
        write_chrome_trace(events, Path(out_dir) / "pipeline.json", us_per_unit=1e6, name=par.schedule)
        line += f" | timeline: {Path(out_dir) / 'pipeline.png'}"
    return line
