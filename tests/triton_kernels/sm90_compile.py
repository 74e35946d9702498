"""Compile Triton kernels for sm_90 (H100) without a GPU: PTX and cubin through triton's own
ptxas. Reads a JSON list of specs on stdin:

    {"module": "triton_kernels.matmul", "kernel": "_matmul_kernel",
     "dtype": "bf16",                      # element type of every *_ptr argument ...
     "ptrs": {"T_ptr": "i64"},             # ... except these
     "ints": {"M": 8192, ...},             # integer arguments, by value
     "floats": {"eps": 1e-6},              # float arguments
     "constexprs": {"BLOCK_M": 128, ...}, "num_warps": 8, "num_stages": 3}

Integers are specialised as a real launch would: 1 becomes a constant, multiples of 16 get
the divisibility hint, and every pointer is assumed 16-byte aligned (torch allocations are).
Prints one JSON line: per spec {"ok", "error", "wgmma", "shared", "registers", "spill_bytes"}.
registers/spill_bytes come from ptxas -v, so they are null when triton's cache already held
the kernel; pass --fresh to compile in an empty cache directory and always get them.
Only ever run as a script (it edits os.environ before importing triton):

    .venv/bin/python tests/triton_kernels/sm90_compile.py [--fresh] < specs.json
"""
import contextlib
import importlib
import io
import json
import os
import re
import sys
import tempfile
from pathlib import Path

# Before triton is imported: a real compile, not the interpreter the test process runs.
os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.6's default; silences 3.9's notice
os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"  # ptxas -v output, parsed for registers and spills
if "--fresh" in sys.argv:
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="sm90_compile_")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root: triton_kernels

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

DIVISIBLE = [["tt.divisibility", 16]]


def _source(spec: dict) -> ASTSource:
    fn = getattr(importlib.import_module(spec["module"]), spec["kernel"])
    constexprs = dict(spec.get("constexprs", {}))
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = "*" + spec.get("ptrs", {}).get(name, spec["dtype"])
            attrs[(i,)] = DIVISIBLE
        elif name in spec.get("ints", {}):
            value = spec["ints"][name]
            if value == 1:
                signature[name], constexprs[name] = "constexpr", 1
                continue
            signature[name] = "i32" if abs(value) < 2**31 else "i64"
            if value % 16 == 0:
                attrs[(i,)] = DIVISIBLE
        elif name in spec.get("floats", {}):
            signature[name] = "fp32"
        else:
            raise KeyError(f"{spec['kernel']}: no value for argument '{name}'")
    return ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)


def compile_one(spec: dict) -> dict:
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):  # the ptxas -v log is printed to stdout
            kernel = triton.compile(
                _source(spec), target=GPUTarget("cuda", 90, 64),
                options={"num_warps": spec.get("num_warps", 4), "num_stages": spec.get("num_stages", 3)},
            )
    except Exception as e:  # report, do not stop: the caller wants every kernel's result
        return {"ok": False, "error": f"{type(e).__name__}: {str(e)[:2000]}"}
    regs = re.search(r"Used (\d+) registers", log.getvalue())
    spills = re.findall(r"(\d+) bytes spill stores", log.getvalue())
    return {
        "ok": True, "error": None,
        "wgmma": kernel.asm["ptx"].count("wgmma.mma_async"),
        "shared": kernel.metadata.shared,
        "registers": int(regs.group(1)) if regs else None,
        "spill_bytes": sum(map(int, spills)) if spills else None,
    }


if __name__ == "__main__":
    specs = json.loads(sys.stdin.read())
    results = [compile_one(s) for s in specs]
    print(json.dumps(results))
