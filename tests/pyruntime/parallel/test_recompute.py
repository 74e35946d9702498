"""Activation recomputation (parallel/recompute.py): losses and gradient norms bit-identical to
no recomputation at one process and in one spawned 2-rank world (dp 2 ZeRO-3, tp 2 + sp,
pp 2 1F1B, pp 2 zero bubble), the measured activation bytes of `full` equal to the stored
block inputs exactly, selective < none, --recompute-layers, and bad input in one line."""
import dataclasses

import pytest

from pyruntime.config import ConfigError, ParallelConfig
from pyruntime.parallel.pipeline.split import plan_stage_layers
from pyruntime.parallel.validate import validate
from support.configs import TEST_MODEL, tiny_config
from support.world import Run, run_world, single_process, train

MODEL = dataclasses.replace(TEST_MODEL, n_layers=4)
GLOBAL_BATCH, MICRO_BATCH, SEQ_LEN, STEPS = 8, 2, 16, 3
MODES = ("none", "selective", "full")
LAYOUTS = {  # each on 2 ranks
    "dp2_zero3": dict(dp=2, zero=3),
    "tp2_sp": dict(tp=2, sequence_parallel=True),
    "pp2_1f1b": dict(pp=2, schedule="1f1b"),
    "pp2_zb": dict(pp=2, schedule="zb"),
}


def _config(out, mode, layers=None, **parallel):
    cfg = tiny_config(out, steps=STEPS, global_batch=GLOBAL_BATCH, micro_batch=MICRO_BATCH, seq_len=SEQ_LEN)
    return dataclasses.replace(cfg, model=dataclasses.replace(MODEL),
                               parallel=ParallelConfig(recompute=mode, recompute_layers=layers, **parallel))


def _series(records, key):
    return [r[key] for r in records]


def full_bytes(parallel: dict, pp_rank: int = 0) -> int:
    """What `full` keeps per step on one rank: each block's input (micro-batch x tokens on this
    rank x hidden, fp32) and, once per chunk forward, the rotary cos and sin tables (whole
    sequences x head dim), for every micro-batch."""
    dp, pp, tp = (parallel.get(k, 1) for k in ("dp", "pp", "tp"))
    tokens = SEQ_LEN // tp if parallel.get("sequence_parallel") else SEQ_LEN
    layers = plan_stage_layers(MODEL, pp)[pp_rank]
    microbatches = GLOBAL_BATCH // (dp * MICRO_BATCH)
    per_forward = layers * MICRO_BATCH * tokens * MODEL.dim * 4 + 2 * SEQ_LEN * MODEL.head_dim * 4
    return microbatches * per_forward


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = tmp_path_factory.mktemp("recompute_single")
    return {mode: single_process(_config(out / mode, mode)) for mode in MODES}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Every layout x mode (and pp 2 with --recompute-layers 1) in one 2-rank world; per rank,
    per run, the metric records."""
    out = tmp_path_factory.mktemp("recompute_world")
    cases = [(name, mode, None) for name in LAYOUTS for mode in MODES] + [("pp2_1f1b", "full", 1)]
    runs = [Run(_config(out / f"{n}_{m}_{k}", m, k, **LAYOUTS[n])) for n, m, k in cases]
    per_rank = run_world(2, train, runs, name="recompute layouts")
    return {case: [per_rank[r][i].records for r in range(2)] for i, case in enumerate(cases)}


@pytest.mark.parametrize("mode", ["selective", "full"])
def test_single_process_bit_identical(single, mode):
    for key in ("loss", "grad_norm"):
        assert _series(single[mode], key) == _series(single["none"], key), key


def test_single_process_activation_bytes(single):
    none, selective, full = (single[m][0]["activation_bytes"] for m in MODES)
    assert full == full_bytes({}), (full, full_bytes({}))
    assert full < selective < none, (full, selective, none)
    assert all(r["activation_bytes"] == single[m][0]["activation_bytes"] for m in MODES for r in single[m])


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("mode", ["selective", "full"])
def test_layouts_bit_identical(world, layout, mode):
    for rank in range(2):
        for key in ("loss", "grad_norm"):
            assert _series(world[(layout, mode, None)][rank], key) == \
                _series(world[(layout, "none", None)][rank], key), (rank, key)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layouts_full_keeps_only_block_inputs(world, layout):
    parallel = LAYOUTS[layout]
    for rank in range(2):
        pp_rank = rank if parallel.get("pp", 1) > 1 else 0
        got = world[(layout, "full", None)][rank][0]["activation_bytes"]
        assert got == full_bytes(parallel, pp_rank), (rank, got, full_bytes(parallel, pp_rank))
        none = world[(layout, "none", None)][rank][0]["activation_bytes"]
        selective = world[(layout, "selective", None)][rank][0]["activation_bytes"]
        assert got < selective <= none, (rank, got, selective, none)
        # Under sequence parallelism the GEMMs save the gathered norm output and the tp MLP's
        # SwiGLU is fused into its GEMM: selective has nothing it drops there (yet).
        assert selective < none or parallel.get("sequence_parallel"), (rank, selective, none)


def test_recompute_layers_first_k_blocks(world):
    # pp 2: 2 blocks per stage, the first recomputed: between full and none, same losses.
    for rank in range(2):
        part = world[("pp2_1f1b", "full", 1)][rank]
        assert _series(part, "loss") == _series(world[("pp2_1f1b", "none", None)][rank], "loss")
        got = part[0]["activation_bytes"]
        assert world[("pp2_1f1b", "full", None)][rank][0]["activation_bytes"] < got < \
            world[("pp2_1f1b", "none", None)][rank][0]["activation_bytes"]


@pytest.mark.parametrize("parallel,message", [
    (dict(recompute="full", recompute_layers=3, pp=2), "--recompute-layers 3 is more than stage 0's 2 layer"),
    (dict(recompute_layers=1), "--recompute-layers 1 needs --recompute selective or full"),
])
def test_bad_recompute_layers(tmp_path, parallel, message):
    cfg = _config(tmp_path, parallel.pop("recompute", "none"), parallel.pop("recompute_layers"), **parallel)
    cfg.validate()
    with pytest.raises(ConfigError, match=message):
        validate(cfg)


def test_bad_mode_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match="recompute"):
        _config(tmp_path, "some").validate()


@pytest.mark.parametrize("ops", ["rotary", "norm,norm", "", "norm,swiglu,softmax"])
def test_bad_recompute_ops_are_one_line_exit_2(ops, capsys):
    from pyruntime.cli import main

    assert main(["train", "--recompute", "selective", "--recompute-ops", ops]) == 2
    err = capsys.readouterr().err
    want = f"--recompute-ops '{ops}': expected a comma-separated subset of norm, swiglu, kv_repeat"
    assert err.count("\n") == 1 and want in err


@pytest.mark.parametrize("ops", ["norm", "swiglu", "kv_repeat"])
def test_each_selective_set_drops_less_than_both_and_is_exact(tmp_path, ops):
    """One process: each set alone saves fewer bytes than none and more than both; losses and
    gradient norms stay bit-identical to none."""
    from support.world import single_process

    def run(mode, recompute_ops):
        cfg = _config(tmp_path, mode)
        cfg = dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, recompute_ops=recompute_ops))
        return single_process(cfg)

    none, one, both = run("none", "norm,swiglu,kv_repeat"), run("selective", ops), run("selective", "norm,swiglu,kv_repeat")
    assert [(r["loss"], r["grad_norm"]) for r in one] == [(r["loss"], r["grad_norm"]) for r in none]
    assert both[0]["activation_bytes"] < one[0]["activation_bytes"] < none[0]["activation_bytes"]


def test_3d_layout_is_bit_identical_in_every_mode(layout_results):
    """dp 2 x pp 2 x tp 2 (ZeRO-1, sequence parallel, 1F1B), in the shared 8-rank layout world:
    selective and full give exactly none's losses and gradient norms."""
    from support.layouts import RECOMPUTE

    results = layout_results(8)
    none, *others = RECOMPUTE[8]
    for layout in others:
        assert results[layout].loss == results[none].loss and results[layout].grad_norm == results[none].grad_norm, \
            layout.recompute
