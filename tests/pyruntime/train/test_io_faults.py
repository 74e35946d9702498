"""Disk faults during a run (ENOSPC, EROFS, EIO) on every kind of file it writes: metrics,
checkpoints, the loss curve. Each ends the run with one line naming the path and the cause,
exit 2, no traceback, no half-written checkpoint, and the last complete checkpoint loads.

Faults are real where the kernel can give them without root: /dev/full answers every write
with ENOSPC (a symlink points a file of the run at it), and torch.save into it fails as on a
full disk ("unexpected pos", the OSError only in its context). Otherwise a failing writer is
injected for the one file a test names (EROFS, EIO, a write cut short mid-line).
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import time

import pytest
from torch.distributed.checkpoint import filesystem as dcp_fs

from pyruntime.cli import main
from pyruntime.train import ckpt_dirs
from pyruntime.train import metrics as metrics_mod

from support.launch import launch

ARGS = ["--preset", "tiny", "--seq-len", "16", "--global-batch", "2", "--micro-batch", "1",
        "--eval-every", "0"]  # not --quiet: that also turns the metrics file off


def train(out, *extra) -> int:
    return main(["train", *ARGS, "--out", str(out), *extra])


def one_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("pyruntime: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err.strip().removeprefix("pyruntime: error: ")


def assert_resumes_from(out, step: int, capsys) -> None:
    """The last complete checkpoint loads: a run resumed from --out continues after `step`."""
    assert train(out, "--steps", str(step + 1), "--resume", str(out)) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == step + 1
    capsys.readouterr()


# -- checkpoints -----------------------------------------------------------------------------
@contextlib.contextmanager
def failing_checkpoint_writes(monkeypatch, step_dir: str, fault):
    """DCP's writes into <step_dir>.tmp go through `fault(path, mode)` instead of the disk."""
    real = dcp_fs.FileSystem.create_stream

    def create_stream(self, path, mode):
        if "w" in mode and f"{step_dir}.tmp" in str(path):
            return fault(path, mode)
        return real(self, path, mode)

    monkeypatch.setattr(dcp_fs.FileSystem, "create_stream", create_stream)
    yield


@contextlib.contextmanager
def full_disk(path, mode):
    with open("/dev/full", "wb") as stream:  # every write: ENOSPC, as on a full disk
        yield stream


@contextlib.contextmanager
def read_only(path, mode):
    raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
    yield


@pytest.mark.parametrize("fault,cause", [(full_disk, "no space left on device (ENOSPC)"),
                                         (read_only, "read-only file system (EROFS)")])
def test_checkpoint_save_fault(tmp_path, monkeypatch, capsys, fault, cause):
    out = tmp_path / "run"
    with failing_checkpoint_writes(monkeypatch, "step_4", fault):
        assert train(out, "--steps", "6", "--save-every", "2") == 2
    line = one_line(capsys)
    ckpts = out / "checkpoints"
    assert line == (f"saving checkpoint {ckpts}/step_4 failed: {cause}; "
                    f"the last complete checkpoint {ckpts}/step_2 is intact")
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_2"]  # nothing half-written
    monkeypatch.undo()
    assert_resumes_from(out, 2, capsys)


def test_checkpoint_commit_fault(tmp_path, monkeypatch, capsys):
    """EIO while pointing `latest` at the new checkpoint: latest keeps naming the old one."""
    out = tmp_path / "run"
    real = ckpt_dirs.write_atomic

    def write_atomic(path, text):
        if text.startswith("step_4"):
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(path))
        real(path, text)

    monkeypatch.setattr(ckpt_dirs, "write_atomic", write_atomic)
    assert train(out, "--steps", "6", "--save-every", "2") == 2
    assert one_line(capsys).endswith(f"input/output error (EIO); the last complete checkpoint "
                                     f"{out}/checkpoints/step_2 is intact")
    monkeypatch.undo()
    assert_resumes_from(out, 2, capsys)


# -- metrics and the loss curve ----------------------------------------------------------------
class FailingFile:
    """The metrics file, failing on its `fail_at`-th write after writing half of it (as a
    disk that fills up mid-line does)."""

    def __init__(self, real, fail_at: int, code: int):
        self.real, self.writes, self.fail_at, self.code = real, 0, fail_at, code

    def write(self, data):
        self.writes += 1
        if self.writes == self.fail_at:
            self.real.write(bytes(data[:len(data) // 2]))
            raise OSError(self.code, os.strerror(self.code))
        return self.real.write(data)

    def __getattr__(self, name):
        return getattr(self.real, name)


@pytest.mark.parametrize("code,cause", [(errno.ENOSPC, "no space left on device (ENOSPC)"),
                                        (errno.EIO, "input/output error (EIO)")])
def test_metrics_fault_mid_run(tmp_path, monkeypatch, capsys, code, cause):
    out = tmp_path / "run"
    monkeypatch.setattr(metrics_mod, "open", lambda *a, **k: FailingFile(open(*a, **k), 4, code), raising=False)
    assert train(out, "--steps", "6", "--save-every", "2") == 2
    assert one_line(capsys) == f"cannot write metrics file {out}/metrics.jsonl: {cause}"
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3]  # the half line was cut back
    monkeypatch.undo()
    assert_resumes_from(out, 2, capsys)


def test_metrics_on_a_read_only_file_system(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"

    def read_only_open(path, *a, **k):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    monkeypatch.setattr(metrics_mod, "open", read_only_open, raising=False)
    assert train(out, "--steps", "2") == 2
    assert one_line(capsys) == f"cannot write metrics file {out}/metrics.jsonl: read-only file system (EROFS)"


def test_metrics_on_a_full_device(tmp_path, capsys):
    """A real ENOSPC: the metrics file is /dev/full."""
    out = tmp_path / "run"
    assert train(out, "--steps", "2", "--metrics", "/dev/full") == 2
    assert one_line(capsys) == "cannot write metrics file /dev/full: no space left on device (ENOSPC)"


def test_loss_curve_on_a_full_device(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "loss.png").symlink_to("/dev/full")
    assert train(out, "--steps", "4", "--save-every", "2") == 2
    assert one_line(capsys) == f"cannot write loss curve {out}/loss.png: no space left on device (ENOSPC)"
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_4"  # saved before the plot


# -- every rank ----------------------------------------------------------------------------------
def test_a_fault_on_rank_0_ends_every_rank_with_its_line(tmp_path):
    """dp 2, plain processes: rank 0 alone writes metrics (to /dev/full); rank 1, waiting in
    the next step's all-reduce, gets rank 0's line from the watchdog and exits 2 too."""
    out = tmp_path / "run"
    args = [*ARGS, "--out", str(out), "--steps", "50", "--metrics", "/dev/full", "--peer-timeout", "10"]
    with launch(2, args) as ranks:
        t0 = time.monotonic()
        codes = ranks.wait(timeout=120)
        print(f"both ranks exited {time.monotonic() - t0:.1f} s after the launch")
        assert codes == [2, 2], ranks.all_stderr()
        line = "cannot write metrics file /dev/full: no space left on device (ENOSPC)"
        assert ranks.stderr(0) == f"pyruntime: error: {line}\n", ranks.all_stderr()
        assert ranks.stderr(1) == f"pyruntime: error: rank 0 (dp 0, pp 0, tp 0): {line}\n", ranks.all_stderr()


def test_a_loss_curve_fault_after_the_last_step_ends_every_rank(tmp_path):
    """The loss curve is drawn by rank 0 after the last collective of training: a full disk
    there still ends rank 1 with rank 0's line (exit 2), not with a silent exit 0."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "loss.png").symlink_to("/dev/full")
    with launch(2, [*ARGS, "--out", str(out), "--steps", "2", "--peer-timeout", "10"]) as ranks:
        codes = ranks.wait(timeout=120)
        assert codes == [2, 2], ranks.all_stderr()
        line = f"cannot write loss curve {out}/loss.png: no space left on device (ENOSPC)"
        assert ranks.stderr(0) == f"pyruntime: error: {line}\n", ranks.all_stderr()
        assert ranks.stderr(1) == f"pyruntime: error: rank 0 (dp 0, pp 0, tp 0): {line}\n", ranks.all_stderr()
