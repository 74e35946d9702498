"""The planner's step time against the trainer's, on this machine: after `plan --calibrate`
(run here unless --profile names a saved profile), >= 8 layouts of world size <= 2 (no
oversubscription on 2 cores), each trained for a few steps in a spawned gloo world; the
predicted and measured step time side by side, and how well the prediction ranks them
(Kendall tau, 1 = the same order).

    python -m pyruntime bench plan [--preset tiny --seq-len 128 --global-batch 8 --steps 5]
"""
from __future__ import annotations

import dataclasses
import sys

from pyruntime.bench.harness import header, require, suite_parser, table_lines

# (world size, parallel fields, micro-batch)
LAYOUTS = [
    (1, {}, 8), (1, {}, 4), (1, {}, 2), (1, {}, 1),
    (2, {"dp": 2}, 4), (2, {"dp": 2, "zero": 1}, 2), (2, {"dp": 2, "zero": 3}, 4),
    (2, {"tp": 2}, 8), (2, {"tp": 2, "sequence_parallel": True}, 4),
    (2, {"pp": 2}, 2), (2, {"pp": 2, "schedule": "gpipe"}, 4), (2, {"pp": 2, "schedule": "zb"}, 2),
]


def kendall_tau(a: list[float], b: list[float]) -> float:
    """Tau-a: (concordant - discordant) pairs over all pairs."""
    sign = lambda x: (x > 0) - (x < 0)  # noqa: E731
    n = len(a)
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    return sum(sign(a[i] - a[j]) * sign(b[i] - b[j]) for i, j in pairs) / len(pairs)


def _configs(args, world: int):
    from pyruntime.config import Config, DataConfig, ParallelConfig, PRESETS, TrainConfig

    out = []
    for w, par, mb in LAYOUTS:
        if w != world:
            continue
        full = {"dp": 1, **par}
        out.append(Config(train=TrainConfig(preset=args.preset, steps=args.steps + 2, quiet=True, eval_every=0,
                                            out="runs/bench_plan"),
                          model=dataclasses.replace(PRESETS[args.preset]),
                          data=DataConfig(seq_len=args.seq_len, global_batch=args.global_batch, micro_batch=mb,
                                          max_bytes=400_000),
                          parallel=ParallelConfig(**full)))
    return out


def _layout(cfg):
    from pyruntime.plan.layout import Layout

    p = cfg.parallel
    return Layout(dp=p.dp, tp=p.tp, pp=p.pp, zero=p.zero, sp=p.sequence_parallel, schedule=p.schedule,
                  micro_batch=cfg.data.micro_batch, bucket_mb=p.bucket_mb)


def main(argv=None) -> int:
    from pyruntime.plan.calibrate import calibrate, load_profile
    from pyruntime.plan.layout import Workload
    from pyruntime.plan.measure import measure_step_time
    from pyruntime.plan.timing import Cluster, step_time
    from pyruntime.config import PRESETS
    from pyruntime.spawn import run_world

    parser = suite_parser("plan", __doc__)
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per layout (after 2 warm-up steps)")
    parser.add_argument("--profile", help="a saved `plan --calibrate` profile (default: calibrate now)")
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args(argv)
    require(parser, args, positive=("seq_len", "global_batch", "steps"))
    print("\n".join(header(["plan", *(argv or [])], "cpu", "CPU / gloo ranks, one thread each")), flush=True)
    # calibrated with this preset's blocks at tp 1 and 2, as `plan --calibrate --preset P
    # --seq-len S --gpus 2` does
    dev = (load_profile(args.profile) if args.profile
           else calibrate("runs/bench_plan_profile.json", model=PRESETS[args.preset], seq_len=args.seq_len, tps=(1, 2)))
    print(f"profile: {dev.name} | GEMM {dev.peak_flops / 1e9:.1f} GFLOP/s x {dev.gemm_efficiency:.0%} | dispatch "
          f"{dev.block_overhead * 1e3:.2f} ms per block + {dev.micro_overhead * 1e3:.2f} ms per micro-batch + {dev.step_overhead * 1e3:.1f} ms per step | "
          f"collectives {dev.intra_bw / 1e9:.2f} GB/s + {dev.latency * 1e6:.0f} us (gather "
          f"{dev.gather_latency * 1e6:.0f} us, p2p {dev.p2p_latency * 1e6:.0f} us) | memory {dev.mem_bw / 1e9:.1f} GB/s"
          f" | model pieces timed: {len(dev.block_fits)}", flush=True)
    rows, predicted, measured = [], [], []
    for world in (1, 2):
        configs = _configs(args, world)
        per_rank = run_world(world, measure_step_time, configs, args.steps, 2, timeout=1800,
                             name=f"bench plan world {world}")
        for i, cfg in enumerate(configs):
            lay = _layout(cfg)
            work = Workload(model=cfg.model, seq_len=cfg.data.seq_len, global_batch=cfg.data.global_batch)
            p = step_time(work, lay, Cluster(dev, world, world)).step
            m = max(r[i] for r in per_rank)
            predicted.append(p)
            measured.append(m)
            rows.append([lay.describe(), str(world), f"{p * 1e3:.1f}", f"{m * 1e3:.1f}", f"{(p - m) / m:+.0%}"])
    print("\n".join(table_lines(["layout", "ranks", "predicted ms", "measured ms", "error"], rows, args.markdown)))
    within = sum(abs(p - m) <= 0.25 * m for p, m in zip(predicted, measured))
    print(f"{within} of {len(rows)} layouts within 25% | Kendall tau of the ranking {kendall_tau(predicted, measured):.2f}"
          f" (goal: >= 8 within 25%, tau >= 0.7)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
