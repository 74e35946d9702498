"""Tied embeddings (model.tie_embeddings) at the sharded layouts, in one 4-rank world against
single-process training (losses within 1e-5 relative every step, the first step's gradient
norm within 1e-6): dp 2 x tp 2 ZeRO-3 (the head's unit gathers the embedding's: one
parameter, one gradient); dp 2 x pp 2 ZeRO-1 and ZeRO-3 (each stage's copy in a flat group of
its own, the gradient shards summed over pp; ZeRO-3 also with --offload optimizer); and a run
resumed at dp 2 x pp 2 ZeRO-2 from the ZeRO-3 run's step-2 checkpoint, which holds the
matrix once; and pp 4, where the two copies sit on the first and last of four stages."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from pyruntime.config import ParallelConfig
from pyruntime.parallel.parallelize import meta_model
from pyruntime.parallel.tied import isolate, tied_copy
from pyruntime.parallel.zero.stage3 import _owned, _unit_params, transformer_units
from support.configs import tiny_config
from support.world import Run, run_world, single_process, train

STEPS, SAVE_AT = 3, 2


def config(out: Path, layers: int | None = None, **parallel):
    cfg = tiny_config(out, steps=STEPS, global_batch=8, micro_batch=2)
    model = dataclasses.replace(cfg.model, tie_embeddings=True, n_layers=layers or cfg.model.n_layers)
    return dataclasses.replace(cfg, model=model, parallel=ParallelConfig(**parallel))


def tied_layout(trainer) -> dict:
    """Where this rank's engine keeps the tied matrix: how many flat groups hold it, how many
    parameters share its group, the group's shard size, and the units each ZeRO-3 unit
    gathers with its own."""
    model, groups = trainer.model, getattr(trainer.data_parallel, "groups", None)
    if groups is None:  # ZeRO-3: the units' groups
        groups = [u.group for u in trainer.data_parallel.units]
    mats = {id(m.weight) for m in (model.embed_tokens, model.lm_head) if m is not None}
    holding = [g for g in groups if any(id(p) in mats for p in g.params)]
    return {"mats": len(mats), "groups": len(holding), "group_params": [len(g.params) for g in holding],
            "shard_numel": [g.layout.shard_numel for g in holding],
            "borrows": getattr(trainer.data_parallel, "borrows", None)}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tied")
    saver = config(tmp / "pp2_zero3", dp=2, pp=2, zero=3)
    saver = dataclasses.replace(saver, train=dataclasses.replace(saver.train, save_every=SAVE_AT))
    resumed = config(tmp / "resumed", dp=2, pp=2, zero=2)
    resumed = dataclasses.replace(resumed, train=dataclasses.replace(
        resumed.train, resume=str(tmp / "pp2_zero3" / "checkpoints" / f"step_{SAVE_AT}")))
    offload = config(tmp / "pp2_zero3_offload", dp=2, pp=2, zero=3)
    runs = {"dp2_tp2_zero3": config(tmp / "tp2_zero3", dp=2, tp=2, zero=3),
            "dp2_pp2_zero1": config(tmp / "pp2_zero1", dp=2, pp=2, zero=1),
            "dp2_pp2_zero3": saver,
            "dp2_pp2_zero3_offload": dataclasses.replace(offload, optim=dataclasses.replace(offload.optim,
                                                                                             offload="optimizer")),
            "resumed_pp2_zero2": resumed,
            "pp4": config(tmp / "pp4", pp=4, layers=4)}
    per_rank = run_world(4, train, [Run(cfg, inspect=None if name == "pp4" else tied_layout)  # pp4: no flat groups
                                    for name, cfg in runs.items()], name="tied")
    results = {name: [per_rank[r][i] for r in range(4)] for i, name in enumerate(runs)}
    return tmp, results, {"layers": single_process(config(tmp / "single")),
                          "four": single_process(config(tmp / "single4", layers=4))}


@pytest.mark.parametrize("name", ["dp2_tp2_zero3", "dp2_pp2_zero1", "dp2_pp2_zero3", "dp2_pp2_zero3_offload", "pp4"])
def test_layout_reproduces_single_process(world, name):
    _, results, refs = world
    ref = refs["four" if name == "pp4" else "layers"]
    for rank, (records, _) in enumerate(results[name]):
        got = torch.tensor([r["loss"] for r in records], dtype=torch.float64)
        want = torch.tensor([r["loss"] for r in ref], dtype=torch.float64)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=0, msg=f"rank {rank}")
        assert abs(records[0]["grad_norm"] - ref[0]["grad_norm"]) <= 1e-6 * ref[0]["grad_norm"], rank


def test_zero3_one_stage_keeps_one_matrix_in_one_unit(world):
    _, results, _ = world
    for _, layout in results["dp2_tp2_zero3"]:
        assert layout["mats"] == 1 and layout["groups"] == 1  # one parameter, in the embedding's unit
        assert layout["borrows"][-1] == [0] and all(not b for b in layout["borrows"][:-1])  # the head's unit


@pytest.mark.parametrize("name", ["dp2_pp2_zero1", "dp2_pp2_zero3"])
def test_pp_stage_copies_sit_alone_in_identically_sharded_groups(world, name):
    _, results, _ = world
    layouts = [layout for _, layout in results[name]]
    assert all(lay["mats"] == 1 and lay["group_params"] == [1] for lay in layouts)  # no middle stage at pp 2
    assert len({tuple(lay["shard_numel"]) for lay in layouts}) == 1  # both stages shard it alike


def test_resume_from_a_zero3_pp_checkpoint_continues_single_process_training(world):
    tmp, results, refs = world
    ref = refs["layers"]
    for rank, (records, _) in enumerate(results["resumed_pp2_zero2"]):
        assert [r["step"] for r in records] == list(range(SAVE_AT + 1, STEPS + 1)), rank
        got = torch.tensor([r["loss"] for r in records], dtype=torch.float64)
        want = torch.tensor([r["loss"] for r in ref[SAVE_AT:]], dtype=torch.float64)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=0, msg=f"rank {rank}")
    meta = json.loads((tmp / "pp2_zero3" / "checkpoints" / f"step_{SAVE_AT}" / "meta.json").read_text())
    tied = sorted(n for n in meta["checksums"] if "embed_tokens.weight" in n or "lm_head" in n)
    # the matrix, its two moments: once each, under the embedding's name (no head copy)
    assert tied == ["model.embed_tokens.weight", "optim.exp_avg.embed_tokens.weight",
                    "optim.exp_avg_sq.embed_tokens.weight"], tied


def test_isolate_moves_the_item_into_a_list_of_its_own_in_place():
    a, b, c, d = object(), object(), object(), object()
    assert isolate([[a, b, c], [d]], b) == [[a], [b], [c], [d]]
    assert isolate([[a, b], [c]], a) == [[a], [b], [c]]
    assert isolate([[a, b]], None) == [[a, b]] and isolate([[a, b]], d) == [[a, b]]


def test_tied_units_one_stage_and_stage_copies(tmp_path):
    model = meta_model(config(tmp_path))
    assert tied_copy(model) is None  # both uses on this stage: one parameter, nothing to sum
    owned, borrows = _owned([_unit_params(u) for u in transformer_units(model)])
    assert sum(any(p is model.embed_tokens.weight for p in ps) for ps in owned) == 1
    assert borrows[-1] == [0] and all(not b for b in borrows[:-1])
    model.embed_tokens = None  # the last pipeline stage: the head's copy, in a unit of its own
    assert tied_copy(model) is model.lm_head.weight
    assert transformer_units(model)[-2:] == [[model.norm], [model.lm_head]]
