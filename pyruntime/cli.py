"""Command line: `python -m pyruntime train|demo ...` (and under torchrun for many ranks).

Bad input exits with code 2 and one line naming the problem, before any process group is
created, so no rank is left waiting in a collective.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import shlex
import sys
import time
from pathlib import Path

from pyruntime.config import (SECTIONS, Config, ConfigError, TrainConfig, config_from_dict, default_micro_batch,
                              load_config_file)
from pyruntime.data import DataError
from pyruntime.data.tokenize import TokenizeError, add_tokenize_parser, run_tokenize
from pyruntime.generate import add_generate_parser, run_generate
from pyruntime.hf.cli import add_export_parser, model_from_init_dir, run_export
from pyruntime.schema import field_help, flag_type
from pyruntime.train.ckpt_dirs import CheckpointError
from pyruntime.train.faults import IOFault, describe_os_error, os_cause
from pyruntime.mesh import ParallelDims
from pyruntime.parallel.validate import pipeline_too_long, validate as validate_parallel

# flag -> (section, field); its type is the field's annotation and its help the field's docstring
# (schema.flag_type, schema.field_help): a setting is explained once, in config.py.
TRAIN_FLAGS = {
    "--preset": ("train", "preset"),
    "--steps": ("train", "steps"),
    "--seed": ("train", "seed"),
    "--out": ("train", "out"),
    "--metrics": ("train", "metrics"),
    "--eval-every": ("train", "eval_every"),
    "--eval-batches": ("train", "eval_batches"),
    "--log-every": ("train", "log_every"),
    "--global-batch": ("data", "global_batch"),
    "--micro-batch": ("data", "micro_batch"),
    "--seq-len": ("data", "seq_len"),
    "--data": ("data", "path"),
    "--lr": ("optim", "lr"),
    "--warmup": ("optim", "warmup_steps"),
    "--grad-clip": ("optim", "grad_clip"),
    "--kernels": ("model", "kernels"),
    "--dp": ("parallel", "dp"),
    "--pp": ("parallel", "pp"),
    "--tp": ("parallel", "tp"),
    "--zero": ("parallel", "zero"),
    "--bucket-mb": ("parallel", "bucket_mb"),
    "--schedule": ("parallel", "schedule"),
    "--virtual-stages": ("parallel", "virtual_stages"),
    "--pp-layout": ("parallel", "pp_layout"),
    "--mesh-order": ("parallel", "mesh_order"),
    "--recompute": ("parallel", "recompute"),
    "--recompute-layers": ("parallel", "recompute_layers"),
    "--recompute-ops": ("parallel", "recompute_ops"),
    "--offload": ("optim", "offload"),
    "--timeline": ("train", "timeline"),
    "--save-every": ("train", "save_every"),
    "--resume": ("train", "resume"),
    "--peer-timeout": ("train", "peer_timeout_s"),
    "--init-from": ("train", "init_from"),
    "--export-hf": ("train", "export_hf"),
    "--export-dtype": ("train", "export_dtype"),
    "--export-shard-mb": ("train", "export_shard_mb"),
}

class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse prints usage + message; we want one line
        raise ConfigError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="pyruntime", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    train = sub.add_parser("train", help="train a model")
    train.add_argument("--config", help="JSON or TOML file with [train]/[model]/[data]/[optim]/[parallel]")
    train.add_argument("--quiet", action="store_true", help=field_help(TrainConfig, "quiet"))
    train.add_argument("--no-plan-check", action="store_true",
                       help="on CUDA, run even a layout the planner predicts will not fit the GPU's memory")
    train.add_argument("--sp", action="store_true", help="sequence parallelism (needs --tp > 1)")
    train.add_argument("--tp-overlap", action="store_true",
                       help="overlap the sequence-parallel collectives with the GEMMs (needs --sp)")
    train.add_argument("--microbatches", type=int, default=None,
                       help="micro-batches per step per dp rank (sets the micro-batch size)")
    for flag, (section, name) in TRAIN_FLAGS.items():
        cls = SECTIONS[section]
        train.add_argument(flag, type=flag_type(cls, name), default=None, help=field_help(cls, name))
    sched = sub.add_parser("schedule", help="draw a planned pipeline schedule (no training)")
    sched.add_argument("--pp", type=int, required=True, help="pipeline ranks")
    sched.add_argument("--microbatches", type=int, required=True, help="micro-batches per step")
    sched.add_argument("--schedule", default="1f1b", help="naive, gpipe, 1f1b, interleaved, zb")
    sched.add_argument("--virtual-stages", type=int, default=1, help="chunks per rank (interleaved)")
    sched.add_argument("--png", help="write the Gantt chart here")
    sched.add_argument("--trace", help="write a Chrome trace (Perfetto) here")
    # add_help=False: `bench --help` and `bench SUITE --help` reach the suite runner (pyruntime/bench/)
    bench = sub.add_parser("bench", add_help=False, help="microbenchmarks side by side with PyTorch "
                           "(`bench --help` lists the suites)")
    bench.add_argument("bench_args", nargs=argparse.REMAINDER)
    add_export_parser(sub)
    add_tokenize_parser(sub)
    add_generate_parser(sub)
    from pyruntime.plan.cli import add_arguments as add_plan_arguments
    add_plan_arguments(sub.add_parser("plan", help="predict memory and step time of a layout, or --search "
                                      "the fastest that fits (pyruntime/plan/)"))
    demo = sub.add_parser("demo", help="train the tiny preset on the embedded corpus")
    demo.add_argument("--steps", type=int, default=200, help="optimizer steps (default 200)")
    demo.add_argument("--out", default="runs/demo", help="run directory: metrics, loss curve, checkpoints "
                      "(default runs/demo)")
    return parser


def config_from_args(args: argparse.Namespace, world_size: int) -> Config:
    """Defaults < --config file < flags; then the layout is completed and validated."""
    raw = load_config_file(args.config) if args.config else {}
    for name, section in raw.items():  # flags are merged into the sections below
        if name in SECTIONS and not isinstance(section, dict):
            raise ConfigError(f"config section '{name}' must be a table/object, got {section!r}")
    raw = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    for flag, (section, name) in TRAIN_FLAGS.items():
        value = getattr(args, flag.lstrip("-").replace("-", "_"))
        if value is not None:
            raw.setdefault(section, {})[name] = value
    if args.quiet:
        raw.setdefault("train", {})["quiet"] = True
    if args.no_plan_check:
        raw.setdefault("train", {})["plan_check"] = False
    if args.sp:
        raw.setdefault("parallel", {})["sequence_parallel"] = True
    if args.tp_overlap:
        raw.setdefault("parallel", {})["tp_overlap"] = True
    raw = model_from_init_dir(raw)  # --init-from: the model section is the directory's
    cfg = config_from_dict(raw)
    cfg.parallel.validate()  # sizes first: the arithmetic below divides by them
    cfg.data.validate()
    par = cfg.parallel
    if "dp" not in raw.get("parallel", {}) and par.pp >= 1 and par.tp >= 1:
        if world_size % (par.pp * par.tp) == 0:
            par = dataclasses.replace(par, dp=world_size // (par.pp * par.tp))
            cfg = dataclasses.replace(cfg, parallel=par)
    if args.microbatches is None and "micro_batch" not in raw.get("data", {}):
        mb = default_micro_batch(cfg.data.global_batch, par.dp, par.pp)
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, micro_batch=mb))
    if args.microbatches is not None:  # micro-batches per step per dp rank -> micro-batch size
        if args.micro_batch is not None:
            raise ConfigError(f"--microbatches {args.microbatches} and --micro-batch {args.micro_batch} both set "
                              "the micro-batch size; give one of them")
        per_rank, m = cfg.data.global_batch // max(par.dp, 1), args.microbatches
        if m < 1 or cfg.data.global_batch % par.dp or per_rank % m:
            raise ConfigError(f"--microbatches {m}: global batch {cfg.data.global_batch} does not divide into "
                              f"dp {par.dp} x {m} micro-batches")
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, micro_batch=per_rank // m))
    cfg.validate()
    validate_parallel(cfg)  # each parallelism's rules (tp divides the heads, pp splits the layers, ...)
    ParallelDims.from_config(cfg.parallel, world_size)  # raises if the layout does not fit the world
    return cfg


def run_train(args: argparse.Namespace) -> int:
    import torch.distributed as dist

    from pyruntime.comm.watchdog import watch_peers
    from pyruntime.mesh import Launch, default_device, init_distributed
    from pyruntime.train.trainer import Trainer, open_corpus

    from pyruntime.train.preflight import check_run

    launch = Launch.from_env()
    cfg = config_from_args(args, launch.world_size)
    check_outputs(cfg, quiet=cfg.train.quiet or launch.rank != 0)
    dims = ParallelDims.from_config(cfg.parallel, launch.world_size)
    device = default_device(launch)
    cfg = check_run(cfg, device)  # paths, kernels, the checkpoint to resume from
    corpus = open_corpus(cfg)  # data errors surface here, before any collective
    init_distributed(launch, device)
    try:
        dims.build_mesh(device.type)
        # A peer that dies mid-step must not leave this rank waiting forever in a collective.
        with watch_peers(launch.rank, launch.world_size, cfg.train.peer_timeout_s, dims.coords,
                         describe_error=user_error):
            Trainer(cfg, dims, device, rank=launch.rank, corpus=corpus).fit()
    finally:
        dist.destroy_process_group()
    return 0


def run_demo(args: argparse.Namespace) -> int:
    """The richest layout: dp 2 x pp 2 x tp 2 = 8 CPU processes on gloo, launched through
    torchrun: ZeRO-1 over dp, a 1F1B pipeline of 4 micro-batches over pp, tensor + sequence
    parallelism over tp. Prints the layout and per-rank memory, the falling loss, and writes
    the measured pipeline timeline and the loss curve into --out."""
    import subprocess

    train = ["train", "--preset", "tiny", "--steps", str(args.steps), "--out", args.out,
             "--dp", "2", "--pp", "2", "--tp", "2", "--sp", "--zero", "1", "--schedule", "1f1b",
             "--microbatches", "4", "--eval-every", "50", "--log-every", "10", "--timeline", args.out]
    # Checked here, once, with the checks each of the 8 (CPU) ranks runs: a bad --steps or
    # --out is one line, not eight lines and torchrun's report.
    import torch

    from pyruntime.train.preflight import check_run

    cfg = config_from_args(build_parser().parse_args(train), 8)
    check_run(cfg, torch.device("cpu"))
    check_outputs(cfg, quiet=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "8", "-m", "pyruntime", *train]
    # Quoted so the line pastes back into a shell as it is (paths with spaces included).
    print("demo: OMP_NUM_THREADS=1 " + shlex.join(cmd), flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.call(cmd, env=env)


def run_schedule(args: argparse.Namespace) -> int:
    """Simulate a named schedule with unit costs; print bubbles and write the pictures."""
    from pyruntime.parallel.pipeline.timeline import plan_and_draw

    if args.png:
        require_matplotlib("schedule --png")
    for flag, path in (("--png", args.png), ("--trace", args.trace)):
        if path and Path(path).is_dir():  # matplotlib would write DIR.png beside it instead
            raise ConfigError(f"schedule {flag} {path} is a directory; give a file name")
    too_long = pipeline_too_long(args.pp, args.microbatches, args.virtual_stages)
    if min(args.pp, args.microbatches, args.virtual_stages) >= 1 and too_long:
        raise ConfigError(f"schedule: {too_long}")
    started = time.time()
    try:
        res = plan_and_draw(args.schedule, args.pp, args.microbatches, args.virtual_stages,
                            png=args.png, trace=args.trace)
    except ValueError as e:  # the C++ generator/validator names what does not fit
        raise ConfigError(str(e)) from None
    except OSError as e:  # a full or read-only disk: no half-written picture or trace stays
        outputs = [Path(p) for p in (args.png, args.trace) if p]
        for path in outputs:
            if path.is_file() and path.stat().st_mtime >= started - 1:
                path.unlink()
        raise IOFault(f"schedule: cannot write {' / '.join(map(str, outputs))}: {os_cause(e) or e}") from None
    print(f"{args.schedule}: pp {args.pp}, {args.microbatches} micro-batches, v {args.virtual_stages} | "
          f"makespan {res.makespan:g} | bubble per rank "
          + " ".join(f"{b:.3f}" for b in res.bubble_fractions)
          + f" | peak live activations {list(res.peak_activations)}")
    for path in (args.png, args.trace):
        if path:
            print(f"wrote {path}")
    return 0


def require_matplotlib(what: str) -> None:
    """matplotlib is the optional "plots" extra: a run that asks for a picture checks for it
    before any work (find_spec imports nothing), never after training."""
    if importlib.util.find_spec("matplotlib") is None:
        raise ConfigError(f'{what} needs matplotlib, which is not installed: pip install "pyruntime[plots]" '
                          "(or pip install matplotlib)")


def check_outputs(cfg: Config, quiet: bool) -> None:
    """Before training: --timeline needs matplotlib and a writable directory; the loss curve is
    only skipped without matplotlib (said once, here, not discovered after the last step)."""
    if cfg.train.timeline:
        if cfg.parallel.pp < 2:
            raise ConfigError(f"--timeline draws the measured pipeline schedule: it needs --pp >= 2, got pp "
                              f"{cfg.parallel.pp}")
        require_matplotlib("--timeline")
        from pyruntime.train.preflight import writable_dir

        writable_dir(Path(cfg.train.timeline), "timeline directory (--timeline)")
    if not quiet and importlib.util.find_spec("matplotlib") is None:
        print(f'pyruntime: matplotlib is not installed, so {Path(cfg.train.out) / "loss.png"} will not be '
              'written (pip install "pyruntime[plots]")', file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:  # the suites parse their own options, --help included
        from pyruntime.bench import run
        return run(argv[1:])
    try:
        args = build_parser().parse_args(argv)
        if args.command == "train":
            return run_train(args)
        if args.command == "demo":
            return run_demo(args)
        if args.command == "schedule":
            return run_schedule(args)
        if args.command == "export":
            return run_export(args)
        if args.command == "tokenize":
            return run_tokenize(args)
        if args.command == "generate":
            return run_generate(args)
        if args.command == "plan":
            from pyruntime.plan.cli import run as run_plan
            return run_plan(args)
        if args.command == "bench":
            from pyruntime.bench import run
            return run(args.bench_args)
    except USER_ERRORS + (OSError,) as e:
        print(f"pyruntime: error: {user_error(e)[1]}", file=sys.stderr)
        return 2
    return 1


# Errors that are the user's to fix (bad input, a full disk): one line, exit 2, on every rank
# (the watchdog gives the line to the peers of the rank that raised it).
USER_ERRORS = (ConfigError, DataError, CheckpointError, IOFault, TokenizeError)


def user_error(e: BaseException) -> tuple[int, str] | None:
    """(exit code, one line) for a user-facing error, None for anything else (a bug)."""
    if isinstance(e, USER_ERRORS):
        return 2, " ".join(str(e).split())
    if isinstance(e, OSError):  # a file operation no `writing` block named: its path and cause
        return 2, describe_os_error(e)
    return None


if __name__ == "__main__":
    sys.exit(main())
