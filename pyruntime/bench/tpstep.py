"""Tensor parallelism against PyTorch's own: training-step time of our apply_tp (Megatron
column/row-parallel layers, fused q/k/v and gate/up GEMMs, vocab-parallel embedding and
cross-entropy) vs torch.distributed.tensor.parallel.parallelize_module with ColwiseParallel /
RowwiseParallel (q, k, v, gate, up column-wise; o, down row-wise; the embedding row-wise over
the vocabulary; the LM head column-wise with loss_parallel, so neither side gathers the
logits), on `--tp` gloo ranks on CPU, same model, same weights, same batch, same loss, same
clipping and AdamW. `--sp`: sequence parallelism on both sides (PyTorch's plan as torchtitan's:
SequenceParallel norms, PrepareModuleInput all-gathers, o / down reduce-scattered). Same as
`python -m pyruntime bench tpstep`. `--tp-overlap`: ours also overlaps those collectives with
the GEMMs in chunks (comm/overlap.py); PyTorch's side stays plain sequence parallelism (its
async tp needs CUDA symmetric memory).

    python -m pyruntime bench tpstep                  # "small" preset, tp 2
    python -m pyruntime bench tpstep --tp 4 --sp --steps 20 --markdown

What is timed: one full step after a barrier: forward, loss, backward ("fwd+bwd"), then the
global-norm clip (our clip_grad_norm on both sides: one all-reduce of the squared norms of
the local pieces, tp-replicated parameters counted once) and the AdamW step + zero_grad
(build_adamw on both sides; PyTorch's parameters are DTensors). A step's time is the slowest
rank's. Ours and PyTorch's steps alternate one by one in the same processes (who goes first
alternating), so machine noise hits both alike; torch/ours is the ratio of the two medians,
pairs the median over those pairs of back-to-back steps of their ratio (> 1: ours is faster). A check step first compares the
loss (within 1e-5) and the gradient norm (within 1e-4 relative) and refuses to time if they
differ.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time

# One thread per rank: the ranks share the cores of CI; set before torch starts its pools.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

LOSS_TOL = 1e-5
NORM_TOL = 1e-4


def _config(args):
    from pyruntime.config import PRESETS, Config, DataConfig, ParallelConfig, TrainConfig

    cfg = Config(train=TrainConfig(preset=args.preset, seed=args.seed, quiet=True),
                 model=dataclasses.replace(PRESETS[args.preset]),
                 data=DataConfig(seq_len=args.seq_len, micro_batch=args.batch, global_batch=args.batch),
                 parallel=ParallelConfig(tp=args.tp, sequence_parallel=args.sp or args.tp_overlap,
                                         tp_overlap=args.tp_overlap))
    from pyruntime.parallel.validate import validate

    cfg.validate()
    validate(cfg)
    return cfg


def _build_ours(cfg, dims, device):
    """The Trainer's tp path at dp = pp = 1 (parallelize: apply_tp, vocab-parallel loss, the
    engine's AdamW), from the same full weights as PyTorch's side."""
    from pyruntime.parallel.parallelize import build_model, parallelize
    from pyruntime.parallel.tensor import tp_replicas

    par = parallelize(build_model(cfg, device), dims, cfg, device)
    grads = lambda: par.engine.gradient_pieces(lambda p: tp_replicas(p, dims.tp))  # noqa: E731
    return par.model, par.loss_fn, par.engine.optimizer, grads


def torch_tp_plan(n_layers: int, sequence_parallel: bool) -> dict:
    """PyTorch's tensor-parallel plan for the reference model (module names as HF Llama); with
    sequence parallelism as torchtitan's: norms on sequence shards (SequenceParallel), the
    attention / MLP inputs all-gathered (PrepareModuleInput), o / down reduce-scattered."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, RowwiseParallel,
                                                   SequenceParallel)

    seq = Shard(1) if sequence_parallel else Replicate()
    plan = {"embed_tokens": RowwiseParallel(input_layouts=Replicate(), output_layouts=seq),
            "lm_head": ColwiseParallel(input_layouts=seq, output_layouts=Shard(-1), use_local_output=False)}
    if sequence_parallel:
        plan["norm"] = SequenceParallel()
    for i in range(n_layers):
        for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"):
            plan[f"layers.{i}.{name}"] = ColwiseParallel()
        for name in ("self_attn.o_proj", "mlp.down_proj"):
            plan[f"layers.{i}.{name}"] = RowwiseParallel(output_layouts=seq)
        if sequence_parallel:
            plan[f"layers.{i}.input_layernorm"] = SequenceParallel()
            plan[f"layers.{i}.post_attention_layernorm"] = SequenceParallel()
            plan[f"layers.{i}.self_attn"] = PrepareModuleInput(input_layouts=(Shard(1), None, None),
                                                               desired_input_layouts=(Replicate(), None, None))
            plan[f"layers.{i}.mlp"] = PrepareModuleInput(input_layouts=(Shard(1),),
                                                         desired_input_layouts=(Replicate(),))
    return plan


def _build_torch(cfg, dims, device):
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.parallel import loss_parallel, parallelize_module

    from pyruntime.parallel.optimizer import build_adamw
    from pyruntime.model.loss import lm_loss
    from pyruntime.parallel.parallelize import build_model

    model = build_model(cfg, device)
    sp = cfg.parallel.sequence_parallel
    parallelize_module(model, dims.mesh["tp"], torch_tp_plan(cfg.model.n_layers, sp))
    if sp:  # hidden states are local sequence shards: the rotary tables must cover whole sequences
        model.sequence_shards = dims.tp
    optimizer = build_adamw(model.named_parameters(), cfg.optim)

    def loss_fn(logits, targets):
        with loss_parallel():
            return lm_loss(logits, targets)

    def grads():
        """Local pieces and their replication: a gradient's placement can differ from its
        parameter's (the row-wise embedding's gradient comes back replicated)."""
        pieces, counts = [], []
        for p in model.parameters():
            if p.grad is None:
                continue
            if isinstance(p.grad, DTensor):
                pieces.append(p.grad.to_local())
                counts.append(dims.tp if all(pl.is_replicate() for pl in p.grad.placements) else 1)
            else:
                pieces.append(p.grad)
                counts.append(dims.tp)
        return pieces, counts

    def backward(loss):
        with loss_parallel():  # the vocab-sharded cross-entropy's backward
            loss.backward()
    return model, loss_fn, optimizer, grads, backward


def _pair_on_rank(args, dims, device) -> dict:
    from pyruntime.train.optim import clip_grad_norm

    cfg = _config(args)
    gen = torch.Generator().manual_seed(args.seed)
    toks = torch.randint(0, cfg.model.vocab_size, (args.batch, args.seq_len + 1), generator=gen)
    x, y = toks[:, :-1].contiguous(), toks[:, 1:].contiguous()
    model_o, loss_o, opt_o, grads_o = _build_ours(cfg, dims, device)
    model_t, loss_t, opt_t, grads_t, backward_t = _build_torch(cfg, dims, device)
    world, clip = dist.group.WORLD, cfg.optim.grad_clip
    sides = {
        "ours": (lambda: loss_o(model_o(x), y), lambda loss: loss.backward(), grads_o, opt_o),
        "torch": (lambda: loss_t(model_t(x), y), backward_t, grads_t, opt_t),
    }

    def fwd_bwd(side: str) -> float:
        forward, backward, _, _ = sides[side]
        loss = forward()
        backward(loss)
        loss = loss.detach()
        return float(loss.full_tensor() if hasattr(loss, "full_tensor") else loss)  # torch's: a DTensor

    def update(side: str, do_clip: bool = True) -> float:
        _, _, grads, opt = sides[side]
        pieces, counts = grads()
        norm = clip_grad_norm(pieces, clip if do_clip else 0.0, world, counts)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(norm)

    # -- the check step: same loss and gradient norm (the layouts of the weights differ:
    # ours fuses q/k/v and gate/up); no optimizer step, so the weights stay equal --------
    check = {}
    for side in sides:
        check[f"loss_{side}"] = fwd_bwd(side)
        pieces, counts = sides[side][2]()
        check[f"norm_{side}"] = float(clip_grad_norm(pieces, 0.0, world, counts))
        sides[side][3].zero_grad(set_to_none=True)
    if not abs(check["loss_ours"] - check["loss_torch"]) <= LOSS_TOL:
        raise AssertionError(f"first-step loss ours {check['loss_ours']:.8f} vs torch {check['loss_torch']:.8f}")
    if not abs(check["norm_ours"] - check["norm_torch"]) <= NORM_TOL * check["norm_torch"]:
        raise AssertionError(f"gradient norm ours {check['norm_ours']:.6g} vs torch {check['norm_torch']:.6g}")

    times = {"ours": [], "torch": []}  # (fwd+bwd s, full step s)
    order = ("ours", "torch")
    for step in range(args.warmup + args.steps):
        for side in order if step % 2 == 0 else order[::-1]:
            dist.barrier()
            t0 = time.perf_counter()
            fwd_bwd(side)
            t1 = time.perf_counter()
            update(side)
            t2 = time.perf_counter()
            if step >= args.warmup:
                times[side].append((t1 - t0, t2 - t0))
    return {"check": check, "times": times}


def _rank(rank: int, world: int, args) -> list[dict] | None:
    """The pair on this rank; rank 0 returns every rank's times."""
    from pyruntime.mesh import ParallelDims

    dims = ParallelDims(1, 1, world, world).build_mesh("cpu")
    mine = _pair_on_rank(args, dims, torch.device("cpu"))
    everything = [None] * world
    dist.all_gather_object(everything, mine)
    return everything if rank == 0 else None


def run_benchmark(args, timeout_s: float = 900.0) -> list[dict]:
    from pyruntime.spawn import run_world

    return run_world(args.tp, _rank, args, timeout=timeout_s, name="bench tpstep")[0]


def summarise(per_rank: list[dict]) -> dict:
    n = len(per_rank[0]["times"]["ours"])

    def slowest(side: str, which: int) -> list[float]:
        return [max(r["times"][side][i][which] for r in per_rank) for i in range(n)]

    out = {"check": per_rank[0]["check"]}
    for which, label in ((0, "fwd+bwd"), (1, "step")):
        ours, theirs = slowest("ours", which), slowest("torch", which)
        out[label] = {"ours": statistics.median(ours), "torch": statistics.median(theirs),
                      "pairs": statistics.median(t / o for o, t in zip(ours, theirs))}
        out[label]["ratio"] = out[label]["torch"] / out[label]["ours"]
    return out


def main(argv=None) -> int:
    from pyruntime.bench.harness import require, suite_parser, table_lines
    from pyruntime.config import PRESETS

    parser = suite_parser("tpstep", __doc__)
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--sp", action="store_true", help="sequence parallelism on both sides")
    parser.add_argument("--tp-overlap", action="store_true",
                        help="ours with chunked all-gather/reduce-scatter overlap (implies --sp; "
                             "PyTorch's side: plain sp)")
    parser.add_argument("--preset", default="small", choices=sorted(PRESETS))
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args(argv)
    require(parser, args, positive=("tp", "seq_len", "batch", "steps"), non_negative=("warmup",))
    if torch.cuda.is_available():
        print("bench tpstep runs the ranks on gloo/CPU (one GPU cannot host several NCCL ranks)")
    try:
        _config(args)
    except ValueError as e:  # ConfigError: e.g. tp not dividing the heads
        print(f"bench tpstep: {e}", file=sys.stderr)
        return 2
    r = summarise(run_benchmark(args))
    c = r["check"]
    print(f"bench tpstep | preset {args.preset} | batch {args.batch} x {args.seq_len} | tp {args.tp}"
          f"{' with sequence parallelism' if args.sp or args.tp_overlap else ''}"
          f"{' (ours overlapped)' if args.tp_overlap else ''} on "
          f"{args.tp} gloo ranks, {os.cpu_count()} cores | median of {args.steps} steps after {args.warmup} "
          f"warm-up, ours and torch alternating | check: loss {c['loss_ours']:.6f} vs {c['loss_torch']:.6f}, "
          f"grad norm {c['norm_ours']:.6g} vs {c['norm_torch']:.6g}")
    print("baseline: PyTorch's parallelize_module (DTensor) on the same model and batch; torch/ours: the ratio "
          "of the two medians shown; pairs: median over the steps of the ratio of two steps run back to back; "
          "> 1: ours is faster")
    head = ["what", "timed", "ours ms", "torch ms", "torch/ours", "pairs"]
    body = [["apply_tp vs parallelize_module", label, f"{r[label]['ours'] * 1e3:.1f}",
             f"{r[label]['torch'] * 1e3:.1f}", f"{r[label]['ratio']:.2f}x", f"{r[label]['pairs']:.2f}x"]
            for label in ("fwd+bwd", "step")]
    print("\n".join(table_lines(head, body, args.markdown)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
