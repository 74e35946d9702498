"""Console output of the runtime: progress lines on stdout, and remarks every rank may need
to see once (a kernel fallback) on stderr. The callers decide which rank speaks."""
from __future__ import annotations

import sys


def say(msg: str, enabled: bool = True) -> None:
    """A progress line on stdout (the trainer passes enabled = is rank 0)."""
    if enabled:
        print(msg, file=sys.stdout, flush=True)


def warn(msg: str) -> None:
    """One line on stderr, e.g. a fallback the user asked nothing about but should know of."""
    print(f"pyruntime: warning: {msg}", file=sys.stderr, flush=True)
