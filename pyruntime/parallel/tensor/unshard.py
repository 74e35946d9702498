"""full_state_dict: the inverse of apply_tp for the weights. Gathers every tp shard back into
the full tensors, under the reference model's names (q_proj / k_proj / v_proj, gate_proj /
up_proj, padding stripped), so checkpoints and comparisons never see the tp layout.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

from pyruntime.comm.tp import gather_along
from pyruntime.parallel.tensor.apply import ParallelAttention, ParallelMLP, tp_group_of
from pyruntime.parallel.tensor.layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding


def _gather_rows(local: torch.Tensor, group: dist.ProcessGroup, local_rows: list[int],
                 full_rows: list[int]) -> list[torch.Tensor]:
    """The full tensors of the pieces stacked in `local` (each rank holds local_rows[i] rows
    of piece i), each cut to full_rows[i] rows (dropping the padding)."""
    world = group.size()
    per_rank = gather_along(local.detach(), group, 0).view(world, local.shape[0], *local.shape[1:])
    pieces, start = [], 0
    for n, full in zip(local_rows, full_rows):
        pieces.append(per_rank[:, start:start + n].reshape(world * n, *local.shape[1:])[:full].clone())
        start += n
    return pieces


def _unfused(module: nn.Module, group: dist.ProcessGroup) -> tuple[str, dict[str, torch.Tensor]]:
    """(fused child name, {reference name: full weight}) of a ParallelAttention / ParallelMLP."""
    world = group.size()
    if isinstance(module, ParallelAttention):
        q, k, v = _gather_rows(module.qkv_proj.weight, group, module.split_sizes,
                               [n * world for n in module.split_sizes])
        return "qkv_proj", {"q_proj.weight": q, "k_proj.weight": k, "v_proj.weight": v}
    half = module.gate_up_proj.weight.shape[0] // 2
    gate, up = _gather_rows(module.gate_up_proj.weight, group, [half, half], [half * world] * 2)
    return "gate_up_proj", {"gate_proj.weight": gate, "up_proj.weight": up}


def _unsharded(module: nn.Module, group: dist.ProcessGroup) -> dict[str, torch.Tensor]:
    """{parameter name: full tensor} of one tensor-parallel layer."""
    if isinstance(module, RowParallelLinear):
        out = {"weight": gather_along(module.weight.detach(), group, 1).clone()}
        if module.bias is not None:
            out["bias"] = module.bias.detach().clone()
        return out
    full = module.out_features if isinstance(module, ColumnParallelLinear) else module.num_embeddings
    return {name: _gather_rows(p, group, [p.shape[0]], [full])[0] for name, p in module.named_parameters()}


@torch.no_grad()
def full_state_dict(model: nn.Module, dims_or_tp_group) -> dict[str, torch.Tensor]:
    """Every full (unsharded) parameter of a model transformed by apply_tp, keyed by its name
    in the reference model; the same on every tp rank (a collective: call it on all)."""
    group = tp_group_of(dims_or_tp_group)
    full, fused, sharded = {}, set(), []
    for name, module in model.named_modules():  # parents come before their children
        prefix = f"{name}." if name else ""
        if isinstance(module, (ParallelAttention, ParallelMLP)):
            child, weights = _unfused(module, group)
            fused.add(prefix + child)
            full.update({prefix + key: t for key, t in weights.items()})
        elif isinstance(module, (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding)):
            sharded.append(prefix)
            if name not in fused:
                full.update({prefix + key: t for key, t in _unsharded(module, group).items()})
    for name, p in model.named_parameters():
        if not name.startswith(tuple(sharded)):  # replicated (norm weights)
            full[name] = p.detach().clone()
    return full
