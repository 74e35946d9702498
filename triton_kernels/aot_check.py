"""Compile every Triton kernel of this package for NVIDIA GPUs ahead of time, on a machine
without one (Triton lowers to PTX with its own LLVM and assembles with the ptxas it ships).

    python -m pyruntime.triton_kernels.aot_check                       # bf16, fp16, fp32 for sm_90a and sm_80
    python -m pyruntime.triton_kernels.aot_check --dtypes bf16 --targets sm_90a --first-config

The interpreter the CPU tests use runs a kernel's Python, not its compilation: a kernel can
pass there and still fail to lower for a GPU (a dtype tl.dot does not take, a layout or
shape the backend refuses) or need more shared memory than the GPU has. This compiles each
kernel as the runtime launches it on CUDA (the same constexpr flags, the CUDA block sizes,
every autotune config) and reports per config the shared memory next to the target's
per-block limit; a kernel variant none of whose configs fits cannot launch at all. What it
cannot show: numerics and speed (those need the GPU: benchmarks/gpu_checks.sh).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import os
import re
import sys
import tempfile
from dataclasses import dataclass, field

import torch

try:
    import triton
    import triton.compiler
except ImportError:  # the optional "triton" extra: one line, not a traceback
    if __name__ == "__main__":
        print('aot_check: needs triton, which is not installed: pip install "pyruntime[triton]"', file=sys.stderr)
        sys.exit(2)
    raise
from triton._C.libtriton import native_specialize_impl
from triton.backends.compiler import BaseBackend, GPUTarget

from . import adamw, cross_entropy, matmul, rmsnorm, swiglu, swiglu_matmul

# Per-block shared memory a kernel may use (opt-in maximum): H100/H200 227 KB, A100 163 KB.
TARGETS = {"sm_90a": (GPUTarget("cuda", 90, 32), 232_448), "sm_80": (GPUTarget("cuda", 80, 32), 166_912)}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
CUDA = torch.device("cuda")  # only its type is read: no GPU is needed to name one


@dataclass
class Variant:
    """One way the runtime launches a kernel: example runtime arguments (tensors stand for
    pointers: only their dtype and alignment are read), the constexprs it passes, and the
    configs (kwargs, num_warps, num_stages) the launch may pick from. Arguments are
    specialised as Triton's launcher does (an int equal to 1 becomes a constant, multiples of
    16 and aligned pointers get divisibility hints), so the compiled code is the launch's."""

    name: str
    fn: object
    args: dict[str, object]
    constexprs: dict[str, object]
    configs: list[tuple[dict, int, int]] = field(default_factory=lambda: [({}, 4, 3)])

    def source(self, extra_constexprs: dict) -> triton.compiler.ASTSource:
        signature, constexprs, attrs = {}, {**self.constexprs, **extra_constexprs}, {}
        for i, p in enumerate(self.fn.params):
            if p.is_constexpr:
                signature[p.name] = "constexpr"
                continue
            kind, attr = native_specialize_impl(BaseBackend, self.args[p.name], False, True, True)
            signature[p.name] = kind
            if kind == "constexpr":
                constexprs[p.name] = self.args[p.name]
            elif isinstance(attr, str):
                attrs[(i,)] = BaseBackend.parse_attr(attr)
        return triton.compiler.ASTSource(fn=self.fn, signature=signature, constexprs=constexprs, attrs=attrs)


def _tuned(autotuner) -> list[tuple[dict, int, int]]:
    return [(dict(c.kwargs), c.num_warps, c.num_stages) for c in autotuner.configs]


def _ptr(dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(16, dtype=dtype)  # a stand-in pointer: 16-byte aligned, like torch's allocations


# 7B shapes at tp 8: 8192 tokens, hidden 4096, the MLP's 11008 / 8 = 1376 columns per rank,
# a 128256 vocabulary / 8 = 16032 logits per rank.
M_TOKENS, HIDDEN, FFN_TP, VOCAB_TP = 8192, 4096, 11008 // 8, 128256 // 8

# (name, (M, N, K), a strides, b strides): the three GEMMs of a linear layer as ops/linear.py
# passes them (transposed views, never copies).
GEMM_LAYOUTS = [
    ("fwd x @ W^T", (M_TOKENS, FFN_TP, HIDDEN), (HIDDEN, 1), (1, HIDDEN)),
    ("dgrad dy @ W", (M_TOKENS, HIDDEN, FFN_TP), (FFN_TP, 1), (HIDDEN, 1)),
    ("wgrad dy^T @ x", (FFN_TP, HIDDEN, M_TOKENS), (1, FFN_TP), (HIDDEN, 1)),
]


def _gemm_args(dtype: torch.dtype, mnk, a_strides, b_strides) -> dict[str, object]:
    M, N, K = mnk
    ptrs = {n: _ptr(dtype) for n in ("C_ptr", "A_ptr", "B_ptr", "A2_ptr", "B2_ptr", "BIAS_ptr", "PRE_ptr")}
    return {**ptrs, "M": M, "N": N, "K": K, "stride_am": a_strides[0], "stride_ak": a_strides[1],
            "stride_bk": b_strides[0], "stride_bn": b_strides[1], "stride_cm": N, "stride_cn": 1}


def variants(dtype: str) -> list[Variant]:
    """Every kernel launch of the CUDA paths, with the activations (and gradients) in `dtype`."""
    dt = DTYPES[dtype]
    precision = matmul.input_precision(dt, CUDA)
    gemm_configs = _tuned(matmul._matmul_kernel_tuned)
    plain = dict(ACTIVATION="none", HAS_BIAS=False, STORE_PRE=False, HAS_SECOND=False, INPUT_PRECISION=precision)
    out = [Variant(f"gemm {name}", matmul._matmul_kernel, _gemm_args(dt, mnk, a, b), plain, gemm_configs)
           for name, mnk, a, b in GEMM_LAYOUTS]
    fwd = GEMM_LAYOUTS[0]
    for name, flags in (("fwd +bias+gelu, pre saved", dict(ACTIVATION="gelu", HAS_BIAS=True, STORE_PRE=True)),
                        ("fwd +silu, pre saved", dict(ACTIVATION="silu", STORE_PRE=True))):
        out.append(Variant(f"gemm {name}", matmul._matmul_kernel, _gemm_args(dt, *fwd[1:]), {**plain, **flags},
                           gemm_configs))
    dgrad = GEMM_LAYOUTS[1]
    out.append(Variant("gemm dgrad, two products (swiglu dx)", matmul._matmul_kernel, _gemm_args(dt, *dgrad[1:]),
                       {**plain, "HAS_SECOND": True}, gemm_configs))
    n = M_TOKENS * FFN_TP
    for act in ("gelu", "silu"):
        out.append(Variant(f"activation backward ({act})", matmul._activation_bwd_kernel,
                           {"PRE_ptr": _ptr(dt), "DY_ptr": _ptr(dt), "n_elements": n},
                           dict(ACTIVATION=act, BLOCK_SIZE=matmul._GPU_EW_BLOCK)))
    swiglu_args = {**{k: _ptr(dt) for k in ("H_ptr", "X_ptr", "WG_ptr", "WU_ptr", "G_ptr", "U_ptr")},
                   "M": M_TOKENS, "N": FFN_TP, "K": HIDDEN, "stride_xm": HIDDEN, "stride_xk": 1,
                   "stride_wn": HIDDEN, "stride_wk": 1, "stride_hm": FFN_TP, "stride_hn": 1}
    for pre in (False, True):
        out.append(Variant(f"swiglu projection{', pre saved' if pre else ''}", swiglu_matmul._swiglu_matmul_kernel,
                           swiglu_args, dict(STORE_PRE=pre, INPUT_PRECISION=precision),
                           _tuned(swiglu_matmul._swiglu_matmul_kernel_tuned)))
    block = dict(BLOCK_SIZE=swiglu._GPU_BLOCK_SIZE)
    out.append(Variant("swiglu fwd", swiglu._swiglu_fwd_kernel,
                       {"C_ptr": _ptr(dt), "A_ptr": _ptr(dt), "B_ptr": _ptr(dt), "n_elements": n}, block))
    out.append(Variant("swiglu bwd", swiglu._swiglu_bwd_kernel,
                       {**{k: _ptr(dt) for k in ("DA_ptr", "DB_ptr", "DC_ptr", "A_ptr", "B_ptr")}, "n_elements": n},
                       block))
    rms_block, rms_warps = rmsnorm._block_settings(HIDDEN)
    out.append(Variant("rmsnorm fwd", rmsnorm._rmsnorm_fwd_kernel,
                       {"Y_ptr": _ptr(dt), "Y_row_stride": HIDDEN, "X_ptr": _ptr(dt), "X_row_stride": HIDDEN,
                        "W_ptr": _ptr(dt), "RSTD_ptr": _ptr(torch.float32), "n_cols": HIDDEN, "eps": 1e-5},
                       dict(BLOCK_SIZE=rms_block), [({}, rms_warps, 3)]))
    out.append(Variant("rmsnorm bwd", rmsnorm._rmsnorm_bwd_kernel,
                       {"DX_ptr": _ptr(dt), "DX_row_stride": HIDDEN, "DY_ptr": _ptr(dt), "DY_row_stride": HIDDEN,
                        "X_ptr": _ptr(dt), "X_row_stride": HIDDEN, "W_ptr": _ptr(dt), "RSTD_ptr": _ptr(torch.float32),
                        "DW_ptr": _ptr(torch.float32), "DW_row_stride": HIDDEN, "n_rows": M_TOKENS,
                        "n_cols": HIDDEN, "rows_per_program": 31},
                       dict(BLOCK_SIZE=rms_block), [({}, rms_warps, 3)]))
    ce_block, ce_warps = cross_entropy._block_settings(CUDA, VOCAB_TP)
    logits = {"X_ptr": _ptr(dt), "X_row_stride": VOCAB_TP, "T_ptr": _ptr(torch.int64)}
    out.append(Variant("vocab-parallel CE stats", cross_entropy._ce_stats_kernel,
                       {**logits, **{k: _ptr(torch.float32) for k in ("MAX_ptr", "SUMEXP_ptr", "TGT_ptr")},
                        "vocab_start": VOCAB_TP, "vocab_valid": VOCAB_TP},
                       dict(BLOCK_SIZE=ce_block), [({}, ce_warps, 3)]))
    out.append(Variant("vocab-parallel CE grad, in place", cross_entropy._ce_grad_kernel,
                       {**logits, **{k: _ptr(torch.float32) for k in ("GMAX_ptr", "GSUM_ptr", "SCALE_ptr")},
                        "scale_stride": 0, "vocab_start": VOCAB_TP, "vocab_valid": VOCAB_TP, "n_cols": VOCAB_TP},
                       dict(BLOCK_SIZE=ce_block), [({}, ce_warps, 3)]))
    flat = {**{k: _ptr(torch.float32) for k in ("P_ptr", "M_ptr", "V_ptr")}, "G_ptr": _ptr(dt),
            "DECAY_ptr": _ptr(torch.uint8), "n_elements": 7_000_000_000 // 8,
            **dict.fromkeys(("decay_factor", "beta1", "beta2", "eps", "step_size", "bias_correction2_sqrt"), 0.5)}
    for mask in (True, False):
        # fp32 master weights and moments (a 7B model's shard over dp 8), gradients in `dtype`.
        out.append(Variant(f"fused AdamW ({'decay mask' if mask else 'all decay'}, {dtype} grads)", adamw._adamw_kernel,
                           flat, dict(HAS_DECAY_MASK=mask, BLOCK_SIZE=adamw._GPU_BLOCK_SIZE)))
    return out


@dataclass
class Compiled:
    variant: str
    config: dict
    num_warps: int
    num_stages: int
    shared: int | None = None  # bytes; None when compilation failed
    registers: int | None = None  # per thread, from ptxas -v (None: triton's cache held the kernel)
    spill_bytes: int | None = None  # spill stores, from ptxas -v
    wgmma: int = 0  # Hopper tensor-core instructions (wgmma.mma_async) in the PTX
    error: str = ""


def compile_variant(v: Variant, target: GPUTarget, first_config: bool = False) -> list[Compiled]:
    """Compile v for target with each of its configs (the first only with first_config).
    Registers and spills are read from ptxas's log (TRITON_DUMP_PTXAS_LOG=1, set by main)."""
    results = []
    for kwargs, warps, stages in v.configs[:1] if first_config else v.configs:
        log = io.StringIO()
        try:
            with contextlib.redirect_stdout(log):  # triton prints the ptxas log
                kernel = triton.compile(v.source(kwargs), target=target,
                                        options={"num_warps": warps, "num_stages": stages})
        except Exception as e:  # noqa: BLE001 - reported per config, the others still compile
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            results.append(Compiled(v.name, kwargs, warps, stages, error=f"{type(e).__name__}: {first}"[:300]))
            continue
        regs = re.search(r"Used (\d+) registers", log.getvalue())
        spills = re.findall(r"(\d+) bytes spill stores", log.getvalue())
        results.append(Compiled(v.name, kwargs, warps, stages, kernel.metadata.shared,
                                int(regs.group(1)) if regs else None, sum(map(int, spills)) if spills else None,
                                kernel.asm["ptx"].count("wgmma.mma_async")))
    return results


def _config_label(c: Compiled) -> str:
    tiles = "x".join(str(c.config[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K") if k in c.config)
    return f"{tiles + ' ' if tiles else ''}w{c.num_warps} s{c.num_stages}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pyruntime.triton_kernels.aot_check", description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", type=lambda s: s.split(","), default=list(DTYPES))
    parser.add_argument("--targets", type=lambda s: s.split(","), default=list(TARGETS))
    parser.add_argument("--first-config", action="store_true", help="only the first config of each autotuned kernel")
    parser.add_argument("--json", action="store_true", help="one JSON list of every compiled config, on stdout")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        # @triton.jit then makes interpreter functions, which have nothing to compile.
        print("aot_check: unset TRITON_INTERPRET (kernels defined for the interpreter cannot be compiled)",
              file=sys.stderr)
        return 2
    for name in args.dtypes + args.targets:
        if name not in DTYPES and name not in TARGETS:
            print(f"aot_check: unknown dtype or target '{name}' (dtypes {', '.join(DTYPES)}; targets "
                  f"{', '.join(TARGETS)})", file=sys.stderr)
            return 2
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="aot_check_")  # a cache hit would skip ptxas
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.6's default; silences 3.9's notice
    say = (lambda *a, **k: None) if args.json else print
    say(f"aot_check | triton {triton.__version__} | targets {', '.join(args.targets)} | dtypes {', '.join(args.dtypes)}"
        " | shared: per block, next to the target's limit; regs: per thread; spills: bytes")
    say(f"{'target':<7} {'dtype':<5} {'kernel':<40} {'config':<18} {'shared KB':>9} {'regs':>5} {'spills':>6} "
        f"{'fits':>5}")
    rows, failures, unlaunchable = [], [], []
    for target_name in args.targets:
        target, limit = TARGETS[target_name]
        for dtype in args.dtypes:
            for v in variants(dtype):
                results = compile_variant(v, target, args.first_config)
                for r in results:
                    fits = r.shared is not None and r.shared <= limit
                    rows.append({"target": target_name, "dtype": dtype, "fits": fits, **dataclasses.asdict(r)})
                    shared = f"{r.shared / 1024:9.1f}" if r.shared is not None else f"{'-':>9}"
                    say(f"{target_name:<7} {dtype:<5} {v.name:<40} {_config_label(r):<18} {shared} "
                        f"{r.registers if r.registers is not None else '-':>5} "
                        f"{r.spill_bytes if r.spill_bytes is not None else '-':>6} "
                        f"{'-' if r.shared is None else ('yes' if fits else 'NO'):>5}"
                        f"{'  ' + r.error if r.error else ''}", flush=True)
                    if r.error:
                        failures.append(f"{target_name} {dtype} {v.name} {_config_label(r)}: {r.error}")
                if not any(r.shared is not None and r.shared <= limit for r in results):
                    unlaunchable.append(f"{target_name} {dtype} {v.name}")
    if args.json:
        print(json.dumps(rows))
    for line in failures:
        say(f"FAILED to compile: {line}")
    for line in unlaunchable:
        say(f"NO CONFIG FITS: {line}")
    return 1 if failures or unlaunchable else 0


if __name__ == "__main__":
    sys.exit(main())
