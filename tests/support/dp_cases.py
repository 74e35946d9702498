"""The data-parallel / ZeRO test cases, as Layout cases (support/layouts.py) of the tiny model
with a variant's run settings: which stages and variants the shared worlds
(tests/pyruntime/parallel/conftest.py) run, and the loss comparison."""
from __future__ import annotations

import torch

from pyruntime.comm.collectives import DEBUG_DELAY_ENV
from pyruntime.config import OptimConfig, ParallelConfig

from support.dp_probes import overlap_probe
from support.layouts import STEPS, Layout, config
from support.world import Run, train

DELAY_STEPS = 6
DELAY_S = "0.003"
ZEROS = (0, 1, 2, 3)
# plain: one micro-batch per rank, no clipping, one 25 MB bucket, validation every 10 steps
# (forward under no_grad: ZeRO-3 gathers and frees without a backward). accum_clip: two
# micro-batches per rank, a clip far below the gradient norm (so it always acts), buckets of
# ~2600 elements. cli_default: the optimizer and bucket settings of a plain `train` command
# (clipping at 1.0 over large flat shards: an inexact norm would drift the losses apart).
_CLI = (OptimConfig(), ParallelConfig())
VARIANTS = {"plain": {"micro_per_rank": 1, "grad_clip": 0.0, "bucket_mb": 25.0, "eval_every": 10},
            "accum_clip": {"micro_per_rank": 2, "grad_clip": 0.3, "bucket_mb": 0.01, "eval_every": 0},
            "cli_default": {"micro_per_rank": 1, "grad_clip": _CLI[0].grad_clip, "bucket_mb": _CLI[1].bucket_mb,
                            "eval_every": 0, "lr": _CLI[0].lr, "warmup": _CLI[0].warmup_steps}}
# dp 3 (its own world): ZeRO-2 with one bucket over the whole model, so each rank's gradient
# shard is one long flat tensor (the case where an fp32 norm was furthest off), CLI defaults.
ONE_BUCKET = {"global_batch": 6, "bucket_mb": 1000.0}


def case(dp: int, zero: int, variant: str, steps: int = STEPS) -> Layout:
    """The Layout of a data-parallel case: the tiny model (support.configs.TEST_MODEL) at lr
    3e-3 unless the variant says otherwise, one_bucket at dp 3 on top of cli_default."""
    v = VARIANTS["cli_default" if variant == "one_bucket" else variant]
    settings = {"lr": v.get("lr", 3e-3), "warmup": v.get("warmup", 2), "grad_clip": v["grad_clip"],
                "bucket_mb": v["bucket_mb"], "eval_every": v["eval_every"],
                **(ONE_BUCKET if variant == "one_bucket" else {})}
    return Layout(dp=dp, zero=zero, microbatches=v["micro_per_rank"], model="tiny", steps=steps, tag=variant,
                  **settings)


def world_jobs(out_dir, dp: int) -> tuple[list, list]:
    """The runs of the dp world ((zero, variant) keys, in order) and its jobs for run_jobs."""
    if dp == 3:
        return [(2, "one_bucket")], [(train, {"runs": [Run(config(out_dir, case(3, 2, "one_bucket")))]})]
    runs = [(z, v) for z in ZEROS for v in VARIANTS]
    jobs = [(train, {"runs": [Run(config(out_dir, case(dp, z, v))) for z, v in runs]})]
    if dp == 2:  # the debug-delay runs and overlap probes need one world only
        jobs.append((train, {"runs": [Run(config(out_dir, case(dp, z, "accum_clip", DELAY_STEPS)),
                                          {DEBUG_DELAY_ENV: DELAY_S}) for z in ZEROS]}))
        jobs += [(overlap_probe, {"zero": z, "out_dir": str(out_dir)}) for z in (0, 3)]
    return runs, jobs


def assert_losses_match(got: list[float], want: list[float], rtol: float = 1e-5) -> None:
    assert len(got) == len(want)
    torch.testing.assert_close(torch.tensor(got, dtype=torch.float64), torch.tensor(want, dtype=torch.float64),
                               rtol=rtol, atol=0)
