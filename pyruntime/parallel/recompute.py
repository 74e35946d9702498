"""Activation recomputation, applied to an unmodified model by the runtime (parallelize.py),
and the measured activation bytes of every step.

    apply_recompute(model, "full", layers=2, stage_layers=[4, 4])  # first 2 blocks of each stage
    ...train...
    activation_bytes(model)   # bytes the blocks saved for backward since the last call

Modes (`train --recompute`):
- none: blocks run as they are; only metered.
- full: a block keeps only its input (and the shared rotary tables); its forward is rerun
  inside its backward (`_FullRecompute`, an autograd Function whose inputs include the
  block's parameters, so the outer graph reaches them: `backward(inputs=params)` (zb's first
  stage), dp buckets and ZeRO hooks see each parameter's gradient arrive through the ordinary
  AccumulateGrad of the outer graph; the inner pass is `torch.autograd.grad`, which
  accumulates nothing). Under ZeRO-3 the unit is gathered once: its pre-backward hook (on
  the block output's gradient) gathers it for the recompute and the backward together; the
  recompute calls the block's own forward, not the module, so no forward hook gathers or
  frees it again. Zero bubble: the recompute runs under the same deferrable_forward() flag
  as the forward, so B stashes each GEMM's (X, dY) as usual and W runs only those GEMMs.
  Sequence parallelism: only the sequence shard is kept and the recompute re-gathers it (the
  all-gather is repeated in backward, as in Megatron): keeping the gathered input would hold
  tp times more. Autocast state is recorded at forward and restored for the recompute. The
  model has no dropout, so no RNG state needs replaying.
- selective: the block runs with its graph, but the outputs of its cheap, memory-heavy ops
  are not saved: the RMSNorm outputs (saved by the q/k/v and gate/up GEMMs for their
  weight gradients), the SwiGLU activation (saved by the down projection) and, with grouped
  KV heads, the repeated k and v attention saves (model/llama.repeat_kv offers them: the
  recipe keeps the unrepeated k and v, 1/groups of the bytes) are packed as recipes and
  recomputed on first unpack in backward (saved-tensor hooks keyed by storage);
  the GEMM outputs, the attention inputs/outputs and everything else stay saved. Norm
  outputs come from module forward hooks, so a norm whose output the next layer gathers
  first (sequence parallelism: the GEMM saves the gathered copy) is not dropped; the fused
  tp SwiGLU GEMM makes no separate activation to drop. Rotary is not recomputed: it runs
  inside the attention function, where no module boundary marks it.

activation_bytes: the storages saved for backward inside the transformer blocks (each once
per chunk forward, parameters and ZeRO-3 unit buffers left out; train/saved_bytes.py), summed
over the step's forwards on this rank. The embedding, the final norm, the head and the loss
are outside the blocks and the same in every mode.
"""
from __future__ import annotations

import contextlib
import functools
import threading
import weakref
from typing import Callable

import torch
import torch.nn as nn

from pyruntime.config import RECOMPUTE_MODES as MODES, Config, ConfigError
from pyruntime.ops import wgrad
from pyruntime.train.saved_bytes import SavedTensorMeter, note_saved

_state = threading.local()  # the selective recipes of the block forward now running
SELECTIVE_OPS = ("norm", "swiglu", "kv_repeat")  # what --recompute selective can drop (--recompute-ops)
ALL_OPS = ",".join(SELECTIVE_OPS)  # --recompute-ops' default (config.ParallelConfig spells it out)


def check_recompute(cfg: Config) -> None:
    """--recompute-layers must fit every stage (before any process group exists)."""
    from pyruntime.parallel.pipeline.split import plan_stage_layers

    par = cfg.parallel
    # the split is only asked for with --recompute-layers (its own checks name a bad split)
    counts = [] if par.recompute_layers is None else plan_stage_layers(cfg.model, par.pp * par.virtual_stages,
                                                                       par.pp_layout)
    refused = recompute_misfit(par.recompute, par.recompute_layers, par.recompute_ops, counts)
    if refused:
        raise ConfigError(refused)


def recompute_misfit(mode: str, layers: int | None, ops: str, stage_layers: list[int]) -> str | None:
    """Why train refuses these recompute settings (one line), or None; the planner asks too.
    stage_layers: the layers of each pipeline stage (read only when layers is given)."""
    names = ops.split(",")
    if not set(names) <= set(SELECTIVE_OPS) or len(set(names)) != len(names):
        return f"--recompute-ops '{ops}': expected a comma-separated subset of {', '.join(SELECTIVE_OPS)}"
    if mode != "selective" and ops != ALL_OPS:
        return f"--recompute-ops '{ops}' needs --recompute selective, got --recompute {mode}"
    if layers is None:
        return None
    if mode == "none":
        return f"--recompute-layers {layers} needs --recompute selective or full"
    if layers > min(stage_layers):
        return (f"--recompute-layers {layers} is more than stage {stage_layers.index(min(stage_layers))}'s "
                f"{min(stage_layers)} layer(s) (layers per stage: {stage_layers})")
    return None


class _BlockMeter:
    """The SavedTensorMeter of the blocks: one scope per chunk forward (a storage the chunk's
    blocks share, the rotary tables, counts once), bytes summed until taken."""

    def __init__(self):
        self.meter = SavedTensorMeter()
        self.total = 0

    def start_forward(self) -> None:
        self.total += self.meter.bytes
        self.meter.reset()

    def take(self) -> int:
        self.start_forward()
        total, self.total = self.total, 0
        return total


def _params(block: nn.Module) -> list[torch.Tensor]:
    return [p for p in block.parameters() if p.requires_grad]


def _autocast_state(device_type: str) -> tuple[bool, torch.dtype]:
    return torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)


class _FullRecompute(torch.autograd.Function):
    """y = block(x); saves x only and reruns the block in backward (see the module docstring)."""

    @staticmethod
    def forward(ctx, run: Callable, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *params):
        ctx.run, ctx.n_params = run, len(params)
        ctx.deferrable = wgrad.forward_is_deferrable()
        ctx.autocast = _autocast_state(x.device.type)
        ctx.save_for_backward(x, cos, sin)
        with torch.no_grad():
            return run(x, cos, sin)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, cos, sin = ctx.saved_tensors
        params = ctx.run.params()
        x = x.detach().requires_grad_(x.requires_grad)
        enabled, dtype = ctx.autocast
        with torch.enable_grad(), torch.autocast(x.device.type, dtype=dtype, enabled=enabled), \
                (wgrad.deferrable_forward() if ctx.deferrable else contextlib.nullcontext()):
            y = ctx.run(x, cos, sin)
        inputs = ([x] if x.requires_grad else []) + params
        grads = list(torch.autograd.grad(y, inputs, dy, allow_unused=True))
        dx = grads.pop(0) if x.requires_grad else None
        return (None, dx, None, None, *grads)


class _Recipe:
    """A dropped activation: recomputed (once) from what is still saved, on first unpack."""

    def __init__(self, fn: Callable[[], torch.Tensor]):
        self.fn, self.value = fn, None

    def get(self) -> torch.Tensor:
        if self.value is None:
            with torch.no_grad():
                self.value = self.fn()
        return self.value


class _Selective:
    """Saved-tensor hooks for one block forward: tensors whose storage is a recipe's output
    are packed as (recipe, shape, stride, offset); the rest go to the meter and are kept."""

    def __init__(self):
        self.recipes = {}

    def add(self, out: torch.Tensor, fn: Callable[[], torch.Tensor], keep: tuple[torch.Tensor, ...] = ()) -> None:
        """`out` is rebuilt by fn() if it is saved; `keep`: what fn reads that nothing else
        saves (the recipe holds it until backward, so the meter counts it)."""
        # A weak reference: once `out` is gone its storage may be freed and the same
        # StorageImpl address handed to an unrelated tensor, which must not match.
        self.recipes[out.untyped_storage()._cdata] = (_Recipe(fn), weakref.ref(out))
        for t in keep:
            note_saved(t)

    def pack(self, t: torch.Tensor):
        entry = self.recipes.get(t.untyped_storage()._cdata)
        if entry is not None and entry[1]() is not None:
            return (entry[0], t.shape, t.stride(), t.storage_offset())
        note_saved(t)  # kept: the block meter (and any meter around it) counts it
        return t

    @staticmethod
    def unpack(packed):
        if isinstance(packed, tuple):
            recipe, shape, stride, offset = packed
            return recipe.get().as_strided(shape, stride, offset)
        return packed


def _norm_hook(module: nn.Module, args, output) -> None:
    sel = getattr(_state, "selective", None)
    if sel is not None and torch.is_grad_enabled():
        sel.add(output, functools.partial(module.forward, *args))


def _mlp_hooks(mlp: nn.Module) -> None:
    """Plain SwiGLU MLP (model/llama.py MLP): down_proj's input is swiglu(gate, up)."""
    from pyruntime import ops

    seen: dict[str, torch.Tensor] = {}

    def keep(name, _module, _args, output):
        if getattr(_state, "selective", None) is not None:
            seen[name] = output

    def before_down(_module, args):
        sel = getattr(_state, "selective", None)
        if sel is not None and torch.is_grad_enabled() and {"gate", "up"} <= seen.keys():
            gate, up = seen.pop("gate"), seen.pop("up")
            sel.add(args[0], functools.partial(ops.swiglu, gate, up, backend=mlp.kernels))

    mlp.gate_proj.register_forward_hook(functools.partial(keep, "gate"))
    mlp.up_proj.register_forward_hook(functools.partial(keep, "up"))
    mlp.down_proj.register_forward_pre_hook(before_down)


class _BlockRun:
    """The block's own forward as the recompute calls it (no module hooks), and its current
    parameters (ZeRO-3 replaces the Parameter objects when it makes them)."""

    def __init__(self, block: nn.Module, forward: Callable):
        self.block, self.forward = block, forward

    def __call__(self, x, cos, sin):
        return self.forward(x, cos, sin)

    def params(self) -> list[torch.Tensor]:
        return _params(self.block)


def _wrap(block: nn.Module, mode: str, first: bool, meter: _BlockMeter, kv_repeat: bool = False) -> None:
    """kv_repeat: in selective mode, also drop attention's repeated k / v (model/llama.repeat_kv)."""
    from pyruntime.model.llama import DROPPABLE

    run = _BlockRun(block, block.forward)

    def forward(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():
            return run(x, cos, sin)
        if first:
            meter.start_forward()
        meter.meter.exclude_more(run.params())
        if mode == "full":
            with meter.meter:
                return _FullRecompute.apply(run, x, cos, sin, *run.params())
        if mode == "selective":
            sel = _Selective()
            _state.selective = sel
            DROPPABLE.offer = sel.add if kv_repeat else None
            try:
                with meter.meter.counting(), torch.autograd.graph.saved_tensors_hooks(sel.pack, sel.unpack):
                    return run(x, cos, sin)
            finally:
                _state.selective = DROPPABLE.offer = None
        with meter.meter:
            return run(x, cos, sin)

    block.forward = forward


def apply_recompute(model: nn.Module, mode: str = "none", layers: int | None = None,
                    stage_layers: list[int] | None = None, ops: tuple[str, ...] = SELECTIVE_OPS) -> None:
    """Recompute the first `layers` blocks (all when None) of each stage of `model` in `mode`
    and meter every block. stage_layers: layers per stage (pipeline split); the model's
    layers are grouped into stages by their global index. ops: what selective drops (a subset
    of SELECTIVE_OPS). Called once, before ZeRO-3 makes the parameters (hooks key on modules,
    not on Parameter objects)."""
    if mode not in MODES:
        raise ValueError(f"recompute mode '{mode}' is not one of {MODES}")
    from pyruntime.model.llama import MLP, RMSNorm

    counts = stage_layers or [model.cfg.n_layers]
    starts = [sum(counts[:i]) for i in range(len(counts))]
    meter = _BlockMeter()
    model.activation_meter = meter  # read by activation_bytes()
    for key, block in model.layers.items():
        index = int(key)
        stage = max(s for s, start in enumerate(starts) if start <= index)
        position = index - starts[stage]
        block_mode = mode if layers is None or position < layers else "none"
        # A chunk's forward starts at its stage's first layer (each stage is one chunk).
        _wrap(block, block_mode, position == 0, meter, kv_repeat="kv_repeat" in ops)
        if block_mode == "selective":
            for module in block.modules():
                if isinstance(module, RMSNorm) and "norm" in ops:
                    module.register_forward_hook(_norm_hook)
                elif type(module) is MLP and "swiglu" in ops:
                    _mlp_hooks(module)


def activation_bytes(model: nn.Module) -> int | None:
    """Bytes the blocks saved for backward since the last call (None: not applied)."""
    meter = getattr(model, "activation_meter", None)
    return meter.take() if meter is not None else None


def activation_line(cfg: Config, nbytes: int | None) -> str:
    """The start-up line on activations, from the first step's measured bytes."""
    par = cfg.parallel
    which = "" if par.recompute == "none" or par.recompute_layers is None else \
        f", first {par.recompute_layers} block(s) of each stage"
    measured = "not measured" if nbytes is None else f"{nbytes / 2**20:.2f} MB"
    return (f"activations: recompute {par.recompute}{which}; saved for backward by this rank's blocks "
            f"in step 1: {measured} (measured, all micro-batches)")
