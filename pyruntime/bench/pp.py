"""Pipeline parallelism against torch.distributed.pipelining: step time of our executor
(pyruntime/parallel/pipeline) vs PyTorch's ScheduleGPipe, Schedule1F1B and
ScheduleInterleaved1F1B, on 2 ranks (gloo on CPU), same model, same weights, same
micro-batches, same loss, same optimizer; with our measured bubble per rank beside the
simulated one. Same as `python -m pyruntime bench pp`.

    python -m pyruntime bench pp                 # "small" preset, 8 micro-batches
    python -m pyruntime bench pp --markdown      # table for benchmarks/RESULTS.md
    python -m pyruntime bench pp --schedules 1f1b --steps 30

What is timed (the same work on both sides): one full training step after a barrier:
the schedule's forward + backward over all micro-batches (ours: PipelineExecutor.run_step;
PyTorch: schedule.step), then the global-norm gradient clip (one all-reduce over both ranks)
and the AdamW step + zero_grad, the same code on both sides, as the Trainer runs them. The
pipeline part alone is reported too ("fwd+bwd"). Step time of a step is the slowest rank's;
the table shows the median over the measured steps. Ours and PyTorch's steps alternate one by
one in the same processes (who goes first alternating too), so machine noise (other load,
frequency changes) hits both alike. Two ratios (> 1: ours is faster): "torch/ours" is the
ratio of the two medians shown beside it; "pairs" is the median over the steps of the ratio of
the two steps run back to back, which the load of the moment cancels out of. They differ when
the load changed during the run: read the two together.

Both sides run the identical stage modules: each rank builds two copies of the model from the
same seed, prunes both to its stages with keep_local_stages, and PyTorch's PipelineStage wraps
a module registering exactly the parameters of one of our StageChunks and calling its forward.
Loss: pyruntime.train.trainer.lm_loss (mean cross-entropy per micro-batch) on both sides; we
divide each micro-batch's loss by the micro-batch count before backward, PyTorch (scale_grads=
True, its default) divides the accumulated gradients by it after the last backward: the same
gradients. A check step before the timing (no optimizer step) compares the first step's loss
(within 1e-5) and every gradient, and refuses to time if they differ.

Bubble: from our executor's own timed actions (StepRecord) of each measured step, per rank
1 - (time in F/B/W) / (step span), median over the steps; "simulated" is our C++ simulator on
the same schedule with the measured mean F and B times (apply.measured_costs) and no message
cost. The gap line splits each rank's measured idle time into time blocked on messages (the
executor's StepRecord.waits: a compute waiting for its received input, the sends at the end
of the step; message latency + waiting for a slower peer), time between its own actions
(Python, slot bookkeeping, posting messages) and time before its first / after its last
action, next to the schedule's simulated idle time.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import statistics
import subprocess
import sys
import time

# One thread per rank: 2 ranks share the 2 cores of CI; set before torch starts its pools
# (spawned ranks inherit the environment).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn as nn  # noqa: E402

# ours -> (PyTorch's schedule class, virtual stages per rank)
PAIRS = {"gpipe": ("ScheduleGPipe", 1), "1f1b": ("Schedule1F1B", 1), "interleaved": ("ScheduleInterleaved1F1B", 2)}
PP = 2
LOSS_TOL = 1e-5   # |loss ours - loss torch| on the first step
GRAD_TOL = 1e-5   # max |grad ours - grad torch| / max |grad torch| per parameter


@dataclasses.dataclass
class Args:
    preset: str = "small"
    # ~150-250 ms per step on one core per rank: messages of 64 KB, 16 actions per rank
    seq_len: int = 64
    micro_batch: int = 1
    microbatches: int = 8
    warmup: int = 2
    steps: int = 15
    seed: int = 1234
    schedules: tuple[str, ...] = tuple(PAIRS)


# ----------------------------------------------------------------------------- per rank


class TorchStageModule(nn.Module):
    """One of our StageChunks as PyTorch's PipelineStage needs it: the chunk's modules
    registered (PipelineStage scales and inspects gradients through submod.parameters(); a
    StageChunk registers nothing, its parameters belong to the model) and the chunk's own
    forward, so both sides run exactly the same operations."""

    def __init__(self, chunk):
        super().__init__()
        m = chunk.model
        parts = {f"layer{k}": m.layers[k] for k in chunk.layer_keys}
        if chunk.is_first:
            parts["embed_tokens"] = m.embed_tokens
        if chunk.is_last:
            parts.update(norm=m.norm, lm_head=m.lm_head)
        self.parts = nn.ModuleDict(parts)
        self._chunk = [chunk]  # a list: not a submodule (its model holds other chunks too)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._chunk[0](x)


def _config(args: Args, schedule: str, virtual_stages: int):
    from pyruntime.config import PRESETS, Config, DataConfig, ParallelConfig, TrainConfig
    from pyruntime.parallel.validate import validate

    cfg = Config(train=TrainConfig(preset=args.preset, seed=args.seed, quiet=True),
                 model=dataclasses.replace(PRESETS[args.preset]),
                 data=DataConfig(seq_len=args.seq_len, micro_batch=args.micro_batch,
                                 global_batch=args.micro_batch * args.microbatches),
                 parallel=ParallelConfig(dp=1, pp=PP, schedule=schedule, virtual_stages=virtual_stages))
    cfg.validate()
    validate(cfg)
    return cfg


def _build_ours(cfg, dims, device):
    """Exactly the Trainer's pipeline path at dp = tp = 1 (parallelize: split, data-parallel
    engine owning AdamW, executor), from the same full weights as PyTorch's side. Returns
    (model, engine, executor)."""
    from pyruntime.parallel.parallelize import build_model, parallelize

    par = parallelize(build_model(cfg, device), dims, cfg, device)
    return par.model, par.engine, par.executor


def _build_torch(cfg, dims, device, torch_schedule: str):
    """The same model and stages under torch.distributed.pipelining. Returns (model,
    optimizer, schedule, holds first stage, holds last stage)."""
    import torch.distributed.pipelining as pipelining

    from pyruntime.parallel.pipeline.apply import activation_shape, split_model
    from pyruntime.parallel.optimizer import build_adamw
    from pyruntime.model.loss import lm_loss
    from pyruntime.parallel.parallelize import build_model

    model = build_model(cfg, device)
    chunks, _ = split_model(model, cfg, dims)
    mb, seq, dim = activation_shape(cfg)
    # Static shapes, as our executor has them from the config: no shape-inference exchange.
    # requires_grad marks what carries a gradient back (PipelineStage reads it off the examples).
    hidden = torch.empty(mb, seq, dim, device=device, requires_grad=True)
    stages = []
    for chunk in chunks:
        inp = torch.zeros(mb, seq, dtype=torch.long, device=device) if chunk.is_first else hidden
        out = torch.empty(mb, seq, cfg.model.vocab_size, device=device, requires_grad=True) if chunk.is_last else hidden
        stages.append(pipelining.PipelineStage(TorchStageModule(chunk), chunk.stage, chunk.num_stages, device,
                                               input_args=inp, output_args=out, group=dims.group("pp")))
    cls = getattr(pipelining, torch_schedule)
    n = cfg.data.global_batch // cfg.data.micro_batch
    # scale_grads=True: lm_loss is a per-micro-batch mean, PyTorch divides the gradients by n.
    schedule = cls(stages if len(stages) > 1 else stages[0], n, loss_fn=lm_loss, scale_grads=True)
    optimizer = build_adamw(model.named_parameters(), cfg.optim)
    return (model, optimizer, schedule, any(c.is_first for c in chunks), any(c.is_last for c in chunks))


def _micro_batches(cfg, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The step's micro-batches, identical on every rank (random tokens from the seed)."""
    gen = torch.Generator().manual_seed(seed)
    n = cfg.data.global_batch // cfg.data.micro_batch
    toks = torch.randint(0, cfg.model.vocab_size, (n, cfg.data.micro_batch, cfg.data.seq_len + 1), generator=gen)
    return [(t[:, :-1].contiguous(), t[:, 1:].contiguous()) for t in toks]


def _pair_on_rank(args: Args, name: str, dims, device) -> dict:
    from pyruntime.train.optim import clip_grad_norm

    torch_name, v = PAIRS[name]
    cfg = _config(args, name, v)
    micro = _micro_batches(cfg, args.seed)
    x_all, y_all = torch.cat([x for x, _ in micro]), torch.cat([y for _, y in micro])
    model_o, engine, executor = _build_ours(cfg, dims, device)
    model_t, opt_t, sched_t, first_t, last_t = _build_torch(cfg, dims, device, torch_name)
    world = dist.group.WORLD
    clip = cfg.optim.grad_clip

    def ours_fwd_bwd() -> torch.Tensor:
        return executor.run_step(micro)

    def ours_update() -> None:  # Trainer.train_step after the pipeline (loss logging aside)
        engine.finish_gradient_sync()
        grads, replication = engine.gradient_pieces()
        clip_grad_norm(grads, clip, world, replication)
        engine.optimizer.step()
        engine.optimizer.zero_grad(set_to_none=True)

    losses_t: list[torch.Tensor] = []

    def torch_fwd_bwd() -> None:
        # PyTorch splits the whole batch along dim 0 into the same n micro-batches.
        sched_t.step(*((x_all,) if first_t else ()), target=y_all if last_t else None,
                     losses=losses_t if last_t else None, return_outputs=False)

    def torch_update() -> None:
        grads = [p.grad for p in model_t.parameters() if p.grad is not None]
        clip_grad_norm(grads, clip, world)
        opt_t.step()
        opt_t.zero_grad(set_to_none=True)

    # -- the check step: same loss, same gradients (no optimizer step: weights stay equal) --
    loss_o = (ours_fwd_bwd() / len(micro)).item()
    torch_fwd_bwd()
    loss_t = torch.stack(losses_t).mean().item() if last_t else 0.0
    grads_o = dict((n, p.grad) for n, p in model_o.named_parameters())
    worst_grad = 0.0
    for n, p in model_t.named_parameters():
        go, gt = grads_o[n], p.grad
        if go is None or gt is None:
            raise AssertionError(f"{name}: {n} has no gradient on {'ours' if go is None else 'torch'}")
        worst_grad = max(worst_grad, ((go - gt).abs().max() / gt.abs().max().clamp_min(1e-30)).item())
    engine.optimizer.zero_grad(set_to_none=True)
    opt_t.zero_grad(set_to_none=True)
    check = {"loss_ours": loss_o, "loss_torch": loss_t, "holds_loss": last_t, "grad_rel_err": worst_grad}
    if last_t and not abs(loss_o - loss_t) <= LOSS_TOL:
        raise AssertionError(f"{name}: first-step loss ours {loss_o:.8f} vs torch {loss_t:.8f}")
    if not worst_grad <= GRAD_TOL:
        raise AssertionError(f"{name}: gradients differ from torch's by {worst_grad:.3g} (relative)")

    # -- timing: ours and torch alternate step by step, a barrier before each; who goes
    # first alternates too, so neither always runs right after the other's step -----------
    times = {"ours": [], "torch": []}   # (fwd+bwd s, full step s) per measured step
    records = []
    sides = (("ours", ours_fwd_bwd, ours_update), ("torch", torch_fwd_bwd, torch_update))
    for step in range(args.warmup + args.steps):
        for side, fwd_bwd, update in sides if step % 2 == 0 else sides[::-1]:
            dist.barrier()
            t0 = time.perf_counter()
            fwd_bwd()
            t1 = time.perf_counter()
            update()
            t2 = time.perf_counter()
            losses_t.clear()
            if step >= args.warmup:
                times[side].append((t1 - t0, t2 - t0))
                if side == "ours":
                    records.append(executor.record)
    return {"check": check, "times": times, "records": records, "cfg": cfg}


def bench_rank(rank: int, world: int, args: Args) -> list[dict] | None:
    """Every schedule pair on this rank; rank 0 returns the summaries."""
    from pyruntime.mesh import ParallelDims

    device = torch.device("cpu")
    dims = ParallelDims(1, PP, 1, PP).build_mesh(device.type)
    out = []
    for name in args.schedules:
        mine = _pair_on_rank(args, name, dims, device)
        cfg = mine.pop("cfg")
        everything: list = [None] * PP
        dist.all_gather_object(everything, mine)
        if rank == 0:
            out.append(_summarise(name, cfg, everything))
    return out if rank == 0 else None


# ----------------------------------------------------------------------------- summary


def _summarise(name: str, cfg, per_rank: list[dict]) -> dict:
    from pyruntime.parallel.pipeline.apply import measured_costs, microbatch_count
    from pyruntime.parallel.pipeline.schedule import simulate

    par = cfg.parallel
    n_steps = len(per_rank[0]["times"]["ours"])

    def per_step(side: str, which: int) -> list[float]:  # the slowest rank's time, step by step
        return [max(r["times"][side][s][which] for r in per_rank) for s in range(n_steps)]

    def median_step(side: str, which: int) -> float:
        return statistics.median(per_step(side, which))

    def paired_ratio(which: int) -> float:
        # torch/ours of the two steps run back to back, median over the pairs: the load of the
        # moment cancels out of each pair (robuster than a ratio of the two medians)
        return statistics.median(t / o for t, o in zip(per_step("torch", which), per_step("ours", which)))

    bubbles, busy, blocked, gaps, edges = ([[] for _ in range(PP)] for _ in range(5))
    spans, all_events = [], []
    for s in range(n_steps):
        recs = [r["records"][s] for r in per_rank]
        t0 = min(rec.wall_start for rec in recs)  # one clock: wall time, exact on one host
        span = max(rec.wall_start - t0 + max(e.end for e in rec.events) for rec in recs)
        for rank, rec in enumerate(recs):
            shift = rec.wall_start - t0
            b = sum(e.duration for e in rec.events if e.kind in ("F", "B", "W"))
            c = rec.blocked()
            first = shift + min(e.start for e in rec.events)
            last = shift + max(e.end for e in rec.events)
            bubbles[rank].append(1.0 - b / span)
            busy[rank].append(b)
            blocked[rank].append(c)
            edges[rank].append(first + span - last)  # before its first action, after its last
            gaps[rank].append(last - first - b - c)   # between its own actions: Python, posting
            all_events += rec.events
        spans.append(span)
    costs = measured_costs(all_events, par.virtual_stages)
    sim = simulate(par.schedule, PP, microbatch_count(cfg), par.virtual_stages, costs)
    med, mean = statistics.median, statistics.mean
    ours_step, torch_step = median_step("ours", 1), median_step("torch", 1)
    ours_pp, torch_pp = median_step("ours", 0), median_step("torch", 0)
    holder = next(r["check"] for r in per_rank if r["check"]["holds_loss"])
    return {
        "schedule": name, "torch": PAIRS[name][0], "virtual_stages": par.virtual_stages,
        "ours_ms": ours_step * 1e3, "torch_ms": torch_step * 1e3, "ratio": paired_ratio(1),
        "ours_pp_ms": ours_pp * 1e3, "torch_pp_ms": torch_pp * 1e3, "pp_ratio": paired_ratio(0),
        "bubble": [med(b) for b in bubbles], "sim_bubble": list(sim.bubble_fractions),
        "span_ms": med(spans) * 1e3, "sim_ms": sim.makespan * 1e3,
        # one micro-batch through the rank's whole share (all its chunks), mean over ranks
        "f_ms": costs.forward * 1e3, "b_ms": costs.backward * 1e3,
        # the idle time's parts: means over the steps, so that they add up
        "idle_ms": [mean(spans) * 1e3 - mean(b) * 1e3 for b in busy],
        "sim_idle_ms": [(sim.makespan - b) * 1e3 for b in sim.busy],
        "blocked_ms": [mean(c) * 1e3 for c in blocked],
        "gap_ms": [mean(x) * 1e3 for x in gaps],
        "edge_ms": [mean(x) * 1e3 for x in edges],
        "loss_ours": holder["loss_ours"], "loss_torch": holder["loss_torch"],
        "grad_rel_err": max(r["check"]["grad_rel_err"] for r in per_rank),
    }


TABLE_LEGEND = (
    "baseline \"torch\": torch.distributed.pipelining with the schedule of column \"torch schedule\". "
    "ms: median step time (slowest rank); torch/ours: the ratio of those two medians; pairs: median over "
    "the steps of torch/ours of two steps run back to back; > 1: ours is faster. fwd+bwd: the pipeline "
    "part of the step alone. bubble: ours, per rank (rank 0 rank 1)")


def format_table(rows: list[dict], markdown: bool = False) -> str:
    """Every ratio sits right of the two numbers it comes from; TABLE_LEGEND says what each is."""
    head = ["schedule", "torch schedule", "ours ms", "torch ms", "torch/ours", "pairs",
            "fwd+bwd ours ms", "fwd+bwd torch ms", "torch/ours", "pairs", "bubble measured", "bubble simulated"]
    body = [[f"{r['schedule']}" + (f" v={r['virtual_stages']}" if r["virtual_stages"] > 1 else ""), r["torch"],
             f"{r['ours_ms']:.1f}", f"{r['torch_ms']:.1f}", f"{r['torch_ms'] / r['ours_ms']:.2f}x",
             f"{r['ratio']:.2f}x",
             f"{r['ours_pp_ms']:.1f}", f"{r['torch_pp_ms']:.1f}", f"{r['torch_pp_ms'] / r['ours_pp_ms']:.2f}x",
             f"{r['pp_ratio']:.2f}x",
             " ".join(f"{b:.3f}" for b in r["bubble"]), " ".join(f"{b:.3f}" for b in r["sim_bubble"])]
            for r in rows]
    from pyruntime.bench.harness import table_lines
    return "\n".join(table_lines(head, body, markdown))


def gap_line(r: dict) -> str:
    ranks = range(len(r["bubble"]))
    return (f"{r['schedule']}: pipeline {r['span_ms']:.1f} ms measured (median) vs {r['sim_ms']:.1f} ms simulated "
            f"(F {r['f_ms']:.1f} ms, B {r['b_ms']:.1f} ms per micro-batch and rank); "
            "idle per rank measured (mean) " + " / ".join(f"{r['idle_ms'][i]:.1f}" for i in ranks)
            + " ms (blocked on messages " + " / ".join(f"{r['blocked_ms'][i]:.1f}" for i in ranks)
            + ", between its actions " + " / ".join(f"{r['gap_ms'][i]:.1f}" for i in ranks)
            + ", before its first / after its last " + " / ".join(f"{r['edge_ms'][i]:.1f}" for i in ranks)
            + ") vs simulated " + " / ".join(f"{r['sim_idle_ms'][i]:.1f}" for i in ranks)
            + f" ms; clip + AdamW outside the pipeline {r['ours_ms'] - r['ours_pp_ms']:.1f} ms")


# ----------------------------------------------------------------------------- processes


def run_benchmark(args: Args, timeout_s: float = 900.0) -> list[dict]:
    """Spawns the 2 gloo ranks, runs every schedule pair; the summaries (rank 0's)."""
    from pyruntime.spawn import run_world

    return run_world(PP, bench_rank, args, timeout=timeout_s, name="bench pp")[0]


def _header(argv: list[str], args: Args) -> str:
    from pyruntime.config import PRESETS
    from pyruntime.model import count_params
    from pyruntime.parallel.pipeline.executor import DEBUG_ENV, debug_from_env

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                timeout=10, cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    params = count_params(PRESETS[args.preset])["total"]
    debug = [f"NOTE: {DEBUG_ENV} is set: ours sends a checked header before every message (slower)"]
    return "\n".join(([] if not debug_from_env() else debug) + [
        f"device: CPU ({os.cpu_count()} cores), gloo, pp {PP}, 1 thread per rank; torch {torch.__version__}",
        f"date: {datetime.date.today().isoformat()}; commit: {commit or 'unknown'}",
        f"command: python -m pyruntime bench pp {' '.join(argv)}".rstrip(),
        f"model: preset {args.preset} ({params / 1e6:.2f}M params), {args.microbatches} micro-batches x "
        f"{args.micro_batch} sequences x {args.seq_len} tokens, fp32, AdamW + global-norm clip",
        f"timing: full step (fwd+bwd of every micro-batch, clip, AdamW); median of {args.steps} steps after "
        f"{args.warmup} warm-up, slowest rank per step; ours and torch alternate step by step",
    ])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    from pyruntime.bench.harness import suite_parser
    from pyruntime.config import PRESETS

    d = Args()
    parser = suite_parser("pp", __doc__)
    parser.add_argument("--preset", default=d.preset, choices=sorted(PRESETS), help="model preset (default small: 8 layers)")
    parser.add_argument("--seq-len", type=int, default=d.seq_len)
    parser.add_argument("--micro-batch", type=int, default=d.micro_batch, help="sequences per micro-batch")
    parser.add_argument("--microbatches", type=int, default=d.microbatches, help="micro-batches per step")
    parser.add_argument("--warmup", type=int, default=d.warmup, help="untimed steps per side and schedule")
    parser.add_argument("--steps", type=int, default=d.steps, help="timed steps per side and schedule")
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--schedules", type=lambda t: tuple(t.split(",")), default=d.schedules,
                        help="gpipe,1f1b,interleaved (default all three)")
    parser.add_argument("--markdown", action="store_true", help="a Markdown table for benchmarks/RESULTS.md")
    try:
        ns = parser.parse_args(argv)
    except SystemExit as e:  # argparse exits on --help or on bad input; return its code
        return int(e.code or 0)
    bad = [s for s in ns.schedules if s not in PAIRS]
    if bad or ns.steps < 1 or ns.warmup < 0:
        print(f"bench pp: --schedules takes {','.join(PAIRS)}, --steps >= 1, --warmup >= 0", file=sys.stderr)
        return 2
    args = Args(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(Args)})
    try:
        for s in args.schedules:
            _config(args, s, PAIRS[s][1])
    except ValueError as e:  # ConfigError: e.g. fewer layers than stages, microbatches % pp
        print(f"bench pp: {e}", file=sys.stderr)
        return 2
    print(_header(argv, args), flush=True)
    rows = run_benchmark(args)
    print("first-step check (before timing): " + "; ".join(
        f"{r['schedule']} loss ours {r['loss_ours']:.6f} torch {r['loss_torch']:.6f} "
        f"(|diff| {abs(r['loss_ours'] - r['loss_torch']):.1e}), grads max rel diff {r['grad_rel_err']:.1e}"
        for r in rows))
    print()
    print(format_table(rows, markdown=ns.markdown))
    print(TABLE_LEGEND)
    print()
    print("bubble: ours, per rank (rank 0 rank 1), median over the timed steps; simulated: same schedule "
          "with our measured mean F/B times and free messages. The gap:")
    for r in rows:
        print("  " + gap_line(r))
    print("  (idle measured - simulated: message latency on gloo/loopback, waiting for a peer whose F/B ran "
          "slower than the mean (two ranks and gloo's threads share the cores), Python and message posting "
          "between actions, none of which the simulator charges. Both runtimes wait for a receive at the "
          "action that consumes it and post receives ahead of it. The full step adds clip + AdamW outside "
          "the pipeline, the same on both sides)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
