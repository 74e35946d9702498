"""Deferred initialisation: the trainer builds the model on the meta device, shapes it for
the layout (pipeline split, apply_tp) there, and only then gives parameters storage and
their initial values, so no rank ever holds the full model. The data-parallel engine decides
when: everything at once where every rank keeps whole (tp-local) parameters (dp 1, DDP,
ZeRO-1/2); at ZeRO-3 the rank's shard of each parameter is copied from its value, drawn one
parameter at a time and only where the shard holds a piece of it, and the parameters
themselves get no values (they become views of unit buffers gathered from the shards): a
rank holds its shards plus one parameter, never a unit or the model, the point of ZeRO-3
for a model that does not fit one device.

A parameter's value is the one the full reference model would give it, cut for this rank:
model/init.py draws every reference tensor from its own generator seeded by (seed, name),
and tp_param_specs says which reference tensors a local parameter stacks and how tp cuts
them (the same table checkpoints use). So every layout starts from the same weights, exactly
as if the full model had been built, initialised and then split.
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.distributed as dist
import torch.nn as nn

from pyruntime.config import ModelConfig
from pyruntime.model.init import full_init
from pyruntime.model.llama import reference_shapes
from pyruntime.parallel.tensor.unshard import local_shard, tp_param_specs


class DeferredInit:
    """Initial values for the parameters of `model`, a (split, tp-sharded) reference model
    built on the meta device; made on `device` by `materialize`."""

    def __init__(self, model: nn.Module, cfg: ModelConfig, seed: int, tp_group: dist.ProcessGroup | None,
                 device: torch.device, *, draw: bool = True):
        """draw=False: a checkpoint will overwrite every value (--resume), so none is drawn:
        parameters start at zero (ZeRO-3's master shard too), which saves drawing a large
        model's worth of random numbers at every restart."""
        self.cfg, self.seed, self.tp_group, self.device, self.draws = cfg, seed, tp_group, device, draw
        self.specs = {spec.local: spec for spec in tp_param_specs(model)}
        self.shapes = reference_shapes(cfg)
        self.names = {id(p): name for name, p in model.named_parameters()}  # of the meta parameters
        # meta parameter id -> (it, its made Parameter), over every materialize call: a parameter
        # shared by modules made in different calls (a tied head, ZeRO-3 units) stays shared
        self.made: dict[int, tuple[nn.Parameter, nn.Parameter]] = {}

    def value(self, p: nn.Parameter) -> torch.Tensor:
        """The initial local value (fp32, CPU) of p, one of the model's meta parameters: its
        reference tensors drawn in full, one parameter at a time, and cut for this tp rank."""
        spec = self.specs[self.names[id(p)]]
        full = {ref: full_init(ref, torch.Size(self.shapes[ref]), self.cfg, self.seed) for ref in spec.full}
        return local_shard(spec, full, self.tp_group)

    def value_range(self, p: nn.Parameter, start: int, stop: int) -> torch.Tensor:
        """Elements [start, stop) of p's flattened value (ZeRO-3 copies a range into its
        shard). Drawing needs the whole reference tensors anyway; a loader (hf/load.py)
        reads just the range."""
        return self.value(p).reshape(-1)[start:stop]

    @torch.no_grad()
    def materialize(self, modules: Iterable[nn.Module], values: bool = True) -> None:
        """Give every meta parameter under `modules` storage on self.device holding its initial
        value. Each becomes a new Parameter (a meta tensor cannot take real data in place), so
        call this before anything (hooks, optimizers, unit lists) holds the old ones.
        values=False: placeholders of the right shape, dtype and device backed by one element
        (ZeRO-3 gives them their storage, views of a unit buffer, right after)."""
        for module in modules:
            for sub in module.modules():
                for key, p in list(sub._parameters.items()):
                    if p is None or not p.is_meta:
                        continue
                    if id(p) not in self.made:
                        if not values:
                            value = torch.empty((), device=self.device, dtype=p.dtype).expand(p.shape)
                        elif not self.draws:
                            value = torch.zeros(p.shape, device=self.device, dtype=p.dtype)
                        else:
                            value = self.value(p).to(self.device, p.dtype)
                        param = nn.Parameter(value, requires_grad=p.requires_grad)
                        param.__dict__.update(p.__dict__)  # marks such as tp_sharded
                        self.made[id(p)] = (p, param)
                    sub._parameters[key] = self.made[id(p)][1]


def check_materialized(model: nn.Module) -> None:
    """Raise if any parameter or buffer of `model` is still on the meta device."""
    left = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"deferred init: {', '.join(left[:5])} still on the meta device")
