"""Activation bytes saved for backward: the planner's formula (pyruntime/plan/activations.py)
against SavedTensorMeter on the real model, within 5%, on 37 layouts (recompute none /
selective / full among them). Layouts that only change shapes (dp: the micro-batch; pp and
virtual stages: which layers and ends a chunk holds) are measured in this process, chunk by
chunk; tp (with and without sequence parallelism) in one 2-rank world running the trainer's
own tp model and vocab-parallel loss."""
import dataclasses

import pytest

from support.configs import tiny_config
from pyruntime.spawn import run_world
from pyruntime.config import ModelConfig
from pyruntime.parallel.pipeline.split import plan_stage_layers
from pyruntime.plan.layout import Layout, Workload, check
from pyruntime.plan.measure import measure_activations, measure_chunk
from pyruntime.plan.memory import chunk_activation_bytes, in_flight

MODEL = ModelConfig(dim=32, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=64, vocab_size=256, max_seq_len=64)
GQA, MHA = {}, {"n_kv_heads": 4}
# (layout, global batch, model changes)
SHAPE_LAYOUTS = [
    (Layout(micro_batch=4), 4, GQA),
    (Layout(dp=2, micro_batch=2), 4, GQA),
    (Layout(dp=4, micro_batch=1), 4, MHA),
    (Layout(pp=2, micro_batch=2), 4, GQA),
    (Layout(pp=2, micro_batch=1), 4, MHA),
    (Layout(pp=2, schedule="gpipe", micro_batch=4), 4, GQA),
    (Layout(pp=2, schedule="naive", micro_batch=4), 4, MHA),
    (Layout(pp=4, micro_batch=1), 4, {"n_layers": 5}),
    (Layout(pp=4, schedule="zb", micro_batch=1), 8, MHA),
    (Layout(pp=2, schedule="interleaved", virtual_stages=2, micro_batch=2), 4, GQA),
    (Layout(pp=2, schedule="interleaved", virtual_stages=2, micro_batch=1), 4, MHA),
    (Layout(pp=4, pp_layout="balanced", micro_batch=1), 4, {"n_layers": 6}),
    (Layout(dp=2, pp=2, micro_batch=1), 4, GQA),
    (Layout(dp=2, pp=2, schedule="zb", micro_batch=1), 8, MHA),
    (Layout(pp=4, schedule="interleaved", virtual_stages=2, micro_batch=1), 8, {"n_layers": 8}),
    (Layout(dp=4, pp=2, micro_batch=1), 16, {"n_layers": 3}),
    (Layout(micro_batch=4, recompute="selective"), 4, GQA),
    (Layout(pp=2, micro_batch=2, recompute="full"), 4, MHA),
    (Layout(dp=2, pp=2, micro_batch=1, recompute="selective"), 4, MHA),
    (Layout(pp=2, schedule="zb", micro_batch=1, recompute="full"), 4, GQA),
    # --recompute-layers (the first K blocks of each chunk) and --recompute-ops (what selective drops)
    (Layout(pp=2, micro_batch=1, recompute="full", recompute_layers=1), 4, {"n_layers": 5}),
    (Layout(pp=2, schedule="interleaved", virtual_stages=2, micro_batch=1, recompute="selective",
            recompute_layers=1), 4, {"n_layers": 6}),
    (Layout(micro_batch=2, recompute="selective", recompute_ops="norm"), 4, GQA),
    (Layout(micro_batch=2, recompute="selective", recompute_ops="swiglu"), 4, GQA),
    (Layout(micro_batch=2, recompute="selective", recompute_ops="kv_repeat,norm", recompute_layers=3), 4, GQA),
]
SEQ = 16


def _close(predicted, measured):
    return abs(predicted - measured) <= 0.05 * measured


@pytest.mark.parametrize("layout,global_batch,model", SHAPE_LAYOUTS)
def test_activation_formula_per_chunk(layout, global_batch, model):
    work = Workload(model=dataclasses.replace(MODEL, **model), seq_len=SEQ, global_batch=global_batch)
    check(work, layout)
    stages = layout.pp * layout.virtual_stages
    counts = plan_stage_layers(work.model, stages, layout.pp_layout)
    for r in range(layout.pp):
        measured = [sum(m) for m in measure_chunk(work.model, counts, layout.pp, r, layout.micro_batch, SEQ,
                                                 layout.recompute, recompute_layers=layout.recompute_layers,
                                                 recompute_ops=layout.recompute_ops)]
        predicted = chunk_activation_bytes(work, layout, r)
        assert len(measured) == len(predicted) == layout.virtual_stages
        for p, m in zip(predicted, measured):
            assert _close(p, m), f"{layout.describe()} rank {r}: predicted {p} B, measured {m} B"
    assert len(in_flight(work, layout)) == layout.pp


# (sp, kv heads, micro-batch, recompute); tp 2 with recompute at 1 and 2 ranks' shapes
TP_LAYOUTS = [(sp, kv, mb, "none") for sp in (False, True) for kv in (2, 4) for mb in (1, 2)] + \
    [(sp, 2, 2, rec) for sp in (False, True) for rec in ("selective", "full")]


def test_activation_formula_tensor_parallel(tmp_path):
    configs = []
    for sp, kv, mb, rec in TP_LAYOUTS:
        cfg = tiny_config(tmp_path, global_batch=4, micro_batch=mb, seq_len=SEQ)
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, n_kv_heads=kv, n_layers=2),
                                  parallel=dataclasses.replace(cfg.parallel, tp=2, sequence_parallel=sp,
                                                               recompute=rec))
        configs.append(cfg)
    per_rank = run_world(2, measure_activations, configs, name="plan activations tp")
    for cfg, (sp, kv, mb, rec), *measured in zip(configs, TP_LAYOUTS, *per_rank):
        work = Workload(model=cfg.model, seq_len=SEQ, global_batch=4)
        predicted = chunk_activation_bytes(work, Layout(tp=2, sp=sp, micro_batch=mb, recompute=rec), 0)[0]
        for rank, m in enumerate(measured):
            assert _close(predicted, sum(m)), \
                f"tp 2 sp {sp} kv {kv} mb {mb} recompute {rec} rank {rank}: {predicted} vs {sum(m)}"
