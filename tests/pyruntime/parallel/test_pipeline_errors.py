"""Pipeline bad input and failures: one-line errors before any send for impossible splits
and batch shapes; a mismatched message named in debug mode; a silent peer named after the
timeout instead of a hang."""
import dataclasses

import pytest

from support import pipeline_faults
from support.layouts import Layout, config
from support.world import run_world
from pyruntime.cli import build_parser, config_from_args
from pyruntime.config import ConfigError
from pyruntime.parallel.pipeline.split import plan_stage_layers


def cli_config(*flags, world=2):
    args = build_parser().parse_args(["train", "--preset", "tiny", *flags])
    return config_from_args(args, world)


@pytest.mark.parametrize("flags, message", [
    (["--pp", "8", "--global-batch", "16", "--micro-batch", "1"], "4 layer(s), fewer than pp x virtual stages = 8"),
    (["--pp", "2", "--pp-layout", "1,2"], "sums to 3 layers; the model has 4"),
    (["--pp", "2", "--pp-layout", "4,0"], "every stage needs at least 1 layer"),
    (["--pp", "2", "--pp-layout", "2,1,1"], "has 3 stage(s); pp x virtual stages = 2"),
    (["--pp", "2", "--pp-layout", "two,two"], "expected 'even', 'balanced' or layer counts"),
    (["--pp", "4", "--global-batch", "6", "--micro-batch", "2"], "needs at least pp = 4 micro-batches per step, got 3"),
    (["--pp", "2", "--global-batch", "6", "--micro-batch", "4"], "global batch 6 does not divide"),
    (["--pp", "2", "--schedule", "interleaved", "--global-batch", "6", "--micro-batch", "2"],
     "needs virtual_stages >= 2"),
    (["--pp", "2", "--schedule", "interleaved", "--virtual-stages", "2", "--global-batch", "6",
      "--micro-batch", "2"], "micro-batches (3) divisible by pp 2"),
    (["--pp", "2", "--microbatches", "3", "--global-batch", "8"], "--microbatches 3"),
    (["--pp", "2", "--schedule", "zigzag"], "unknown pipeline schedule 'zigzag'"),
])
def test_bad_pipeline_input_is_one_line(flags, message):
    with pytest.raises(ConfigError) as e:
        cli_config(*flags, world=int(flags[1]))  # dp 1: the world is the pipeline
    assert message in str(e.value) and "\n" not in str(e.value)


def test_microbatches_flag_sets_the_micro_batch():
    cfg = cli_config("--pp", "2", "--microbatches", "4", "--global-batch", "16")
    assert cfg.data.micro_batch == 4 and cfg.parallel.pp == 2


def test_even_and_balanced_splits_cover_every_layer():
    from pyruntime.config import PRESETS
    model = PRESETS["tiny"]
    assert plan_stage_layers(model, 3, "even") == [1, 2, 1]  # the remainder goes to the middle
    big = dataclasses.replace(PRESETS["small"], n_layers=10, vocab_size=32000)
    balanced = plan_stage_layers(big, 4, "balanced")
    assert balanced == [1, 4, 4, 1]  # the embedding and the head weigh on the end stages
    assert plan_stage_layers(model, 2, "3,1") == [3, 1]


def _config(tmp_path):
    cfg = config(tmp_path, Layout(pp=2, microbatches=2))
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, peer_timeout_s=3.0))


def test_debug_headers_name_a_shape_mismatch(tmp_path):
    mismatch = run_world(2, pipeline_faults.shape_mismatch, _config(tmp_path))[1]
    assert ("pp rank 1 RECV_F(mb=0, chunk=0) from pp rank 0 expected activation of micro-batch 0 from stage 0, "
            "shape (4, 17, 32), torch.float32 but pp rank 0 sent activation of micro-batch 0 from stage 0, "
            "shape (4, 16, 32)") in mismatch


def test_a_silent_peer_is_named_after_the_timeout(tmp_path):
    message = run_world(2, pipeline_faults.silent_peer, _config(tmp_path))[0]
    assert "waited 3 s at most for" in message and "no answer from pp rank 1 (global rank 1)" in message
