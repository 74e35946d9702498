"""Checkpoint directories on disk: committing a finished save, finding the checkpoint to
resume from, and what a save that failed on a full or read-only disk leaves (and says).

    <dir>/step_<N>/   a complete checkpoint (meta.json written last)
    <dir>/step_<N>.tmp  a save in progress, or one that failed or was killed: never loaded
    <dir>/latest      the text "step_<N>", replaced atomically

`--resume` takes a step_<N> directory, a folder of them (its latest), the run's --out
directory (its checkpoints/ folder) or "auto" (OUT/checkpoints' latest if there is one,
else a fresh start: what a restarted job passes every time).
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import shutil
from pathlib import Path

from torch.distributed.checkpoint.filesystem import FileSystem

from pyruntime.train.faults import os_cause

META = "meta.json"
LATEST = "latest"
CHECKPOINTS = "checkpoints"  # under --out
STEP_DIR = re.compile(r"step_(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint or weights file that cannot be used; the message is one line naming it."""


# -- writing ---------------------------------------------------------------------------------
def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # a platform without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, text: str) -> None:
    """Replace `path` by a file holding `text`: readers see the old or the new file, whole."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()  # only left over when the write failed
    fsync_dir(path.parent)


def commit(directory: Path, tmp: Path, final: Path, keep: int | None) -> None:
    """Rank 0: make tmp the checkpoint `final`, point latest at it, prune old ones."""
    old = None
    if final.exists():  # saving the same step again: move the old copy aside, drop it after
        old = final.with_name(final.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_dir(directory)
    write_atomic(directory / LATEST, final.name + "\n")
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    if keep is not None:
        complete = sorted((int(m.group(1)), p) for p in directory.iterdir()
                          if (m := STEP_DIR.match(p.name)) and (p / META).is_file())
        for _, p in complete[:-keep]:
            if p != final:
                shutil.rmtree(p, ignore_errors=True)


class WatchedFileSystem(FileSystem):
    """DCP's file system, remembering the cause of the first failed open / write / close on
    this rank. DCP hands failures between ranks pickled, which drops the OSError that a
    torch.save into a full disk hides behind "unexpected pos 704 vs 598"."""

    def __init__(self):
        super().__init__()
        self.cause: str | None = None

    @contextlib.contextmanager
    def create_stream(self, path, mode):
        try:
            with super().create_stream(path, mode) as stream:
                yield stream
        except BaseException as e:
            self.cause = self.cause or os_cause(e)
            raise


def failed_save(tmp: Path, directory: Path, cause: str) -> str:
    """Rank 0, after a failed save: drop the half-written tmp (it could never be loaded, and
    it holds the space a full disk needs) and say which complete checkpoint still stands."""
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        standing = f"the last complete checkpoint {resolve_checkpoint(directory)} is intact"
    except CheckpointError:
        standing = "there is no earlier complete checkpoint"
    return f"saving checkpoint {tmp.with_suffix('')} failed: {cause}; {standing}"


# -- finding ---------------------------------------------------------------------------------
def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """The complete checkpoint directory `path` names: a step_<N> directory, a folder of them
    (then the one its `latest` file names), or a run's --out directory (its checkpoints/).
    Raises CheckpointError."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"no checkpoint at {p}")
    if not (p / LATEST).is_file() and not (p / META).is_file() and (p / CHECKPOINTS).is_dir():
        p = p / CHECKPOINTS  # the run's --out directory, as a user naturally passes it
    if (p / LATEST).is_file():
        name = (p / LATEST).read_text().strip()
        if not name or not (p / name).is_dir():
            raise CheckpointError(f"{p / LATEST} names '{name}', which is not a directory in {p}")
        p = p / name
    if p.name.endswith(".tmp"):  # never renamed: its save did not finish, whatever it holds
        raise CheckpointError(f"incomplete checkpoint {p}: an unfinished save (no step_<N> rename)")
    if not (p / META).is_file():
        if p.is_dir() and (STEP_DIR.match(p.name) or (p / ".metadata").exists()):
            raise CheckpointError(f"incomplete checkpoint {p}: no {META} (its save did not finish)")
        raise CheckpointError(f"{p} is not a checkpoint: no {META}, no {LATEST} file, no {CHECKPOINTS}/ folder")
    return p


def resolve_resume(resume: str | None, out: str) -> Path | None:
    """The checkpoint a run continues from, or None for a fresh start ("auto" without one)."""
    if not resume:
        return None
    if resume == "auto":
        folder = Path(out) / CHECKPOINTS
        return resolve_checkpoint(folder) if (folder / LATEST).exists() else None
    return resolve_checkpoint(resume)


def with_resume_resolved(cfg):
    """cfg with train.resume a concrete checkpoint directory or None. Every rank resolves it
    before training, when no rank can be writing a checkpoint, so all agree."""
    found = resolve_resume(cfg.train.resume, cfg.train.out)
    resume = str(found) if found is not None else None
    if resume == cfg.train.resume:
        return cfg
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, resume=resume))
