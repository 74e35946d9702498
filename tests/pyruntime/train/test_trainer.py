import dataclasses
import json

import pytest
import torch

from pyruntime.mesh import Launch, ParallelDims, init_distributed
from pyruntime.train.trainer import Trainer
from support.configs import tiny_config


@pytest.fixture(scope="module")
def single_process_dims():
    """A world-1 process group, as `python -m pyruntime train` makes without torchrun."""
    init_distributed(Launch(rank=0, world_size=1, local_rank=0), torch.device("cpu"))
    return ParallelDims(1, 1, 1, 1).build_mesh("cpu")


def losses(cfg, dims):
    return [r["loss"] for r in Trainer(cfg, dims, torch.device("cpu")).fit()]


def test_same_seed_gives_bit_identical_losses(tmp_path, single_process_dims):
    cfg = tiny_config(tmp_path, steps=3)
    assert losses(cfg, single_process_dims) == losses(cfg, single_process_dims)


def test_gradient_accumulation_matches_one_big_micro_batch(tmp_path, single_process_dims):
    one = losses(tiny_config(tmp_path, steps=4, micro_batch=8), single_process_dims)
    four = losses(tiny_config(tmp_path, steps=4, micro_batch=2), single_process_dims)
    torch.testing.assert_close(torch.tensor(four), torch.tensor(one), rtol=1e-5, atol=0)


def test_loss_falls_and_metrics_and_plot_are_written(tmp_path, single_process_dims):
    cfg = tiny_config(tmp_path, steps=30, global_batch=8, micro_batch=8, eval_every=15)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, quiet=False))
    records = Trainer(cfg, single_process_dims, torch.device("cpu")).fit()
    assert records[0]["loss"] == pytest.approx(5.55, abs=0.15)  # ~ln(256) at init
    assert records[-1]["loss"] < records[0]["loss"] - 1.0
    lines = [json.loads(s) for s in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(1, 31))
    assert all({"loss", "lr", "grad_norm", "tokens_per_s", "peak_mem_mb"} <= set(r) for r in lines)
    assert [r["step"] for r in lines if "val_loss" in r] == [15, 30]
    assert (tmp_path / "loss.png").stat().st_size > 1000


def test_clipping_changes_the_update(tmp_path, single_process_dims):
    base = tiny_config(tmp_path, steps=3)
    clipped = dataclasses.replace(base, optim=dataclasses.replace(base.optim, grad_clip=1e-3))
    a, b = losses(base, single_process_dims), losses(clipped, single_process_dims)
    assert a[0] == b[0] and a[2] != b[2]


def test_validation_is_the_same_sequences_whatever_the_micro_batch(tmp_path, single_process_dims):
    """--eval-batches counts global batches: micro-batches of 1, 2 or 8 rows evaluate the same
    sequences (mean of equal-sized means = the mean)."""
    vals = []
    for micro_batch in (1, 2, 8):
        cfg = tiny_config(tmp_path, steps=2, micro_batch=micro_batch, eval_every=2, eval_batches=3)
        vals.append([r["val_loss"] for r in Trainer(cfg, single_process_dims, torch.device("cpu")).fit()
                     if "val_loss" in r])
    assert len(vals[0]) == 1
    torch.testing.assert_close(torch.tensor(vals[1:]), torch.tensor(vals[:1] * 2), rtol=1e-6, atol=0)


def test_too_small_validation_split_is_a_one_line_error(tmp_path):
    from pyruntime.data import DataError
    from pyruntime.train.trainer import open_corpus

    cfg = tiny_config(tmp_path, eval_every=1, eval_batches=100_000)
    with pytest.raises(DataError, match=r"--eval-batches 100000 x global batch 8 needs 800000 \(fewer --eval-batches, "
                                        r"or --eval-every 0 to skip validation\)$"):
        open_corpus(cfg)
