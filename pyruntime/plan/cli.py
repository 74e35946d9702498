"""`python -m pyruntime plan`: the planner's command line (pyruntime/cli.py adds the
subcommand; its flags and output live here).

    plan --preset 7b --seq-len 4096 --global-batch 64 --gpus 8 --device h100 --zero 3
    plan --hf-config config.json --gpus 16 --gpus-per-node 8 --device a100 --search
    plan --calibrate                       # this machine -> plan_profile.json
    plan --calibrate --preset small --seq-len 512 --gpus 2   # ... and that model's blocks (tp 1, 2)
    plan --profile plan_profile.json --preset small --dp 2
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
from pathlib import Path

from pyruntime.config import (MAX_GLOBAL_BATCH, PRESETS, ConfigError, ModelConfig, config_from_dict,
                              default_micro_batch, load_config_file)
from pyruntime.parallel.recompute import ALL_OPS
from pyruntime.plan.calibrate import DEFAULT_PROFILE, calibrate, load_profile
from pyruntime.plan.devices import DEVICES, custom, device
from pyruntime.plan.layout import Layout, PlanError, Workload, check
from pyruntime.plan.memory import all_rank_memory
from pyruntime.plan.report import memory_lines, time_lines
from pyruntime.plan.search import search, tp_degrees, train_command
from pyruntime.plan.timing import Cluster, step_time


def add_arguments(p: argparse.ArgumentParser) -> None:
    model = p.add_mutually_exclusive_group()
    model.add_argument("--preset", help=f"model preset: {', '.join(PRESETS)}")
    model.add_argument("--config", help="a train config file (JSON/TOML): its model, data, parallel sections and "
                                        "optim.offload (flags override them; --search explores the layout but "
                                        "keeps its recompute and offload)")
    model.add_argument("--hf-config", help="a Hugging Face config.json")
    for flag, typ, text in (("--seq-len", int, "tokens per sequence (default 2048)"),
                            ("--global-batch", int, "sequences per step over all dp ranks (default 8 per GPU)"),
                            ("--micro-batch", int, "sequences per forward/backward (default: train's, the "
                                                   "largest divisor of the rank's share up to 8 leaving >= pp "
                                                   "micro-batches)"),
                            ("--microbatches", int, "micro-batches per step per dp rank (sets the micro-batch)"),
                            ("--dp", int, "data-parallel ranks (default: GPUs / (tp x pp))"),
                            ("--tp", int, "tensor-parallel ranks"), ("--pp", int, "pipeline stages"),
                            ("--zero", int, "ZeRO stage 0-3"), ("--schedule", str, "naive, gpipe, 1f1b, interleaved, zb"),
                            ("--virtual-stages", int, "chunks per pipeline rank (interleaved)"),
                            ("--pp-layout", str, "even, balanced or counts like 4,4,3,5"),
                            ("--recompute", str, "none, selective, full"),
                            ("--recompute-layers", int, "with --recompute: only the first K blocks of each stage"),
                            ("--recompute-ops", str, "what --recompute selective drops: a comma-separated subset of "
                                                     f"{ALL_OPS}"),
                            ("--offload", str, "none, optimizer"),
                            ("--mesh-order", str, "the rank grid's axes, outermost first (default dp,pp,tp: tp ranks "
                                                  "adjacent)"),
                            ("--bucket-mb", float, "gradient bucket size in MB"),
                            ("--gpus", int, "GPUs in all"), ("--gpus-per-node", int, "GPUs per node (default 8)"),
                            ("--device", str, f"one of {', '.join(DEVICES)}"),
                            ("--gpu-mem", float, "GB of memory per GPU"), ("--tflops", float, "peak TFLOP/s per GPU"),
                            ("--intra-bw", float, "GB/s per GPU inside a node"),
                            ("--inter-bw", float, "GB/s per GPU between nodes"),
                            ("--tokens", float, "tokens to train on: prints the days it takes"),
                            ("--top", int, "layouts --search prints (default 5)"),
                            ("--profile", str, f"calibration profile to use / write (default {DEFAULT_PROFILE})")):
        p.add_argument(flag, type=typ, default=None, help=text)
    p.add_argument("--sp", action="store_true", help="sequence parallelism (tp > 1)")
    p.add_argument("--search", action="store_true", help="every layout that fits, fastest first")
    p.add_argument("--calibrate", action="store_true",
                   help="measure this machine and save a profile; with a model (--preset, --config, --hf-config) "
                        "also time its blocks at --seq-len for each tp a --search of --gpus tries, which plans of it then use")


# Counts of GPUs (and of ranks along one dimension) beyond any cluster built: a million.
MAX_GPUS = 2**20
# Upper bounds of the counts; the batch ones are train's own (config.MAX_GLOBAL_BATCH).
_AT_MOST = {"global_batch": MAX_GLOBAL_BATCH, "micro_batch": MAX_GLOBAL_BATCH, "microbatches": MAX_GLOBAL_BATCH,
            "recompute_layers": MAX_GPUS, "dp": MAX_GPUS, "tp": MAX_GPUS, "pp": MAX_GPUS, "virtual_stages": MAX_GPUS,
            "gpus": MAX_GPUS, "gpus_per_node": MAX_GPUS}


def _check_numbers(args: argparse.Namespace) -> None:
    """Every size and figure > 0, and the float ones finite (a NaN would print a plan of NaNs);
    counts at most what a real run can have (a plan of 1e23 GPUs is no plan)."""
    for name in ("seq_len", "recompute_layers", "global_batch", "micro_batch", "microbatches", "dp", "tp", "pp",
                 "virtual_stages", "gpus", "gpus_per_node", "tokens", "top", "bucket_mb", "gpu_mem", "tflops",
                 "intra_bw", "inter_bw"):
        value = getattr(args, name)
        flag = f"--{name.replace('_', '-')}"
        if value is not None and not 0 < value < math.inf:
            finite = "a finite number " if isinstance(value, float) else ""
            raise PlanError(f"{flag} must be {finite}> 0, got {value}")
        if value is not None and name in _AT_MOST and value > _AT_MOST[name]:
            raise PlanError(f"{flag} must be at most {_AT_MOST[name]}, got {value}")
    if args.calibrate and args.search:
        raise PlanError("--calibrate measures this machine and writes a profile, --search plans with one: "
                        "run them one after the other")


def read_hf_config(path: str) -> ModelConfig:
    """config.json -> ModelConfig through pyruntime/hf (which refuses fields it cannot honour)."""
    from pyruntime.hf.config import model_config_from_file

    p = Path(path)
    if p.is_dir():
        raise PlanError(f"--hf-config {path} is a directory; give the config.json in it")
    if not p.is_file():
        raise PlanError(f"--hf-config: file not found: {path}")
    try:
        raw = json.loads(p.read_text())
    except ValueError as e:
        raise PlanError(f"--hf-config {path}: not JSON: {e}") from None
    return model_config_from_file(raw, p)


def workload_and_base(args: argparse.Namespace) -> tuple[Workload, dict, list[str]]:
    """The model and batch, the parallel settings of a --config file, and the train flags that
    name the model in the printed commands."""
    par, data = {}, {}
    if args.hf_config:
        model, model_args = read_hf_config(args.hf_config), ["--init-from", str(Path(args.hf_config).parent)]
    elif args.config:
        raw = load_config_file(args.config)
        cfg = config_from_dict(raw)
        model, model_args = cfg.model, ["--config", args.config]
        par, data = dict(raw.get("parallel", {})), raw.get("data", {})
        if "offload" in raw.get("optim", {}):  # the one optim setting that changes memory and time
            par["offload"] = raw["optim"]["offload"]
    else:
        name = args.preset or "tiny"
        if name not in PRESETS:
            raise PlanError(f"unknown preset '{name}'; choose from {', '.join(PRESETS)}")
        model, model_args = dataclasses.replace(PRESETS[name]), ["--preset", name]
    model.validate()
    gpus = args.gpus or 1
    seq = args.seq_len or data.get("seq_len") or min(2048, model.max_seq_len)
    if seq > model.max_seq_len:  # train refuses it too: its rotary table ends there
        raise PlanError(f"--seq-len {seq} exceeds the model's max_seq_len {model.max_seq_len}")
    batch = args.global_batch or data.get("global_batch") or 8 * gpus
    if "micro_batch" in data:
        par["micro_batch"] = data["micro_batch"]
    return Workload(model=model, seq_len=seq, global_batch=batch), par, model_args


def layout_from(args: argparse.Namespace, base: dict, work: Workload) -> Layout:
    get = lambda flag, key, default: getattr(args, flag) if getattr(args, flag) is not None else base.get(key, default)  # noqa: E731
    tp, pp = get("tp", "tp", 1), get("pp", "pp", 1)
    dp = get("dp", "dp", None)
    if dp is None:
        dp = max(1, (args.gpus or tp * pp) // (tp * pp))
    micro = args.micro_batch
    if args.microbatches is not None and micro is not None:
        raise PlanError(f"--microbatches {args.microbatches} and --micro-batch {micro} both set the micro-batch "
                        "size; give one of them")
    if micro is None and args.microbatches is None:  # a flag overrides the file's; else train's default
        micro = base.get("micro_batch") or default_micro_batch(work.global_batch, dp, pp)
    if args.microbatches is not None:
        if work.global_batch % (dp * args.microbatches):
            raise PlanError(f"--microbatches {args.microbatches}: global batch {work.global_batch} does not divide "
                            f"into dp {dp} x {args.microbatches} micro-batches")
        micro = work.global_batch // (dp * args.microbatches)
    lv = levers(args, base)
    return Layout(dp=dp, tp=tp, pp=pp, zero=get("zero", "zero", 0), sp=args.sp or base.get("sequence_parallel", False),
                  schedule=get("schedule", "schedule", "1f1b"), virtual_stages=get("virtual_stages", "virtual_stages", 1),
                  pp_layout=get("pp_layout", "pp_layout", "even"), micro_batch=micro,
                  bucket_mb=get("bucket_mb", "bucket_mb", 25.0), recompute=lv["recompute"] or "none",
                  mesh_order=get("mesh_order", "mesh_order", "dp,pp,tp"),
                  recompute_layers=lv["recompute_layers"], recompute_ops=lv["recompute_ops"],
                  offload=lv["offload"] or "none")


def levers(args: argparse.Namespace, base: dict) -> dict:
    """Recompute and offload as train would run them: the flags, else the --config file's;
    None where neither gives one (--search then tries each)."""
    get = lambda name: getattr(args, name) if getattr(args, name) is not None else base.get(name)  # noqa: E731
    lv = dict(recompute=get("recompute"), recompute_layers=get("recompute_layers"),
              recompute_ops=get("recompute_ops") or ALL_OPS, offload=get("offload"))
    if lv["recompute_layers"] is not None and lv["recompute"] in (None, "none"):  # train's words
        raise PlanError(f"--recompute-layers {lv['recompute_layers']} needs --recompute selective or full")
    return lv


def cluster_from(args: argparse.Namespace, layout_gpus: int) -> Cluster:
    figures = dict(memory_gb=args.gpu_mem, tflops=args.tflops, intra_gbs=args.intra_bw, inter_gbs=args.inter_bw)
    if args.device:
        dev = custom(device(args.device), **figures)
    elif any(v is not None for v in figures.values()):
        flags = {"memory_gb": "--gpu-mem", "tflops": "--tflops", "intra_gbs": "--intra-bw", "inter_gbs": "--inter-bw"}
        missing = [flags[k] for k, v in figures.items() if v is None]
        if missing:
            raise PlanError("without --device, give all of --gpu-mem, --tflops, --intra-bw and --inter-bw "
                            f"(missing: {', '.join(missing)})")
        dev = custom(None, **figures)
    elif args.profile or Path(DEFAULT_PROFILE).is_file():
        dev = load_profile(args.profile or DEFAULT_PROFILE)
    else:
        dev = device("h100")
    return Cluster(dev, args.gpus or layout_gpus, args.gpus_per_node or 8)


def run(args: argparse.Namespace) -> int:
    _check_numbers(args)
    if args.calibrate:
        path = args.profile or DEFAULT_PROFILE
        from pyruntime.train.preflight import file_to_write

        file_to_write(Path(path), "calibration profile (--profile)")  # before minutes of measuring
        model, seq, tps = None, 0, (1,)
        if args.preset or args.config or args.hf_config:  # also time this model's blocks
            work, _, _ = workload_and_base(args)
            model, seq = work.model, work.seq_len
            tps = tuple(tp_degrees(work, args.gpus or 1, args.gpus_per_node or 8))  # what --search tries
        dev = calibrate(path, model=model, seq_len=seq, tps=tps)
        print(f"calibrated {dev.name}: GEMM {dev.peak_flops / 1e9:.1f} GFLOP/s (a block sustains "
              f"{dev.gemm_efficiency:.0%}), dispatch {dev.block_overhead * 1e3:.2f} ms per block + "
              f"{dev.micro_overhead * 1e3:.2f} ms per micro-batch + {dev.step_overhead * 1e3:.1f} ms per step, memory {dev.mem_bw / 1e9:.1f} GB/s, collectives "
              f"{dev.intra_bw / 1e9:.2f} GB/s + {dev.latency * 1e6:.0f} us (all-gather / reduce-scatter "
              f"{dev.gather_latency * 1e6:.0f} us, p2p {dev.p2p_latency * 1e6:.0f} us)"
              + (f", this model's blocks timed at seq {seq} for tp {', '.join(map(str, tps))}" if model else "")
              + f" | {path}")
        return 0
    work, base, model_args = workload_and_base(args)
    if args.search:
        return _search(args, work, model_args, levers(args, base), base)
    layout = layout_from(args, base, work)
    cluster = cluster_from(args, layout.world)
    check(work, layout, cluster.gpus)
    mem = all_rank_memory(work, layout, cuda=cluster.device.cuda)
    t = step_time(work, layout, cluster)
    print("\n".join(memory_lines(work, layout, cluster, mem) + time_lines(work, layout, t, args.tokens)))
    if base.get("tp_overlap") and layout.tp > 1:  # said, not silently planned as something else
        print("tp overlap (the --config file's tp_overlap) is not modelled: its collectives count as exposed, "
              "so the step is an upper bound")
    print("command: " + train_command(layout, work, cluster, model_args))
    return 0


def _search(args: argparse.Namespace, work: Workload, model_args: list[str], lv: dict, base: dict) -> int:
    """lv: the recompute / offload settings given (flags or --config); the layout is searched,
    in the mesh order given (base: the --config file's parallel section)."""
    if not args.gpus:
        raise PlanError("--search needs --gpus N")
    order = args.mesh_order or base.get("mesh_order", "dp,pp,tp")
    # what check() would refuse in every layout, refused once here (else: "no layout fits")
    check(work, Layout(recompute=lv["recompute"] or "none", offload=lv["offload"] or "none",
                       recompute_ops=lv["recompute_ops"], recompute_layers=lv["recompute_layers"], mesh_order=order))
    cluster = cluster_from(args, args.gpus)
    found = search(work, cluster, **lv, mesh_order=order, top=args.top or 5)
    dev = cluster.device
    if not found.fitting:
        print(f"no layout of {cluster.gpus} x {dev.name} ({dev.memory / 1e9:.0f} GB) fits: the smallest needs "
              f"{found.smallest_peak / 1e9:.1f} GB per GPU")
        return 1
    print(f"{found.fitting} layout(s) of {cluster.gpus} x {dev.name} fit; fastest first:")
    for i, c in enumerate(found.fastest, 1):
        print(f"{i}. {c.layout.describe()} | step {c.time.step:.3f} s, {c.time.tokens_per_s:,.0f} tokens/s, "
              f"MFU {c.time.mfu:.1%} | peak {c.peak / 1e9:.1f} GB per GPU"
              + (f" | {c.time.days(args.tokens):.1f} days" if args.tokens else ""))
        print("   " + train_command(c.layout, work, cluster, model_args))
    return 0
