"""Whole-model tensor parallelism: the real Trainer with --tp 2, --tp 4 --sp and
--tp 2 --sp --tp-overlap reproduces single-process training (losses, gradient norms,
validation losses within 1e-5 relative over 20 steps), and bad tp layouts fail up front."""
import pytest
import torch

from pyruntime.cli import main
from pyruntime.config import ConfigError, ParallelConfig
from pyruntime.parallel.validate import check_tp_divides

from support.configs import TEST_MODEL, tiny_config
from support.layouts import MODEL, TENSOR, assert_matches


def local_params(tp: int) -> int:
    """Parameters one tp rank holds: matrices split by tp, the vocabulary padded to a
    multiple of tp, norm weights whole."""
    m = MODEL
    hd = m.dim // m.n_heads
    matrices = m.n_layers * (m.dim * hd * (2 * m.n_heads + 2 * m.kv_heads) + 3 * m.dim * m.ffn_dim) // tp
    vocab = 2 * -(-m.vocab_size // tp) * m.dim  # embedding + LM head
    return matrices + vocab + (2 * m.n_layers + 1) * m.dim


@pytest.mark.parametrize("layout", [l for ls in TENSOR.values() for l in ls], ids=lambda l: l.name())
def test_tp_layouts_reproduce_single_process_training(layout, layout_world, layout_reference):
    """Losses, gradient norms and validation losses within 1e-5 relative over 20 steps; the
    model really was sharded (the shards gathered back equal the unsharded model, checked on
    the ranks by support/tp_checks.shard_report; local parameter count, sequence shards);
    every rank reports the same losses (checked in the world)."""
    world = layout_world(layout.world)
    assert len(layout_reference.loss) == 20 and len(layout_reference.val_loss) == 2
    assert world["inspected"][layout] == [local_params(layout.tp), layout.tp if layout.sp else 1]
    assert_matches(world["layouts"][layout], layout_reference)


BAD = [
    (["--tp", "3"], "tp 3 does not divide model.n_heads 4"),
    (["--sp"], "sequence parallelism / tp overlap need tp > 1"),
    (["--tp", "2", "--sp", "--seq-len", "15"], "sequence parallelism: seq_len 15 is not divisible by tp 2"),
]


@pytest.mark.parametrize("argv,message", BAD)
def test_bad_tp_layouts_exit_2_with_one_line(argv, message, capsys):
    assert main(["train", "--preset", "tiny", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


def test_tp_flags_fill_the_config():
    from pyruntime.cli import build_parser, config_from_args

    args = build_parser().parse_args(["train", "--tp", "2", "--sp", "--tp-overlap"])
    par = config_from_args(args, world_size=4).parallel
    assert (par.dp, par.tp, par.sequence_parallel, par.tp_overlap) == (2, 2, True, True)


def test_kv_heads_must_divide_by_tp():
    with pytest.raises(ConfigError, match="tp 4 does not divide model.n_kv_heads 2"):
        check_tp_divides(TEST_MODEL, 4)
