"""Vocab-parallel cross-entropy: the loss of logits whose vocabulary is split over the tp
ranks (the output of a column-parallel LM head), without ever gathering the full logits.

Per token, with m_r, s_r, t_r the max, exp-sum (relative to m_r) and target logit over the
valid columns of rank r's shard (ops.vocab_parallel_ce_stats):

    M = max_r m_r                                       all-reduce MAX
    S = sum_r s_r exp(m_r - M),  T = sum_r t_r          one all-reduce SUM of both
    loss = log S + M - T                                the same value on every tp rank

Backward: d loss / d logits = (softmax - onehot(target)) * d loss, written over the logits
shard (ops.vocab_parallel_ce_grad_), so no second (N, V/tp) buffer exists: after backward
the logits tensor holds its gradient. Padding columns (vocabulary rounded up to a multiple
of tp) are excluded from the max and the sum and get a zero gradient.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from pyruntime import ops


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Forward: per-token losses (N,) from the shard statistics, all-reduced (MAX, then SUM)
    over tp. Backward: no communication; the gradient kernel overwrites the saved shard."""

    @staticmethod
    def forward(ctx, logits2d, targets, vocab_start, vocab_valid, group, backend):
        row_max, sum_exp, target = ops.vocab_parallel_ce_stats(logits2d, targets, vocab_start,
                                                               vocab_valid, backend=backend)
        global_max = row_max.clone()
        dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=group)
        # a rank with no valid columns has row_max = -inf and sum_exp = 0: exp(-inf) * 0 = 0
        sums = torch.stack([sum_exp * torch.exp(row_max - global_max), target])  # (2, N)
        dist.all_reduce(sums, group=group)
        global_sum = sums[0]
        ctx.save_for_backward(logits2d, targets, global_max, global_sum)
        ctx.vocab = (vocab_start, vocab_valid, backend)
        return torch.log(global_sum) + global_max - sums[1]

    @staticmethod
    def backward(ctx, dloss):
        logits2d, targets, global_max, global_sum = ctx.saved_tensors
        vocab_start, vocab_valid, backend = ctx.vocab
        grad = ops.vocab_parallel_ce_grad_(logits2d, targets, vocab_start, vocab_valid, global_max,
                                           global_sum, dloss.float().contiguous(), backend=backend)
        return grad, None, None, None, None, None


def shard_range(vocab_size: int, shard_width: int, group: dist.ProcessGroup) -> tuple[int, int]:
    """(vocab_start, vocab_valid) of this rank's logits shard: rank r holds columns
    [r * width, r * width + valid), the rest of its width being padding."""
    world, rank = group.size(), group.rank()
    if shard_width * world < vocab_size:
        raise ValueError(f"vocab-parallel cross-entropy: {world} shards of {shard_width} columns "
                         f"cannot hold a vocabulary of {vocab_size}")
    start = rank * shard_width
    return start, max(0, min(shard_width, vocab_size - start))


def vocab_parallel_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, tp_group: dist.ProcessGroup,
                                 vocab_size: int, reduction: str = "mean", backend: str = "auto") -> torch.Tensor:
    """Cross-entropy (fp32) of this rank's logits shard (..., V_padded / tp) against the
    global target ids (...) in [0, vocab_size). reduction: "mean" (what lm_loss computes),
    "sum", or "none" (per token, flattened). The logits shard is overwritten by its
    gradient during backward (module docstring): do not read it afterwards."""
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"vocab_parallel_cross_entropy: unknown reduction '{reduction}'")
    width = logits.shape[-1]
    start, valid = shard_range(vocab_size, width, tp_group)
    logits2d = logits.reshape(-1, width).float()  # bf16 logits: an fp32 copy (like lm_loss)
    if logits2d.stride(-1) != 1:
        logits2d = logits2d.contiguous()
    losses = _VocabParallelCrossEntropy.apply(logits2d, targets.reshape(-1), start, valid, tp_group, backend)
    if reduction == "mean":
        return losses.mean()
    return losses.sum() if reduction == "sum" else losses
