"""Build pyruntime and its C++ extension pyruntime._C.

    pip install --no-build-isolation .      # or -e . for development

torch is NOT pinned: users bring the build that matches their hardware. CUDA sources
(csrc/cuda/*.cu) are compiled in only when the installed torch was built with CUDA and a
CUDA toolkit is found; the CPU build is complete without them.
"""
import glob
import os

from setuptools import find_packages, setup

import torch
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 2))


def _with_cuda() -> bool:
    if os.environ.get("PYRUNTIME_NO_CUDA") == "1":
        return False
    return torch.version.cuda is not None and CUDA_HOME is not None


def _extension():
    # csrc/core/*.cpp is the torch-free core (also built by CMakeLists.txt with its C++ tests);
    # csrc/*.cpp are the bindings: pybind11 module + torch.library ops.
    sources = sorted(glob.glob("csrc/core/*.cpp")) + sorted(glob.glob("csrc/*.cpp"))
    cxx = ["-O3", "-std=c++17", "-fopenmp"]
    kwargs = dict(
        name="pyruntime._C",
        include_dirs=[os.path.abspath("csrc")],
        extra_link_args=["-fopenmp"],
    )
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu"))
    if _with_cuda() and cuda_sources:
        nvcc = ["-O3", "-std=c++17", "--use_fast_math", "-DPYRUNTIME_WITH_CUDA"]
        return CUDAExtension(
            sources=sources + cuda_sources,
            extra_compile_args={"cxx": cxx + ["-DPYRUNTIME_WITH_CUDA"], "nvcc": nvcc},
            **kwargs,
        )
    return CppExtension(sources=sources, extra_compile_args={"cxx": cxx}, **kwargs)


setup(
    name="pyruntime",
    version="0.1.0",
    description="Composable data/tensor/pipeline/ZeRO parallel training runtime for LLMs",
    packages=find_packages(include=["pyruntime", "pyruntime.*", "triton_kernels", "triton_kernels.*"]),
    python_requires=">=3.11",
    # No torch pin: it is a runtime requirement the user satisfies with their own build.
    install_requires=["torch", "numpy", "safetensors"],
    extras_require={"triton": ["triton"], "plots": ["matplotlib"], "dev": ["pytest", "matplotlib"]},
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    entry_points={"console_scripts": ["pyruntime=pyruntime.cli:main"]},
)
