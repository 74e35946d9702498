"""What the planner plans for: a model shape, a batch and a layout, and which parameters each
rank then holds (names and local shapes, in the order the trainer registers them).

The rank's parameters are derived from the same sources the trainer uses, never retold: the
stage split is `pipeline.split.plan_stage_layers`, the tp shapes follow `tensor/apply.py`
(q/k/v fused into one column-parallel weight, gate/up into another, the vocabulary padded to
a multiple of tp). Shapes only: nothing is allocated, so any model size can be planned.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from pyruntime.config import ConfigError, ModelConfig
from pyruntime.parallel.pipeline.schedule import schedule_names
from pyruntime.parallel.pipeline.split import plan_stage_layers, stage_layer_ranges
from pyruntime.parallel.recompute import ALL_OPS, recompute_misfit
from pyruntime.parallel.validate import pipeline_setting_unused, pipeline_too_long, tp_misfit  # the trainer's rules

RECOMPUTE_MODES = ("none", "selective", "full")
OFFLOAD_TARGETS = ("none", "optimizer")


class PlanError(ConfigError):
    """Bad planner input: the CLI prints it as one line and exits with code 2."""


@dataclass(frozen=True, kw_only=True)
class Layout:
    """One way to run a step: the train flags of the same names (pyruntime/config.py)."""

    dp: int = 1
    tp: int = 1
    pp: int = 1
    zero: int = 0
    sp: bool = False
    schedule: str = "1f1b"
    virtual_stages: int = 1
    pp_layout: str = "even"
    micro_batch: int = 1
    """Sequences per forward/backward on one rank."""
    recompute: str = "none"
    recompute_layers: int | None = None
    """With recompute: only the first K blocks of each pipeline stage (None: all)."""
    recompute_ops: str = ALL_OPS
    """What selective recompute drops: a comma-separated subset of SELECTIVE_OPS."""
    offload: str = "none"
    bucket_mb: float = 25.0
    mesh_order: str = "dp,pp,tp"
    """The rank grid's axes, outermost first (train's --mesh-order, mesh.ParallelDims): the
    last has adjacent ranks, so it is the one a node holds whole first."""

    @property
    def world(self) -> int:
        return self.dp * self.tp * self.pp

    def stride(self, axis: str) -> int:
        """Global ranks between neighbours along `axis` (dp, pp or tp): the product of the
        sizes of the axes after it in mesh_order."""
        order = [a.strip() for a in self.mesh_order.split(",")]
        return math.prod(getattr(self, a) for a in order[order.index(axis) + 1:])

    def describe(self) -> str:
        parts = [f"dp {self.dp}", f"tp {self.tp}{' sp' if self.sp else ''}", f"pp {self.pp}"]
        if self.pp > 1:
            parts.append(self.schedule + (f" v{self.virtual_stages}" if self.virtual_stages > 1 else ""))
        parts += [f"zero {self.zero}", f"mb {self.micro_batch}"]
        if self.mesh_order.replace(" ", "") != "dp,pp,tp":
            parts.append(f"mesh order {self.mesh_order}")
        if self.recompute != "none":
            parts.append(f"recompute {self.recompute}"
                         + (f" ({self.recompute_ops})" if self.recompute == "selective"
                            and self.recompute_ops != ALL_OPS else "")
                         + (f" first {self.recompute_layers} blocks" if self.recompute_layers is not None else ""))
        if self.offload != "none":
            parts.append(f"offload {self.offload}")
        return ", ".join(parts)


@dataclass(frozen=True, kw_only=True)
class Workload:
    """The model and the batch of one optimizer step (model.tie_embeddings: the head is the
    embedding matrix, one parameter where one rank holds both)."""

    model: ModelConfig
    seq_len: int
    global_batch: int
    """Sequences per optimizer step over all dp ranks."""

    def microbatches(self, layout: Layout) -> int:
        """Micro-batches per step per dp rank."""
        return self.global_batch // (layout.dp * layout.micro_batch)


def check(work: Workload, layout: Layout, gpus: int | None = None) -> None:
    """Raises PlanError (one line naming the numbers) for a layout the trainer would refuse."""
    m, lay = work.model, layout
    for name in ("dp", "tp", "pp", "virtual_stages", "micro_batch"):
        if getattr(lay, name) < 1:
            raise PlanError(f"{name} must be >= 1, got {getattr(lay, name)}")
    if gpus is not None and lay.world != gpus:
        raise PlanError(f"layout dp {lay.dp} x tp {lay.tp} x pp {lay.pp} = {lay.world} is not the GPU count {gpus}")
    if sorted(a.strip() for a in lay.mesh_order.split(",")) != ["dp", "pp", "tp"]:  # ParallelConfig's rule
        raise PlanError(f"mesh order must order dp, pp and tp, e.g. 'dp,pp,tp'; got '{lay.mesh_order}'")
    if lay.zero not in (0, 1, 2, 3):
        raise PlanError(f"zero must be 0, 1, 2 or 3, got {lay.zero}")
    if lay.schedule not in schedule_names():
        raise PlanError(f"unknown schedule '{lay.schedule}'; choose from {', '.join(schedule_names())}")
    if lay.recompute not in RECOMPUTE_MODES:
        raise PlanError(f"unknown recompute mode '{lay.recompute}'; choose from {', '.join(RECOMPUTE_MODES)}")
    if lay.offload not in OFFLOAD_TARGETS:
        raise PlanError(f"unknown offload target '{lay.offload}'; choose from {', '.join(OFFLOAD_TARGETS)}")
    misfit = tp_misfit(m, lay.tp)
    if misfit:
        raise PlanError(misfit)
    if lay.sp and (lay.tp == 1 or work.seq_len % lay.tp):
        raise PlanError(f"sequence parallelism needs tp > 1 dividing seq_len {work.seq_len}, got tp {lay.tp}")
    if work.global_batch % (lay.dp * lay.micro_batch):
        raise PlanError(f"global batch {work.global_batch} does not divide into dp {lay.dp} x micro-batch "
                        f"{lay.micro_batch}")
    stages = lay.pp * lay.virtual_stages
    counts = [m.n_layers]
    if stages > 1:
        try:
            counts = plan_stage_layers(m, stages, lay.pp_layout)
        except ConfigError as e:
            raise PlanError(f"cannot split the model as asked: {e}") from None
    refused = recompute_misfit(lay.recompute, lay.recompute_layers, lay.recompute_ops, counts)
    if refused:
        raise PlanError(refused)
    mbs = work.microbatches(lay)
    if lay.pp > 1 and lay.schedule in ("1f1b", "zb", "interleaved") and mbs < lay.pp:
        raise PlanError(f"schedule {lay.schedule} needs >= pp {lay.pp} micro-batches per step, got {mbs}")
    if lay.pp > 1 and lay.schedule == "interleaved" and (lay.virtual_stages < 2 or mbs % lay.pp):
        raise PlanError(f"interleaved needs virtual stages >= 2 (got {lay.virtual_stages}) and micro-batches "
                        f"({mbs}) divisible by pp {lay.pp}")
    if lay.virtual_stages > 1 and (lay.pp == 1 or lay.schedule != "interleaved"):
        raise PlanError(f"virtual stages {lay.virtual_stages} need pp > 1 and schedule interleaved")
    refused = (pipeline_setting_unused(lay.pp, lay.schedule, lay.pp_layout)  # train refuses these too
               or pipeline_too_long(lay.pp, mbs, lay.virtual_stages))
    if refused:
        raise PlanError(refused)


@dataclass(frozen=True)
class Param:
    name: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class RankPart:
    """What one pipeline rank holds: its layers (global indices, in order), whether it has the
    embedding and the norm + head."""

    layers: tuple[int, ...]
    embedding: bool
    head: bool


def rank_part(work: Workload, layout: Layout, pp_rank: int) -> RankPart:
    if layout.pp * layout.virtual_stages == 1:
        return RankPart(tuple(range(work.model.n_layers)), True, True)
    stages = layout.pp * layout.virtual_stages
    ranges = stage_layer_ranges(plan_stage_layers(work.model, stages, layout.pp_layout))
    local = [c * layout.pp + pp_rank for c in range(layout.virtual_stages)]
    layers = sorted(i for s in local for i in ranges[s])
    return RankPart(tuple(layers), 0 in local, stages - 1 in local)


def _linear(name: str, out: int, inp: int, bias: bool, bias_rows: int | None = None) -> list[Param]:
    """A linear layer's weight, then its bias (bias_rows: a row-parallel layer's replicated bias)."""
    return [Param(name + ".weight", (out, inp))] + ([Param(name + ".bias", (bias_rows or out,))] if bias else [])


def block_params(m: ModelConfig, tp: int, prefix: str) -> list[Param]:
    """One block's parameters in registration order; tp > 1 fuses q/k/v and gate/up (apply_tp)."""
    hd, c, f = m.head_dim, m.dim, m.ffn_dim
    q, kv = m.n_heads * hd, m.kv_heads * hd
    a, p = prefix + "self_attn.", prefix + "mlp."
    if tp == 1:
        attn = [*_linear(a + "q_proj", q, c, m.qkv_bias), *_linear(a + "k_proj", kv, c, m.qkv_bias),
                *_linear(a + "v_proj", kv, c, m.qkv_bias), *_linear(a + "o_proj", c, q, m.o_bias)]
        mlp = [*_linear(p + "gate_proj", f, c, m.mlp_bias), *_linear(p + "up_proj", f, c, m.mlp_bias),
               *_linear(p + "down_proj", c, f, m.mlp_bias)]
    else:
        attn = [*_linear(a + "qkv_proj", (q + 2 * kv) // tp, c, m.qkv_bias),
                *_linear(a + "o_proj", c, q // tp, m.o_bias, bias_rows=c)]
        mlp = [*_linear(p + "gate_up_proj", 2 * f // tp, c, m.mlp_bias),
               *_linear(p + "down_proj", c, f // tp, m.mlp_bias, bias_rows=c)]
    return [Param(prefix + "input_layernorm.weight", (c,)), *attn,
            Param(prefix + "post_attention_layernorm.weight", (c,)), *mlp]


def rank_params(work: Workload, layout: Layout, pp_rank: int = 0) -> list[Param]:
    """The parameters of pipeline rank pp_rank (every tp rank holds the same shapes), in the
    order the rank's model registers them."""
    m, tp = work.model, layout.tp
    part = rank_part(work, layout, pp_rank)
    vocab_rows = -(-m.vocab_size // tp)  # padded with zero rows on the last rank(s)
    out = [Param("embed_tokens.weight", (vocab_rows, m.dim))] if part.embedding else []
    for i in part.layers:
        out += block_params(m, tp, f"layers.{i}.")
    if part.head:
        out.append(Param("norm.weight", (m.dim,)))
        if not (work.model.tie_embeddings and part.embedding):
            out.append(Param("lm_head.weight", (vocab_rows, m.dim)))
    return out


def with_layout(layout: Layout, **changes) -> Layout:
    return dataclasses.replace(layout, **changes)
