"""Every layout of N GPUs that fits, ranked by predicted step time.

Enumerated: tp (divisors of N that fit in a node and divide the heads, KV heads and MLP
width), pp (divisors with at least as many layers), dp = N / (tp pp), ZeRO 0-3 (0 alone at
dp 1), sequence parallelism with tp, micro-batch sizes dividing the per-rank batch, the
schedules 1f1b / zb / interleaved (2 chunks per rank) with pp, and the recompute / offload
modes the trainer offers (read from its flags, so no command is printed that it would refuse).
"""
from __future__ import annotations

import bisect
import itertools
import shlex
from dataclasses import dataclass

from pyruntime.parallel.validate import tp_misfit
from pyruntime.parallel.recompute import ALL_OPS
from pyruntime.plan.layout import Layout, PlanError, Workload, check
from pyruntime.plan.memory import RankMemory, all_rank_memory
from pyruntime.plan.timing import Cluster, StepTime, step_time


@dataclass(frozen=True)
class Candidate:
    layout: Layout
    memory: list[RankMemory]
    time: StepTime

    @property
    def peak(self) -> int:
        return max(max(r.steady_peak, r.first_step_peak) for r in self.memory)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def tp_degrees(work: Workload, gpus: int, gpus_per_node: int) -> list[int]:
    """The tp sizes a search of `gpus` GPUs tries: divisors inside one node that shard the model."""
    return [t for t in _divisors(gpus) if t <= gpus_per_node and tp_misfit(work.model, t) is None]


def trainer_modes() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The recompute modes and offload targets `train` accepts today."""
    from pyruntime.cli import TRAIN_FLAGS

    recompute = ("none", "selective", "full") if "--recompute" in TRAIN_FLAGS else ("none",)
    offload = ("none", "optimizer") if "--offload" in TRAIN_FLAGS else ("none",)
    return recompute, offload


def layouts(work: Workload, cluster: Cluster, max_micro_batch: int = 16, *, recompute: str | None = None,
            offload: str | None = None, recompute_layers: int | None = None, recompute_ops: str = ALL_OPS,
            mesh_order: str = "dp,pp,tp"):
    """Every layout the trainer would accept on cluster.gpus GPUs (not yet checked for memory);
    recompute / offload given: only layouts with that mode (recompute_layers / recompute_ops:
    train's flags of those names, applied to every recomputing layout)."""
    recomputes, offloads = trainer_modes()
    recomputes = (recompute,) if recompute else recomputes
    offloads = (offload,) if offload else offloads
    n = cluster.gpus
    for tp, pp in itertools.product(tp_degrees(work, n, cluster.gpus_per_node), _divisors(n)):
        if n % (tp * pp):
            continue
        dp = n // (tp * pp)
        if work.global_batch % dp:
            continue
        schedules = [("1f1b", 1), ("zb", 1), ("interleaved", 2)] if pp > 1 else [("1f1b", 1)]
        micro_sizes = [b for b in _divisors(work.global_batch // dp) if b <= max_micro_batch]
        for zero, sp, (sched, v), mb, rec, off in itertools.product(
                range(4) if dp > 1 else (0,), (False, True) if tp > 1 else (False,), schedules, micro_sizes,
                recomputes, offloads):
            lay = Layout(dp=dp, tp=tp, pp=pp, zero=zero, sp=sp, schedule=sched, virtual_stages=v, micro_batch=mb,
                         recompute=rec, offload=off, recompute_ops=recompute_ops,
                         recompute_layers=None if rec == "none" else recompute_layers, mesh_order=mesh_order)
            try:
                check(work, lay, n)
            except PlanError:
                continue
            yield lay


@dataclass(frozen=True)
class SearchResult:
    fastest: list[Candidate]
    """The fastest layouts that fit, fastest first (all of them when the search had no top)."""
    fitting: int
    """How many layouts fit."""
    smallest_peak: int
    """The smallest per-GPU peak of any layout: what a search with no fit would need."""


def search(work: Workload, cluster: Cluster, *, recompute: str | None = None, offload: str | None = None,
           recompute_layers: int | None = None, recompute_ops: str = ALL_OPS, mesh_order: str = "dp,pp,tp",
           top: int | None = None) -> SearchResult:
    """Every layout that fits, by predicted step time; recompute / offload (and how recompute
    runs): fixed by the user.
    With top, only the `top` fastest are timed exactly: layouts are simulated in the order of
    their step's lower bound (no pipeline bubble), until that bound exceeds the top-th fastest
    step found, so a search of thousands of GPUs simulates a few schedules, not every one."""
    fitting, smallest = [], None
    cuda = cluster.device.cuda
    for lay in layouts(work, cluster, recompute=recompute, offload=offload, recompute_layers=recompute_layers,
                       recompute_ops=recompute_ops, mesh_order=mesh_order):
        mem = all_rank_memory(work, lay, cuda=cuda)
        peak = max(max(r.steady_peak, r.first_step_peak) for r in mem)
        smallest = peak if smallest is None else min(smallest, peak)
        if peak <= cluster.device.memory:
            fitting.append((step_time(work, lay, cluster, bubble=False).step, lay, mem))
    fitting.sort(key=lambda f: f[0])
    timed: list[Candidate] = []
    for bound, lay, mem in fitting:
        if top is not None and len(timed) >= top and bound > timed[top - 1].time.step:
            break  # every later layout's step is at least its bound: none can enter the top
        bisect.insort(timed, Candidate(lay, mem, step_time(work, lay, cluster)), key=lambda c: (c.time.step, c.peak))
    return SearchResult(timed if top is None else timed[:top], len(fitting), smallest or 0)


def train_command(lay: Layout, work: Workload, cluster: Cluster, model_args: list[str]) -> str:
    """The exact launch of `train` at this layout (one torchrun per node)."""
    nodes = max(1, cluster.gpus // cluster.gpus_per_node)
    per_node = min(cluster.gpus, cluster.gpus_per_node)
    args = ["torchrun", "--nnodes", str(nodes), "--nproc_per_node", str(per_node), "-m", "pyruntime", "train",
            *model_args, "--seq-len", str(work.seq_len), "--global-batch", str(work.global_batch),
            "--micro-batch", str(lay.micro_batch), "--dp", str(lay.dp), "--tp", str(lay.tp), "--pp", str(lay.pp)]
    if lay.zero:
        args += ["--zero", str(lay.zero)]
    if lay.sp:
        args.append("--sp")
    if lay.pp > 1:
        args += ["--schedule", lay.schedule]
        if lay.virtual_stages > 1:
            args += ["--virtual-stages", str(lay.virtual_stages)]
        if lay.pp_layout != "even":
            args += ["--pp-layout", lay.pp_layout]
    if lay.recompute != "none":
        args += ["--recompute", lay.recompute]
        if lay.recompute_layers is not None:
            args += ["--recompute-layers", str(lay.recompute_layers)]
        if lay.recompute == "selective" and lay.recompute_ops != ALL_OPS:
            args += ["--recompute-ops", lay.recompute_ops]
    if lay.offload != "none":
        args += ["--offload", lay.offload]
    if lay.mesh_order.replace(" ", "") != "dp,pp,tp":
        args += ["--mesh-order", lay.mesh_order]
    return shlex.join(args)
