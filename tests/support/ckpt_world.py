"""Checkpoint test cases and the rank function of their one multi-process world (spawned ranks
import it from here). One 4-rank world saves at dp 2 x tp 2 (sequence parallel) ZeRO-1 and
resumes at other layouts; the test process compares with single-process training."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from pyruntime.config import Config, ModelConfig
from pyruntime.mesh import ParallelDims
from pyruntime.train.checkpoint import export_safetensors, import_safetensors, load_checkpoint, save_checkpoint
from pyruntime.train.trainer import Trainer, open_corpus

from support.configs import tiny_config

# 8 query / 4 KV heads and ffn 64 divide by tp 4; a vocabulary of 259 does not divide by 2 or 4,
# so the embedding and the head carry zero padding rows under tp.
MODEL = ModelConfig(dim=32, n_layers=2, n_heads=8, n_kv_heads=4, ffn_dim=64, vocab_size=259, max_seq_len=64)
STEPS, SAVE_AT, SECOND_SAVE = 8, 3, 6
SAVER = {"dp": 2, "tp": 2, "zero": 1, "sequence_parallel": True}
# Resumed from the saver's step SAVE_AT, each to STEPS (the dp 4 ZeRO-3 one saves again at SECOND_SAVE).
RESUMERS = {"dp4_zero3": {"dp": 4, "zero": 3},
            "tp4_sp": {"tp": 4, "sequence_parallel": True},
            "dp2_tp2_zero2": {"dp": 2, "tp": 2, "zero": 2},
            "dp2_tp2_zero0": {"dp": 2, "tp": 2, "zero": 0}}


def config(out_dir, steps: int = STEPS, model: ModelConfig = MODEL, **parallel) -> Config:
    """Global batch 8 in micro-batches of 2 whatever dp, so every layout sums the same
    micro-batch gradients; gradient clipping (1.0) is on."""
    cfg = tiny_config(out_dir, steps=steps, global_batch=8, micro_batch=2)
    return dataclasses.replace(cfg, model=dataclasses.replace(model),
                               parallel=dataclasses.replace(cfg.parallel, **parallel))


def losses(trainer: Trainer, start: int, stop: int) -> list[float]:
    return [trainer.train_step(step)["loss"] for step in range(start, stop)]


def world_run(rank: int, world_size: int, out_dir: str) -> dict:
    """Every multi-rank case, in one world: their losses (the test process compares them)."""
    out = Path(out_dir)
    ckpt, st_saver, st_zero3 = out / "ckpt", out / "saver.safetensors", out / "zero3.safetensors"
    corpus = open_corpus(config(out_dir))

    def trainer(resume: Path | None = None, **parallel) -> Trainer:
        cfg = config(out_dir, **parallel)
        if resume is not None:  # built as --resume builds it: no initial values drawn
            cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, resume=str(resume)))
        dims = ParallelDims(cfg.parallel.dp, 1, cfg.parallel.tp, world_size).build_mesh("cpu")
        return Trainer(cfg, dims, torch.device("cpu"), rank=rank, corpus=corpus)

    res = {"saver_full": losses(trainer(**SAVER), 0, STEPS)}
    t = trainer(**SAVER)
    res["saver_first"] = losses(t, 0, SAVE_AT)
    save_checkpoint(t, ckpt, SAVE_AT)
    export_safetensors(t, st_saver)

    t = trainer(resume=ckpt, **SAVER)  # same layout: must continue bit for bit
    res["saver_resumed"] = losses(t, load_checkpoint(t, ckpt), STEPS)

    for name, parallel in RESUMERS.items():
        t = trainer(resume=ckpt / f"step_{SAVE_AT}", **parallel)
        start = load_checkpoint(t, ckpt / f"step_{SAVE_AT}")
        if name == "dp4_zero3":  # a ZeRO-3 save, which the test process loads single-process
            res[name] = losses(t, start, SECOND_SAVE)
            save_checkpoint(t, ckpt, SECOND_SAVE)
            res[name] += losses(t, SECOND_SAVE, STEPS)
        else:
            res[name] = losses(t, start, STEPS)

    t = trainer(dp=4, zero=3)  # safetensors round trip through a ZeRO-3 layout
    import_safetensors(t, st_saver)
    export_safetensors(t, st_zero3)
    return res
