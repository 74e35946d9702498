"""Activation recomputation (train --recompute): step time and measured activation bytes of
none / each selective set (--recompute-ops) / full, one process, the trainer's own step (parallel/recompute.py), side by
side in one run; ratios are against none (the peer: no recomputation).

    python -m pyruntime bench recompute                       # small preset, CPU
    python -m pyruntime bench recompute --preset tiny --steps 3 --seq-len 32

activation bytes: what the transformer blocks saved for backward in one step, all micro-batches
(SavedTensorMeter, each storage once). step time: median over the timed steps (the first
--warmup steps excluded), after one untimed run of none (the process's first touch of its
memory).
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys

import torch

from pyruntime.bench.harness import header, require, suite_parser, table_lines
from pyruntime.config import PRESETS, Config, DataConfig, ParallelConfig, TrainConfig
from pyruntime.parallel.recompute import ALL_OPS, SELECTIVE_OPS

# The model is built and run by the trainer in this process (a world of one).


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = suite_parser("recompute", __doc__)
    p.add_argument("--preset", default="small", choices=sorted(PRESETS))
    p.add_argument("--steps", type=int, default=4, help="timed steps per mode")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--global-batch", type=int, default=8)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--markdown", action="store_true")
    args = p.parse_args(argv)
    require(p, args, positive=("seq_len", "global_batch", "micro_batch"))
    if args.steps < 1 or args.warmup < 0 or args.global_batch % args.micro_batch:
        p.error(f"--steps must be >= 1, --warmup >= 0 and --micro-batch must divide --global-batch; got "
                f"{args.steps}, {args.warmup}, {args.micro_batch} / {args.global_batch}")
    return args


# (label, --recompute, --recompute-ops): none, each selective set, full
VARIANTS = [("none", "none", ALL_OPS)] + [(f"selective {op}", "selective", op) for op in SELECTIVE_OPS] + [
    (f"selective {ALL_OPS} (default)", "selective", ALL_OPS), ("full", "full", ALL_OPS)]


def _config(args: argparse.Namespace, mode: str, out: str, ops: str = ALL_OPS) -> Config:
    model = dataclasses.replace(PRESETS[args.preset], max_seq_len=max(args.seq_len, PRESETS[args.preset].max_seq_len))
    return Config(train=TrainConfig(preset=args.preset, steps=args.warmup + args.steps, eval_every=0, quiet=True,
                                    out=out),
                  model=model, data=DataConfig(seq_len=args.seq_len, global_batch=args.global_batch,
                                               micro_batch=args.micro_batch, max_bytes=400_000),
                  parallel=ParallelConfig(recompute=mode, recompute_ops=ops))


def run_mode(args: argparse.Namespace, mode: str, out: str, ops: str = ALL_OPS) -> dict:
    from pyruntime.mesh import Launch, ParallelDims, init_distributed
    from pyruntime.train.trainer import Trainer

    cfg = _config(args, mode, out, ops)
    init_distributed(Launch(rank=0, world_size=1, local_rank=0), torch.device("cpu"))
    dims = ParallelDims.from_config(cfg.parallel, 1).build_mesh("cpu")
    trainer = Trainer(cfg, dims, torch.device("cpu"), rank=0)
    records = [trainer.train_step(step) for step in range(cfg.train.steps)]
    timed = records[args.warmup:]
    return {"time": statistics.median(r["step_time_s"] for r in timed),
            "bytes": timed[-1]["activation_bytes"], "loss": [r["loss"] for r in records]}


def main(argv: list[str]) -> int:
    try:
        args = parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    import tempfile

    print("\n".join(header(["recompute", *argv], "triton", None)))
    with tempfile.TemporaryDirectory() as out:
        # Untimed: the process's first trainer pays the first touch of its memory (the
        # allocator's pages), which would otherwise land on whichever mode runs first.
        run_mode(args, "none", out)
        results = {label: run_mode(args, mode, out, ops) for label, mode, ops in VARIANTS}
    base = results["none"]
    if any(r["loss"] != base["loss"] for r in results.values()):
        print("bench recompute: the modes' losses differ (they must be bit-identical)", file=sys.stderr)
        return 1

    def per_ms(r: dict) -> str:  # activation MiB saved per ms of step time added: the trade-off
        added_ms = (r["time"] - base["time"]) * 1e3
        saved = (base["bytes"] - r["bytes"]) / 2**20
        return "" if r is base else (f"{saved / added_ms:.2f}" if added_ms > 0 else "free")

    rows = [[label, f"{args.preset} mb {args.micro_batch}x{args.seq_len}", f"{r['bytes'] / 2**20:.2f}",
             f"{base['bytes'] / r['bytes']:.2f}x", f"{r['time'] * 1e3:.1f}", f"{r['time'] / base['time'] - 1:+.1%}",
             per_ms(r)] for label, r in results.items()]
    print("\n".join(["recompute vs none (losses bit-identical: checked); MiB/ms: activation MiB saved per ms "
                     "of step time added (higher is the better trade)"] + table_lines(
        ["mode", "shape", "activation MiB", "none/mode", "step ms", "time vs none", "MiB/ms"], rows,
        args.markdown)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
