"""The inverse of apply_tp, for the weights or any per-parameter tensor (an Adam moment):

    full_tensors(model, group, local)   local tp tensors -> full tensors under the reference
                                        names (q_proj / k_proj / v_proj, gate_proj / up_proj,
                                        padding stripped); a collective over tp
    local_shards(model, group, full)    full reference-named tensors -> this rank's local
                                        tensors (fused, padded with zero rows); no communication
    full_state_dict(model, group)       full_tensors of the parameters themselves

so checkpoints and comparisons never see the tp layout. Both directions read one table,
`tp_param_specs(model)`: for each local parameter, the reference tensors stacked in it and the
dim tp splits (None: replicated). A model that apply_tp never touched (tp 1) maps to itself,
and a pipeline stage maps just the parameters it holds.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Mapping

import torch
import torch.distributed as dist
import torch.nn as nn

from pyruntime.comm.tp import gather_along
from pyruntime.parallel.tensor.apply import ParallelAttention, ParallelMLP, tp_group_of
from pyruntime.parallel.tensor.layers import (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding,
                                              shard_rows)

# Fused child -> the reference linears stacked (in this order) in its local weight.
_FUSED = {ParallelAttention: ("qkv_proj", ("q_proj", "k_proj", "v_proj")),
          ParallelMLP: ("gate_up_proj", ("gate_proj", "up_proj"))}


@dataclass(frozen=True)
class TPSpec:
    """Local parameter `local` holds, stacked along `dim`, this rank's block of each reference
    tensor in `full` (local_sizes[i] of the full_sizes[i] rows along `dim`, every rank the
    same block size); dim None: a replicated copy."""

    local: str
    full: tuple[str, ...]
    dim: int | None = None
    local_sizes: tuple[int, ...] = ()
    full_sizes: tuple[int, ...] = ()

    @property
    def padded(self) -> bool:
        # A single stacked tensor may not divide by tp (the vocabulary): zero rows pad it.
        # Fused pieces always divide (validate_tp), so their blocks never carry padding.
        return len(self.full) == 1


def _layer_specs(prefix: str, module: nn.Module, fused: tuple[tuple[str, ...], list[int]] | None = None
                 ) -> list[TPSpec]:
    """Specs of one tp layer's parameters. fused: (the reference linears stacked in a fused
    layer, the local rows of each); they divide by tp, so each is local rows x tp in full."""
    world = module.tp_group.size()
    specs = []
    for pname, p in module.named_parameters(recurse=False):
        local = prefix + pname
        if fused is not None:
            bases, rows = fused
            specs.append(TPSpec(local, tuple(f"{b}.{pname}" for b in bases), 0, tuple(rows),
                                tuple(r * world for r in rows)))
        elif isinstance(module, RowParallelLinear):  # weight split by columns; bias replicated
            specs.append(TPSpec(local, (local,), 1, (p.shape[1],), (module.in_features,)) if pname == "weight"
                         else TPSpec(local, (local,)))
        else:  # rows split, the last rank(s) zero-padded
            full = module.num_embeddings if isinstance(module, VocabParallelEmbedding) else module.out_features
            specs.append(TPSpec(local, (local,), 0, (p.shape[0],), (full,)))
    return specs


def _fused_rows(module: nn.Module) -> list[int]:
    """Local rows of each piece stacked in a fused layer's weight."""
    if isinstance(module, ParallelAttention):
        return list(module.split_sizes)  # q, k, v widths differ under grouped KV heads
    half = module.gate_up_proj.weight.shape[0] // 2
    return [half, half]


def tp_param_specs(model: nn.Module) -> list[TPSpec]:
    """One TPSpec per parameter of `model`, in named_parameters() order."""
    by_local: dict[str, TPSpec] = {}
    fused: set[str] = set()
    for name, module in model.named_modules():  # parents come before their children
        prefix = f"{name}." if name else ""
        if isinstance(module, tuple(_FUSED)):
            child, bases = next(v for cls, v in _FUSED.items() if isinstance(module, cls))
            fused.add(prefix + child)
            for spec in _layer_specs(f"{prefix}{child}.", getattr(module, child),
                                     (tuple(prefix + b for b in bases), _fused_rows(module))):
                by_local[spec.local] = spec
        elif isinstance(module, (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding)) \
                and name not in fused:
            by_local.update((s.local, s) for s in _layer_specs(prefix, module))
    specs = [by_local.get(name, TPSpec(name, (name,))) for name, _ in model.named_parameters()]
    if getattr(getattr(model, "cfg", None), "tie_embeddings", False):
        # A pipeline stage holding the head but not the embedding holds the tied matrix under
        # the head's name; its reference tensor is still the one embedding.
        specs = [replace(s, full=("embed_tokens.weight",)) if s.full == ("lm_head.weight",) else s for s in specs]
    return specs


def _gather_spec(local: torch.Tensor, spec: TPSpec, group: dist.ProcessGroup) -> dict[str, torch.Tensor]:
    if spec.dim is None:
        return {spec.full[0]: local.detach().clone()}
    world = group.size()
    x = local.detach().movedim(spec.dim, 0)
    per_rank = gather_along(x.contiguous(), group, 0).view(world, *x.shape)
    out, start = {}, 0
    for ref, n, size in zip(spec.full, spec.local_sizes, spec.full_sizes):
        rows = per_rank[:, start:start + n].reshape(world * n, *x.shape[1:])[:size]  # padding cut
        out[ref] = rows.movedim(0, spec.dim).contiguous().clone()
        start += n
    return out


@torch.no_grad()
def full_tensors(model: nn.Module, dims_or_tp_group, local: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{reference name: full tensor} from `local` ({local parameter name: tensor of that
    parameter's local shape}, e.g. its Adam moment), the same on every tp rank. A collective
    over tp: every tp rank calls it with the same names."""
    group = tp_group_of(dims_or_tp_group)
    out = {}
    for spec in tp_param_specs(model):
        out.update(_gather_spec(local[spec.local], spec, group))
    return out


@torch.no_grad()
def local_shards(model: nn.Module, dims_or_tp_group, full: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{local parameter name: this rank's tensor of the parameter's local shape} cut from
    `full` ({reference name: full tensor}, which must hold every name this rank needs, see
    tp_param_specs); a replicated one is `full`'s tensor itself. No communication."""
    group = tp_group_of(dims_or_tp_group)
    return {spec.local: local_shard(spec, full, group) for spec in tp_param_specs(model)}


def local_shard(spec: TPSpec, full: Mapping[str, torch.Tensor], group: dist.ProcessGroup | None) -> torch.Tensor:
    """This rank's local tensor of one parameter, cut from `full` ({reference name: full
    tensor}, holding at least spec.full); a replicated one is `full`'s tensor itself."""
    if spec.dim is None:
        return full[spec.full[0]]
    blocks = [shard_rows(full[ref].movedim(spec.dim, 0), group, pad=spec.padded) for ref in spec.full]
    return torch.cat(blocks).movedim(0, spec.dim).contiguous()


@torch.no_grad()
def full_state_dict(model: nn.Module, dims_or_tp_group) -> dict[str, torch.Tensor]:
    """Every full (unsharded) parameter of a model transformed by apply_tp, keyed by its name
    in the reference model; the same on every tp rank (a collective: call it on all)."""
    return full_tensors(model, dims_or_tp_group, dict(model.named_parameters()))
