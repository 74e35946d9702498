"""ZeRO-3 / fully sharded data parallelism: parameters, gradients and optimizer states all
split over dp; each rank keeps only its shard of every unit.

Units are groups of consecutive modules: the embedding, each transformer block, and the final
norm + head (whichever this model or pipeline stage has; `transformer_units`). A tied head's
matrix belongs to the embedding's unit, which the head's unit gathers with its own (`_owned`);
a pipeline stage's tied copy is a unit of its own (parallel/tied.py). A unit's
parameters are laid out by the C++ planner (world_size = dp) and become views into one
gathered buffer per unit (compute dtype: bf16 on CUDA, fp32 otherwise), whose storage is
resized to zero while the unit is sharded: autograd's saved tensors refer to the same storage,
so re-gathering into it before the unit's backward brings them back too.

Per micro-batch:
  forward   unit i: wait for its all-gather (or issue it), issue unit i + 1's (prefetch, so
            it runs while unit i computes), run, free unit i. The last unit stays gathered
            when a backward will follow, because the backward starts with it.
  backward  unit i (hook on its output's gradient): wait for its all-gather, prefetch unit
            i - 1 (reverse order); when the last gradient of unit i has accumulated
            (post-accumulate-grad hooks), pack the gradients into one fp32 flat buffer, drop
            the .grad tensors and the gathered parameters, and issue the reduce-scatter (mean
            over dp) while the backward of earlier units still runs, into the rank's fp32
            gradient shard of the unit (added to it on later micro-batches). Every gradient
            hook completes the reduce-scatters already finished, without blocking, so a
            unit's flat copy goes as soon as its collective is done.
The optimizer (sharded.ShardedAdamW: fused AdamW over the fp32 master shard) then needs no
communication: the next forward gathers the updated shards. Per micro-batch that moves
2x the parameters (minus the last unit) in all-gathers and 1x in reduce-scatters.

Assumes units run forward in the listed order (prefetch follows it; any other order is still
correct, only less overlapped) and that every rank backpropagates through the same units.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Iterator

import torch
import torch.nn as nn

from pyruntime.comm.collectives import Collectives, Pending
from pyruntime.config import OptimConfig
from pyruntime.ops.flat import flat_pack
from pyruntime.parallel.accounting import ModelStateBytes, mb, storage_bytes
from pyruntime.parallel.engine import ALIGN, DataParallelEngine, GradReadyTracker, Replicas, grad_or_zeros
from pyruntime.parallel.deferred_init import DeferredInit
from pyruntime.parallel.zero.sharded import (FlatGroup, GradientReductions, ShardedAdamW, ShardedState,
                                             plan_groups)
from pyruntime.parallel.zero.stage12 import MAX_IN_FLIGHT
from pyruntime.parallel.tied import tied_copy


def transformer_units(model: nn.Module) -> list[list[nn.Module]]:
    """[embedding], [block] per layer, [norm, head]: the units of the reference Transformer,
    skipping the parts a pipeline stage does not own."""
    units = []
    if getattr(model, "embed_tokens", None) is not None:
        units.append([model.embed_tokens])
    units += [[layer] for layer in getattr(model, "layers", {}).values()]
    tail = [m for m in (getattr(model, "norm", None), getattr(model, "lm_head", None)) if m is not None]
    if tail and tail[-1] is getattr(model, "lm_head", None) and tied_copy(model) is tail[-1].weight:
        # pp's last stage holding the tied embedding's copy: a unit of its own, sharded as the
        # first stage's embedding unit is (parallel/tied.py sums their gradient shards)
        units += [[m] for m in tail]
    elif tail:
        units.append(tail)
    return units


def _owned(param_lists: list[list[nn.Parameter]]) -> tuple[list[list[nn.Parameter]], list[list[int]]]:
    """Each parameter in the first unit that uses it, and for each unit the earlier units whose
    parameters it also uses (a tied LM head uses the embedding's matrix): it gathers them with
    its own, so the matrix is one parameter with one gradient, summed by autograd over both
    uses before the owning unit's reduce-scatter."""
    owner: dict[int, int] = {}
    owned, borrows = [], []
    for j, params in enumerate(param_lists):
        owned.append([p for p in params if owner.setdefault(id(p), j) == j])
        borrows.append(sorted({owner[id(p)] for p in params} - {j}))
    return owned, borrows


def _unit_params(modules: list[nn.Module]) -> list[nn.Parameter]:
    params = {id(p): p for m in modules for p in m.parameters() if p.requires_grad}
    return list(params.values())


def _check_coverage(model: nn.Module, param_lists: list[list[nn.Parameter]]) -> None:
    counts: dict[int, int] = {}
    for params in param_lists:
        for p in params:
            counts[id(p)] = counts.get(id(p), 0) + 1
    bad = [name for name, p in model.named_parameters() if p.requires_grad and counts.get(id(p)) != 1]
    if bad:
        raise ValueError(f"ZeRO-3: parameter(s) {', '.join(bad[:5])} are not in exactly one unit")


class _Unit:
    """One unit's gathered buffer (parameters are views into it) and its pending all-gather."""

    def __init__(self, group: FlatGroup, modules: list[nn.Module], dtype: torch.dtype, device: torch.device):
        self.group, self.modules = group, modules
        self.full = torch.empty(group.full_numel, dtype=dtype, device=device)
        self.nbytes = self.full.numel() * self.full.element_size()
        with torch.no_grad():
            for p, offset in zip(group.params, group.layout.offsets):
                p.data = self.full[offset:offset + p.numel()].view(p.shape)
        self.gather: Pending | None = None
        self.full.untyped_storage().resize_(0)

    @property
    def allocated(self) -> bool:
        return self.full.untyped_storage().nbytes() > 0

    def start_gather(self, comm: Collectives, master: torch.Tensor) -> None:
        if self.allocated:
            return  # gathered, or its all-gather is already under way
        self.full.untyped_storage().resize_(self.nbytes)
        shard = self.group.shard(master)
        self.gather = comm.all_gather(self.full, shard.to(self.full.dtype))  # to(): no copy in fp32

    def wait(self) -> None:
        if self.gather is not None:
            self.gather.wait()
            self.gather = None

    def free(self) -> None:
        self.wait()  # never release a buffer a collective is still writing
        self.full.untyped_storage().resize_(0)


class FullyShardedEngine(ShardedState, DataParallelEngine):
    """--zero 3 (see the module docstring)."""

    def __init__(self, model: nn.Module, comm: Collectives, optim_cfg: OptimConfig, *, kernels: str = "auto",
                 units: list[list[nn.Module]] | None = None, init: DeferredInit | None = None,
                 compute_dtype: torch.dtype | None = None):
        """init: `model` was built on the meta device (parallel/deferred_init.py); the rank's
        shard of each parameter is copied from its initial value, drawn one parameter at a
        time, so neither the model nor a whole unit is ever made here. compute_dtype: of the
        gathered units (default bf16 on CUDA, fp32 otherwise); master weights, gradient
        shards and moments stay fp32 whatever it is."""
        modules = units if units is not None else transformer_units(model)
        param_lists, self.borrows = _owned([_unit_params(mods) for mods in modules])
        _check_coverage(model, param_lists)
        groups = plan_groups(param_lists, comm.size, ALIGN)  # sizes only: meta parameters will do
        device = init.device if init is not None else next(p.device for ps in param_lists for p in ps)
        self.compute_dtype = compute_dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        # publish_dtype: with --offload optimizer the master shard is on the host and the
        # device keeps a copy of it in the compute dtype between steps, which the gathers read
        # (sharded.ShardedAdamW._init_offload says why kept, not made per gather)
        optimizer = ShardedAdamW(groups, comm.rank, optim_cfg, debug=comm.debug, kernels=kernels,
                                 grad_per_group=True, device=device, copy_params=False,
                                 publish_dtype=self.compute_dtype, keep_device_copy=True)
        self.units, self.deferred = [], init is not None
        for i, (group, mods) in enumerate(zip(groups, modules)):
            if init is None:
                optimizer.copy_in(i)  # this rank's shard, before the full values go
            else:  # straight from the initial values, one parameter at a time; only those
                # overlapping this rank's shard are drawn (none when a checkpoint will be
                # loaded: the master shard stays zero). The parameters then need no values:
                # placeholders, whose data _Unit makes views of the (released) unit buffer.
                if init.draws:
                    optimizer.copy_in(i, [functools.partial(init.value_range, p) for p in group.params])
                init.materialize(mods, values=False)
                taken = {id(p) for u in self.units for p in u.group.params}  # a borrowed (tied) one
                group.params = [p for p in _unit_params(mods) if id(p) not in taken]  # the new Parameters
            self.units.append(_Unit(group, mods, self.compute_dtype, device))
        if init is not None:
            init.materialize([model])  # anything outside the units (nothing trainable is)
        optimizer.publish()  # offload: the device's copy of the shards, from the host master
        super().__init__(model, optimizer, comm)
        self.reductions = GradientReductions(comm, optimizer)
        self.tracker = GradReadyTracker([g.params for g in groups], self._reduce,
                                        on_grad=lambda *_: self.reductions.reap())
        self.peak_live = 0  # bytes beyond the shards: gathered units, unsharded grads, buffers in flight
        for i, unit in enumerate(self.units):
            unit.modules[0].register_forward_pre_hook(functools.partial(self._pre_forward, i))
            unit.modules[-1].register_forward_hook(functools.partial(self._post_forward, i))

    def describe(self) -> str:
        largest = max((u.nbytes for u in self.units), default=0)
        return (f"ZeRO-3: dp {self.comm.size}, {len(self.units)} units (largest {mb(largest)} gathered, "
                f"{str(self.compute_dtype).replace('torch.', '')}), next unit prefetched, "
                f"gradients reduce-scattered during backward"
                f"{', parameters initialised shard by shard from the meta device' if self.deferred else ''}")

    # -- hooks -----------------------------------------------------------------------------
    def _gather(self, i: int, wait: bool) -> None:
        for j in [i, *self.borrows[i]]:  # with the units whose parameters it borrows (tied)
            unit = self.units[j]
            if not unit.allocated:
                # the fp32 master, or with offload the device's copy once unit j's is back
                unit.start_gather(self.comm, self.optimizer.gather_source(j))
                self._observe()
            if wait:
                unit.wait()

    def _free(self, i: int) -> None:
        for j in [i, *self.borrows[i]]:
            self.units[j].free()

    def _pre_forward(self, i: int, _module, _args) -> None:
        self._gather(i, wait=True)
        if i + 1 < len(self.units):
            self._gather(i + 1, wait=False)

    def _post_forward(self, i: int, _module, _args, output) -> None:
        if torch.is_grad_enabled():
            outputs = output if isinstance(output, (tuple, list)) else (output,)
            for t in outputs:
                if isinstance(t, torch.Tensor) and t.requires_grad:
                    t.register_hook(functools.partial(self._pre_backward, i))
            if i == len(self.units) - 1:
                return  # the backward starts here: keep it gathered
        self._free(i)

    def _pre_backward(self, i: int, _grad: torch.Tensor) -> None:
        self.reductions.reap()
        self._gather(i, wait=True)
        if i > 0:
            self._gather(i - 1, wait=False)

    def _reduce(self, i: int) -> None:
        """All of unit i's gradients have accumulated: reduce-scatter them, free the unit."""
        group = self.units[i].group
        # Its backward is over: every parameter's gradient has accumulated, and a borrowed
        # (tied) matrix is no longer read (the embedding's backward does not read it).
        self._free(i)
        # The previous unit's reduce-scatter had this unit's backward to run (and was reaped
        # already if it finished).
        self.reductions.drain(MAX_IN_FLIGHT - 1)
        grads = [grad_or_zeros(p) for p in group.params]
        flat = flat_pack(grads, group.layout).float()  # reduced in fp32 also when computed in bf16
        self._observe(transient=storage_bytes(grads) + flat.numel() * 4)
        for p in group.params:
            p.grad = None
        self.reductions.issue(i, flat)

    def _observe(self, transient: int = 0) -> None:
        live = sum(u.nbytes for u in self.units if u.allocated) + self.reductions.bytes_held()
        self.peak_live = max(self.peak_live, live + transient)

    # -- the engine interface --------------------------------------------------------------
    @contextlib.contextmanager
    def micro_batch(self, last: bool) -> Iterator[None]:
        self.tracker.reset(armed=True)  # every micro-batch reduces: no full-size gradient is kept
        yield
        self.tracker.flush()
        for unit in self.units:
            unit.free()
        self.reductions.drain()

    def after_pipeline_action(self) -> None:
        # Units are gathered again by the next action's hooks; between actions only the
        # shards (and gradients still accumulating) are held.
        for unit in self.units:
            unit.free()

    def end_pipeline_step(self) -> None:
        super().end_pipeline_step()
        self.after_pipeline_action()

    def finish_gradient_sync(self) -> None:
        self.reductions.drain()
        super().finish_gradient_sync()

    def gradient_pieces(self, replicas: Replicas | None = None) -> tuple[list[torch.Tensor], list[int]]:
        return self.optimizer.gradient_pieces(self.comm.rank, replicas)

    # -- checkpoints (see DataParallelEngine, sharded.ShardedState) --------------------
    def import_local_state(self, state: dict[str, dict[str, torch.Tensor]], steps: int) -> None:
        # Only the shards change: units are gathered from them at the next forward (one still
        # gathered would hold the old weights, so none is).
        for unit in self.units:
            unit.free()
        self._import_shards(state, steps)

    # -- memory accounting (held_*: sharded.ShardedState) ---------------------------------
    def planned_bytes(self) -> ModelStateBytes:
        return ModelStateBytes.unsharded(self.params, param=self._shard_bytes(), grad=self._shard_bytes(),
                                         optim=self.held_optim_bytes())

    def step_metrics(self) -> dict:
        """Adds the step's peak: the four shards plus the most that was live beyond them."""
        rec = super().step_metrics()
        rec["gathered_peak_bytes"] = self.peak_live
        rec["peak_model_state_bytes"] = 4 * self._shard_bytes() + self.peak_live
        rec["largest_unit_bytes"] = max((u.nbytes for u in self.units), default=0)
        self.peak_live = 0
        return rec
