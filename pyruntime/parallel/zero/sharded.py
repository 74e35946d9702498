"""Flat groups and the sharded AdamW that every ZeRO stage shares.

A flat group is a list of parameters laid out in one flat buffer (a ZeRO-1/2 gradient bucket,
or a ZeRO-3 unit) by the C++ planner, with world_size = dp: the buffer splits into dp equal
shards and `layout.pieces(rank)` says which slice of which parameter is in this rank's shard.
Each rank keeps, for the concatenation of its shards of all groups, four flat fp32 buffers:
master weights, gradient, and the two Adam moments. The optimizer step is then one fused
AdamW call over those buffers (ops.adamw), whatever the number of parameters. With
--offload optimizer (parallel/offload.ShardOffload) the master and moments are on the host,
with a host copy of the gradient shard made as each reduction completes.

Padding (alignment gaps, the tail) is zero in the master weights and in every gradient, so it
stays zero through AdamW and adds nothing to the gradient norm.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn

from pyruntime.comm.collectives import CommDebug, Collectives, Pending
from pyruntime.comm.raw import all_gather_into
from pyruntime.config import OptimConfig
from pyruntime.ops.adamw import DecayMask, adamw_step
from pyruntime.parallel.offload import ShardOffload
from pyruntime.ops.flat import FlatLayout, plan_flat_layout
from pyruntime.parallel.accounting import storage_bytes
from pyruntime.parallel.optimizer import is_decayed


@dataclass
class FlatGroup:
    """params laid out by `layout`; this rank's shard of it sits at [shard_begin, shard_begin +
    layout.shard_numel) of the rank's flat shard buffers."""

    params: list[nn.Parameter]
    layout: FlatLayout
    shard_begin: int

    def shard(self, flat: torch.Tensor) -> torch.Tensor:
        """This group's slice of one of the rank's flat shard buffers (a view)."""
        return flat[self.shard_begin:self.shard_begin + self.layout.shard_numel]

    @property
    def full_numel(self) -> int:
        return self.layout.total_numel


def plan_groups(param_lists: Sequence[Sequence[nn.Parameter]], world_size: int, align: int) -> list[FlatGroup]:
    groups, begin = [], 0
    for params in param_lists:
        layout = plan_flat_layout([p.numel() for p in params], world_size=world_size, align=align)
        groups.append(FlatGroup(list(params), layout, begin))
        begin += layout.shard_numel
    return groups


def adamw_backend(kernels: str) -> str:
    """The model's kernel choice, where AdamW has that backend (it has no C++ one)."""
    return kernels if kernels in ("triton", "reference") else "auto"


class ShardedAdamW(ShardOffload):
    """AdamW over this rank's shards of `groups`: fp32 master weights and moments in one flat
    buffer each, updated by the fused ops.adamw_step. Duck-types what the trainer uses of
    torch.optim: step(), zero_grad() and param_groups[*]["lr"]. after_step (ZeRO-1/2)
    publishes the updated shards to the model's parameters.

    Gradient shards exist only from a step's first reduction to zero_grad(set_to_none=True),
    so they are not held while the forward's activations pile up. grad_per_group=True
    (ZeRO-3) allocates each group's shard when that group is first reduced, as its backward
    ends, and steps group by group (one fused launch per unit); otherwise (ZeRO-1/2, whose
    buckets can number thousands) one flat gradient shard and one launch."""

    def __init__(self, groups: list[FlatGroup], rank: int, cfg: OptimConfig, *, debug: CommDebug,
                 kernels: str = "auto", after_step: Callable[[], None] | None = None,
                 grad_per_group: bool = False, device: torch.device | None = None, copy_params: bool = True,
                 publish_dtype: torch.dtype | None = None, keep_device_copy: bool = False):
        """copy_params=False: the master shard stays zero until copy_in(i) is called for each
        group (ZeRO-3 with deferred init makes one unit's parameters at a time; until then
        they may be on the meta device, which is why `device` can be given); the engine then
        calls publish() once they all are. publish_dtype: of the shard the engine gathers
        (the parameters' dtype at ZeRO-1/2, the compute dtype at ZeRO-3; default fp32).
        keep_device_copy: with offload, keep the device's copy of the shard between steps
        (ZeRO-3, see _init_offload); otherwise it exists only from the step to the gather."""
        self.groups, self.cfg, self.debug, self.after_step = groups, cfg, debug, after_step
        self.backend, self.grad_per_group, self.rank = adamw_backend(kernels), grad_per_group, rank
        if device is None:
            device = groups[0].params[0].device if groups and groups[0].params else torch.device("cpu")
        self.device = device
        numel = sum(g.layout.shard_numel for g in groups)
        self.offload = cfg.offload == "optimizer"
        self.publish_dtype, self.keep_device_copy = publish_dtype or torch.float32, keep_device_copy
        if self.offload:
            self._init_offload(numel)
        else:
            self.master = torch.zeros(numel, dtype=torch.float32, device=self.device)
            self.exp_avg, self.exp_avg_sq = torch.zeros_like(self.master), torch.zeros_like(self.master)
        self._grads: list[torch.Tensor | None] = [None] * len(groups)  # grad_per_group
        self._flat_grad: torch.Tensor | None = None
        self._written: set[int] = set()  # groups whose shard holds a reduction since zero_grad
        segments = [self._decay_segments(g) for g in groups]
        if copy_params:
            for i in range(len(groups)):
                self.copy_in(i)
            if self.offload and self.device_params is not None:
                self.publish()
        if grad_per_group:
            self.decays = [DecayMask.from_segments(g.layout.shard_numel, seg, self.device)
                           for g, seg in zip(groups, segments)]
        else:
            shifted = [(g.shard_begin + b, g.shard_begin + e) for g, seg in zip(groups, segments) for b, e in seg]
            self.decays = [DecayMask.from_segments(numel, shifted, self.device)]
        self.param_groups = [{"lr": cfg.lr}]
        self.steps = 0

    def _decay_segments(self, group: FlatGroup) -> list[tuple[int, int]]:
        """The [begin, end) ranges of this rank's shard of `group` that get weight decay."""
        return [(piece.shard_offset, piece.shard_offset + piece.numel) for piece in group.layout.pieces(self.rank)
                if is_decayed(group.params[piece.tensor_index])]

    @torch.no_grad()
    def copy_in(self, i: int, values: Sequence[Callable[[int, int], torch.Tensor]] | None = None) -> None:
        """Copy this rank's pieces of group i's parameters into the master shard; with
        `values`, from values[j](start, stop), elements [start, stop) of parameter j's
        flattened value, instead of parameter j (called only for the parameters this rank's
        shard holds a piece of, once each with the range its pieces span, one value alive
        at a time: a loader then reads only that range)."""
        group = self.groups[i]
        master = group.shard(self.master)
        pieces = group.layout.pieces(self.rank)
        current, src, lo = None, None, 0
        for piece in pieces:
            if piece.tensor_index != current:
                current, src = piece.tensor_index, None  # the previous value goes before the next is drawn
                lo = piece.tensor_offset
                hi = max(q.tensor_offset + q.numel for q in pieces if q.tensor_index == current)
                src = (values[current](lo, hi) if values is not None
                       else group.params[current].detach().reshape(-1)[lo:hi])
            master[piece.shard_offset:piece.shard_offset + piece.numel].copy_(
                src[piece.tensor_offset - lo:piece.tensor_offset - lo + piece.numel])

    def group_grad(self, i: int) -> torch.Tensor:
        """Group i's fp32 gradient shard, allocated (zeroed) on first use after zero_grad; with
        offload its host slice (what the step reads; every copy to it has landed)."""
        if self.offload:
            self.transfers.wait_host("grad")
            if i not in self._landed:  # nothing reduced this step: zeros, as on the device
                self.groups[i].shard(self.host_grad).zero_()
                self._landed.add(i)
            return self.groups[i].shard(self.host_grad)
        return self._device_grad(i)

    def _device_grad(self, i: int) -> torch.Tensor:
        if self.grad_per_group:
            if self._grads[i] is None:
                self._grads[i] = torch.zeros(self.groups[i].layout.shard_numel, device=self.device)
            return self._grads[i]
        if self._flat_grad is None:
            self._flat_grad = torch.zeros_like(self.master)
        return self.groups[i].shard(self._flat_grad)

    def grad_destination(self, i: int) -> tuple[torch.Tensor, bool]:
        """Where group i's next reduced gradient goes: (its gradient shard, True) for the first
        reduction since zero_grad, which overwrites it (a per-group shard is then allocated
        without zeroing); (the shard, False) afterwards, when a reduction must be added."""
        first = i not in self._written
        self._written.add(i)
        if first and self.grad_per_group and self._grads[i] is None:
            self._grads[i] = torch.empty(self.groups[i].layout.shard_numel, device=self.device)
        return self._device_grad(i), first

    def held_grads(self) -> list[torch.Tensor]:
        return [g for g in self._grads if g is not None] + ([self._flat_grad] if self._flat_grad is not None else [])

    @torch.no_grad()
    def step(self) -> None:
        self.debug.pause()  # a step that does not wait for its gradients reads NaN under debug
        if not self.held_grads():
            return  # no gradient this step: torch.optim skips such parameters too
        self.steps += 1
        hyper = {"lr": self.param_groups[0]["lr"], "betas": self.cfg.betas, "eps": self.cfg.eps,
                 "weight_decay": self.cfg.weight_decay, "step": self.steps, "backend": self.backend}
        if self.offload:
            self._host_step(hyper)  # the copies back start; gather_source waits for them
        elif self.grad_per_group:
            for g, grad, decay in zip(self.groups, self._grads, self.decays):
                if grad is not None:
                    adamw_step(g.shard(self.master), grad, g.shard(self.exp_avg), g.shard(self.exp_avg_sq),
                               decay, **hyper)
        else:
            adamw_step(self.master, self._flat_grad, self.exp_avg, self.exp_avg_sq, self.decays[0], **hyper)
        if self.after_step is not None:
            self.after_step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._written = set()
        if self.offload:
            self._landed = set()
        if set_to_none:
            self._grads, self._flat_grad = [None] * len(self.groups), None
        for grad in self.held_grads():
            grad.zero_()
        for g in self.groups:
            for p in g.params:
                if set_to_none:
                    p.grad = None
                elif p.grad is not None:
                    p.grad.zero_()

    def gradient_pieces(self, rank: int, replicas=None) -> tuple[list[torch.Tensor], list[int]]:
        """The gradient shards for global-norm clipping: held by this rank alone, so replication
        1; with replicas (parameter -> copies on other axes), one view per parameter slice."""
        grads = [self.group_grad(i) for i in range(len(self.groups))]  # zeros where nothing was reduced
        if replicas is None or all(replicas(p) == 1 for g in self.groups for p in g.params):
            whole = grads if self.grad_per_group else [self.host_grad if self.offload else self._flat_grad]
            return whole, [1] * len(whole)
        pieces, counts = [], []
        for g, grad in zip(self.groups, grads):
            for piece in g.layout.pieces(rank):
                pieces.append(grad[piece.shard_offset:piece.shard_offset + piece.numel])
                counts.append(replicas(g.params[piece.tensor_index]))
        return pieces, counts

    def state_bytes(self) -> int:
        """The two moments (the master weights are counted as parameters)."""
        return 2 * self.master.numel() * self.master.element_size()

    # -- checkpoints (train/checkpoint.py) ---------------------------------------------------
    # The engines' export_local_state / import_local_state: {parameter name: {"param",
    # "exp_avg", "exp_avg_sq"}} of whole (over dp) fp32 tensors. Read from the flat shards,
    # never from p.data (ZeRO-3 parameters are views into freed buffers).
    _BUFFERS = {"param": "master", "exp_avg": "exp_avg", "exp_avg_sq": "exp_avg_sq"}

    @torch.no_grad()
    def export_state(self, names: dict[nn.Parameter, str], group: dist.ProcessGroup,
                     moments: bool = True) -> dict[str, dict[str, torch.Tensor]]:
        """Whole tensors of every parameter: one all-gather over dp (`group`) per flat group
        and buffer, so at most one group's full flat buffer is held beyond the result."""
        keys = list(self._BUFFERS) if moments else ["param"]
        out: dict[str, dict[str, torch.Tensor]] = {}
        for g in self.groups:
            for key in keys:
                flat = getattr(self, self._BUFFERS[key])
                full = torch.empty(g.full_numel, dtype=flat.dtype, device=flat.device)
                all_gather_into(full, g.shard(flat).contiguous(), group)  # not comm: no step stats
                for p, offset in zip(g.params, g.layout.offsets):
                    out.setdefault(names[p], {})[key] = full[offset:offset + p.numel()].view(p.shape).clone()
        return out

    @torch.no_grad()
    def import_state(self, names: dict[nn.Parameter, str], rank: int, state: dict[str, dict[str, torch.Tensor]],
                     steps: int) -> None:
        """Fill this rank's shards from whole tensors (no communication); padding stays zero."""
        for attr in self._BUFFERS.values():
            getattr(self, attr).zero_()
        for g in self.groups:
            for piece in g.layout.pieces(rank):
                entry = state[names[g.params[piece.tensor_index]]]
                for key, attr in self._BUFFERS.items():
                    src = entry[key].reshape(-1)[piece.tensor_offset:piece.tensor_offset + piece.numel]
                    g.shard(getattr(self, attr))[piece.shard_offset:piece.shard_offset + piece.numel].copy_(src)
        self.steps = steps
        self.publish()  # offload: the device's parameter copy follows the loaded master


class GradientReductions:
    """The reduce-scatters of flat gradients into a ShardedAdamW's gradient shards, oldest
    first. A group's first reduction of a step lands straight in its shard; a later one
    (gradient accumulation) lands in a partial buffer that is added on completion.

    reap() completes the ones the backend has already finished without blocking: called from
    the backward's hooks, it drops each flat gradient copy as soon as its collective is done
    instead of when the next one is issued (the copy is a whole bucket / unit of fp32, so this
    lowers the backward's peak memory)."""

    def __init__(self, comm: Collectives, optimizer: ShardedAdamW):
        self.comm, self.optimizer = comm, optimizer
        # (collective, gradient shard, partial result to add to it or None, bytes held, group)
        self.items: list[tuple[Pending, torch.Tensor, torch.Tensor | None, int, int]] = []

    def issue(self, i: int, flat: torch.Tensor) -> None:
        """Reduce-scatter (mean over dp) the flat gradients of group i; flat is given up (a
        packed copy the caller no longer reads) and referenced until the collective completes."""
        shard, first = self.optimizer.grad_destination(i)
        out = shard if first else torch.empty_like(shard)
        held = (flat.numel() + (0 if first else out.numel())) * flat.element_size()
        pending = self.comm.reduce_scatter_avg(out, flat, scratch_input=True)
        self.items.append((pending, shard, None if first else out, held, i))

    def _complete_oldest(self) -> None:
        pending, shard, partial, _, i = self.items.pop(0)
        pending.wait()
        if partial is not None:
            shard.add_(partial)
        self.optimizer.grad_reduced(i, shard)  # offload: on its way to the host now

    def drain(self, keep: int = 0) -> None:
        """Complete the oldest until at most `keep` remain (waiting for them)."""
        while len(self.items) > keep:
            self._complete_oldest()

    def reap(self) -> None:
        """Complete, oldest first, those that are already done; never blocks."""
        while self.items and self.items[0][0].is_completed():
            self._complete_oldest()

    def bytes_held(self) -> int:
        return sum(item[3] for item in self.items)


class ShardedState:
    """What the ZeRO engines (whose optimizer is a ShardedAdamW over the model's parameters)
    share of DataParallelEngine's interface: checkpoint state in and out by parameter name, and
    the bytes held (the model's parameters + the fp32 master shard [+ offload: the device's copy
    of it]; the full-size .grad tensors + the gradient shards [+ offload: the host's]; the two
    moment shards), of which held_host_bytes are in host memory."""

    def optimizer_steps(self) -> int:
        return self.optimizer.steps

    def export_local_state(self, moments: bool = True) -> dict[str, dict[str, torch.Tensor]]:
        names = {p: n for n, p in self.model.named_parameters()}
        return self.optimizer.export_state(names, self.comm.group, moments)

    def _import_shards(self, state: dict[str, dict[str, torch.Tensor]], steps: int) -> None:
        names = {p: n for n, p in self.model.named_parameters()}
        self.optimizer.import_state(names, self.comm.rank, state, steps)

    # -- memory accounting -----------------------------------------------------------------
    def _shard_bytes(self) -> int:
        return self.optimizer.master.numel() * self.optimizer.master.element_size()

    def _device_copy_bytes(self) -> int:
        """Offload: the device's parameter copy of the shard (none where it is the master)."""
        opt = self.optimizer
        if not opt.offload or opt.device_params is opt.master or opt.device_params is None:
            return 0  # no copy, or a transient one (ZeRO-1/2 on CUDA) not held through the step
        return storage_bytes([opt.device_params])

    def held_param_bytes(self) -> int:
        opt = self.optimizer
        staging = [opt._staging] if opt.offload and opt._staging is not opt.device_params else []
        return storage_bytes([*self.params, *staging]) + self._shard_bytes() + self._device_copy_bytes()

    def held_grad_bytes(self) -> int:
        host = [self.optimizer.host_grad] if self.optimizer.offload else []
        return storage_bytes([*(p.grad for p in self.params), *self.optimizer.held_grads(), *host])

    def held_host_bytes(self) -> int:
        """Of the held bytes, those in host memory with --offload optimizer: the fp32 master,
        gradient and moment shards, and the bf16 staging copy on CUDA (0 without offload)."""
        opt = self.optimizer
        if not opt.offload:
            return 0
        staging = opt._staging if opt._staging is not opt.device_params else None
        return storage_bytes([opt.master, opt.host_grad, opt.exp_avg, opt.exp_avg_sq, staging])

    def step_metrics(self) -> dict:
        """Adds host_state_bytes (of the held bytes, those in host memory) and, with offload,
        the gradient / parameter copies of the step (offload_grad_copies, offload_param_copies)."""
        rec = super().step_metrics()
        rec["host_state_bytes"] = self.held_host_bytes()
        if self.optimizer.offload:
            counts = self.optimizer.transfers.take_counts()
            rec["offload_grad_copies"], rec["offload_param_copies"] = counts.get("grad", 0), counts.get("param", 0)
        return rec

    def held_optim_bytes(self) -> int:
        return self.optimizer.state_bytes()
