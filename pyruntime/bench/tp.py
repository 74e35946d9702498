"""`bench tp`: the kernels behind the tensor-parallel layers on one device, at 7B shapes per tp
degree: the fused GEMM + bias + GeLU and the fused SwiGLU projection against eager PyTorch
(matmul, then bias, then activation), the plain GEMM against torch.matmul, and the
vocab-parallel cross-entropy kernels against F.cross_entropy, with peak extra memory. Without
CUDA it runs small shapes on the PyTorch reference paths and says so.

    python -m pyruntime bench tp                  # 7B shapes, tp 1,2,8 (CUDA)
    python -m pyruntime bench tp --markdown       # table for benchmarks/RESULTS.md
    python -m pyruntime bench tp --tp 8 --only ce
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pyruntime.bench.harness import Row, _device, compare, header, print_table, require, suite_parser


@dataclass
class TPShapes:
    tokens: int
    hidden: int
    ffn: int
    vocab: int
    tps: tuple[int, ...]
    dtype: torch.dtype


GPU_SHAPES = TPShapes(tokens=8192, hidden=4096, ffn=11008, vocab=128256, tps=(1, 2, 8), dtype=torch.bfloat16)
# CPU: small enough to finish in seconds on two cores; fp32 because CPU bf16 GEMMs are slow.
CPU_SHAPES = TPShapes(tokens=256, hidden=512, ffn=1376, vocab=8192, tps=(1, 2, 8), dtype=torch.float32)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _check_close(name: str, ours, base, tol: float) -> None:
    """Refuse to time a kernel that computes something else than its baseline."""
    err = (ours.float() - base.float()).abs().max().item()
    scale = base.float().abs().max().item()
    if not err <= tol * max(1.0, scale):
        raise AssertionError(f"{name}: max |ours - torch| = {err:.3g} (|torch| <= {scale:.3g})")


def _mlp_rows(s: TPShapes, tp: int, backend: str, timing: dict) -> list[Row]:
    from pyruntime.ops import linear, swiglu_linear

    dev, dt = _device(), s.dtype
    m, k, n = s.tokens, s.hidden, s.ffn // tp
    gen = torch.Generator(device=dev).manual_seed(tp)
    x = torch.randn(m, k, device=dev, dtype=dt, generator=gen)
    w, wu = (torch.randn(n, k, device=dev, dtype=dt, generator=gen) / k**0.5 for _ in range(2))
    b = torch.randn(n, device=dev, dtype=dt, generator=gen)
    dy = torch.randn(m, n, device=dev, dtype=dt, generator=gen)
    shape, flops = f"{m}x{k} @ {k}x{n} {str(dt)[6:]}", 2.0 * m * n * k
    tag = "" if backend == "triton" else " [reference]"
    tol = 1e-4 if dt == torch.float32 else 3e-2

    def fwd_bwd(fn, *leaves):
        leaves = [t.detach().requires_grad_(True) for t in leaves]
        return lambda: torch.autograd.grad(fn(*leaves), leaves, dy)

    cases = [  # name, ours, eager baseline, flops
        ("gemm", lambda: linear(x, w, backend=backend), lambda: torch.matmul(x, w.t()), flops),
        ("linear+bias+gelu fwd", lambda: linear(x, w, b, "gelu", backend=backend),
         lambda: F.gelu(torch.matmul(x, w.t()) + b, approximate="tanh"), flops),
        ("swiglu proj fwd", lambda: swiglu_linear(x, w, wu, backend=backend),
         lambda: F.silu(torch.matmul(x, w.t())) * torch.matmul(x, wu.t()), 2 * flops),
        ("linear+bias+gelu fwd+bwd",
         fwd_bwd(lambda x_, w_, b_: linear(x_, w_, b_, "gelu", backend=backend), x, w, b),
         fwd_bwd(lambda x_, w_, b_: F.gelu(torch.matmul(x_, w_.t()) + b_, approximate="tanh"), x, w, b),
         3 * flops),
        ("swiglu proj fwd+bwd", fwd_bwd(lambda x_, g_, u_: swiglu_linear(x_, g_, u_, backend=backend), x, w, wu),
         fwd_bwd(lambda x_, g_, u_: F.silu(torch.matmul(x_, g_.t())) * torch.matmul(x_, u_.t()), x, w, wu),
         6 * flops),
    ]
    rows = []
    for name, ours, base, fl in cases:
        with torch.no_grad() if "bwd" not in name else torch.enable_grad():
            o, r = ours(), base()
            for oi, ri in zip(o, r) if isinstance(o, tuple) else [(o, r)]:
                _check_close(f"{name} tp={tp}", oi, ri, tol)
            del o, r
            rows.append(compare(name + tag, f"{shape} tp={tp}", ours, base, flops=fl, **timing))
    return rows


def _ce_rows(s: TPShapes, tp: int, backend: str, timing: dict) -> list[Row]:
    from pyruntime.ops import vocab_parallel_ce_grad_, vocab_parallel_ce_stats

    dev, dt = _device(), s.dtype
    n, vs = s.tokens, -(-s.vocab // tp)
    gen = torch.Generator(device=dev).manual_seed(100 + tp)
    logits = 4 * torch.randn(n, vs, device=dev, dtype=dt, generator=gen)
    targets = torch.randint(0, vs, (n,), device=dev, generator=gen)
    leaf = logits.detach().clone().requires_grad_(True)

    def ours():  # the kernels of one rank; the (N,) all-reduces between them are not timed
        m, se, _ = vocab_parallel_ce_stats(logits, targets, 0, vs, backend=backend)
        return vocab_parallel_ce_grad_(logits, targets, 0, vs, m, se, 1.0 / n, backend=backend)

    def base():
        return torch.autograd.grad(F.cross_entropy(leaf, targets), leaf)[0]

    m, se, t = vocab_parallel_ce_stats(logits, targets, 0, vs, backend=backend)
    _check_close(f"ce stats tp={tp}", torch.log(se) + m - t,
                 F.cross_entropy(logits.float(), targets, reduction="none"), 1e-3)
    _check_close(f"ce grad tp={tp}", ours(), base(), 1e-2)  # ours() overwrites logits: last check
    # Ours reads the shard twice and writes it once; F.cross_entropy moves more.
    return [compare("vocab-parallel CE fwd+bwd" + ("" if backend == "triton" else " [reference]"),
                    f"{n}x{vs} {str(dt)[6:]} tp={tp}", ours, base,
                    bytes_moved=3.0 * n * vs * logits.element_size(),
                    baseline_name="F.cross_entropy", memory=True, **timing)]


def run_tp(args: argparse.Namespace, argv: list[str]) -> int:
    argv = ["tp", *argv]
    from pyruntime.ops.dispatch import unavailable_reason

    on_cuda = torch.cuda.is_available()
    s = GPU_SHAPES if on_cuda else CPU_SHAPES
    s = TPShapes(
        tokens=args.tokens or s.tokens, hidden=args.hidden or s.hidden, ffn=args.ffn or s.ffn,
        vocab=args.vocab or s.vocab, tps=tuple(args.tp) if args.tp else s.tps,
        dtype=DTYPES[args.dtype] if args.dtype else s.dtype,
    )
    reason = unavailable_reason("triton", torch.device(_device()), explicit=False)
    backend = "triton" if reason is None else "reference"
    bad = [tp for tp in s.tps if tp < 1 or s.ffn % tp]
    if bad:
        print(f"bench tp: tp {bad} must be >= 1 and divide the MLP width {s.ffn}", file=sys.stderr)
        return 2
    if set(args.only) - {"mlp", "ce"}:
        print(f"bench tp: --only takes mlp and/or ce, got {','.join(args.only)}", file=sys.stderr)
        return 2
    timing = dict(warmup=args.warmup, repeat=args.repeat or (30 if on_cuda else 5))
    lines = header(argv, backend, reason)
    print("\n".join(lines), flush=True)
    rows = []
    for tp in s.tps:
        if "mlp" in args.only:
            rows += _mlp_rows(s, tp, backend, timing)
        if "ce" in args.only:
            rows += _ce_rows(s, tp, backend, timing)
        if on_cuda:
            torch.cuda.empty_cache()  # the next tp's shapes differ: do not keep this one's blocks
    print()
    print_table(rows, markdown=args.markdown)
    return 0


def _int_list(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]




def main(argv: list[str]) -> int:
    on_cuda = torch.cuda.is_available()
    default = GPU_SHAPES if on_cuda else CPU_SHAPES
    where = "on CUDA" if on_cuda else "here (no CUDA)"
    parser = suite_parser("tp", __doc__)
    parser.add_argument("--tp", type=_int_list, help=f"tp degrees (default {','.join(map(str, default.tps))})")
    parser.add_argument("--tokens", type=int, help=f"rows M (default {default.tokens} {where})")
    parser.add_argument("--hidden", type=int, help=f"K (default {default.hidden} {where})")
    parser.add_argument("--ffn", type=int, help=f"MLP width before the tp split (default {default.ffn} {where})")
    parser.add_argument("--vocab", type=int, help=f"vocabulary before the tp split (default {default.vocab} {where})")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help=f"default {str(default.dtype)[6:]} {where}")
    parser.add_argument("--only", type=lambda t: t.split(","), default=["mlp", "ce"], help="mlp,ce")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeat", type=int, help=f"timed runs per row (default {30 if on_cuda else 5} {where})")
    parser.add_argument("--markdown", action="store_true", help="a Markdown table for benchmarks/RESULTS.md")
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse exits on --help or on bad input; return its code
        return int(e.code or 0)
    require(parser, args, positive=("tokens", "hidden", "ffn", "vocab", "repeat"), non_negative=("warmup",))
    return run_tp(args, argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
