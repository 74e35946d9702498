"""Instruction data end to end: tokenize writes a loss mask, and training on it gives the same
losses and gradient norms (1e-5 relative) single-process and at dp 2 (2 micro-batches per
rank), tp 2 + sp and pp 2: masked targets do not count, and the mean is over the step's
counted tokens at every layout. The first loss equals the masked mean computed by hand."""
import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

from pyruntime.config import DataConfig, ParallelConfig
from pyruntime.data import BatchSampler, load_corpus
from pyruntime.data.tokenize import tokenize_files, train_bpe
from pyruntime.model import Transformer, init_weights
from support.configs import tiny_config
from support.world import Run, run_world, single_process, train

LAYOUTS = [ParallelConfig(dp=2, zero=1), ParallelConfig(tp=2, sequence_parallel=True), ParallelConfig(pp=2)]


def config(tmp, data, par: ParallelConfig, tag: str):
    cfg = tiny_config(tmp / tag, steps=3, global_batch=8, micro_batch=2, seq_len=16, eval_every=3, eval_batches=1)
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=300), parallel=par,
                               data=DataConfig(path=str(data), seq_len=16, global_batch=8, micro_batch=2,
                                               val_fraction=0.2))


def run(rank, world_size, cfgs):
    return [r.records for r in train(rank, world_size, [Run(c) for c in cfgs])]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("masked")
    rows = [{"prompt": f"Question {i}: what is {i} plus {i}?", "response": f" It is {2 * i}."} for i in range(120)]
    (tmp / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = train_bpe(iter([r["prompt"] + r["response"] for r in rows]), 300, tmp / "tokenizer.json")
    total, counted = tokenize_files([str(tmp / "sft.jsonl")], tmp / "sft.bin", tok)
    assert 0 < counted < total / 2
    return tmp, tmp / "sft.bin"


def test_masked_first_loss_is_the_mean_over_counted_targets(data):
    tmp, path = data
    cfg = config(tmp, path, ParallelConfig(), "single")
    records = single_process(cfg)
    corpus = load_corpus(path, val_fraction=0.2)
    x, y = BatchSampler(corpus.train, seq_len=16, global_batch=8, seed=cfg.train.seed,
                        mask=corpus.train_mask).global_batch_at(0)
    model = Transformer(cfg.model)
    init_weights(model, cfg.model, cfg.train.seed)
    counts = y >= 0
    assert 0 < counts.sum() < counts.numel()
    want = F.cross_entropy(model(x)[counts], y[counts]).item()
    assert abs(records[0]["loss"] - want) < 1e-5


def test_layouts_reproduce_single_process_on_masked_data(data):
    tmp, path = data
    ref = single_process(config(tmp, path, ParallelConfig(), "single2"))
    per_rank = run_world(2, run, [config(tmp, path, par, f"l{i}") for i, par in enumerate(LAYOUTS)],
                         name="masked layouts")
    for i, par in enumerate(LAYOUTS):
        for key in ("loss", "grad_norm", "val_loss"):
            got = [r[key] for r in per_rank[0][i] if key in r]
            want = [r[key] for r in ref if key in r]
            torch.testing.assert_close(torch.tensor(got, dtype=torch.float64), torch.tensor(want, dtype=torch.float64),
                                       rtol=1e-5, atol=0, msg=lambda m, k=key, p=par: f"{p} {k}: {m}")
