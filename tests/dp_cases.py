"""The data-parallel / ZeRO test cases: which stages, variants and configs the shared worlds
(tests/pyruntime/parallel/conftest.py) run, and the loss comparison."""
from __future__ import annotations

import dataclasses

import torch

from pyruntime.comm.collectives import DEBUG_DELAY_ENV

from dp_workers import Run, overlap_probe, train_records, with_parallel
from helpers import tiny_config

STEPS = 20
DELAY_STEPS = 6
DELAY_S = "0.003"
ZEROS = (0, 1, 2, 3)
# plain: one micro-batch per rank, no clipping, one 25 MB bucket, validation every 10 steps
# (forward under no_grad: ZeRO-3 gathers and frees without a backward). accum_clip: two
# micro-batches per rank, a clip far below the gradient norm (so it always acts), buckets of
# ~2600 elements.
VARIANTS = {"plain": {"micro_per_rank": 1, "grad_clip": 0.0, "bucket_mb": 25.0, "eval_every": 10},
            "accum_clip": {"micro_per_rank": 2, "grad_clip": 0.3, "bucket_mb": 0.01, "eval_every": 0}}
GLOBAL_BATCH = 8


def config(out_dir, dp: int, zero: int, variant: str, steps: int = STEPS):
    v = VARIANTS[variant]
    cfg = tiny_config(out_dir, steps=steps, global_batch=GLOBAL_BATCH,
                      micro_batch=GLOBAL_BATCH // dp // v["micro_per_rank"], eval_every=v["eval_every"],
                      eval_batches=2)
    cfg = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, grad_clip=v["grad_clip"]))
    return with_parallel(cfg, dp=dp, zero=zero, bucket_mb=v["bucket_mb"])


def world_jobs(out_dir, dp: int) -> tuple[list, list]:
    runs = [(z, v) for z in ZEROS for v in VARIANTS]
    jobs = [(train_records, {"runs": [Run(config(out_dir, dp, z, v)) for z, v in runs]})]
    if dp == 2:  # the debug-delay runs and overlap probes need one world only
        jobs.append((train_records, {"runs": [Run(config(out_dir, dp, z, "accum_clip", DELAY_STEPS),
                                                  {DEBUG_DELAY_ENV: DELAY_S}) for z in ZEROS]}))
        jobs += [(overlap_probe, {"zero": z, "out_dir": str(out_dir)}) for z in (0, 3)]
    return runs, jobs


def assert_losses_match(got: list[float], want: list[float], rtol: float = 1e-5) -> None:
    assert len(got) == len(want)
    torch.testing.assert_close(torch.tensor(got, dtype=torch.float64), torch.tensor(want, dtype=torch.float64),
                               rtol=rtol, atol=0)
