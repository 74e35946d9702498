"""The data-parallel engine base: what the trainer, the pipeline executor and checkpoints
need from data parallelism, whatever the ZeRO stage (and, as is, dp 1: nothing to sync).

    engine = apply_data_parallel(model, dims, cfg)     # parallel/data.py: --zero 0 | 1 | 2 | 3
    optimizer = engine.optimizer                       # .step() .zero_grad() .param_groups
    for i, micro in enumerate(micro_batches):
        with engine.micro_batch(last=i == len(micro_batches) - 1):
            loss(model(x), y).backward()
    engine.finish_gradient_sync()                      # every gradient collective waited for
    grads, replication = engine.gradient_pieces()      # for global-norm clipping
    optimizer.step()

Also the pieces every engine shares: gradient buckets, the gradient-ready tracker (post-
accumulate-grad hooks), and the model-state byte accounting. Subclasses: parallel/ddp.py
(--zero 0), parallel/zero/stage12.py, parallel/zero/stage3.py. An engine only sees the
parameters of the model it is given and its dp group, so it composes with pipeline stages (a
subset of layers) and with tp (dp is never the world).
"""
from __future__ import annotations

import contextlib
import functools
from typing import Callable, Sequence

import torch
import torch.nn as nn

from pyruntime.comm.collectives import Collectives
from pyruntime.ops.flat import plan_buckets
from pyruntime.parallel.accounting import ModelStateBytes, storage_bytes

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


