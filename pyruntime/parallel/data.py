"""Data parallelism: the engine the trainer talks to, and plain DDP with gradient buckets.

    engine = apply_data_parallel(model, dims, cfg)     # --zero 0 | 1 | 2 | 3
    optimizer = engine.optimizer                       # .step() .zero_grad() .param_groups
    for i, micro in enumerate(micro_batches):
        with engine.micro_batch(last=i == len(micro_batches) - 1):
            loss(model(x), y).backward()
    engine.finish_gradient_sync()                      # every gradient collective waited for
    grads, replication = engine.gradient_pieces()      # for global-norm clipping
    optimizer.step()

DDP (`--zero 0`): parameters are taken in reverse registration order (their gradients arrive
roughly that way in backward) and grouped into buckets of at most bucket_mb
(ops.flat.plan_buckets; the first one at most 1 MB, so communication starts early). Each
bucket owns one flat buffer (laid out by the C++ planner, allocated once) and each
parameter's first gradient of a step is moved into it by its post-accumulate-grad hook, the
.grad becoming a view into the buffer; later micro-batches accumulate in place there. So
what backward produces is what is all-reduced, and the reduced result is the .grad: no
pack / unpack copies (as DDP, which also keeps its buckets). On the last micro-batch the
hook divides each gradient by dp (in the copy when there is one) and counts the gradients
of each bucket; when a bucket's last one has accumulated, its all-reduce (a sum, so the
mean over dp) is issued asynchronously, in place, so it runs while the backward of earlier
layers still computes. The earlier micro-batches of gradient accumulation communicate
nothing. finish_gradient_sync() waits for each bucket.

The engine only sees the parameters of the model it is given and the dp group of `dims`, so
it composes with pipeline stages (a subset of layers) and with tp (dp is never the world).
"""
from __future__ import annotations

import contextlib
import functools
from typing import Callable, Iterator, Sequence

import torch
import torch.nn as nn

from pyruntime.comm.collectives import CommDebug, CommStats, Collectives, Pending
from pyruntime.config import Config, ConfigError, OptimConfig
from pyruntime.mesh import ParallelDims
from pyruntime.ops.flat import FlatLayout, plan_buckets, plan_flat_layout
from pyruntime.parallel.accounting import ModelStateBytes, storage_bytes
from pyruntime.parallel.deferred_init import DeferredInit
from pyruntime.train.metrics import say
from pyruntime.train.optim import build_adamw

# Elements: every tensor in a flat buffer starts 64-byte aligned in fp32 (see ops/flat.py).
ALIGN = 16

# How many ranks outside the dp axis hold an identical copy of a parameter (1 without tp / pp).
Replicas = Callable[[nn.Parameter], int]


# The first bucket (the gradients that arrive first) is capped at this, so that a communication
# starts early in the backward even when one bucket_mb would hold the whole model (as DDP does).
FIRST_BUCKET_BYTES = 1 << 20


def trainable_params(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def gradient_buckets(params: Sequence[nn.Parameter], bucket_bytes: int) -> list[list[nn.Parameter]]:
    """params in reverse registration order (roughly the order their gradients are ready),
    grouped by ops.flat.plan_buckets: the first bucket at most FIRST_BUCKET_BYTES, the rest
    at most bucket_bytes (a tensor larger than the cap gets a bucket of its own)."""
    order = list(params)[::-1]
    if not order:
        return []
    numels, size = [p.numel() for p in order], order[0].element_size()
    first = plan_buckets(numels, min(bucket_bytes, FIRST_BUCKET_BYTES), size, align=ALIGN)[0]
    rest = plan_buckets(numels[first.end:], bucket_bytes, size, align=ALIGN) if first.end < len(order) else []
    return [order[:first.end]] + [order[first.end + b.begin:first.end + b.end] for b in rest]


def grad_or_zeros(p: nn.Parameter) -> torch.Tensor:
    """p.grad, created as zeros for a parameter that got no gradient on this rank (the other
    ranks may have one, and every rank must contribute to the same collective)."""
    if p.grad is None:
        p.grad = torch.zeros_like(p)
    return p.grad


class GradReadyTracker:
    """Calls on_ready(i) once per armed backward, as soon as every parameter of group i has
    accumulated its gradient (post-accumulate-grad hooks). flush() fires the groups that did
    not complete (a parameter without a gradient), in order. on_grad(i, j, counted), if
    given, runs at every gradient accumulation of parameter j of group i, before on_ready;
    counted: this accumulation is the step's last for it (armed), i.e. the one that counts
    (DDP moves the gradient into its bucket; the ZeRO engines reap finished collectives)."""

    def __init__(self, groups: Sequence[Sequence[nn.Parameter]], on_ready: Callable[[int], None],
                 on_grad: Callable[[int, int, bool], None] | None = None):
        self.sizes = [len(g) for g in groups]
        self.on_ready, self.on_grad = on_ready, on_grad
        self.armed = False
        self.armed_params: set[int] = set()
        self.seen: list[set[int]] = [set() for _ in groups]
        self.fired = [False] * len(groups)
        self.handles = [p.register_post_accumulate_grad_hook(functools.partial(self._hook, i, j))
                        for i, group in enumerate(groups) for j, p in enumerate(group)]

    def reset(self, armed: bool) -> None:
        self.armed = armed
        self.armed_params: set[int] = set()
        self.seen = [set() for _ in self.sizes]
        self.fired = [False] * len(self.sizes)

    def arm(self, params: Sequence[nn.Parameter]) -> None:
        """Count these parameters' gradients from now on (the pipeline arms each chunk for its
        last backward of the step; the others keep accumulating locally)."""
        self.armed_params.update(id(p) for p in params)

    def _hook(self, i: int, j: int, param: nn.Parameter) -> None:
        counted = not self.fired[i] and (self.armed or id(param) in self.armed_params)
        if self.on_grad is not None:
            self.on_grad(i, j, counted)
        if not counted:
            return
        self.seen[i].add(j)
        if len(self.seen[i]) == self.sizes[i]:
            self.fired[i] = True
            self.on_ready(i)

    def flush(self) -> None:
        for i, fired in enumerate(self.fired):
            if self.armed and not fired:
                self.fired[i] = True
                self.on_ready(i)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


class DataParallelEngine:
    """What the trainer needs from data parallelism; used as is for dp = 1 (nothing to sync)."""

    def __init__(self, model: nn.Module, optimizer, comm: Collectives | None = None):
        self.model, self.optimizer, self.comm = model, optimizer, comm
        self.params = trainable_params(model)
        self._grad_bytes_at_sync = 0

    def describe(self) -> str:
        return "data parallel: off (dp 1)"

    def micro_batch(self, last: bool) -> contextlib.AbstractContextManager:
        """Wraps one micro-batch's forward + backward; `last` marks the final one of the step."""
        return contextlib.nullcontext()

    def finish_gradient_sync(self) -> None:
        """Wait for every gradient collective of the step (before clipping and the optimizer)."""
        self._grad_bytes_at_sync = self.held_grad_bytes()

    # -- pipeline parallelism: micro-batches interleave, so no `micro_batch(last)` scope -----
    tracker: "GradReadyTracker | None" = None

    def begin_pipeline_step(self) -> None:
        """Start of a pipeline step: gradients accumulate locally, nothing is communicated."""
        if self.tracker is not None:
            self.tracker.reset(armed=False)

    def arm_gradient_sync(self, params: Sequence[nn.Parameter]) -> None:
        """The next backward is the step's last one for these parameters: reduce their
        buckets / units as soon as they are complete (overlapping the remaining backward)."""
        if self.tracker is not None:
            self.tracker.arm(params)

    def after_pipeline_action(self) -> None:
        """After each forward / backward of a chunk (ZeRO-3 releases gathered units)."""

    def end_pipeline_step(self) -> None:
        """End of the schedule: launch whatever was not complete (parameters without a
        gradient); finish_gradient_sync() then waits for everything."""
        if self.tracker is not None:
            self.tracker.armed = True
            self.tracker.flush()

    def gradient_pieces(self, replicas: Replicas | None = None) -> tuple[list[torch.Tensor], list[int]]:
        """The gradient tensors this rank holds, each with the number of ranks holding an
        identical copy (optim.clip_grad_norm's `replication`): the dp replicas here, times
        replicas(p) for the other axes (e.g. tp for a parameter tp does not shard)."""
        params = [p for p in self.params if p.grad is not None]
        dp = self.comm.size if self.comm else 1
        return [p.grad for p in params], [dp * (replicas(p) if replicas else 1) for p in params]

    # -- checkpoints (train/checkpoint.py) ---------------------------------------------------
    # {local parameter name: {"param", "exp_avg", "exp_avg_sq"}}: fp32, the parameter's local
    # (tp-sharded) shape, whole over dp. Here the torch.optim AdamW state (replicated over dp).
    def optimizer_steps(self) -> int:
        """AdamW steps taken (torch.optim counts per parameter; a parameter that never had a
        gradient has no count, the others agree)."""
        return max((int(s["step"]) for s in self.optimizer.state.values() if "step" in s), default=0)

    @torch.no_grad()
    def export_local_state(self, moments: bool = True) -> dict[str, dict[str, torch.Tensor]]:
        """Copies of every trainable parameter's weight (and, with moments, Adam moments:
        zeros before the first step). ZeRO engines gather them over dp (a collective)."""
        out = {}
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            entry = {"param": p.detach().float().clone()}
            if moments:
                state = self.optimizer.state.get(p, {})
                for key in ("exp_avg", "exp_avg_sq"):
                    entry[key] = state[key].float().clone() if key in state else torch.zeros_like(entry["param"])
            out[name] = entry
        return out

    @torch.no_grad()
    def import_local_state(self, state: dict[str, dict[str, torch.Tensor]], steps: int) -> None:
        """The inverse of export_local_state (moments required); steps 0 clears the optimizer
        state, as a fresh torch.optim.AdamW has none."""
        groups = {id(p): g for g in self.optimizer.param_groups for p in g["params"]}
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            entry = state[name]
            p.copy_(entry["param"])
            if steps == 0:
                self.optimizer.state.pop(p, None)
                continue
            # The step counter as torch.optim.AdamW creates it: on the device when fused or
            # capturable, else a CPU scalar (fp32 unless the default dtype is fp64).
            group = groups[id(p)]
            on_device = bool(group.get("fused") or group.get("capturable"))
            dtype = torch.float64 if torch.get_default_dtype() == torch.float64 and not on_device else torch.float32
            self.optimizer.state[p] = {
                "step": torch.tensor(float(steps), dtype=dtype, device=p.device if on_device else "cpu"),
                "exp_avg": entry["exp_avg"].to(p.device, p.dtype).clone(memory_format=torch.preserve_format),
                "exp_avg_sq": entry["exp_avg_sq"].to(p.device, p.dtype).clone(memory_format=torch.preserve_format)}

    # -- memory accounting -----------------------------------------------------------------
    def held_param_bytes(self) -> int:
        return storage_bytes(self.params)

    def held_grad_bytes(self) -> int:
        return storage_bytes(p.grad for p in self.params)

    def held_optim_bytes(self) -> int:
        return storage_bytes(t for state in self.optimizer.state.values() for t in state.values()
                             if isinstance(t, torch.Tensor))

    def planned_bytes(self) -> ModelStateBytes:
        """Steady-state bytes per rank, known before the first step (the start-up line)."""
        n = sum(p.numel() for p in self.params)
        return ModelStateBytes.unsharded(self.params, param=self.held_param_bytes(), grad=4 * n, optim=8 * n)

    def memory_line(self) -> str:
        return f"{self.describe()} | model state per rank: {self.planned_bytes().line()}"

    def step_metrics(self) -> dict:
        """Per-rank metric fields after a step: bytes held (gradients as at the sync point, where
        they are all materialised) and, with dp > 1, the bytes communicated."""
        held = ModelStateBytes.unsharded(self.params, param=self.held_param_bytes(),
                                         grad=self._grad_bytes_at_sync, optim=self.held_optim_bytes())
        return {**held.fields(), **(self.comm.stats.take() if self.comm else {})}


class _Bucket:
    """A bucket's flat gradient buffer (layout order, padding zero) and each parameter's view
    into it."""

    def __init__(self, params: list[nn.Parameter], layout: FlatLayout):
        self.params, self.layout = params, layout
        self.flat = torch.zeros(layout.total_numel, dtype=params[0].dtype, device=params[0].device)
        self.views = [self.flat[offset:offset + p.numel()].view_as(p) for p, offset in zip(params, layout.offsets)]
        self.scaled: set[int] = set()  # parameters whose gradient is final (scaled) this step

    @torch.no_grad()
    def take(self, j: int, scale: float | None) -> None:
        """Make parameter j's .grad its view into `flat`, holding the gradient it has (zeros if
        none); scale given: that gradient is final for the step, multiply it by `scale` (in the
        copy when there is one, so it costs no pass of its own)."""
        p, view = self.params[j], self.views[j]
        grad = p.grad
        if grad is not None and grad.data_ptr() == view.data_ptr():
            if scale is not None:
                view.mul_(scale)  # accumulated in place over earlier micro-batches
        else:
            if grad is None:
                view.zero_()
            elif scale is None:
                view.copy_(grad)
            else:
                torch.mul(grad, scale, out=view)
            p.grad = view
        if scale is not None:
            self.scaled.add(j)

    def finalize(self, scale: float) -> None:
        """Scale the gradients no counted accumulation reached (zeros where there is none)."""
        for j in range(len(self.params)):
            if j not in self.scaled:
                self.take(j, scale)
        self.scaled.clear()


class BucketedDataParallel(DataParallelEngine):
    """--zero 0: replicated parameters and optimizer, bucketed async all-reduce of gradients."""

    def __init__(self, model: nn.Module, comm: Collectives, optim_cfg: OptimConfig, bucket_bytes: int):
        super().__init__(model, build_adamw(model.named_parameters(), optim_cfg), comm)
        self.buckets = [_Bucket(params, plan_flat_layout([p.numel() for p in params], world_size=1, align=ALIGN))
                        for params in gradient_buckets(self.params, bucket_bytes)]
        self.bucket_bytes = bucket_bytes
        # Every new gradient moves into its bucket (later ones accumulate there); the step's
        # last one is divided by dp on the way, so the all-reduce is a sum.
        self.scale = 1.0 / comm.size
        self.tracker = GradReadyTracker([b.params for b in self.buckets], self._launch, on_grad=self._take)
        self.pending: list[Pending] = []

    def describe(self) -> str:
        return (f"data parallel: dp {self.comm.size}, {len(self.buckets)} gradient bucket(s) of <= "
                f"{self.bucket_bytes / 2**20:g} MB, all-reduce overlapped with backward")

    @contextlib.contextmanager
    def micro_batch(self, last: bool) -> Iterator[None]:
        self.tracker.reset(armed=last)  # earlier micro-batches only accumulate locally
        yield
        self.tracker.flush()

    def _take(self, i: int, j: int, last: bool) -> None:
        self.buckets[i].take(j, self.scale if last else None)

    def _launch(self, i: int) -> None:
        bucket = self.buckets[i]
        bucket.finalize(self.scale)  # e.g. zeros for a parameter without a gradient (other ranks may have one)
        self.pending.append(self.comm.all_reduce_sum(bucket.flat))

    def finish_gradient_sync(self) -> None:
        for pending in self.pending:
            pending.wait()
        self.pending = []
        super().finish_gradient_sync()


def apply_data_parallel(model: nn.Module, dims: ParallelDims, cfg: Config, *, verbose: bool = False,
                        init: DeferredInit | None = None) -> DataParallelEngine:
    """The data-parallel engine of cfg.parallel (zero stage, bucket size) over dims' dp axis.
    Installs hooks on `model` (and, at ZeRO-3, shards its parameters in place). init: `model`
    is on the meta device; its parameters are made here (at ZeRO-3 one unit at a time)."""
    par = cfg.parallel
    fully_sharded = dims.dp > 1 and par.zero == 3
    if init is not None and not fully_sharded:
        init.materialize([model])
    if dims.dp == 1:
        if par.zero > 0:
            say(f"--zero {par.zero} with dp 1: nothing to shard over, ZeRO does nothing here", verbose)
        return DataParallelEngine(model, build_adamw(model.named_parameters(), cfg.optim))
    try:
        debug = CommDebug.from_env()
    except ValueError as e:
        raise ConfigError(str(e)) from None
    comm = Collectives(dims.group("dp"), CommStats(), debug)
    bucket_bytes = max(1, int(par.bucket_mb * 2**20))
    if par.zero == 0:
        return BucketedDataParallel(model, comm, cfg.optim, bucket_bytes)
    if par.zero in (1, 2):
        from pyruntime.parallel.zero.stage12 import ZeroBucketEngine
        return ZeroBucketEngine(model, comm, cfg.optim, bucket_bytes, stage=par.zero, kernels=cfg.model.kernels)
    from pyruntime.parallel.zero.stage3 import FullyShardedEngine
    return FullyShardedEngine(model, comm, cfg.optim, kernels=cfg.model.kernels, init=init)
