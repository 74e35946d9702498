"""Each parallelism checks the settings it will be applied with, from the config alone,
before any process group exists (one ConfigError line each). The config module stays a leaf:
it checks fields and their ranges; what a layout needs of the model and the batch is here.

    from pyruntime.parallel.validate import validate
    cfg.validate(); validate(cfg)          # what the CLI and the Trainer do
"""
from __future__ import annotations

from pyruntime.config import Config, ConfigError, ModelConfig, ParallelConfig
from pyruntime.schema import check_value, one_of
from pyruntime.parallel.pipeline.schedule import schedule_names
from pyruntime.parallel.pipeline.split import plan_stage_layers
from pyruntime.parallel.recompute import check_recompute


def validate(cfg: Config) -> None:
    """Every parallelism's rules for `cfg` (whose fields Config.validate() has checked)."""
    # The schedules are the C++ generator's (one list of their names, csrc/core/schedule_gen.cpp).
    check_value("parallel.schedule", cfg.parallel.schedule, one_of(*schedule_names(), noun="pipeline schedule"))
    check_tensor_parallel(cfg)
    check_pipeline(cfg)
    check_recompute(cfg)
    check_nothing_ignored(cfg)


def check_nothing_ignored(cfg: Config) -> None:
    """A setting changed from its default that the layout would not use is refused, not
    silently dropped: a pipeline schedule or stage split without a pipeline (selective
    recompute's op set without selective recompute: recompute.recompute_misfit)."""
    par = cfg.parallel
    unused = pipeline_setting_unused(par.pp, par.schedule, par.pp_layout)
    if unused:
        raise ConfigError(unused)


def pipeline_setting_unused(pp: int, schedule: str, pp_layout: str) -> str | None:
    """Why a schedule or stage split other than the default is unused (pp 1), or None (the
    planner asks too)."""
    default = ParallelConfig()
    for flag, value, default_value in (("--schedule", schedule, default.schedule),
                                       ("--pp-layout", pp_layout, default.pp_layout)):
        if pp == 1 and value != default_value:
            return f"{flag} {value} needs --pp > 1: with pp 1 there is no pipeline (leave it at {default_value})"
    return None


# pp x micro-batches per step x virtual stages above which a schedule is refused: its action
# lists (built at start-up) and its simulation (the planner's memory and time) grow with it;
# 2^18 (16 x 16384) took 18 s to simulate on the 2-core CI host, 2^20 37 s and 1.4 GB, 2^24
# (16M micro-batches) minutes and 9 GB.
MAX_PIPELINE_CELLS = 1 << 18


def pipeline_too_long(pp: int, microbatches: int, virtual_stages: int) -> str | None:
    """Why a pipeline step of this many micro-batches is refused, or None (train, plan and
    the schedule command ask)."""
    cells = pp * microbatches * virtual_stages
    if pp > 1 and cells > MAX_PIPELINE_CELLS:
        return (f"pp x microbatches x virtual stages = {pp} x {microbatches} x {virtual_stages} = {cells} exceeds "
                f"{MAX_PIPELINE_CELLS}: simulating that schedule takes minutes and gigabytes")
    return None


def tp_misfit(model: ModelConfig, tp: int) -> str | None:
    """Why tp cannot shard the model (one line), or None: tensor parallelism splits attention
    by heads and KV heads and the MLP by hidden units (the planner asks too)."""
    for name, size in (("n_heads", model.n_heads), ("n_kv_heads", model.kv_heads), ("ffn_dim", model.ffn_dim)):
        if size % tp:
            return f"tp {tp} does not divide model.{name} {size}"
    return None


def check_tp_divides(model: ModelConfig, tp: int) -> None:
    misfit = tp_misfit(model, tp)
    if misfit:
        raise ConfigError(misfit)


def check_tensor_parallel(cfg: Config) -> None:
    par = cfg.parallel
    check_tp_divides(cfg.model, par.tp)
    if (par.sequence_parallel or par.tp_overlap) and par.tp == 1:
        raise ConfigError("sequence parallelism / tp overlap need tp > 1")
    if par.sequence_parallel and cfg.data.seq_len % par.tp:
        raise ConfigError(f"sequence parallelism: seq_len {cfg.data.seq_len} is not divisible by tp {par.tp}")


def check_pipeline(cfg: Config) -> None:
    par, data = cfg.parallel, cfg.data
    if par.pp == 1:
        return
    plan_stage_layers(cfg.model, par.pp * par.virtual_stages, par.pp_layout)  # raises on a bad split
    m = data.global_batch // (par.dp * data.micro_batch)
    if par.schedule in ("1f1b", "zb", "interleaved") and m < par.pp:
        raise ConfigError(f"schedule {par.schedule} needs at least pp = {par.pp} micro-batches per step, got {m} "
                          f"(global batch {data.global_batch} / (dp {par.dp} x micro-batch {data.micro_batch}))")
    if par.schedule == "interleaved" and m % par.pp:
        raise ConfigError(f"schedule interleaved needs micro-batches ({m}) divisible by pp {par.pp}")
    too_long = pipeline_too_long(par.pp, m, par.virtual_stages)
    if too_long:
        raise ConfigError(f"{too_long}; give fewer, larger micro-batches (--micro-batch) or more dp ranks")
