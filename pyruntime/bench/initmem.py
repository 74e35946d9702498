"""Peak resident memory per rank while the trainer builds a ZeRO-3 model, deferred (the
trainer's way: meta device, each parameter drawn straight into the rank's shard) against
eager (the whole model built and initialised on every rank, then sharded), each in a fresh
world of gloo ranks on CPU.

    .venv/bin/python -m pyruntime bench initmem --dp 4
    python -m pyruntime bench initmem --dp 2 --dim 1024 --layers 16 --vocab 32000

Peak: the rank's VmHWM (peak resident set) after the build over the one before it; held:
VmRSS after it. Both include the AdamW moments and master shard the engine allocates.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time

import torch

from pyruntime.bench.harness import require, suite_parser


def _status_mb() -> dict[str, float]:
    with open("/proc/self/status") as f:
        return {line.split(":")[0]: int(line.split()[1]) / 1024 for line in f if line.startswith(("VmHWM", "VmRSS"))}


def _build(rank: int, world: int, model_cfg, eager: bool) -> dict[str, float]:
    from pyruntime.config import Config, DataConfig, ParallelConfig, TrainConfig
    from pyruntime.mesh import ParallelDims
    from pyruntime.parallel.parallelize import build_model, meta_model, parallelize

    cfg = Config(model=model_cfg, data=DataConfig(global_batch=world, micro_batch=1),
                 parallel=ParallelConfig(dp=world, zero=3), train=TrainConfig(quiet=True))
    dims = ParallelDims(world, 1, 1, world).build_mesh("cpu")
    before = _status_mb()
    t0 = time.perf_counter()
    if eager:
        parallelize(build_model(cfg, torch.device("cpu")), dims, cfg, torch.device("cpu"))
    else:
        parallelize(meta_model(cfg), dims, cfg, torch.device("cpu"))
    after = _status_mb()
    return {"peak_mb": after["VmHWM"] - before["VmHWM"], "held_mb": after["VmRSS"] - before["VmRSS"],
            "seconds": time.perf_counter() - t0}


def main(argv=None) -> int:
    from pyruntime.config import ModelConfig
    from pyruntime.model import count_params
    from pyruntime.spawn import run_world

    parser = suite_parser("initmem", __doc__)
    parser.add_argument("--dp", type=int, default=4)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--ffn", type=int, default=2816)
    parser.add_argument("--vocab", type=int, default=32000)
    args = parser.parse_args(argv)
    require(parser, args, positive=("dp", "dim", "layers", "ffn", "vocab"))
    model_cfg = ModelConfig(vocab_size=args.vocab, dim=args.dim, n_layers=args.layers, n_heads=16, n_kv_heads=8,
                            ffn_dim=args.ffn)
    model_cfg.validate()  # --dim must divide into the 16 heads
    n = count_params(model_cfg)["total"]
    print(f"bench_init_memory | ZeRO-3, dp {args.dp}, gloo | model {n / 1e6:.1f}M params ({n * 4 / 2**20:.0f} MB fp32, "
          f"shard {n * 4 / args.dp / 2**20:.0f} MB; master + 2 moments = 3 shards) | per rank, worst rank")
    print(f"{'build':<10} {'peak MB':>9} {'held MB':>9} {'seconds':>8}")
    for name, eager in (("deferred", False), ("eager", True)):
        per_rank = run_world(args.dp, _build, dataclasses.replace(model_cfg), eager, timeout=900,
                             name=f"bench_init_memory {name}")
        print(f"{name:<10} {max(r['peak_mb'] for r in per_rank):9.0f} {max(r['held_mb'] for r in per_rank):9.0f} "
              f"{max(r['seconds'] for r in per_rank):8.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
