"""`plan --calibrate`: measure this machine and save a profile later plans use instead of the
device table.

    GEMM throughput      a (2048 x 512) @ (512 x 512) matmul (bf16 on CUDA, fp32 on CPU)
    block efficiency     the matmul FLOPs of 2 more blocks (forward + loss + backward of a
                         4- vs a 2-block model at a mid-sized shape) over their time, as a
                         fraction of the GEMM rate (what attention, norms and elementwise ops
                         leave of it)
    dispatch overheads   1- and 2-block models at a tiny shape, where nothing but dispatch
                         counts: per block, and per micro-batch outside the blocks
    step overhead        a trainer step of a 1-block model at a tiny shape (a 1-rank world),
                         less what the other figures predict for it: the optimizer's and the
                         clipping's dispatch, the sampler, metrics
    memory bandwidth     a 64 MB copy
    collectives, p2p     a 2-rank world (gloo on CPU, NCCL with >= 2 GPUs): all-reduce, the
                         runtime's all-gather / reduce-scatter, send/recv, of 4 KB (latency)
                         and 8 MB (bandwidth); the slower rank's figures
Every figure is the fastest of repeated runs after a warm-up (see _best_time). On CPU with one torch thread, as
each spawned rank of a CPU world runs (pyruntime/spawn.py), so the profile describes a rank.
"""
from __future__ import annotations

import dataclasses
import json
import os
import socket
import time
from pathlib import Path

import torch

from pyruntime.plan.devices import Device
from pyruntime.plan.layout import PlanError

DEFAULT_PROFILE = "plan_profile.json"


def _best_time(fn, repeats: int = 9, warmup: int = 2, sync=lambda: None) -> float:
    """The fastest of `repeats` timed runs: on a machine shared with other jobs, the least
    disturbed one estimates the machine (a median drifts with the others' load)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return min(times)


def _device_and_sync():
    if torch.cuda.is_available():
        return torch.device("cuda"), torch.cuda.synchronize
    return torch.device("cpu"), lambda: None


def gemm_flops() -> float:
    dev, sync = _device_and_sync()
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    a = torch.randn(2048, 512, device=dev, dtype=dtype)
    b = torch.randn(512, 512, device=dev, dtype=dtype)
    return 2 * 2048 * 512 * 512 / _best_time(lambda: a @ b, sync=sync)


def _model_time(layers: int, dim: int, batch: int, seq: int) -> tuple[float, float]:
    """(seconds of a model's forward + loss + backward, its blocks' matmul FLOPs) at this shape."""
    from pyruntime.config import ModelConfig
    from pyruntime.model.llama import Transformer
    from pyruntime.plan.layout import Layout, Workload
    from pyruntime.plan.timing import chunk_forward_flops
    from pyruntime.model.loss import lm_loss
    from pyruntime.parallel.recompute import apply_recompute

    dev, sync = _device_and_sync()
    cfg = ModelConfig(dim=dim, n_layers=layers, n_heads=max(2, dim // 64), ffn_dim=dim * 8 // 3 // 8 * 8,
                      vocab_size=256, max_seq_len=seq)
    model = Transformer(cfg).to(dev)
    apply_recompute(model, "none")  # as the trainer runs every block: metered (parallel/recompute.py)
    x = torch.randint(0, 256, (batch, seq), device=dev)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=dev.type == "cuda")

    def run():
        with autocast:
            loss = lm_loss(model(x), x)
        loss.backward()

    flops = 3 * chunk_forward_flops(Workload(model=cfg, seq_len=seq, global_batch=batch), Layout(micro_batch=batch),
                                    layers, False)
    return _best_time(run, sync=sync), flops


def dispatch_overheads() -> tuple[float, float, float]:
    """(seconds per block, seconds per micro-batch outside the blocks, the fraction of the GEMM
    rate a mid-sized block sustains): tiny models of 1 and 3 blocks, where only dispatch
    counts, and 2 vs 4 blocks at a mid-sized shape."""
    one, _ = _model_time(1, 32, 1, 8)
    three, _ = _model_time(3, 32, 1, 8)
    block = max(three - one, 0.0) / 2
    mid2, flops2 = _model_time(2, 256, 4, 128)
    mid4, flops4 = _model_time(4, 256, 4, 128)
    rate = (flops4 - flops2) / max(mid4 - mid2 - 2 * block, 1e-9)
    return block, max(one - block, 0.0), rate


def memory_bandwidth() -> float:
    dev, sync = _device_and_sync()
    a = torch.empty(16 * 2**20, device=dev)
    b = torch.empty_like(a)
    return 2 * a.numel() * 4 / _best_time(lambda: a.copy_(b), sync=sync)


def comm_probe(rank: int, world_size: int, cuda: bool) -> dict:
    """Latency (4 KB) and time of 8 MB of an all-reduce, of the all-gather / reduce-scatter
    the runtime issues (comm/tp.py) and of a send / receive, between two ranks."""
    import torch.distributed as dist

    from pyruntime.comm.tp import gather_along, reduce_scatter_along

    dev = torch.device("cuda", rank) if cuda else torch.device("cpu")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    group = dist.group.WORLD
    out = {}
    for nbytes, key in ((4096, "small"), (8 * 2**20, "large")):
        t = torch.ones(nbytes // 4, device=dev)

        def p2p():
            if rank == 0:
                dist.send(t, 1)
            else:
                dist.recv(t, 0)
        out[f"allreduce_{key}"] = _best_time(lambda: dist.all_reduce(t), sync=sync)
        out[f"gather_{key}"] = (_best_time(lambda: gather_along(t[: t.numel() // 2], group, 0), sync=sync)
                                + _best_time(lambda: reduce_scatter_along(t, group, 0), sync=sync)) / 2
        out[f"p2p_{key}"] = _best_time(p2p, sync=sync)
        out[f"bytes_{key}"] = nbytes
    return out


def _fit(r: dict, kind: str) -> tuple[float, float]:
    """(latency, bytes/s) of one kind of message from its 4 KB and 8 MB timings."""
    bw = (r["bytes_large"] - r["bytes_small"]) / max(r[f"{kind}_large"] - r[f"{kind}_small"], 1e-9)
    return r[f"{kind}_small"], bw


def calibrate(path: str | os.PathLike = DEFAULT_PROFILE, comm: bool = True) -> Device:
    """Measure, save the profile as JSON at `path`, and return it as a Device."""
    from pyruntime.spawn import run_world

    cuda = torch.cuda.is_available()
    if not cuda:
        torch.set_num_threads(1)
    rate = gemm_flops()
    block, micro, block_rate = dispatch_overheads()
    lat = {"allreduce": (10e-6, 1e12), "gather": (10e-6, 1e12), "p2p": (10e-6, 1e12)}
    if comm and (not cuda or torch.cuda.device_count() >= 2):
        runs = run_world(2, comm_probe, cuda, backend="nccl" if cuda else "gloo", name="plan calibrate")
        worst = {k: max(r[k] for r in runs) for k in runs[0]}
        lat = {kind: _fit(worst, kind) for kind in lat}
    memory = (torch.cuda.get_device_properties(0).total_memory if cuda
              else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    # A 2-rank all-reduce moves the buffer once per direction: its fitted rate is the bus bandwidth.
    bw = lat["allreduce"][1]
    dev = Device(f"calibrated:{socket.gethostname()}:{'cuda' if cuda else 'cpu'}", float(memory), rate, bw, bw,
                 f"plan --calibrate on {time.strftime('%Y-%m-%d %H:%M')}", mem_bw=memory_bandwidth(),
                 latency=lat["allreduce"][0], gather_latency=lat["gather"][0], p2p_latency=lat["p2p"][0],
                 gemm_efficiency=min(1.0, block_rate / rate), block_overhead=block, micro_overhead=micro,
                 overlap=cuda, cuda=cuda)
    dev = dataclasses.replace(dev, step_overhead=step_overhead(dev))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(dataclasses.asdict(dev), indent=1))
    return dev


def step_overhead(dev: Device) -> float:
    """A trainer step's time beyond what the profile predicts for it (see the module docstring)."""
    from pyruntime.config import Config, DataConfig, ModelConfig, TrainConfig
    from pyruntime.plan.layout import Layout, Workload
    from pyruntime.plan.measure import measure_step_time
    from pyruntime.plan.timing import Cluster, step_time
    from pyruntime.spawn import run_world

    model = ModelConfig(dim=32, n_layers=1, n_heads=2, ffn_dim=88, vocab_size=256, max_seq_len=8)
    cfg = Config(train=TrainConfig(quiet=True, eval_every=0, steps=12, out="runs/plan_calibrate"), model=model,
                 data=DataConfig(seq_len=8, global_batch=1, micro_batch=1, max_bytes=100_000))
    measured = run_world(1, measure_step_time, [cfg], 9, 3, name="plan calibrate step")[0][0]
    work = Workload(model=model, seq_len=8, global_batch=1)
    predicted = step_time(work, Layout(), Cluster(dataclasses.replace(dev, step_overhead=0.0), 1, 1)).step
    return max(measured - predicted, 0.0)


def load_profile(path: str | os.PathLike) -> Device:
    p = Path(path)
    if not p.is_file():
        raise PlanError(f"calibration profile not found: {path} (write one with `plan --calibrate`)")
    try:
        return Device(**json.loads(p.read_text()))
    except (ValueError, TypeError) as e:
        raise PlanError(f"calibration profile {path} is not one `plan --calibrate` wrote: {e}") from None
