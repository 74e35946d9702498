"""The CUDA sources of pyruntime._C (csrc/cuda/*.cu) compiled for Hopper with nvcc, as
setup.py compiles them under a CUDA torch: a CPU build never compiles them, so without this a
mistake there would first show on a GPU machine. Skipped where nvcc is missing."""
import shutil
import subprocess
from pathlib import Path

import pytest
from torch.utils.cpp_extension import include_paths

ROOT = Path(__file__).resolve().parents[3]
NVCC_FLAGS = ["-O3", "-std=c++17", "--use_fast_math", "-DPYRUNTIME_WITH_CUDA"]  # setup.py's


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
@pytest.mark.parametrize("source", sorted(p.name for p in (ROOT / "csrc" / "cuda").glob("*.cu")))
def test_cuda_source_compiles_for_sm90(source, tmp_path):
    # A CPU torch wheel ships c10/cuda's headers but not the one its CMake build generates;
    # it only declares that c10_cuda is a shared library.
    stub = tmp_path / "include" / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
    stub.parent.mkdir(parents=True)
    stub.write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    includes = [f"-I{tmp_path / 'include'}", f"-I{ROOT / 'csrc'}", *(f"-I{p}" for p in include_paths())]
    obj = tmp_path / "out.o"
    proc = subprocess.run(["nvcc", "-c", str(ROOT / "csrc" / "cuda" / source), "-o", str(obj), *NVCC_FLAGS,
                           "-gencode=arch=compute_90a,code=sm_90a", *includes],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert obj.stat().st_size > 0
