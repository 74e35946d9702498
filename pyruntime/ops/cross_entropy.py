"""Cross-entropy over a vocabulary split across tensor-parallel ranks, on the Triton kernels
or the pure-PyTorch reference, plus a single-device cross_entropy built on the same kernels.

Each rank holds logits_shard (N, Vs): columns [vocab_start, vocab_start + vocab_valid) of the
vocabulary, then Vs - vocab_valid padding columns. The tensor-parallel layer does

    m, s, t = vocab_parallel_ce_stats(shard, targets, vocab_start, vocab_valid)
    M = all_reduce_max(m);  S = all_reduce_sum(s * exp(m - M));  T = all_reduce_sum(t)
    loss = log(S) + M - T                                          # (N,), per token
    backward: vocab_parallel_ce_grad_(shard, targets, vocab_start, vocab_valid, M, S, dloss)

These two are not autograd Functions and do no communication. Targets are global vocabulary
ids in [0, vocab); there is no ignore_index: a target outside every shard would silently
give loss = log(S) + M, so callers that mask tokens must do so explicitly.
Backends (fastest first): "triton" (CUDA; CPU only interpreted, for tests) and "reference".
"""
from __future__ import annotations

import torch

from pyruntime.ops.dispatch import choose

CANDIDATES = ("triton", "reference")
REDUCTIONS = ("mean", "sum", "none")


def ce_stats_reference(logits_shard, targets, vocab_start: int, vocab_valid: int):
    """(row_max, sum_exp, target_logit), fp32 (N,), in plain PyTorch."""
    x = logits_shard[:, :vocab_valid].float()  # (N, valid)
    if vocab_valid == 0:
        n = x.shape[0]
        return (torch.full((n,), -float("inf"), device=x.device), x.new_zeros(n), x.new_zeros(n))
    row_max = x.max(dim=1).values
    sum_exp = torch.exp(x - row_max[:, None]).sum(dim=1)
    local = targets.long() - vocab_start
    inside = (local >= 0) & (local < vocab_valid)
    picked = x.gather(1, local.clamp(0, vocab_valid - 1)[:, None]).squeeze(1)
    return row_max, sum_exp, torch.where(inside, picked, torch.zeros_like(picked))


def ce_grad_reference_(logits_shard, targets, vocab_start: int, vocab_valid: int,
                       global_max, global_sum_exp, grad_scale):
    """The same gradient as the kernel, computed in fp32 and copied over logits_shard."""
    n, vs = logits_shard.shape
    x = logits_shard[:, :vocab_valid].float()
    grad = torch.zeros((n, vs), dtype=torch.float32, device=logits_shard.device)
    grad[:, :vocab_valid] = torch.exp(x - global_max.float()[:, None]) / global_sum_exp.float()[:, None]
    local = targets.long() - vocab_start
    rows = torch.nonzero((local >= 0) & (local < vocab_valid)).squeeze(1)
    grad[rows, local[rows]] -= 1.0
    scale = torch.as_tensor(grad_scale, dtype=torch.float32, device=grad.device)
    grad *= scale[:, None] if scale.dim() == 1 else scale
    with torch.no_grad():
        logits_shard.copy_(grad)
    return logits_shard


def _check(name, logits_shard, targets, vocab_valid) -> None:
    if logits_shard.dim() != 2 or targets.shape != logits_shard.shape[:1]:
        raise ValueError(f"{name}: logits_shard {tuple(logits_shard.shape)} must be (N, Vs) "
                         f"and targets {tuple(targets.shape)} (N,)")
    if not 0 <= vocab_valid <= logits_shard.shape[1]:
        raise ValueError(f"{name}: vocab_valid {vocab_valid} outside [0, {logits_shard.shape[1]}]")


def vocab_parallel_ce_stats(logits_shard: torch.Tensor, targets: torch.Tensor, vocab_start: int,
                            vocab_valid: int, backend: str = "auto"):
    """Per row of logits_shard (N, Vs), over its valid columns: (row_max, sum_exp relative to
    row_max, target_logit or 0 when the target is not in [vocab_start, vocab_start +
    vocab_valid)), each fp32 (N,). A shard with vocab_valid == 0 reports (-inf, 0, 0)."""
    _check("vocab_parallel_ce_stats", logits_shard, targets, vocab_valid)
    if choose("vocab_parallel_ce", backend, logits_shard.device, candidates=CANDIDATES) == "triton":
        from pyruntime.triton_kernels.cross_entropy import ce_stats  # lazy: triton is optional

        return ce_stats(logits_shard, targets, vocab_start, vocab_valid)
    return ce_stats_reference(logits_shard, targets, vocab_start, vocab_valid)


def vocab_parallel_ce_grad_(logits_shard: torch.Tensor, targets: torch.Tensor, vocab_start: int,
                            vocab_valid: int, global_max: torch.Tensor, global_sum_exp: torch.Tensor,
                            grad_scale: float | torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Overwrite logits_shard with d loss / d logits = (softmax - onehot(target)) * grad_scale
    (0 in the padding columns) and return it. global_max, global_sum_exp: (N,) over the
    whole vocabulary (sum_exp relative to global_max); grad_scale: a scalar or (N,) tensor.
    The overwrite is reported to autograd (version counter), so a graph that saved
    logits_shard elsewhere fails loudly instead of reading gradients."""
    _check("vocab_parallel_ce_grad_", logits_shard, targets, vocab_valid)
    if choose("vocab_parallel_ce", backend, logits_shard.device, candidates=CANDIDATES) == "triton":
        from pyruntime.triton_kernels.cross_entropy import ce_grad_

        ce_grad_(logits_shard, targets, vocab_start, vocab_valid, global_max, global_sum_exp, grad_scale)
        if not logits_shard.is_inference():
            torch.autograd.graph.increment_version(logits_shard)
        return logits_shard
    return ce_grad_reference_(logits_shard, targets, vocab_start, vocab_valid,
                              global_max, global_sum_exp, grad_scale)


class CrossEntropyFunction(torch.autograd.Function):
    """Forward: per-row loss log(S) + M - x[target] from the stats kernel (vocab_start 0, the
    whole vocabulary valid), saving the logits and (M, S). Backward: the gradient kernel
    overwrites the saved logits with the gradient and returns them: no second (N, V)
    buffer, so after backward the caller's logits hold the gradient, not the logits."""

    @staticmethod
    def forward(ctx, logits2d, targets, reduction):
        row_max, sum_exp, target_logit = vocab_parallel_ce_stats(logits2d, targets, 0, logits2d.shape[1], "triton")
        losses = torch.log(sum_exp) + row_max - target_logit  # (N,) fp32
        ctx.save_for_backward(logits2d, targets, row_max, sum_exp)
        ctx.reduction = reduction
        if reduction == "mean":
            return losses.mean()
        return losses.sum() if reduction == "sum" else losses

    @staticmethod
    def backward(ctx, dloss):
        logits2d, targets, row_max, sum_exp = ctx.saved_tensors
        n = logits2d.shape[0]
        # A tensor scale (no .item()): the backward stays free of host syncs.
        scale = dloss / n if ctx.reduction == "mean" else dloss
        grad = vocab_parallel_ce_grad_(logits2d, targets, 0, logits2d.shape[1], row_max, sum_exp,
                                       scale, "triton")
        return grad, None, None


def cross_entropy_reference(logits, targets, reduction: str = "mean"):
    """F.cross_entropy in fp32 (the loss dtype of the Triton path), no ignore_index."""
    vocab = logits.shape[-1]
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, vocab).float(), targets.reshape(-1), reduction=reduction, ignore_index=-(2**62)
    )


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean",
                  backend: str = "auto") -> torch.Tensor:
    """Single-device cross-entropy of logits (..., V) against integer targets (...) in [0, V);
    the loss is fp32. reduction: "mean" | "sum" | "none" (per token, flattened).
    The Triton path writes the gradient over the logits in backward (see
    CrossEntropyFunction). Out-of-range targets raise (this costs one host sync)."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"cross_entropy: unknown reduction '{reduction}'; expected one of {REDUCTIONS}")
    vocab = logits.shape[-1]
    if logits.dim() < 1 or targets.shape != logits.shape[:-1]:
        raise ValueError(f"cross_entropy: targets {tuple(targets.shape)} must be logits' {tuple(logits.shape)} leading dims")
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= vocab):
        raise ValueError(f"cross_entropy: targets must lie in [0, {vocab}) (there is no ignore_index)")
    if choose("cross_entropy", backend, logits.device, candidates=CANDIDATES) == "triton":
        logits2d = logits.reshape(-1, vocab)
        if logits2d.stride(1) != 1:
            logits2d = logits2d.contiguous()
        return CrossEntropyFunction.apply(logits2d, targets.reshape(-1), reduction)
    return cross_entropy_reference(logits, targets, reduction)
