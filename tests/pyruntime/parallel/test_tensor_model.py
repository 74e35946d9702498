"""Whole-model tensor parallelism: the real Trainer with --tp 2, --tp 4 --sp and
--tp 2 --sp --tp-overlap reproduces single-process training (losses, gradient norms,
validation losses within 1e-5 relative over 20 steps), and bad tp layouts fail up front."""
import dataclasses

import pytest
import torch

import tp_workers
from helpers import TEST_MODEL, tiny_config
from multiproc import run_world
from pyruntime.cli import main
from pyruntime.config import ConfigError, ParallelConfig
from pyruntime.mesh import Launch, ParallelDims, init_distributed
from pyruntime.train.trainer import Trainer

# 8 query / 4 KV heads and ffn 64 divide by 4; a vocabulary of 259 divides by neither 2 nor 4,
# so the embedding and LM head are padded (the byte corpus only uses ids < 256).
MODEL = dataclasses.replace(TEST_MODEL, n_heads=8, n_kv_heads=4, vocab_size=259)


def config(tmp_path, tp=1, sp=False, overlap=False):
    cfg = tiny_config(tmp_path, steps=20, eval_every=10, eval_batches=2)
    return dataclasses.replace(cfg, model=dataclasses.replace(MODEL),
                               parallel=ParallelConfig(tp=tp, sequence_parallel=sp, tp_overlap=overlap))


def single_process(cfg):
    init_distributed(Launch(rank=0, world_size=1, local_rank=0), torch.device("cpu"))
    records = Trainer(cfg, ParallelDims(1, 1, 1, 1).build_mesh("cpu"), torch.device("cpu")).fit()
    return {key: [r[key] for r in records if key in r] for key in ("loss", "grad_norm", "val_loss")}


def local_params(tp: int) -> int:
    """Parameters one tp rank holds: matrices split by tp, the vocabulary padded to a
    multiple of tp, norm weights whole."""
    m = MODEL
    hd = m.dim // m.n_heads
    matrices = m.n_layers * (m.dim * hd * (2 * m.n_heads + 2 * m.kv_heads) + 3 * m.dim * m.ffn_dim) // tp
    vocab = 2 * -(-m.vocab_size // tp) * m.dim  # embedding + LM head
    return matrices + vocab + (2 * m.n_layers + 1) * m.dim


def test_tp_layouts_reproduce_single_process_training(tmp_path):
    expected = single_process(config(tmp_path))
    two = run_world(2, tp_workers.train_records, [config(tmp_path, 2), config(tmp_path, 2, sp=True, overlap=True)])
    four = run_world(4, tp_workers.train_records, [config(tmp_path, 4, sp=True)])
    runs = {"tp2": (two[0][0], [local_params(2), 1]), "tp2 sp overlap": (two[0][1], [local_params(2), 2]),
            "tp4 sp": (four[0][0], [local_params(4), 4])}
    assert len(expected["loss"]) == 20 and len(expected["val_loss"]) == 2
    for name, (got, layout) in runs.items():
        assert got["layout"] == layout, name
        for key in expected:
            torch.testing.assert_close(torch.tensor(got[key]), torch.tensor(expected[key]), rtol=1e-5, atol=0,
                                       msg=lambda m: f"{name} {key}: {m}")
    for per_rank in (two, four):  # every tp rank reports the same (all-reduced) losses
        assert all(r == per_rank[0] for r in per_rank)


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
        TEST_MODEL.validate_tp(4)
