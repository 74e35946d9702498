"""Kill and resume: a SIGKILLed rank is named by the others, which exit non-zero within a
bounded time; --resume given the run's --out directory (what a user naturally passes) then
continues from its last checkpoint and reproduces the uninterrupted run's losses exactly
(CPU, same layout: dp 1 x pp 2, with a checkpoint every 10 steps)."""
import json
import os
import signal
import time

import pytest

from support.launch import launch

ARGS = ["--preset", "tiny", "--steps", "80", "--pp", "2", "--seq-len", "32", "--global-batch", "4",
        "--micro-batch", "1", "--eval-every", "0", "--save-every", "10", "--peer-timeout", "5"]


def losses(out) -> dict[int, float]:
    """step -> loss; a resumed run's records (appended later) replace the crashed run's."""
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines)}


def test_killed_rank_then_resume_reproduces_the_uninterrupted_run(tmp_path):
    whole, crashed = tmp_path / "whole", tmp_path / "crashed"
    with launch(2, ARGS + ["--out", str(whole)]) as ranks:
        assert ranks.wait(timeout=240) == [0, 0], ranks.all_stderr()
    reference = losses(whole)

    with launch(2, ARGS + ["--out", str(crashed)]) as ranks:
        deadline = time.monotonic() + 120
        while not (crashed / "checkpoints" / "step_20").is_dir():
            assert all(p.poll() is None for p in ranks.procs), "a rank exited before the kill\n" + ranks.all_stderr()
            assert time.monotonic() < deadline, "no checkpoint written\n" + ranks.all_stderr()
            time.sleep(0.05)
        os.kill(ranks.procs[1].pid, signal.SIGKILL)
        killed = time.monotonic()
        try:
            code = ranks.procs[0].wait(timeout=40)
        except Exception:
            pytest.fail("rank 0 still running 40 s after rank 1 was killed\n" + ranks.all_stderr())
        print(f"rank 0 exited {time.monotonic() - killed:.1f} s after the kill")
        assert code != 0
        assert ranks.stderr(0).startswith("pyruntime: error: rank 1 (dp 0, pp 1, tp 0) stopped responding"), \
            ranks.all_stderr()
        assert ranks.stderr(0).count("\n") == 1, ranks.all_stderr()
    last = int((crashed / "checkpoints" / "latest").read_text().strip().removeprefix("step_"))
    assert last >= 20

    with launch(2, ARGS + ["--out", str(crashed), "--resume", str(crashed)]) as ranks:
        assert ranks.wait(timeout=240) == [0, 0], ranks.all_stderr()
    resumed = losses(crashed)
    assert sorted(resumed) == sorted(reference)
    assert [resumed[s] for s in range(last + 1, 81)] == [reference[s] for s in range(last + 1, 81)]  # exact
