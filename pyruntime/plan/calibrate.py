"""`plan --calibrate`: measure this machine and save a profile later plans use instead of the
device table.

    GEMM throughput      a (2048 x 512) @ (512 x 512) matmul (bf16 on CUDA, fp32 on CPU)
    block efficiency     one transformer block's forward + backward at a mid-sized shape,
                         its matmul FLOPs over its time, as a fraction of the GEMM rate (what
                         attention, norms and elementwise ops leave of it)
    block overhead       the same block at a tiny shape, where nothing but dispatch counts
    memory bandwidth     a 64 MB copy
    collectives, p2p     a 2-rank world (gloo on CPU, NCCL with >= 2 GPUs): all-reduce and
                         send/recv of 4 KB (latency) and 8 MB (bandwidth)
Every figure is a median of repeated runs after a warm-up. On CPU with one torch thread, as
each spawned rank of a CPU world runs (pyruntime/spawn.py), so the profile describes a rank.
"""
from __future__ import annotations

import dataclasses
import json
import os
import socket
import statistics
import time
from pathlib import Path

import torch

from pyruntime.plan.devices import Device
from pyruntime.plan.layout import PlanError

DEFAULT_PROFILE = "plan_profile.json"


def _median_time(fn, repeats: int = 7, warmup: int = 2, sync=lambda: None) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _device_and_sync():
    if torch.cuda.is_available():
        return torch.device("cuda"), torch.cuda.synchronize
    return torch.device("cpu"), lambda: None


def gemm_flops() -> float:
    dev, sync = _device_and_sync()
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    a = torch.randn(2048, 512, device=dev, dtype=dtype)
    b = torch.randn(512, 512, device=dev, dtype=dtype)
    return 2 * 2048 * 512 * 512 / _median_time(lambda: a @ b, sync=sync)


def _block_time(dim: int, batch: int, seq: int) -> tuple[float, float]:
    """(seconds of one block's forward + backward, its matmul FLOPs) at this shape."""
    from pyruntime.config import ModelConfig
    from pyruntime.model.llama import Block, model_rotary
    from pyruntime.plan.timing import chunk_forward_flops
    from pyruntime.plan.layout import Layout, Workload

    dev, sync = _device_and_sync()
    cfg = ModelConfig(dim=dim, n_layers=1, n_heads=max(1, dim // 64), ffn_dim=dim * 8 // 3 // 8 * 8, vocab_size=256,
                      max_seq_len=seq)
    block = Block(cfg).to(dev)
    x = torch.randn(batch, seq, dim, device=dev, requires_grad=True)
    cos, sin = model_rotary(cfg, seq, dev, x.dtype)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=dev.type == "cuda")

    def run():
        with autocast:
            y = block(x, cos, sin)
        y.float().sum().backward()

    flops = 3 * chunk_forward_flops(Workload(model=cfg, seq_len=seq, global_batch=batch), Layout(micro_batch=batch),
                                    1, False)
    return _median_time(run, sync=sync), flops


def memory_bandwidth() -> float:
    dev, sync = _device_and_sync()
    a = torch.empty(16 * 2**20, device=dev)
    b = torch.empty_like(a)
    return 2 * a.numel() * 4 / _median_time(lambda: a.copy_(b), sync=sync)


def comm_probe(rank: int, world_size: int, cuda: bool) -> dict:
    """All-reduce and p2p latency (4 KB) and bandwidth (8 MB) between two ranks."""
    import torch.distributed as dist

    dev = torch.device("cuda", rank) if cuda else torch.device("cpu")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    out = {}
    for nbytes, key in ((4096, "small"), (8 * 2**20, "large")):
        t = torch.ones(nbytes // 4, device=dev)
        out[f"allreduce_{key}"] = _median_time(lambda: dist.all_reduce(t), sync=sync)

        def p2p():
            if rank == 0:
                dist.send(t, 1)
            else:
                dist.recv(t, 0)
        out[f"p2p_{key}"] = _median_time(p2p, sync=sync)
        out[f"bytes_{key}"] = nbytes
    return out


def _ring_fit(small: float, large: float, n_small: int, n_large: int, factor: float) -> tuple[float, float]:
    """(latency, bandwidth) from two timings t = latency + factor * bytes / bw."""
    bw = factor * (n_large - n_small) / max(large - small, 1e-9)
    return max(small - factor * n_small / bw, 1e-7), bw


def calibrate(path: str | os.PathLike = DEFAULT_PROFILE, comm: bool = True) -> Device:
    """Measure, save the profile as JSON at `path`, and return it as a Device."""
    from pyruntime.spawn import run_world

    cuda = torch.cuda.is_available()
    if not cuda:
        torch.set_num_threads(1)
    rate = gemm_flops()
    small_t, _ = _block_time(32, 1, 8)
    mid_t, mid_flops = _block_time(256, 4, 128)
    efficiency = min(1.0, mid_flops / max(mid_t - small_t, 1e-9) / rate)
    latency, bw = 10e-6, 1e12
    if comm and (not cuda or torch.cuda.device_count() >= 2):
        r = run_world(2, comm_probe, cuda, backend="nccl" if cuda else "gloo", name="plan calibrate")[0]
        # all-reduce of 2 ranks moves (2-1)/2 x 2 = 1x the buffer; a p2p moves it once
        latency, bw = _ring_fit(r["p2p_small"], r["p2p_large"], r["bytes_small"], r["bytes_large"], 1.0)
    memory = (torch.cuda.get_device_properties(0).total_memory if cuda
              else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    dev = Device(f"calibrated:{socket.gethostname()}:{'cuda' if cuda else 'cpu'}", float(memory), rate, bw, bw,
                 f"plan --calibrate on {time.strftime('%Y-%m-%d %H:%M')}", mem_bw=memory_bandwidth(),
                 latency=latency, gemm_efficiency=efficiency, block_overhead=small_t, cuda=cuda)
    Path(path).write_text(json.dumps(dataclasses.asdict(dev), indent=1))
    return dev


def load_profile(path: str | os.PathLike) -> Device:
    p = Path(path)
    if not p.is_file():
        raise PlanError(f"calibration profile not found: {path} (write one with `plan --calibrate`)")
    try:
        return Device(**json.loads(p.read_text()))
    except (ValueError, TypeError) as e:
        raise PlanError(f"calibration profile {path} is not one `plan --calibrate` wrote: {e}") from None
