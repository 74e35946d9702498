"""Shared worlds for the parallel tests: spawning costs seconds on CI's 2 cores, so each world
size is spawned once per session and runs every case of that size (support/dp_cases.py,
support/layouts.py) through the one worker (support/world.py: train), and single-process
references (support/world.py: single_process) are computed once, in this process."""
from __future__ import annotations

import pytest

from support import layouts
from support.dp_cases import DELAY_STEPS, ZEROS, case, world_jobs
from support.world import run_jobs, run_world, single_process


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
            result = {"train": {run: [r[0][i].records for r in per_rank] for i, run in enumerate(runs)}}
            if dp == 2:
                result["delay"] = {z: [r[1][i].records for r in per_rank] for i, z in enumerate(ZEROS)}
                result["overlap"] = {0: [r[2] for r in per_rank], 3: [r[3] for r in per_rank]}
            cache[dp] = result
        return cache[dp]

    return get


@pytest.fixture(scope="session")
def reference_records(tmp_path_factory):
    """reference_records(dp, variant) -> single-process records of that variant's Layout
    (Layout.single_process: the dp run's micro-batch size); variant "delay": the accum_clip
    variant over DELAY_STEPS; "one_bucket": the dp 3 case."""
    out_dir = tmp_path_factory.mktemp("single")
    cache = {}

    def get(dp: int, variant: str) -> list[dict]:
        if (dp, variant) not in cache:
            layout = (case(dp, 0, "accum_clip", DELAY_STEPS) if variant == "delay"
                      else case(dp, 0, variant)).single_process()
            cache[(dp, variant)] = single_process(layouts.config(out_dir, layout))
        return cache[(dp, variant)]

    return get


@pytest.fixture(scope="session")
def layout_world(tmp_path_factory):
    """layout_world(world) -> {"layouts": {Layout: Result}, "inspected": {Layout: ...},
    "reshard": {Layout: losses} or None}: every layout of that world size
    (support/layouts.py), and in the resharding world the resharding cases, in one world."""
    cache = {}

    def get(world: int) -> dict:
        if world not in cache:
            cases = layouts.by_world(world)
            out_dir = str(tmp_path_factory.mktemp(f"layouts{world}"))
            reshard = world == layouts.RESHARD_WORLD
            out = run_world(world, layouts.run_layouts, out_dir, cases, reshard)[0]
            cache[world] = {"layouts": dict(zip(cases, out["layouts"])),
                            "inspected": dict(zip(cases, out["inspected"])), "reshard": out.get("reshard")}
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
    cfg = layouts.config(tmp_path_factory.mktemp("layout_single"), layouts.Layout())
    return layouts.records_to_result(single_process(cfg))
