"""I/O faults as one line: which file, what was being written and the cause, e.g.

    cannot write metrics file runs/x/metrics.jsonl: no space left on device (ENOSPC)

A full disk, a read-only mount or a failing device (ENOSPC, EROFS, EIO, ...) during a run is
the user's to fix, not a bug: the CLI prints the line and exits 2 on every rank (the
watchdog hands it to the peers), never a traceback.
"""
from __future__ import annotations

import contextlib
import errno
import os
import re


class IOFault(RuntimeError):
    """A file the run writes could not be written; the message is one line naming it."""


def _errno_words(code: int) -> str:
    text, name = os.strerror(code), errno.errorcode.get(code, str(code))
    return f"{text[:1].lower()}{text[1:]} ({name})"


def os_cause(error: BaseException) -> str | None:
    """"no space left on device (ENOSPC)" for the first OSError in `error`'s chain (torch's
    serializer, for one, reports a full disk as "unexpected pos ..." with the OSError as
    its context) or the first "os error N" in a message (Rust's, e.g. safetensors'), or
    None when there is neither."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno:
            return _errno_words(error.errno)
        if found := re.search(r"\(os error (\d+)\)", str(error)):
            return _errno_words(int(found.group(1)))
        error = error.__cause__ or error.__context__
    return None


def describe_os_error(error: OSError) -> str:
    """One line for an OSError that no `writing` block named: its path and the cause."""
    cause = os_cause(error) or " ".join(str(error).split()) or type(error).__name__
    return f"I/O error on {error.filename}: {cause}" if error.filename is not None else f"I/O error: {cause}"


@contextlib.contextmanager
def writing(what: str, path):
    """Turn an OSError inside the block into an IOFault naming `what` and `path`."""
    try:
        yield
    except OSError as e:
        raise IOFault(f"cannot write {what} {path}: {os_cause(e) or e}") from None
