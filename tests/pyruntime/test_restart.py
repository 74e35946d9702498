"""Automatic restart: `torchrun --max-restarts 2 ... --resume auto`, a 4-process run (dp 2 x
pp 2) whose rank 1 is SIGKILLed twice mid-run. Each time torchrun restarts every worker, they
resume from OUT/checkpoints' latest, and the run ends with exactly the losses of an
uninterrupted run of the same layout (tiny preset, 10 steps of 4 x 16 tokens: the time is mostly the 4 start-ups of 4 processes).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from support.launch import launch

STEPS, EVERY = 10, 2
ARGS = ["--preset", "tiny", "--seq-len", "16", "--global-batch", "4", "--micro-batch", "1", "--dp", "2",
        "--pp", "2", "--steps", str(STEPS), "--save-every", str(EVERY), "--eval-every", "0", "--log-every", "1",
        "--peer-timeout", "20"]


def losses(out: Path) -> dict[int, float]:
    """step -> loss; records a resumed incarnation appends replace the killed one's."""
    return {r["step"]: r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


def workers(agent: int) -> dict[int, int]:
    """RANK -> pid of torchrun's live worker processes (its children)."""
    found = {}
    for child in Path(f"/proc/{agent}/task/{agent}/children").read_text().split():
        try:
            env = dict(kv.split("=", 1) for kv in Path(f"/proc/{child}/environ").read_text().split("\0") if "=" in kv)
        except OSError:  # exited meanwhile
            continue
        if "RANK" in env:
            found[int(env["RANK"])] = int(child)
    return found


def latest(out: Path) -> int:
    path = out / "checkpoints" / "latest"
    return int(path.read_text().strip().removeprefix("step_")) if path.exists() else 0


def kill_rank_after_checkpoint(agent: subprocess.Popen, out: Path, after: int, log: Path) -> int:
    """Wait until this incarnation saved a checkpoint past `after`, SIGKILL its rank 1; returns
    the checkpoint step it had reached."""
    deadline = time.monotonic() + 180
    while latest(out) <= after:
        assert agent.poll() is None, "torchrun exited before the kill\n" + log.read_text()[-3000:]
        assert time.monotonic() < deadline, "no new checkpoint\n" + log.read_text()[-3000:]
        time.sleep(0.05)
    pids = workers(agent.pid)
    assert 1 in pids, f"no rank 1 among torchrun's workers {pids}"
    os.kill(pids[1], signal.SIGKILL)
    return latest(out)


def test_killed_rank_restarts_and_ends_with_the_uninterrupted_losses(tmp_path):
    whole, restarted, log = tmp_path / "whole", tmp_path / "restarted", tmp_path / "torchrun.log"
    with launch(4, ARGS + ["--out", str(whole)]) as ranks:
        assert ranks.wait(timeout=300) == [0, 0, 0, 0], ranks.all_stderr()

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "4",
           "--max-restarts", "2", "--monitor-interval", "0.2", "-m", "pyruntime", "train", *ARGS,
           "--out", str(restarted), "--resume", "auto"]
    with open(log, "w") as f:
        agent = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=tmp_path,
                                 env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        first = kill_rank_after_checkpoint(agent, restarted, 0, log)
        second = kill_rank_after_checkpoint(agent, restarted, first, log)
        assert agent.wait(timeout=300) == 0, log.read_text()[-3000:]
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()
    text = log.read_text()
    resumed = [int(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("resumed from ")]
    assert len(resumed) == 2 and first <= resumed[0] < resumed[1] and second <= resumed[1], text[-3000:]
    assert losses(restarted) == losses(whole)  # every step, exactly
