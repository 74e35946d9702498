"""Build pyruntime and its C++ extension pyruntime._C.

    pip install --no-build-isolation .      # or -e . for development

torch is NOT pinned: users bring the build that matches their hardware. CUDA sources
(csrc/cuda/*.cu) are compiled in only when the installed torch was built with CUDA and a
CUDA toolkit is found; the CPU build is complete without them.
"""
import fcntl
import glob
import os
import sys

from setuptools import find_packages, setup

try:
    import torch
except ModuleNotFoundError:  # pip's isolated build environment: torch is deliberately not a build requirement
    sys.exit("pyruntime compiles pyruntime._C against the torch you run it with, and this build environment "
             "has no torch: install torch first, then `pip install --no-build-isolation .` (or -e .)")
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 2))
HERE = os.path.dirname(os.path.abspath(__file__))


class _BuildExt(BuildExtension.with_options(use_ninja=True)):
    """Compiles into one persistent folder, build/ext-temp, whatever the build (editable,
    wheel, plain install): ninja then recompiles only the translation units whose sources,
    headers or flags changed, where an editable build would otherwise start from an empty
    temporary folder and compile all of them (~45 s each). A lock serialises concurrent
    builds of one checkout so they never write the same object files at once."""

    def finalize_options(self) -> None:
        super().finalize_options()
        self.build_temp = os.path.join(HERE, "build", "ext-temp")

    def build_extensions(self) -> None:
        os.makedirs(self.build_temp, exist_ok=True)
        with open(os.path.join(self.build_temp, ".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            super().build_extensions()


def _with_cuda() -> bool:
    if os.environ.get("PYRUNTIME_NO_CUDA") == "1":
        return False
    return torch.version.cuda is not None and CUDA_HOME is not None


def _extension():
    # csrc/core/*.cpp is the torch-free core (also built by CMakeLists.txt with its C++ tests);
    # csrc/*.cpp are the bindings: pybind11 module + torch.library ops.
    sources = sorted(glob.glob("csrc/core/*.cpp")) + sorted(glob.glob("csrc/*.cpp"))
    # -fno-math-errno: sqrt need not set errno, so loops with a sqrt (csrc/adamw_cpu.cpp)
    # vectorise; nothing in csrc reads errno.
    cxx = ["-O3", "-std=c++17", "-fopenmp", "-fno-math-errno"]
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
    # The kernels live in the top-level folder triton_kernels/ but install as pyruntime.triton_kernels:
    # two other distributions (Triton's own, used by vLLM, and PyPI's triton-kernels) own a
    # top-level `triton_kernels`, and installing either beside pyruntime would overwrite files.
    packages=find_packages(include=["pyruntime", "pyruntime.*"]) + ["pyruntime.triton_kernels"],
    package_dir={"pyruntime.triton_kernels": "triton_kernels"},
    python_requires=">=3.11",
    # No torch pin: it is a runtime requirement the user satisfies with their own build.
    install_requires=["torch", "numpy", "safetensors"],
    # hf: `tokenize` and `generate` with real subword vocabularies (pyruntime/data/tokenize.py)
    extras_require={"triton": ["triton"], "plots": ["matplotlib"], "hf": ["tokenizers"],
                    "dev": ["pytest", "matplotlib", "tokenizers", "transformers"]},
    ext_modules=[_extension()],
    cmdclass={"build_ext": _BuildExt},
    entry_points={"console_scripts": ["pyruntime=pyruntime.cli:main"]},
)
