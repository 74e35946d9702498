"""Shared worlds for the data-parallel and ZeRO tests: spawning costs seconds on CI's 2 cores,
so each dp size is spawned once per session and runs every stage and variant (tests/dp_cases.py)
in it, and single-process references are computed once, in this process."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from pyruntime.mesh import Launch, ParallelDims, init_distributed
from pyruntime.train.trainer import Trainer

from dp_cases import DELAY_STEPS, STEPS, ZEROS, config, world_jobs
from dp_workers import run_jobs
from multiproc import run_world


@pytest.fixture(scope="session")
def world_results(tmp_path_factory):
    """world_results(dp) -> {"train": {(zero, variant): [records of rank r] per rank},
    "delay": {zero: [...]}, "overlap": {zero: [probe of rank r]}}; each dp spawned once."""
    cache = {}

    def get(dp: int) -> dict:
        if dp not in cache:
            out_dir = tmp_path_factory.mktemp(f"dp{dp}")
            runs, jobs = world_jobs(out_dir, dp)
            per_rank = run_world(dp, run_jobs, jobs)
            result = {"train": {run: [r[0][i] for r in per_rank] for i, run in enumerate(runs)}}
            if dp == 2:
                result["delay"] = {z: [r[1][i] for r in per_rank] for i, z in enumerate(ZEROS)}
                result["overlap"] = {0: [r[2] for r in per_rank], 3: [r[3] for r in per_rank]}
            cache[dp] = result
        return cache[dp]

    return get


@pytest.fixture(scope="session")
def reference_records(tmp_path_factory):
    """reference_records(dp, variant) -> single-process records of that variant with the
    micro-batch size of the dp run (validation batches are cut in micro-batches); variant
    "delay": the accum_clip variant over DELAY_STEPS."""
    out_dir = tmp_path_factory.mktemp("single")
    cache = {}

    def get(dp: int, variant: str) -> list[dict]:
        if (dp, variant) not in cache:
            # A fresh world-1 group and mesh each time: other tests destroy the default group.
            init_distributed(Launch(rank=0, world_size=1, local_rank=0), torch.device("cpu"))
            dims = ParallelDims(1, 1, 1, 1).build_mesh("cpu")
            steps = DELAY_STEPS if variant == "delay" else STEPS
            cfg = config(out_dir, dp, 0, "accum_clip" if variant == "delay" else variant, steps)
            cfg = dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, dp=1))
            cache[(dp, variant)] = Trainer(cfg, dims, torch.device("cpu")).fit()
        return cache[(dp, variant)]

    return get


@pytest.fixture(scope="session")
def layout_world(tmp_path_factory):
    """layout_world(world) -> {"layouts": {Layout: Result}, "reshard": {Layout: losses} or
    None}: every pipeline and composed layout of that world size (tests/layout_cases.py),
    and in the resharding world the resharding cases, trained in one spawned world."""
    import layout_cases

    cache = {}

    def get(world: int) -> dict:
        if world not in cache:
            layouts = layout_cases.PIPELINE.get(world, []) + layout_cases.COMPOSED.get(world, [])
            out_dir = str(tmp_path_factory.mktemp(f"layouts{world}"))
            reshard = world == layout_cases.RESHARD_WORLD
            out = run_world(world, layout_cases.run_layouts, out_dir, layouts, reshard)[0]
            cache[world] = {"layouts": dict(zip(layouts, out["layouts"])), "reshard": out.get("reshard")}
        return cache[world]

    return get


@pytest.fixture(scope="session")
def layout_results(layout_world):
    """layout_results(world) -> {Layout: Result} of that world's layouts."""
    return lambda world: layout_world(world)["layouts"]


@pytest.fixture(scope="session")
def layout_reference(tmp_path_factory):
    """Single-process Result of the layout-case config, the whole global batch in one
    micro-batch: every layout, whatever its micro-batch size, must reproduce it (training
    and validation losses are means over equal-sized micro-batches)."""
    import layout_cases

    # A fresh world-1 group and mesh: other tests destroy the default group.
    init_distributed(Launch(rank=0, world_size=1, local_rank=0), torch.device("cpu"))
    dims = ParallelDims(1, 1, 1, 1).build_mesh("cpu")
    cfg = layout_cases.config(tmp_path_factory.mktemp("layout_single"), layout_cases.Layout())
    return layout_cases.records_to_result(Trainer(cfg, dims, torch.device("cpu")).fit())
