"""Every Triton kernel compiled for Hopper (sm_90a) in bf16 without a GPU, every autotune
config, as the CUDA launches specialise them (triton_kernels/aot_check.py). Runs in a child
process: this one defines the kernels for the interpreter, which cannot be compiled."""
import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

from support.kernels import needs_triton

ROOT = Path(__file__).resolve().parents[2]


def aot_check(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-m", "pyruntime.triton_kernels.aot_check", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def hopper_bf16() -> dict[str, list[dict]]:
    proc = aot_check("--dtypes", "bf16", "--targets", "sm_90a", "--json")
    assert proc.stdout.strip(), proc.stderr[-3000:]
    by_variant = defaultdict(list)
    for row in json.loads(proc.stdout.strip().splitlines()[-1]):
        by_variant[row["variant"]].append(row)
    return by_variant


@needs_triton
def test_every_kernel_config_compiles_and_every_kernel_can_launch(hopper_bf16):
    assert len(hopper_bf16) >= 17, sorted(hopper_bf16)
    for variant, rows in hopper_bf16.items():
        assert all(r["error"] == "" for r in rows), [r["error"] for r in rows if r["error"]]
        # At least one config fits the shared memory and does not spill registers.
        assert any(r["fits"] and r["spill_bytes"] == 0 for r in rows), (variant, rows)


def stage_bytes(variant: str, config: dict) -> int:
    """bf16 bytes of the operand tiles one K step loads: A and B, twice for the GEMM with two
    products, A and both weights for the SwiGLU projection."""
    m, n, k = config["BLOCK_M"], config["BLOCK_N"], config["BLOCK_K"]
    if variant.startswith("swiglu projection"):
        return (m + 2 * n) * k * 2
    return (m + n) * k * 2 * (2 if "two products" in variant else 1)


@needs_triton
def test_gemms_use_hopper_tensor_cores_and_pipeline_their_loads(hopper_bf16):
    gemms = {v: rows for v, rows in hopper_bf16.items() if v.startswith(("gemm", "swiglu projection"))}
    assert len(gemms) == 8, sorted(gemms)
    for variant, rows in gemms.items():
        for r in rows:
            assert r["wgmma"] > 0, (variant, r)  # wgmma.mma_async, not mma.sync
            # Software pipelining keeps num_stages tiles in shared memory (Triton 3.x keeps
            # num_stages - 1 in flight plus the one being read, so >= num_stages - 1): loads
            # the compiler could not pipeline would hold a single stage.
            assert r["shared"] >= (r["num_stages"] - 1) * stage_bytes(variant, r["config"]), (variant, r)


@needs_triton
def test_bad_arguments_are_refused():
    proc = aot_check("--dtypes", "fp8")
    assert proc.returncode == 2 and "unknown dtype or target 'fp8'" in proc.stderr
