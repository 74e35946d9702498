"""Stage split: which layers each pipeline stage owns, and the per-rank model that keeps them.

    counts = plan_stage_layers(model_cfg, stages=4, spec="even")    # [1, 1, 1, 1]
    chunks = keep_local_stages(model, counts, pp=2, pp_rank=1, virtual_stages=2)

With pp ranks and v chunks per rank there are S = pp * v stages; stage s = c * pp + r is chunk
c of rank r (Megatron's interleaved placement, as in schedule.py). Stage 0 also owns the
embedding, stage S-1 the final norm, the LM head and the loss.

The rank's model stays the reference Transformer with everything of other stages removed:
parameter names do not change (`layers.7.mlp.down_proj.weight` is called that on whichever
rank holds it), so initialisation, tensor parallelism, ZeRO units and checkpoints need no
pipeline knowledge. StageChunk is the forward of one chunk over that model.
"""
from __future__ import annotations

import functools

import torch
import torch.nn as nn

from pyruntime.config import ConfigError, ModelConfig
from pyruntime.model.llama import count_params

LAYOUTS = ("even", "balanced")


def _parse_explicit(spec: str, stages: int, n_layers: int) -> list[int]:
    try:
        counts = [int(c) for c in spec.split(",")]
    except ValueError:
        raise ConfigError(f"--pp-layout '{spec}': expected 'even', 'balanced' or layer counts like '4,4,3,5'") from None
    if len(counts) != stages:
        raise ConfigError(f"--pp-layout '{spec}' has {len(counts)} stage(s); pp x virtual stages = {stages}")
    if any(c < 1 for c in counts):
        raise ConfigError(f"--pp-layout '{spec}': every stage needs at least 1 layer")
    if sum(counts) != n_layers:
        raise ConfigError(f"--pp-layout '{spec}' sums to {sum(counts)} layers; the model has {n_layers}")
    return counts


def _even(n_layers: int, stages: int) -> list[int]:
    return list(_even_counts(n_layers, stages))


@functools.lru_cache(maxsize=1024)  # the planner's search asks the same split for thousands of layouts
def _even_counts(n_layers: int, stages: int) -> tuple[int, ...]:
    # The remainder goes to the middle stages: the first and last also carry the embedding
    # and the head + loss.
    base, extra = divmod(n_layers, stages)
    order = sorted(range(stages), key=lambda s: (s in (0, stages - 1), abs(s - (stages - 1) / 2)))
    counts = [base] * stages
    for s in order[:extra]:
        counts[s] += 1
    return tuple(counts)


def _balanced(cfg: ModelConfig, stages: int) -> list[int]:
    """Contiguous split minimising the sum of squared stage parameter counts (the embedding
    counted on the first stage, norm + head on the last), exactly, by dynamic programming.
    Squares rather than the maximum: with a large vocabulary the end stages bound the maximum
    whatever the middle does, and squares still spread the middle layers evenly."""
    n = cfg.n_layers
    per = count_params(cfg)
    layer, embed, head = per["per_layer"], per["embedding"], per["embedding"] + cfg.dim

    def cost(first: int, end: int, stage: int) -> int:  # layers [first, end) on `stage`
        return (end - first) * layer + (embed if stage == 0 else 0) + (head if stage == stages - 1 else 0)

    inf = float("inf")
    # best[s][i]: smallest sum of squared costs of stages 0..s-1 holding layers [0, i); cut: the last cut
    best = [[inf] * (n + 1) for _ in range(stages + 1)]
    cut = [[0] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = 0
    for s in range(1, stages + 1):
        for i in range(s, n - (stages - s) + 1):
            for j in range(s - 1, i):
                value = best[s - 1][j] + cost(j, i, s - 1) ** 2
                if value < best[s][i]:
                    best[s][i], cut[s][i] = value, j
    counts, i = [], n
    for s in range(stages, 0, -1):
        j = cut[s][i]
        counts.append(i - j)
        i = j
    return counts[::-1]


def plan_stage_layers(cfg: ModelConfig, stages: int, spec: str = "even") -> list[int]:
    """Layers per stage (stage order). spec: "even", "balanced" or explicit "4,4,3,5".
    Raises ConfigError (one line) for fewer layers than stages or counts that do not add up:
    a layer is never silently dropped."""
    if stages < 1:
        raise ConfigError(f"pipeline stages must be >= 1, got {stages}")
    if cfg.n_layers < stages:
        raise ConfigError(f"the model has {cfg.n_layers} layer(s), fewer than pp x virtual stages = {stages}")
    spec = spec.strip()
    if spec == "even":
        return _even(cfg.n_layers, stages)
    if spec == "balanced":
        return _balanced(cfg, stages)
    return _parse_explicit(spec, stages, cfg.n_layers)


def stage_layer_ranges(counts: list[int]) -> list[range]:
    """Global layer indices of each stage."""
    ranges, start = [], 0
    for c in counts:
        ranges.append(range(start, start + c))
        start += c
    return ranges


class StageChunk(nn.Module):
    """Forward of one pipeline stage over the rank's (pruned) model: tokens or hidden states
    in, hidden states or logits out. The model is referenced, not registered, so parameters
    keep their reference names and belong to the model alone; modules are looked up at call
    time, so transforms applied after the split (tensor parallelism) are picked up."""

    def __init__(self, model: nn.Module, stage: int, num_stages: int, layers: range):
        super().__init__()
        self._model = [model]  # a list: not a submodule
        self.stage, self.num_stages = stage, num_stages
        self.layer_keys = [str(i) for i in layers]
        self.is_first, self.is_last = stage == 0, stage == num_stages - 1

    @property
    def model(self) -> nn.Module:
        return self._model[0]

    def parameters_of_chunk(self) -> list[nn.Parameter]:
        m = self.model
        mods = [m.layers[k] for k in self.layer_keys]
        if self.is_first:
            mods.insert(0, m.embed_tokens)
        if self.is_last:
            mods += [m.norm, m.lm_head]
        return [p for mod in mods for p in mod.parameters() if p.requires_grad]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.run(x, self.layer_keys, embed=self.is_first, head=self.is_last)


def keep_local_stages(model: nn.Module, counts: list[int], pp: int, pp_rank: int,
                      virtual_stages: int = 1) -> list[StageChunk]:
    """Removes from `model` (in place) the layers, embedding, norm and head of stages other
    than this rank's, and returns this rank's chunks in chunk order."""
    num_stages = pp * virtual_stages
    if len(counts) != num_stages:
        raise ConfigError(f"layout has {len(counts)} stage(s); pp {pp} x virtual stages {virtual_stages} = {num_stages}")
    ranges = stage_layer_ranges(counts)
    local = [c * pp + pp_rank for c in range(virtual_stages)]
    keep = {str(i) for s in local for i in ranges[s]}
    for key in [k for k in model.layers.keys() if k not in keep]:
        del model.layers[key]
    if 0 not in local:
        model.embed_tokens = None
    if num_stages - 1 not in local:
        model.norm = None
        model.lm_head = None
    return [StageChunk(model, s, num_stages, ranges[s]) for s in local]
