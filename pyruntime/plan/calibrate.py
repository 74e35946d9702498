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
                         runtime's all-gather / reduce-scatter, send/recv, from 4 KB to 8 MB
                         (COMM_BYTES), each between small GEMMs as in a step; the slower
                         rank's mean (see _mean_time_between_work); plans use the
                         least-squares line through the sizes
    the model's blocks   with a model (`plan --calibrate --preset/--config/--hf-config`): one
                         block and the rest of a micro-batch (embedding, head, loss) of that
                         model at its sequence length, per tp degree, at micro-batches 1 and 4
                         (model_fits); plans of that model use them instead of FLOPs / rate
Every other figure is the fastest of repeated runs after a warm-up (see _best_time). On CPU
with one torch thread, as each spawned rank of a CPU world runs (pyruntime/spawn.py), so the
profile describes a rank.
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


def _run_times(fn, repeats: int, warmup: int, sync, before=None) -> list[float]:
    """Seconds of each of `repeats` runs of fn after `warmup` untimed ones; before (if given)
    runs, untimed, ahead of every run."""
    times = []
    for i in range(warmup + repeats):
        if before is not None:
            before()
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def _best_time(fn, repeats: int = 9, warmup: int = 2, sync=lambda: None) -> float:
    """The fastest of `repeats` timed runs: on a machine shared with other jobs, the least
    disturbed one estimates the machine (a median drifts with the others' load)."""
    return min(_run_times(fn, repeats, warmup, sync))


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


def _model_time(layers: int, dim: int, batch: int, seq: int, shape=None) -> tuple[float, float]:
    """(seconds of a model's forward + loss + backward, its blocks' matmul FLOPs) at this shape
    (a generic one of width dim, or `shape`, a ModelConfig, with `layers` blocks)."""
    from pyruntime.config import ModelConfig
    from pyruntime.model.llama import Transformer
    from pyruntime.plan.layout import Layout, Workload
    from pyruntime.plan.timing import chunk_forward_flops
    from pyruntime.model.loss import lm_loss
    from pyruntime.parallel.recompute import apply_recompute

    dev, sync = _device_and_sync()
    if shape is None:
        cfg = ModelConfig(dim=dim, n_layers=layers, n_heads=max(2, dim // 64), ffn_dim=dim * 8 // 3 // 8 * 8,
                          vocab_size=256, max_seq_len=seq)
    else:
        cfg = dataclasses.replace(shape, n_layers=layers, max_seq_len=max(seq, shape.max_seq_len))
    torch.manual_seed(0)
    model = Transformer(cfg).to(dev)
    apply_recompute(model, "none")  # as the trainer runs every block: metered (parallel/recompute.py)
    x = torch.randint(0, cfg.vocab_size, (batch, seq), device=dev)
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


def tp_local_model(model, tp: int):
    """The shapes one tp rank computes with (tensor/apply.py): its share of the heads, of the
    MLP and of the vocabulary (padded to a multiple of tp), the head width kept."""
    if tp == 1:
        return model
    return dataclasses.replace(model, n_heads=model.n_heads // tp, n_kv_heads=model.kv_heads // tp,
                      head_size=model.head_dim, ffn_dim=model.ffn_dim // tp, vocab_size=-(-model.vocab_size // tp))


# Micro-batch sizes the model's pieces are timed at (their time is fitted as a line through them).
FIT_MICRO_BATCHES = (1, 4)


def probe_bytes(model, seq_len: int) -> int:
    """Memory the largest model_fits probe needs: 3 blocks with embedding and head, their
    parameters and gradients in fp32, and what a micro-batch of FIT_MICRO_BATCHES[-1] saves
    for backward, with the logits' peak (plan/activations.py)."""
    from pyruntime.model.llama import count_params
    from pyruntime.plan.activations import Shape, chunk_bytes, logits_peak_bytes

    probe = dataclasses.replace(model, n_layers=3)
    x = Shape(probe, FIT_MICRO_BATCHES[-1], seq_len)
    return 8 * count_params(probe)["total"] + chunk_bytes(x, 3, True, True) + logits_peak_bytes(x)


def model_fits(model, seq_len: int, tps=(1,)) -> tuple[tuple[str, float, float, float, float], ...]:
    """Devices.block_fits for `model` at seq_len on this machine, for each tp degree in tps:
    models of 1 and 3 of its (tp-local) blocks, forward + loss + backward, timed at each of
    FIT_MICRO_BATCHES; a block is half the difference, the rest what the 1-block model takes
    beyond its block. Collectives are not in them (the planner adds those)."""
    from pyruntime.plan.devices import fit_key

    fits = []
    for tp in tps:
        local = tp_local_model(model, tp)
        block, rest = [], []
        for mb in FIT_MICRO_BATCHES:
            one, _ = _model_time(1, 0, mb, seq_len, shape=local)
            three, _ = _model_time(3, 0, mb, seq_len, shape=local)
            block.append(max(three - one, 0.0) / 2)
            rest.append(max(one - block[-1], 0.0))
        (m0, m1), fit = FIT_MICRO_BATCHES, []
        for y0, y1 in (block, rest):
            slope = max((y1 - y0) / (m1 - m0), 0.0)
            fit += [max(y0 - slope * m0, 0.0), slope]
        fits.append((fit_key(model, seq_len, tp), *fit))
    return tuple(fits)


def memory_bandwidth() -> float:
    dev, sync = _device_and_sync()
    a = torch.empty(16 * 2**20, device=dev)
    b = torch.empty_like(a)
    return 2 * a.numel() * 4 / _best_time(lambda: a.copy_(b), sync=sync)


# Message sizes the collectives are timed at: from latency-bound to bandwidth-bound.
COMM_BYTES = (4096, 65536, 262144, 2**20, 8 * 2**20)
COMM_KINDS = ("allreduce", "gather", "p2p")


def _mean_time_between_work(fn, work, repeats: int = 30, warmup: int = 3, sync=lambda: None) -> float:
    """The mean of `repeats` timed runs of fn, each after a call of work (not timed). A step
    interleaves its collectives with compute, and pays the sum of dozens of them: their mean
    cost between compute is what adds up. On a 2-core CPU the two ranks and gloo's threads then
    compete for the cores, which an idle back-to-back loop does not show (measured here: the
    idle loop's fastest 2-rank all-reduce of 512 KB took 0.5 ms, the mean between ~1 ms of
    GEMMs 2.3 ms, and the trainer's tp all-reduces of that size 2.8 ms on average)."""
    times = _run_times(fn, repeats, warmup, sync, before=work)
    return sum(times) / len(times)


def comm_probe(rank: int, world_size: int, cuda: bool) -> list[tuple[str, int, float]]:
    """(kind, bytes, seconds) of an all-reduce, of the all-gather / reduce-scatter the runtime
    issues (comm/tp.py, their mean) and of a send / receive between two ranks, at COMM_BYTES,
    each between a few small GEMMs (about a millisecond on one CPU core)."""
    import torch.distributed as dist

    from pyruntime.comm.tp import gather_along, reduce_scatter_along

    dev = torch.device("cuda", rank) if cuda else torch.device("cpu")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    group = dist.group.WORLD
    a, b = torch.randn(128, 256, device=dev), torch.randn(256, 256, device=dev)

    def work():
        for _ in range(5):
            a @ b

    def timed(fn) -> float:
        return _mean_time_between_work(fn, work, sync=sync)

    out = []
    for nbytes in COMM_BYTES:
        t = torch.ones(nbytes // 4, device=dev)

        def p2p():
            if rank == 0:
                dist.send(t, 1)
            else:
                dist.recv(t, 0)
        out.append(("allreduce", nbytes, timed(lambda: dist.all_reduce(t))))
        out.append(("gather", nbytes, (timed(lambda: gather_along(t[: t.numel() // 2], group, 0))
                                       + timed(lambda: reduce_scatter_along(t, group, 0))) / 2))
        out.append(("p2p", nbytes, timed(p2p)))
    return out


def _fit(times: list[tuple[str, int, float]], kind: str) -> tuple[float, float]:
    """(latency, bytes/s) of one kind of message: the least-squares line through its timed
    sizes (a line, not the points joined: single sizes are noisy on a shared CPU)."""
    from pyruntime.plan.devices import line_fit

    intercept, slope = line_fit([(b, t) for k, b, t in times if k == kind])
    return intercept, 1.0 / max(slope, 1e-15)


def calibrate(path: str | os.PathLike = DEFAULT_PROFILE, comm: bool = True, model=None, seq_len: int = 0,
              tps=(1,)) -> Device:
    """Measure, save the profile as JSON at `path`, and return it as a Device. Given a model
    (a ModelConfig) and seq_len, also time its blocks at each tp degree in tps (model_fits)."""
    from pyruntime.spawn import run_world

    cuda = torch.cuda.is_available()
    if model is not None:  # before measuring anything: a model too big to probe is refused at once
        need, have = probe_bytes(model, seq_len), _free_memory(cuda)
        if need > have // 2:
            raise PlanError(f"timing this model's blocks at seq {seq_len} needs about {need / 1e9:.1f} GB "
                            f"(3 blocks, micro-batch {FIT_MICRO_BATCHES[-1]}); this machine has "
                            f"{have / 1e9:.1f} GB free: calibrate with a shorter --seq-len or without a model")
    if not cuda:
        torch.set_num_threads(1)
    rate = gemm_flops()
    block, micro, block_rate = dispatch_overheads()
    lat = {kind: (10e-6, 1e12) for kind in COMM_KINDS}
    times: list[tuple[str, int, float]] = []
    if comm and (not cuda or torch.cuda.device_count() >= 2):
        runs = run_world(2, comm_probe, cuda, backend="nccl" if cuda else "gloo", name="plan calibrate")
        times = [(k, b, max(r[i][2] for r in runs)) for i, (k, b, _) in enumerate(runs[0])]  # the slower rank
        lat = {kind: _fit(times, kind) for kind in COMM_KINDS}
    fits = model_fits(model, seq_len, tps) if model is not None else ()
    memory = (torch.cuda.get_device_properties(0).total_memory if cuda
              else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    # A 2-rank all-reduce moves the buffer once per direction: its fitted rate is the bus bandwidth.
    bw = lat["allreduce"][1]
    dev = Device(f"calibrated:{socket.gethostname()}:{'cuda' if cuda else 'cpu'}", float(memory), rate, bw, bw,
                 f"plan --calibrate on {time.strftime('%Y-%m-%d %H:%M')}", mem_bw=memory_bandwidth(),
                 latency=lat["allreduce"][0], gather_latency=lat["gather"][0], p2p_latency=lat["p2p"][0],
                 gemm_efficiency=min(1.0, block_rate / rate), block_overhead=block, micro_overhead=micro,
                 overlap=cuda, cuda=cuda, comm_times=tuple(times), block_fits=fits)
    dev = dataclasses.replace(dev, step_overhead=step_overhead(dev))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(dataclasses.asdict(dev), indent=1))
    return dev


def _free_memory(cuda: bool) -> int:
    if cuda:
        return torch.cuda.mem_get_info()[0]
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError):  # no such sysconf name here
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


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
        raw = json.loads(p.read_text())
        for key in ("comm_times", "block_fits"):  # JSON gives lists; the Device holds tuples
            raw[key] = tuple(tuple(row) for row in raw.get(key, ()))
        return Device(**raw)
    except (ValueError, TypeError, AttributeError) as e:
        raise PlanError(f"calibration profile {path} is not one `plan --calibrate` wrote: {e}") from None
