"""Small configurations shared by the trainer, CLI and parallel tests."""
from __future__ import annotations

import dataclasses

from pyruntime.config import Config, DataConfig, ModelConfig, OptimConfig, TrainConfig

TEST_MODEL = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, vocab_size=256,
                         max_seq_len=64)


def tiny_config(tmp_path, *, steps=4, global_batch=8, micro_batch=4, seq_len=16, **train) -> Config:
    """A model and batch small enough that a step takes milliseconds on one CPU core."""
    return Config(
        train=TrainConfig(**{"steps": steps, "seed": 7, "eval_every": 0, "out": str(tmp_path), "quiet": True, **train}),
        model=dataclasses.replace(TEST_MODEL),
        data=DataConfig(seq_len=seq_len, global_batch=global_batch, micro_batch=micro_batch,
                        max_bytes=200_000),
        optim=OptimConfig(lr=3e-3, warmup_steps=2),
    )


def with_parallel(cfg: Config, **parallel) -> Config:
    return dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, **parallel))
