"""Parallel layouts (dp x pp x tp, ZeRO stage, sequence parallelism, pipeline schedule) that
must reproduce single-process training, grouped by world size so each world is spawned once
(tests/pyruntime/parallel/test_tensor_model.py, test_pipeline.py and test_3d.py share them
through conftest)."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist

from pyruntime.config import Config, ParallelConfig
from pyruntime.mesh import ParallelDims
from pyruntime.train.checkpoint import load_checkpoint, save_checkpoint
from pyruntime.train.trainer import Trainer

from support.configs import TEST_MODEL, tiny_config
from support.tp_checks import shard_report
from support.world import Run, build_trainer, train

STEPS = 20
GLOBAL_BATCH = 8
# 8 layers so pp 4 x v 2 has a layer per stage; 8 query / 4 KV heads and ffn 64 divide by
# tp 4; a vocabulary of 259 is padded under tp (the byte corpus uses ids < 256).
MODEL = dataclasses.replace(TEST_MODEL, n_layers=8, n_heads=8, n_kv_heads=4, vocab_size=259)


class Layout(NamedTuple):
    """One parity case: the layout and the run settings it trains with (the defaults are the
    layout table's; the data-parallel cases in dp_cases.py set their own)."""

    dp: int = 1
    pp: int = 1
    tp: int = 1
    zero: int = 0
    microbatches: int = 1          # per dp rank and step
    schedule: str = "1f1b"
    virtual_stages: int = 1
    pp_layout: str = "even"
    sp: bool = False
    overlap: bool = False
    mesh_order: str = "dp,pp,tp"
    # run settings
    model: str = "layouts"         # "layouts": MODEL below (8 layers); "tiny": support.configs.TEST_MODEL
    global_batch: int = GLOBAL_BATCH
    steps: int = STEPS
    # lr 1e-3: at 3e-3 the 8-layer model has loss spikes, which amplify summation-order
    # differences in the gradient norm beyond 1e-5 within 20 steps.
    lr: float = 1e-3
    warmup: int = 2
    grad_clip: float = 1.0
    bucket_mb: float = 0.01        # several buckets, some spanning pipeline chunks
    eval_every: int = 10
    recompute: str = "none"
    tag: str = ""                  # a name for the run settings, in test ids

    @property
    def world(self) -> int:
        return self.dp * self.pp * self.tp

    @property
    def micro_batch(self) -> int:
        return self.global_batch // (self.dp * self.microbatches)

    def name(self) -> str:
        parts = [f"dp{self.dp}pp{self.pp}tp{self.tp}", f"zero{self.zero}", f"m{self.microbatches}"]
        if self.pp > 1:
            parts += [self.schedule + (f"v{self.virtual_stages}" if self.virtual_stages > 1 else ""),
                      self.pp_layout.replace(",", "-")]
        parts += ["sp"] * self.sp + ["overlap"] * self.overlap
        if self.mesh_order != "dp,pp,tp":
            parts.append(self.mesh_order.replace(",", "-"))
        parts += [f"recompute-{self.recompute}"] if self.recompute != "none" else []
        return "_".join(parts + ([self.tag] if self.tag else []))

    def single_process(self) -> "Layout":
        """The same run on one process, each micro-batch the same size (validation batches are
        cut in micro-batches, so their means only agree at equal sizes)."""
        return self._replace(dp=1, pp=1, tp=1, zero=0, sp=False, overlap=False,
                             microbatches=self.dp * self.microbatches)


def config(out_dir, layout: Layout) -> Config:
    cfg = tiny_config(out_dir, steps=layout.steps, global_batch=layout.global_batch, micro_batch=layout.micro_batch,
                      eval_every=layout.eval_every, eval_batches=2)
    par = ParallelConfig(dp=layout.dp, pp=layout.pp, tp=layout.tp, zero=layout.zero, schedule=layout.schedule,
                         virtual_stages=layout.virtual_stages, pp_layout=layout.pp_layout,
                         sequence_parallel=layout.sp, tp_overlap=layout.overlap, mesh_order=layout.mesh_order,
                         bucket_mb=layout.bucket_mb, recompute=layout.recompute)
    model = MODEL if layout.model == "layouts" else TEST_MODEL
    optim = dataclasses.replace(cfg.optim, lr=layout.lr, warmup_steps=layout.warmup, grad_clip=layout.grad_clip)
    return dataclasses.replace(cfg, model=dataclasses.replace(model), parallel=par, optim=optim)


# Tensor parallelism on its own (issue: tensor + sequence parallelism): plain, sequence
# parallel with the chunked overlap, and tp 4 (the vocabulary of 259 is padded under both).
TENSOR = {2: [Layout(tp=2), Layout(tp=2, sp=True, overlap=True)],
          4: [Layout(tp=4, sp=True)]}

# pp 2 and pp 4: every schedule, uneven and balanced layouts (issue: pipeline parallelism).
PIPELINE = {
    2: [Layout(pp=2, schedule="naive", microbatches=2, pp_layout="3,5"),
        Layout(pp=2, schedule="gpipe", microbatches=4, pp_layout="balanced"),
        Layout(pp=2, schedule="1f1b", microbatches=4, pp_layout="5,3"),
        Layout(pp=2, schedule="interleaved", virtual_stages=2, microbatches=4, pp_layout="1,3,2,2"),
        Layout(pp=2, schedule="zb", microbatches=4)],
    4: [Layout(pp=4, schedule="naive", microbatches=2),
        Layout(pp=4, schedule="gpipe", microbatches=4, pp_layout="1,2,3,2"),
        Layout(pp=4, schedule="1f1b", microbatches=4, pp_layout="3,1,1,3"),
        Layout(pp=4, schedule="interleaved", virtual_stages=2, microbatches=4),
        Layout(pp=4, schedule="zb", microbatches=8, pp_layout="2,2,1,3")],
}

# dp x pp x tp compositions with ZeRO on dp, up to 8 ranks (issue: 2D/3D parallelism).
COMPOSED = {
    4: [Layout(dp=2, pp=2, zero=1, microbatches=2),
        Layout(dp=2, pp=2, zero=3, microbatches=2, schedule="zb", mesh_order="pp,dp,tp"),
        Layout(pp=2, tp=2, sp=True, microbatches=2, schedule="interleaved", virtual_stages=2, pp_layout="3,1,2,2"),
        Layout(pp=2, tp=2, sp=True, overlap=True, microbatches=4, schedule="gpipe", pp_layout="balanced"),
        Layout(dp=2, tp=2, zero=2, sp=True, microbatches=2)],
    # 8 processes on CI's 2 cores are slow: only the full 3D layouts.
    8: [Layout(dp=2, pp=2, tp=2, zero=1, sp=True, microbatches=2),
        Layout(dp=2, pp=2, tp=2, zero=3, microbatches=2, schedule="interleaved", virtual_stages=2),
        Layout(dp=2, pp=2, tp=2, zero=2, sp=True, overlap=True, microbatches=2, pp_layout="3,5"),
        Layout(dp=2, pp=2, tp=2, zero=0, sp=True, microbatches=2, schedule="zb", pp_layout="balanced")],
}

# Resharding (issue: 2D/3D parallelism), in the 8-rank world: the first 3D layout's run is
# checkpointed at RESHARD_AT, then resumed at other dp / pp / tp and another ZeRO stage; the
# next RESHARD_STEPS losses must equal the uninterrupted run's (COMPOSED[8][0]'s).
RESHARD_WORLD, RESHARD_AT, RESHARD_STEPS = 8, 12, 3
RESHARD_SAVER = COMPOSED[RESHARD_WORLD][0]
RESHARD_TARGETS = [Layout(dp=4, tp=2, zero=3, microbatches=1),
                   Layout(pp=2, tp=4, zero=2, sp=True, microbatches=4, schedule="interleaved", virtual_stages=2),
                   Layout(dp=8, zero=2, microbatches=1)]


class Result(NamedTuple):
    loss: list[float]
    grad_norm: list[float]
    val_loss: list[float]


def records_to_result(records: list[dict]) -> Result:
    return Result(*([r[k] for r in records if k in r] for k in ("loss", "grad_norm", "val_loss")))


# Recomputation on the full 3D layout (issue: memory): none / selective / full must give
# bit-identical losses and gradient norms; 3 steps each (compared with each other).
RECOMPUTE = {8: [COMPOSED[8][0]._replace(steps=3, eval_every=0, recompute=mode)
                 for mode in ("none", "selective", "full")]}


def by_world(world: int) -> list[Layout]:
    return TENSOR.get(world, []) + PIPELINE.get(world, []) + COMPOSED.get(world, []) + RECOMPUTE.get(world, [])


def trainer(out_dir, layout: Layout, rank: int, world_size: int) -> Trainer:
    return build_trainer(config(out_dir, layout), rank, world_size)


def run_layouts(rank: int, world_size: int, out_dir: str, layouts: list[Layout], reshard: bool = False) -> dict | None:
    """Worker for run_world: trains every layout in turn (support/world.train; the tp-only ones
    also check their shards, support/tp_checks.shard_report), then, if asked, the resharding
    cases; rank 0 returns {"layouts": [Result per layout], "inspected": [...], "reshard":
    {target Layout: losses}} (losses are the same on every rank)."""
    runs = [Run(config(out_dir, l), inspect=shard_report if l in TENSOR.get(world_size, []) else None)
            for l in layouts]
    trained = train(rank, world_size, runs)
    results = [records_to_result(r.records) for r in trained]
    everyone: list = [None] * world_size
    dist.all_gather_object(everyone, results)
    assert all(e == results for e in everyone), "ranks report different losses"  # all are reduced
    out = {"layouts": results, "inspected": [r.inspected for r in trained]}
    if reshard:
        out["reshard"] = run_reshard(rank, world_size, out_dir)
    return out if rank == 0 else None


def run_reshard(rank: int, world_size: int, out_dir: str) -> dict[Layout, list[float]]:
    ckpt = Path(out_dir) / "reshard"
    saver = trainer(out_dir, RESHARD_SAVER, rank, world_size)
    for step in range(RESHARD_AT):
        saver.train_step(step)
    save_checkpoint(saver, ckpt, RESHARD_AT)
    out = {}
    for layout in RESHARD_TARGETS:
        t = trainer(out_dir, layout, rank, world_size)
        start = load_checkpoint(t, ckpt)
        out[layout] = [t.train_step(step)["loss"] for step in range(start, start + RESHARD_STEPS)]
    return out


# Losses (the standard) and gradient norms within 1e-5 over the run, and the first step's
# gradient norm (before any update could amplify a difference) within 1e-6.
RTOL = {"loss": 1e-5, "val_loss": 1e-5, "grad_norm": 1e-5}
FIRST_NORM_RTOL = 1e-6


def assert_matches(got: Result, want: Result) -> None:
    for field in Result._fields:
        g, w = getattr(got, field), getattr(want, field)
        assert len(g) == len(w), field
        torch.testing.assert_close(torch.tensor(g, dtype=torch.float64), torch.tensor(w, dtype=torch.float64),
                                   rtol=RTOL[field], atol=0, msg=lambda m, f=field: f"{f}: {m}")
    first, want_first = got.grad_norm[0], want.grad_norm[0]
    assert abs(first - want_first) <= FIRST_NORM_RTOL * want_first, f"first grad norm {first} vs {want_first}"
