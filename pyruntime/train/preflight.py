"""Start-up checks of what a run will need beyond its config, before any process group:
the directories and files it writes, the checkpoint it resumes from and the kernel backend
it asked for. Each failure is one ConfigError / CheckpointError line naming the path or the
flag, so nothing fails after training started (or, worse, after the first collective).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from pyruntime.config import Config, ConfigError
from pyruntime.train.ckpt_dirs import CHECKPOINTS, with_resume_resolved
from pyruntime.train.faults import os_cause


def check_run(cfg: Config, device: torch.device) -> Config:
    """cfg with --resume resolved (see ckpt_dirs.resolve_resume), after every check passed."""
    check_kernels(cfg.model.kernels, device)
    t = cfg.train
    if t.export_hf:  # first: before any directory is made
        from pyruntime.hf.export import check_export_dir

        check_export_dir(t.export_hf, "export directory (--export-hf)")  # it is replaced whole at the end
        if t.init_from and Path(t.export_hf).resolve() == Path(t.init_from).resolve():
            raise ConfigError(f"--export-hf {t.export_hf} is the --init-from directory: the export would replace the "
                              "model the run starts from; give another directory")
        clash = export_clash(Path(t.export_hf), cfg)
        if clash:
            raise ConfigError(f"--export-hf {t.export_hf} {clash}: the export replaces its directory whole, at the "
                              "end of the run; give a directory of its own, e.g. " + str(Path(t.out) / "hf"))
        writable_dir(Path(t.export_hf), "export directory (--export-hf)")
    writable_dir(Path(t.out), "output directory (--out)")
    if t.save_every or t.resume == "auto":
        writable_dir(Path(t.out) / CHECKPOINTS, "checkpoint directory")
    writable_file(cfg.metrics_path, "metrics file (--metrics)")
    if device.type == "cuda" and t.plan_check:
        check_fits(cfg, torch.cuda.get_device_properties(device).total_memory, torch.cuda.get_device_name(device))
    cfg = with_resume_resolved(cfg)
    if not cfg.train.resume:  # a fresh run truncates the metrics file
        check_not_overwriting(cfg.metrics_path, "metrics file (--metrics)")
    if cfg.train.resume:
        from pyruntime.train.checkpoint import check_checkpoint, read_meta

        ckpt = Path(cfg.train.resume)
        meta = read_meta(ckpt)
        if cfg.train.steps < meta["step"]:  # equal: a finished run restarted, which has nothing left to do
            raise ConfigError(f"--steps {cfg.train.steps} is below step {meta['step']} of the checkpoint {ckpt} "
                              f"it resumes from: nothing would train; give --steps > {meta['step']}")
        check_checkpoint(ckpt, meta, cfg.model)  # all but the tensors' bytes, which each rank checks as it reads
    return cfg


def export_clash(export: Path, cfg: Config) -> str | None:
    """How the --export-hf directory overlaps what the run writes (its --out, the checkpoints,
    the metrics file, the timeline), or None. Caught here, not after the last step, when the
    export would refuse the directory and the run's weights (without a checkpoint) be lost."""
    e = export.resolve()
    writes = {"the run's --out directory": Path(cfg.train.out),
              "the checkpoint directory": Path(cfg.train.out) / CHECKPOINTS,
              "the metrics file's directory": cfg.metrics_path.parent}
    if cfg.train.timeline:
        writes["the --timeline directory"] = Path(cfg.train.timeline)
    for what, path in writes.items():
        p = path.resolve()
        if p == e or p.is_relative_to(e):
            return f"{'is' if p == e else 'holds'} {what}"
    if e.is_relative_to((Path(cfg.train.out) / CHECKPOINTS).resolve()):
        return "is inside the checkpoint directory"
    return None


def check_fits(cfg: Config, capacity: int, gpu: str) -> None:
    """The planner's first-step and steady peaks of every pipeline rank against the GPU's
    memory: a layout that would run out of memory mid-step is refused up front. (The
    planner's peak is checked against measured bytes on CPU; on a GPU it is not yet.)"""
    from pyruntime.plan.startup import workload_layout
    from pyruntime.plan.memory import all_rank_memory

    work, layout = workload_layout(cfg)
    for r in all_rank_memory(work, layout, cuda=True):
        if not r.fits(capacity):
            need = max(r.first_step_peak, r.steady_peak)
            raise ConfigError(f"layout predicted not to fit: pp rank {r.pp_rank} needs {need / 2**30:.1f} GiB at its "
                              f"peak, the {gpu} has {capacity / 2**30:.1f} GiB (`python -m pyruntime plan` breaks it "
                              "down and `plan --search` finds layouts that fit; --no-plan-check runs it anyway)")


def check_kernels(requested: str, device: torch.device) -> None:
    """An explicit --kernels choice every op of the model can honour on `device`."""
    if requested == "auto":
        return
    from pyruntime.ops import cross_entropy, dispatch, linear, rmsnorm, swiglu

    for op, module in (("rms_norm", rmsnorm), ("swiglu", swiglu), ("linear", linear),
                       ("cross_entropy", cross_entropy)):
        try:
            dispatch.choose(op, requested, device, candidates=module.CANDIDATES)
        except (dispatch.BackendUnavailable, ValueError) as e:
            raise ConfigError(f"--kernels {requested} (model.kernels) cannot run here: {e}") from None


def _blocking_file(path: Path) -> Path | None:
    """The first ancestor of `path` that exists and is not a directory, if any."""
    for parent in [path, *path.parents]:
        if parent.exists():
            return None if parent.is_dir() else parent
    return None


def writable_dir(path: Path, what: str) -> None:
    """`path` is (or can be made) a directory this process can create files in."""
    blocker = _blocking_file(path)
    if blocker is not None:
        where = "is a file" if blocker == path else f"is under {blocker}, which is a file"
        raise ConfigError(f"{what} {path} {where}; give a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create {what} {path}: {os_cause(e) or e}") from None
    probe = path / f".pyruntime-probe-{os.getpid()}"
    try:  # os.access says yes to root on a read-only bind mount: try it
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"{what} {path} is not writable: {os_cause(e) or e}") from None


def check_not_overwriting(path: Path, what: str) -> None:
    """A fresh run starts the metrics file anew: refuse when what it would replace is not an
    earlier run's metrics (a first line that is a step's JSON record), e.g. the data file."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    with open(path, "rb") as f:
        first = f.readline(1 << 16)
    try:
        record = json.loads(first)
    except ValueError:
        record = None
    if not (isinstance(record, dict) and "step" in record):
        raise ConfigError(f"{what} {path} exists and is not a metrics file (its first line is not a step's record); "
                          "a new run would overwrite it: give another path")


def file_to_write(path: Path, what: str) -> None:
    """`path` can be written later (not a directory, not under a file, in a directory that
    exists or can be made and takes files); unlike writable_file, nothing is created there."""
    if path.is_dir():
        raise ConfigError(f"{what} {path} is a directory; give a file name")
    blocker = _blocking_file(path.parent)
    if blocker is not None:
        raise ConfigError(f"{what} {path} is under {blocker}, which is a file; give a path in a directory")
    writable_dir(path.parent, f"directory of the {what}")


def writable_file(path: Path, what: str) -> None:
    """`path` can be opened for writing (an existing file is left as it is; a new one is made
    to try and removed again, so a run refused later leaves no empty file behind) in a
    directory that exists or can be made."""
    file_to_write(path, what)
    existed = path.exists()
    try:
        with open(path, "ab"):
            pass
    except OSError as e:
        raise ConfigError(f"{what} {path} is not writable: {os_cause(e) or e}") from None
    if not existed:
        path.unlink(missing_ok=True)
