"""Configuration: one dataclass per concern, every field documented.

The CLI flags, a JSON/TOML `--config FILE` and the Python API all fill these same objects;
`Config.validate()` checks everything that can be checked from the config alone, before any
process group exists, so bad input fails with one line (ConfigError) instead of a hang or a
traceback. The layout's own rules (tp divides the heads, pp splits the layers, ...) are the
parallelisms' to check: `pyruntime.parallel.validate(cfg)`; this module imports nothing of
the code it configures (only the stdlib-only schema).

Adding a field: annotate it and write its docstring; its type is then checked (schema.py),
whatever fills it. A range or an enum is one keyword in the class's `@section(...)` line,
e.g. `ffn_dim=POSITIVE` or `rope_scaling=one_of("linear", "llama3")` (None always passes for
`X | None` fields); relations between fields go into the class's `validate()`.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from pyruntime.schema import ConfigError, at_least, between, each, from_table, greater_than, one_of, section

POSITIVE, NON_NEGATIVE = at_least(1), at_least(0)  # for ints
RECOMPUTE_MODES = ("none", "selective", "full")  # parallel/recompute.py
KERNEL_BACKENDS = ("auto", "triton", "cpp", "reference")  # ops/dispatch.py dispatches over these


@section("model", vocab_size=POSITIVE, dim=POSITIVE, n_layers=POSITIVE, n_heads=POSITIVE, n_kv_heads=POSITIVE,
         ffn_dim=POSITIVE, max_seq_len=POSITIVE, rope_theta=greater_than(0), norm_eps=greater_than(0),
         kernels=one_of(*KERNEL_BACKENDS, noun="kernel backend"), head_size=POSITIVE,
         rope_scaling=one_of("linear", "llama3", noun="rope scaling"), rope_factor=greater_than(0),
         rope_low_freq_factor=greater_than(0), rope_original_max_seq_len=POSITIVE, sliding_window=POSITIVE)
@dataclass(kw_only=True)
class ModelConfig:
    """Shape of the Llama-style decoder (pyruntime/model/llama.py)."""

    vocab_size: int = 256
    """Vocabulary size; 256 for the byte tokenizer."""
    dim: int = 128
    """Hidden size."""
    n_layers: int = 4
    """Number of transformer blocks."""
    n_heads: int = 4
    """Attention (query) heads; dim must be divisible by it."""
    n_kv_heads: int | None = None
    """Key/value heads for grouped-query attention; None means n_heads (plain multi-head)."""
    ffn_dim: int = 352
    """Hidden size of the SwiGLU MLP."""
    max_seq_len: int = 2048
    """Longest sequence the rotary tables are built for."""
    rope_theta: float = 10000.0
    """Rotary embedding base."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    kernels: str = "auto"
    """Kernel backend for the model's ops (ops/dispatch.py): auto picks the fastest available."""
    head_size: int | None = None
    """Width of one attention head (Hugging Face's head_dim); None means dim // n_heads."""
    rope_scaling: str | None = None
    """Rotary frequency scaling: None, "linear" (positions / rope_factor) or "llama3" (Llama 3.1's
    long-context rule, by wavelength: model/llama.py rope_frequencies)."""
    rope_factor: float = 1.0
    """Scaling factor of rope_scaling."""
    rope_low_freq_factor: float = 1.0
    """llama3 scaling: wavelengths above original_max / this are divided by rope_factor."""
    rope_high_freq_factor: float = 4.0
    """llama3 scaling: wavelengths below original_max / this are kept; between, interpolated."""
    rope_original_max_seq_len: int = 8192
    """llama3 scaling: the context length the model was pre-trained with."""
    qkv_bias: bool = False
    """Biases on the q, k and v projections (Qwen2; Llama's attention_bias)."""
    o_bias: bool = False
    """Bias on the attention output projection (Llama's attention_bias)."""
    mlp_bias: bool = False
    """Biases on the gate, up and down projections (Llama's mlp_bias)."""
    tie_embeddings: bool = False
    """The LM head is the embedding matrix: one parameter (Llama 3.2 1B/3B, small Qwen2)."""
    sliding_window: int | None = None
    """Each token attends to at most this many tokens, itself included (Mistral); None: all."""

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def head_dim(self) -> int:
        return self.head_size if self.head_size is not None else self.dim // self.n_heads

    def validate(self) -> None:
        if self.head_size is None and self.dim % self.n_heads:
            raise ConfigError(f"model.dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if self.rope_scaling == "llama3" and not self.rope_high_freq_factor > self.rope_low_freq_factor > 0:
            raise ConfigError(f"model.rope_high_freq_factor {self.rope_high_freq_factor} must exceed "
                              f"rope_low_freq_factor {self.rope_low_freq_factor} > 0")
        if self.head_dim % 2:
            raise ConfigError(f"head dim {self.head_dim} must be even for rotary embeddings")
        if self.kv_heads < 1 or self.n_heads % self.kv_heads:
            raise ConfigError(f"n_heads {self.n_heads} is not divisible by n_kv_heads {self.kv_heads}")


def _preset(dim, n_layers, n_heads, n_kv_heads, ffn_dim, vocab_size=256, max_seq_len=2048):
    return ModelConfig(dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads,
                       ffn_dim=ffn_dim, vocab_size=vocab_size, max_seq_len=max_seq_len)


# tiny/small train on a CPU; the large shapes are Llama's, for planning and GPU runs (they are
# built on the meta device on CPU, never materialised).
PRESETS: dict[str, ModelConfig] = {
    "tiny": _preset(128, 4, 4, 2, 352),
    "small": _preset(256, 8, 8, 4, 688),
    "1b": _preset(2048, 16, 32, 8, 8192, vocab_size=128256, max_seq_len=8192),
    "7b": _preset(4096, 32, 32, 32, 11008, vocab_size=32000, max_seq_len=4096),
    "13b": _preset(5120, 40, 40, 40, 13824, vocab_size=32000, max_seq_len=4096),
    "70b": _preset(8192, 80, 64, 8, 28672, vocab_size=128256, max_seq_len=8192),
}


# Bounds that only catch typos: 2**24 sequences per step is far past any real run (the sampler
# holds a step's row numbers at once), and an optimizer scalar must fit a float32.
MAX_GLOBAL_BATCH, FLOAT32_MAX = 2**24, 3.4e38


@section("data", seq_len=POSITIVE, global_batch=between(1, MAX_GLOBAL_BATCH), micro_batch=POSITIVE, max_bytes=POSITIVE,
         val_fraction=between(0, 1, low_open=True, high_open=True))
@dataclass(kw_only=True)
class DataConfig:
    """Where tokens come from and how each step's global batch is cut."""

    path: str | None = None
    """None: the embedded corpus (Python stdlib sources). A .bin/.u16 file: pre-tokenized uint16
    tokens (memory-mapped). Anything else: a UTF-8 text file, byte-tokenized."""
    seq_len: int = 128
    """Tokens per sequence."""
    global_batch: int = 16
    """Sequences per optimizer step, summed over all data-parallel ranks (layout-independent)."""
    micro_batch: int = 8
    """Sequences per forward/backward on one rank; gradients accumulate over micro-batches. The
    CLI's default, when neither a flag nor the file gives it: the largest divisor of
    global_batch / dp up to 8 that leaves >= pp micro-batches (default_micro_batch)."""
    val_fraction: float = 0.05
    """Share of the corpus held out for validation."""
    max_bytes: int = 4_000_000
    """Cap on the embedded corpus size (keeps start-up fast)."""

    def validate(self) -> None:
        from pyruntime.data.corpus import unreadable_data

        refused = None if self.path is None else unreadable_data(Path(self.path))
        if refused:
            raise ConfigError(refused)


def default_micro_batch(global_batch: int, dp: int, pp: int = 1) -> int:
    """The micro-batch when none is given: the largest divisor of a dp rank's share of the
    global batch (global_batch / dp) up to 8, so `--dp 4 --global-batch 16` runs as 4 ranks x
    1 micro-batch of 4 instead of failing on a fixed 8. With a pipeline, the largest that
    still gives every stage work: at least pp micro-batches, a multiple of pp where one is
    (what 1f1b / zb / interleaved need), so `--pp 2 --global-batch 8` runs 2 micro-batches
    of 4, not 1 of 8. That share must be whole (validate())."""
    per_rank = max(global_batch // max(dp, 1), 1)
    sizes = [m for m in range(min(8, per_rank), 0, -1) if per_rank % m == 0]  # largest first
    for fits in (lambda n: n >= pp and n % pp == 0, lambda n: n >= pp):
        for m in sizes:
            if fits(per_rank // m):
                return m
    return 1


@section("optim", lr=between(0, FLOAT32_MAX, low_open=True), min_lr_ratio=between(0, 1), warmup_steps=NON_NEGATIVE,
         weight_decay=between(0, FLOAT32_MAX), betas=each(between(0, 1, high_open=True)),
         eps=between(0, FLOAT32_MAX, low_open=True),
         grad_clip=at_least(0), offload=one_of("none", "optimizer", noun="offload target"))
@dataclass(kw_only=True)
class OptimConfig:
    """AdamW with linear warm-up then cosine decay, and global-norm gradient clipping."""

    lr: float = 3e-3
    """Peak learning rate."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of lr (end of the cosine)."""
    warmup_steps: int = 20
    """Linear warm-up steps from 0 to lr."""
    weight_decay: float = 0.1
    """Decoupled weight decay, applied to matrices only (not norms)."""
    betas: tuple[float, float] = (0.9, 0.95)
    """Adam betas."""
    eps: float = 1e-8
    """Adam epsilon."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this; 0 disables clipping."""
    offload: str = "none"
    """none, or optimizer: fp32 moments (and on an accelerator the master weights' step) in host
    memory, updated by the C++ host AdamW (csrc/adamw_cpu.cpp); each rank offloads only its
    ZeRO shard (parallel/offload.py, zero/sharded.py)."""


@section("parallel", dp=POSITIVE, pp=POSITIVE, tp=POSITIVE, zero=one_of(0, 1, 2, 3), bucket_mb=greater_than(0),
         virtual_stages=POSITIVE,
         recompute=one_of(*RECOMPUTE_MODES, noun="recompute mode"), recompute_layers=POSITIVE)
@dataclass(kw_only=True)
class ParallelConfig:
    """The layout: dp x pp x tp = world size (pyruntime/mesh.py)."""

    dp: int = 1
    """Data-parallel ranks (the CLI's default: world size / (pp x tp))."""
    pp: int = 1
    """Pipeline stages."""
    tp: int = 1
    """Tensor-parallel ranks."""
    sequence_parallel: bool = False
    """With tp: norms and residuals run on sequence shards (B, T/tp, C); an all-gather along
    the sequence precedes each column-parallel GEMM and a reduce-scatter follows each
    row-parallel one (instead of all-reduces). Needs tp > 1 and seq_len divisible by tp."""
    tp_overlap: bool = False
    """With sequence_parallel: cut those all-gathers / reduce-scatters into chunks overlapped
    with the GEMMs (comm/overlap.py). Without sequence_parallel it is refused with a warning."""
    zero: int = 0
    """ZeRO stage over the dp ranks: 0 plain data parallelism (bucketed all-reduce), 1 optimizer
    states sharded, 2 also gradients, 3 also parameters (fully sharded, gathered per block).
    Does nothing with dp = 1."""
    bucket_mb: float = 25.0
    """Gradient bucket size in MB (2^20 bytes) for stages 0-2: each bucket's all-reduce or
    reduce-scatter starts as soon as its last gradient is ready in backward."""
    schedule: str = "1f1b"
    """Pipeline schedule with pp > 1: naive (model parallelism, one micro-batch at a time),
    gpipe, 1f1b, interleaved (needs virtual_stages >= 2), zb (zero bubble, ZB-H1)."""
    virtual_stages: int = 1
    """Model chunks per pipeline rank (interleaved 1F1B); chunk c of rank r is stage c*pp + r."""
    pp_layout: str = "even"
    """How layers split over the pp * virtual_stages stages: "even", "balanced" (by parameter
    count, embedding on the first stage and head on the last), or explicit counts "4,4,3,5"
    (one per stage, >= 1 each, summing to the model's layers)."""
    mesh_order: str = "dp,pp,tp"
    """Axis order of the rank grid, outermost first: the last axis has adjacent ranks (keep
    tp last so tp traffic stays inside a node)."""
    recompute: str = "none"
    """Activation recomputation (parallel/recompute.py): none, selective (norm outputs, the
    SwiGLU activation and grouped-KV repeats are recomputed in backward, GEMM and attention
    outputs kept) or full (each block keeps only its input and reruns its forward in
    backward)."""
    recompute_layers: int | None = None
    """With recompute: only the first K blocks of each pipeline stage (Megatron's "block"
    method; under interleaved each virtual stage, a rank's chunk, counts as a stage); None:
    every block. At most the smallest stage's layer count."""
    recompute_ops: str = "norm,swiglu,kv_repeat"
    """With --recompute selective: which ops' outputs are dropped and recomputed in backward,
    comma-separated: norm (the RMSNorm outputs the q/k/v and gate/up GEMMs save), swiglu (the
    activation the down projection saves), kv_repeat (with grouped KV heads: the repeated k
    and v attention saves). `bench recompute` measures each set."""

    def validate(self) -> None:
        if self.schedule == "interleaved" and self.pp > 1 and self.virtual_stages < 2:
            raise ConfigError(f"schedule interleaved needs virtual_stages >= 2, got {self.virtual_stages}")
        if self.schedule != "interleaved" and self.virtual_stages != 1:
            raise ConfigError(f"virtual_stages {self.virtual_stages} needs schedule interleaved, got {self.schedule}")
        if sorted(self.mesh_order.replace(" ", "").split(",")) != ["dp", "pp", "tp"]:
            raise ConfigError(f"parallel.mesh_order must order dp, pp and tp, e.g. 'dp,pp,tp'; got '{self.mesh_order}'")


@section("train", preset=one_of(*PRESETS, noun="preset"), steps=POSITIVE, seed=between(0, 2**63 - 1),
         eval_every=NON_NEGATIVE, eval_batches=NON_NEGATIVE, log_every=POSITIVE, save_every=NON_NEGATIVE,
         peer_timeout_s=between(0, 86400, low_open=True), export_shard_mb=at_least(1e-6),
         export_dtype=one_of("float32", "bfloat16", "float16", noun="export dtype"))
@dataclass(kw_only=True)
class TrainConfig:
    """The run itself."""

    preset: str = "tiny"
    """Model preset (PRESETS); the `model` section overrides its fields."""
    steps: int = 300
    """Optimizer steps."""
    seed: int = 1234
    """Seeds weights, data order and dropout-free RNG state; the layout never changes them."""
    eval_every: int = 50
    """Validation loss every N steps (0 disables; always at the last step when > 0)."""
    eval_batches: int = 4
    """Validation batches (of global_batch sequences) per evaluation."""
    out: str = "runs/latest"
    """Output directory: metrics, loss curve."""
    metrics: str | None = None
    """JSON-lines metrics file; default <out>/metrics.jsonl."""
    log_every: int = 1
    """Print one log line every N steps."""
    quiet: bool = False
    """No console output and no loss-curve picture; metrics.jsonl is still written."""
    plan_check: bool = True
    """On CUDA, refuse before any process group a layout the planner (pyruntime/plan) predicts
    will not fit the GPU's memory; False (--no-plan-check) runs it anyway."""
    save_every: int = 0
    """Write a checkpoint to <out>/checkpoints every N steps (0: never; always at the end when > 0)."""
    resume: str | None = None
    """Continue from a checkpoint: a step_N directory, a checkpoints/ folder (its latest), a
    run's --out directory, or auto (OUT/checkpoints' latest if there is one, else a fresh start)."""
    timeline: str | None = None
    """With pp > 1: record every pipeline action's start/end and write <timeline>/pipeline.png
    and pipeline.json (Chrome trace) after the last step."""
    peer_timeout_s: float = 60.0
    """A rank whose heartbeat stops for this long is reported lost (by rank) and every other
    rank exits non-zero, instead of waiting in a collective forever."""
    init_from: str | None = None
    """A Hugging Face model directory (config.json + safetensors, sharded or not) to start from:
    the model section comes from its config.json and every rank reads just its slices of the
    weights (pyruntime/hf/load.py)."""
    export_hf: str | None = None
    """After the last step, write the weights as a Hugging Face directory here (hf/export.py)."""
    export_dtype: str = "float32"
    """dtype of the exported weights: float32, bfloat16 or float16."""
    export_shard_mb: float = 5000.0
    """Largest safetensors shard of an export, in MB (10^6 bytes; transformers' default 5 GB)."""

    def validate(self) -> None:
        if self.eval_every and not self.eval_batches:
            raise ConfigError(f"train.eval_batches must be >= 1 when eval_every is {self.eval_every} "
                              "(or set eval_every 0: no validation)")


@dataclass(kw_only=True)
class Config:
    """Everything one training run needs."""

    train: TrainConfig = field(default_factory=TrainConfig)
    model: ModelConfig = field(default_factory=lambda: dataclasses.replace(PRESETS["tiny"]))
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def validate(self) -> None:
        """Every section's fields (types, ranges) and the relations between sections that do
        not depend on a parallelism; those are pyruntime.parallel.validate(cfg)'s."""
        for name, cls in SECTIONS.items():
            part = getattr(self, name)
            if not isinstance(part, cls):
                raise ConfigError(f"config section '{name}' must be a {cls.__name__}, got {type(part).__name__}")
            part.validate()
        per_step = self.parallel.dp * self.data.micro_batch
        if self.data.global_batch % per_step:
            raise ConfigError(
                f"global batch {self.data.global_batch} does not divide into "
                f"dp {self.parallel.dp} x micro-batch {self.data.micro_batch}")
        if self.data.seq_len > self.model.max_seq_len:
            raise ConfigError(f"seq_len {self.data.seq_len} exceeds model.max_seq_len {self.model.max_seq_len}")

    @property
    def metrics_path(self) -> Path:
        return Path(self.train.metrics) if self.train.metrics else Path(self.train.out) / "metrics.jsonl"


SECTIONS = {"train": TrainConfig, "model": ModelConfig, "data": DataConfig,
            "optim": OptimConfig, "parallel": ParallelConfig}


def config_from_dict(raw: dict) -> Config:
    """Nested dict (sections as in SECTIONS) -> Config. Unknown sections or keys and values of
    the wrong type are one-line ConfigErrors naming the key; ranges are Config.validate()'s."""
    if not isinstance(raw, dict):
        raise ConfigError(f"a config must be a table of sections ({', '.join(SECTIONS)}), "
                          f"got a {type(raw).__name__}")
    unknown = set(raw) - set(SECTIONS)
    if {"architectures", "model_type"} & unknown:  # a common mix-up, else two dozen "unknown sections"
        raise ConfigError("this is a Hugging Face config.json, not a pyruntime config (sections "
                          f"{', '.join(SECTIONS)}): pass its directory to train --init-from, or the file to "
                          "plan --hf-config")
    if unknown:
        raise ConfigError(f"unknown config section(s): {', '.join(sorted(unknown))}; "
                          f"allowed: {', '.join(SECTIONS)}")
    train = from_table(TrainConfig, raw.get("train", {}), "train")
    train.validate()  # the preset must be known before its model is looked up
    model = raw.get("model", {})
    if isinstance(model, dict):  # otherwise from_table names the bad section
        model = {**dataclasses.asdict(PRESETS[train.preset]), **model}
    return Config(train=train, model=from_table(ModelConfig, model, "model"),
                  data=from_table(DataConfig, raw.get("data", {}), "data"),
                  optim=from_table(OptimConfig, raw.get("optim", {}), "optim"),
                  parallel=from_table(ParallelConfig, raw.get("parallel", {}), "parallel"))


def load_config_file(path: str) -> dict:
    """Read a JSON or TOML (by the .toml suffix) config file into a nested dict; a missing,
    unreadable, non-UTF-8 or malformed file is one ConfigError naming it."""
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"config file {path} is a directory; expected a .json or .toml file")
    if not p.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        text = p.read_bytes().decode("utf-8-sig")  # a UTF-8 byte-order mark is harmless
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {e.object[e.start]:#04x} at offset "
                          f"{e.start}); save it as UTF-8") from None
    kind = "TOML" if p.suffix == ".toml" else "JSON"
    try:
        if kind == "TOML":
            import tomllib
            raw = tomllib.loads(text)
        else:
            raw = json.loads(text)
    except ValueError as e:  # JSONDecodeError and TOMLDecodeError both derive from it
        hint = "" if p.suffix in (".json", ".toml") else " (a config file is JSON, or TOML when named *.toml)"
        raise ConfigError(f"cannot parse config file {path} as {kind}{hint}: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path}: the top level must be a table/object of sections "
                          f"({', '.join(SECTIONS)}), got a {type(raw).__name__}")
    return raw
