"""Data parallelism and ZeRO against PyTorch's own: step time of `--zero 0` vs
torch.nn.parallel.DistributedDataParallel, and of `--zero 3` vs FSDP2 (fully_shard per block
and at the root), with peak memory per rank; same model, same global batch, same AdamW and
gradient clipping (gloo on CPU, nccl on CUDA).

    python -m pyruntime bench zero                       # 2 and 4 ranks, "small" preset
    python -m pyruntime bench zero --worlds 2 --steps 20 --preset tiny

Step time: ours and PyTorch's variant are built side by side in one world and their steps
alternate one by one (who goes first alternating too, a barrier before each), so machine
noise hits both alike; a step's time is its slowest rank's; the table shows each side's
median, torch/ours (the ratio of those medians) and pairs (the median over the back-to-back
pairs of steps of their ratio).
Peak memory: each variant alone in a fresh world (so no other variant's tensors count), over
MEMORY_STEPS steps after a first one: on CUDA torch.cuda.max_memory_allocated; on CPU the peak
of malloc's bytes in use during those steps over those before the model was built
(HeapPeak; everything the rank holds: model state, activations, communication buffers).
For our engines the peak model-state bytes the engine accounts for are shown as well.
Setup extra: while the model and its engine are built, the peak over what is held once they
are (what building needed beyond its result: a whole model, or one unit), ours as the trainer
does it (on the meta device, parameters made by the engine: at ZeRO-3 one unit at a time)
and FSDP2 as its documentation does it for large models (meta device, fully_shard, to_empty,
each shard initialised from the full value); DDP and --zero 0 hold the whole model anyway.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import ctypes
import statistics
import sys
import threading
import time

import torch

from pyruntime.bench.harness import require, suite_parser
import torch.distributed as dist

MEMORY_STEPS = 3  # steps sampled for the peak, after the timed ones
VARIANTS = ("ours --zero 0", "torch DDP", "ours --zero 3", "torch FSDP2")
BASELINE_OF = {"ours --zero 0": "torch DDP", "ours --zero 3": "torch FSDP2"}


class HeapPeak:
    """Peak bytes in use by malloc (glibc mallinfo2: arena chunks in use + mmapped blocks),
    sampled by a thread every ~0.2 ms. Unlike the resident set it falls when memory is freed,
    so it shows what a step really holds (torch's CPU tensors come from malloc). The GIL is
    released inside torch ops, so the sampler sees their allocations."""

    class _Info(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                  "fsmblks", "uordblks", "fordblks", "keepcost")]

    def __init__(self):
        self._libc = ctypes.CDLL("libc.so.6")
        self._libc.mallinfo2.restype = HeapPeak._Info
        self.peak = self.now()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def now(self) -> int:
        info = self._libc.mallinfo2()
        return info.uordblks + info.hblkhd

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.now())
            time.sleep(0.0002)

    def __enter__(self) -> "HeapPeak":
        self.peak = self.now()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.now())


def _warm_imports() -> None:
    """Load everything any variant loads lazily (torch.optim pulls in dynamo, ~100 MB) before
    the memory baseline is taken, so each variant is charged for its own tensors only."""
    import torch.distributed.fsdp  # noqa: F401
    import pyruntime.parallel.zero.stage3  # noqa: F401
    from pyruntime.ops.adamw import adamw_step

    p = torch.zeros(4, requires_grad=True)
    p.grad = torch.ones(4)
    torch.optim.AdamW([p], foreach=True).step()
    adamw_step(p.detach(), p.grad, torch.zeros(4), torch.zeros(4), None, lr=1e-3, betas=(0.9, 0.95),
               eps=1e-8, weight_decay=0.0, step=1)


def _setup(variant: str, cfg, world: int, device: torch.device):
    """(model, optimizer, one_step) for a variant; one_step(x, y) runs forward, backward,
    gradient sync, clipping and the optimizer step."""
    from pyruntime.mesh import ParallelDims
    from pyruntime.model.loss import lm_loss
    from pyruntime.parallel.optimizer import build_adamw
    from pyruntime.parallel.parallelize import build_model, meta_model, parallelize
    from pyruntime.train.optim import clip_grad_norm

    if variant.startswith("ours"):  # as the Trainer: built on meta, made by the engine (ZeRO-3: unit by unit)
        dims = ParallelDims(world, 1, 1, world).build_mesh(device.type)
        par = parallelize(meta_model(cfg), dims, cfg, device)
        model, engine = par.model, par.engine

        def one_step(x, y):
            with engine.micro_batch(last=True):
                lm_loss(model(x), y).backward()
            engine.finish_gradient_sync()
            grads, replication = engine.gradient_pieces()
            if cfg.parallel.zero == 0:  # replicated gradients: the local norm is global (Trainer too)
                clip_grad_norm(grads, cfg.optim.grad_clip)
            else:
                clip_grad_norm(grads, cfg.optim.grad_clip, dist.group.WORLD, replication)
            engine.optimizer.step()
            engine.optimizer.zero_grad(set_to_none=True)
        return engine, one_step
    if variant == "torch DDP":
        model = torch.nn.parallel.DistributedDataParallel(build_model(cfg, device),
                                                          bucket_cap_mb=cfg.parallel.bucket_mb)
    else:
        model = _fsdp2_model(cfg, world, device)
    optimizer = build_adamw(model.named_parameters(), cfg.optim)

    def one_step(x, y):
        lm_loss(model(x), y).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return None, one_step


@torch.no_grad()
def _fsdp2_model(cfg, world: int, device: torch.device):
    """FSDP2 as its documentation builds a large model: on the meta device, fully_shard per
    block and at the root, to_empty, then each parameter's shard initialised (here from the
    same full values as ours, each rank drawing the full tensor and keeping its slice)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import distribute_tensor

    from pyruntime.model import Transformer, full_init

    mesh = init_device_mesh(device.type, (world,))
    with torch.device("meta"):
        model = Transformer(cfg.model)
    for layer in model.layers.values():
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    model.to_empty(device=device)
    for name, p in model.named_parameters():
        full = full_init(name, p.shape, cfg.model, cfg.train.seed).to(device)
        p.to_local().copy_(distribute_tensor(full, mesh, p.placements, src_data_rank=None).to_local())
    return model


def _cfg_and_batch(rank: int, world: int, variant: str, args, device):
    from pyruntime.config import PRESETS, Config, DataConfig, ParallelConfig

    model_cfg = dataclasses.replace(PRESETS[args.preset])
    cfg = Config(model=model_cfg, data=DataConfig(seq_len=args.seq_len, global_batch=args.global_batch,
                                                  micro_batch=args.global_batch // world),
                 parallel=ParallelConfig(dp=world, zero=3 if "zero 3" in variant else 0))
    gen = torch.Generator().manual_seed(rank)
    x = torch.randint(0, model_cfg.vocab_size, (args.global_batch // world, args.seq_len + 1), generator=gen)
    return cfg, x[:, :-1].to(device), x[:, 1:].to(device)


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_pair(rank: int, world: int, variants: tuple[str, str], args) -> dict:
    """Ours and PyTorch's variant built side by side in this world; their steps alternate one
    by one (who goes first alternating too), a barrier before each, so machine noise hits both
    alike. Returns each side's step times."""
    device = torch.device("cuda", rank) if torch.cuda.is_available() else torch.device("cpu")
    steps = {}
    for variant in variants:
        cfg, x, y = _cfg_and_batch(rank, world, variant, args, device)
        one_step = _setup(variant, cfg, world, device)[1]
        steps[variant] = lambda one_step=one_step, x=x, y=y: one_step(x, y)
    times = {v: [] for v in variants}
    for step in range(args.warmup + args.steps):
        for variant in variants if step % 2 == 0 else variants[::-1]:
            dist.barrier()
            t0 = time.perf_counter()
            steps[variant]()
            _sync(device)
            if step >= args.warmup:
                times[variant].append(time.perf_counter() - t0)
    return {"times": times}


def memory_rank(rank: int, world: int, variant: str, args) -> dict:
    """Peak memory of one variant alone in a fresh world (so no other variant's tensors count):
    MEMORY_STEPS steps after one warm-up step."""
    device = torch.device("cuda", rank) if torch.cuda.is_available() else torch.device("cpu")
    _warm_imports()
    heap = HeapPeak() if device.type == "cpu" else None
    base = heap.now() if heap else 0
    cfg, x, y = _cfg_and_batch(rank, world, variant, args, device)
    with heap or contextlib.nullcontext():
        engine, one_step = _setup(variant, cfg, world, device)
    _sync(device)
    if device.type == "cuda":
        setup_peak, setup_held = torch.cuda.max_memory_allocated(device), torch.cuda.memory_allocated(device)
    else:
        setup_peak, setup_held = heap.peak - base, heap.now() - base
    heap = HeapPeak() if device.type == "cpu" else None
    one_step(x, y)  # the optimizer states exist from the first step on
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if engine is not None:
        engine.step_metrics()  # start the peak accounting afresh
    with heap or contextlib.nullcontext():
        for _ in range(MEMORY_STEPS):
            one_step(x, y)
    _sync(device)
    out = {"peak_mb": (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
                       else heap.peak - base) / 2**20, "setup_extra_mb": (setup_peak - setup_held) / 2**20}
    if engine is not None:
        rec = engine.step_metrics()
        out["state_mb"] = rec.get("peak_model_state_bytes",
                                  rec["param_bytes"] + rec["grad_bytes"] + rec["optim_bytes"]) / 2**20
    return out


def _job(rank: int, world: int, job, args):
    kind, what = job
    return time_pair(rank, world, what, args) if kind == "time" else memory_rank(rank, world, what, args)


def run_world(world: int, job, args) -> list[dict]:
    """One job ("time", (ours, theirs)) or ("memory", variant) on a fresh world of `world` ranks."""
    from pyruntime.spawn import run_world as spawn

    return spawn(world, _job, job, args, timeout=1800, backend="nccl" if torch.cuda.is_available() else "gloo",
                 threads=max(1, (os.cpu_count() or 1) // world), name=f"bench zero {job} on {world} ranks")


def paired_summary(per_rank: list[dict], ours: str, theirs: str) -> dict:
    """Median step time of each side (a step's time: its slowest rank's), their ratio
    torch/ours, and `pairs`: the median over the back-to-back pairs of steps of that ratio
    (robust to load that changes during the run). > 1: ours is faster."""
    n = len(per_rank[0]["times"][ours])
    slowest = {v: [max(r["times"][v][i] for r in per_rank) for i in range(n)] for v in (ours, theirs)}
    return {"ours_s": statistics.median(slowest[ours]), "torch_s": statistics.median(slowest[theirs]),
            "pairs": statistics.median(t / o for o, t in zip(slowest[ours], slowest[theirs]))}


def main(argv=None) -> int:
    from pyruntime.config import PRESETS

    parser = suite_parser("zero", __doc__)
    parser.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--preset", default="small", choices=sorted(PRESETS))
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10, help="timed steps of each side")
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args(argv)
    require(parser, args, positive=("worlds", "seq_len", "global_batch", "steps"), non_negative=("warmup",))
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores), gloo"
    print(f"bench_zero | preset {args.preset} | global batch {args.global_batch} x {args.seq_len} | {device} | "
          f"median of {args.steps} steps after {args.warmup} warm-up, ours and torch alternating step by step; "
          "baseline: torch DDP for --zero 0, torch FSDP2 for --zero 3; torch/ours: the ratio of the two step "
          "medians shown; pairs: median over back-to-back pairs of steps of torch's time over ours; > 1: ours is "
          f"faster | peak memory: each variant alone, {MEMORY_STEPS} steps")
    header = (f"{'ranks':>5} {'variant':<14} {'step ms':>9} {'torch/ours':>10} {'pairs':>7} {'peak MB/rank':>13} "
              f"{'state MB/rank':>14} {'setup extra MB':>14}")
    print(header + "\n" + "-" * len(header), flush=True)
    for world in args.worlds:
        rows = {}
        for ours, theirs in BASELINE_OF.items():
            pair = paired_summary(run_world(world, ("time", (ours, theirs)), args), ours, theirs)
            rows[ours] = {"step_s": pair["ours_s"], "ratio": pair["torch_s"] / pair["ours_s"], "pairs": pair["pairs"]}
            rows[theirs] = {"step_s": pair["torch_s"]}
        for variant in VARIANTS:
            per_rank = run_world(world, ("memory", variant), args)
            rows[variant]["peak_mb"] = max(r["peak_mb"] for r in per_rank)
            rows[variant]["state_mb"] = max(r.get("state_mb", 0.0) for r in per_rank)
            rows[variant]["setup_extra_mb"] = max(r["setup_extra_mb"] for r in per_rank)
        for variant in VARIANTS:
            r = rows[variant]
            ratio = f"{r['ratio']:9.2f}x {r['pairs']:6.2f}x" if "ratio" in r else f"{'':>10} {'':>7}"
            state = f"{r['state_mb']:14.1f}" if r["state_mb"] else f"{'':>14}"
            print(f"{world:>5} {variant:<14} {r['step_s'] * 1e3:9.1f} {ratio} {r['peak_mb']:13.1f} {state} "
                  f"{r['setup_extra_mb']:14.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
