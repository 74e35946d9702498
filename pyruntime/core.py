"""The C++ core, pyruntime._C (flat layout planner, pipeline schedules, flat pack/unpack ops),
loaded on first use so that a missing build fails with a message saying how to build it."""


def load_core(needed_by: str):
    """pyruntime._C, or an ImportError naming what needs it and how to build it."""
    try:
        import torch  # noqa: F401  (loads libc10, which pyruntime._C links against)
        from pyruntime import _C
    except ImportError as e:  # pragma: no cover - depends on the build
        raise ImportError(f"{needed_by} needs pyruntime._C ({e}); run `pip install --no-build-isolation -e .`") from e
    return _C
