"""adamw_step: one AdamW update of a flat fp32 buffer (a ZeRO shard) in place, on the fused
Triton kernel (CUDA), the C++ op (CPU) or the pure-PyTorch reference.

    decay = DecayMask.from_segments(shard_numel, [(0, 4096), (4112, 20000)], device)
    adamw_step(master, grad, exp_avg, exp_avg_sq, decay, lr=3e-3, betas=(0.9, 0.95), eps=1e-8,
               weight_decay=0.1, step=t)

The math is torch.optim.AdamW's (decoupled weight decay, bias-corrected moments); weight
decay applies only to the elements in `decay` (the project decays matrices, not norm
weights). `step` counts from 1, as torch's state["step"] after its increment.

Backends (fastest first): "triton" (CUDA; CPU only interpreted, for tests) reads each element
of the four buffers once and writes three back; "cpp" (CPU, only when asked for: torch.ops.pyruntime.adamw_step,
csrc/adamw_cpu.cpp, the host optimizer of `--offload optimizer`) does the same in one
vectorised, multi-threaded pass, rounding as the reference does except in sqrt (see
_candidates); "reference" is
the sequence of in-place PyTorch ops torch's foreach AdamW runs, on the one flat buffer, so it
matches torch.optim.AdamW to the last bit on CPU.

param_copy (optional, fp32 or bf16, same size): receives the updated parameters, in the same
pass on the C++ backend (the device copy that offload sends back); after the step otherwise.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from pyruntime.core import load_core
from pyruntime.ops.dispatch import choose

def _candidates(device: torch.device) -> tuple[str, ...]:
    # The C++ op has a CPU kernel only, and "auto" keeps the reference on CPU: it is torch's
    # own arithmetic, so ZeRO's sharded step reproduces torch.optim.AdamW (DDP, one process)
    # to the last bit; the C++ loop's sqrt is correctly rounded where torch's (MKL) is not,
    # which moves a few parameters by 1 ulp. The C++ op is chosen explicitly (offload).
    return ("triton", "reference", "cpp") if device.type == "cpu" else ("triton", "reference")


@dataclass(frozen=True)
class DecayMask:
    """Which elements of a flat buffer of `numel` get weight decay: `segments` (sorted, disjoint
    [begin, end) ranges, what the reference slices) and, built on first use, `mask` (bool per
    element, what the kernel reads; 1 byte per element, so not kept where nothing reads it)."""

    numel: int
    segments: tuple[tuple[int, int], ...]
    device: torch.device

    @staticmethod
    def from_segments(numel: int, segments, device: torch.device | str = "cpu") -> "DecayMask":
        merged: list[list[int]] = []
        for begin, end in sorted((int(b), int(e)) for b, e in segments if e > b):
            if begin < 0 or end > numel:
                raise ValueError(f"DecayMask: segment [{begin}, {end}) outside a buffer of {numel} elements")
            if merged and begin <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], end)
            else:
                merged.append([begin, end])
        return DecayMask(numel=numel, segments=tuple((b, e) for b, e in merged), device=torch.device(device))

    @functools.cached_property
    def mask(self) -> torch.Tensor:
        mask = torch.zeros(self.numel, dtype=torch.bool, device=self.device)
        for begin, end in self.segments:
            mask[begin:end] = True
        return mask


def _scalars(lr: float, betas: tuple[float, float], weight_decay: float, step: int) -> dict:
    # Exactly torch's host-side arithmetic (python floats, i.e. fp64).
    beta1, beta2 = betas
    return {"decay_factor": 1 - lr * weight_decay, "beta1": beta1, "beta2": beta2,
            "step_size": (lr / (1 - beta1 ** step)) * -1,
            "bias_correction2_sqrt": (1 - beta2 ** step) ** 0.5}


@torch.no_grad()
def adamw_reference(params: torch.Tensor, grads: torch.Tensor, exp_avg: torch.Tensor,
                    exp_avg_sq: torch.Tensor, decay: DecayMask | None, *, lr: float,
                    betas: tuple[float, float], eps: float, weight_decay: float, step: int) -> None:
    """torch.optim.AdamW(foreach=True)'s sequence of in-place ops on flat tensors."""
    s = _scalars(lr, betas, weight_decay, step)
    if weight_decay != 0:
        for begin, end in (decay.segments if decay is not None else ((0, params.numel()),)):
            params[begin:end].mul_(s["decay_factor"])
    grads = grads.float()
    exp_avg.lerp_(grads, 1 - s["beta1"])
    exp_avg_sq.mul_(s["beta2"]).addcmul_(grads, grads, value=1 - s["beta2"])
    denom = exp_avg_sq.sqrt().div_(s["bias_correction2_sqrt"]).add_(eps)
    params.addcdiv_(exp_avg, denom, value=s["step_size"])


def _adamw_cpp(params, grads, exp_avg, exp_avg_sq, decay: DecayMask | None, param_copy, *, lr, betas, eps,
               weight_decay, step) -> None:
    s = _scalars(lr, betas, weight_decay, step)
    if weight_decay == 0:
        segments = []  # nothing decays
    else:
        segments = [x for seg in (decay.segments if decay is not None else ((0, params.numel()),)) for x in seg]
    load_core("the C++ AdamW (adamw_step, backend 'cpp')")
    torch.ops.pyruntime.adamw_step(params, grads, exp_avg, exp_avg_sq, param_copy, segments,
                                   s["decay_factor"], s["beta1"], s["beta2"], eps, s["step_size"],
                                   s["bias_correction2_sqrt"])


def adamw_step(params: torch.Tensor, grads: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
               decay: DecayMask | None, *, lr: float, betas: tuple[float, float], eps: float,
               weight_decay: float, step: int, backend: str = "auto",
               param_copy: torch.Tensor | None = None) -> None:
    """Update params (fp32 master), exp_avg and exp_avg_sq in place; all 1-D of one size.
    decay=None decays every element. backend: "auto" | "triton" | "cpp" | "reference"."""
    if step < 1:
        raise ValueError(f"adamw_step: step counts from 1, got {step}")
    if decay is not None and decay.numel != params.numel():
        raise ValueError(f"adamw_step: decay mask of {decay.numel} elements for {params.numel()} params")
    if param_copy is not None and (param_copy.shape != params.shape or param_copy.device != params.device):
        raise ValueError(f"adamw_step: param_copy {tuple(param_copy.shape)} on {param_copy.device} must match "
                         f"params {tuple(params.shape)} on {params.device}")
    chosen = choose("adamw", backend, params.device, candidates=_candidates(params.device))
    if chosen == "cpp":
        _adamw_cpp(params, grads, exp_avg, exp_avg_sq, decay, param_copy, lr=lr, betas=betas, eps=eps,
                   weight_decay=weight_decay, step=step)
        return
    if chosen == "triton":
        from pyruntime.triton_kernels.adamw import adamw_step_  # lazy: triton is optional

        s = _scalars(lr, betas, weight_decay, step)
        if weight_decay == 0:
            s["decay_factor"], decay = 1.0, None  # nothing decays: skip reading the mask
        adamw_step_(params, grads, exp_avg, exp_avg_sq, decay.mask if decay is not None else None,
                    eps=eps, **s)
    else:
        adamw_reference(params, grads, exp_avg, exp_avg_sq, decay, lr=lr, betas=betas, eps=eps,
                        weight_decay=weight_decay, step=step)
    if param_copy is not None:
        with torch.no_grad():
            param_copy.copy_(params)
