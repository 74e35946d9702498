"""Launch `python -m pyruntime train ...` as N plain processes (no torchrun: its agent would
kill the other workers itself and hide what the runtime does when a rank dies)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
from contextlib import contextmanager


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Ranks:
    def __init__(self, procs, logs):
        self.procs, self.logs = procs, logs

    def stderr(self, rank: int) -> str:
        self.logs[rank].seek(0)
        return self.logs[rank].read()

    def all_stderr(self, tail: int = 2000) -> str:
        return "\n".join(f"--- rank {r} stderr:\n{self.stderr(r)[-tail:]}" for r in range(len(self.procs)))

    def wait(self, timeout: float) -> list[int]:
        return [p.wait(timeout=timeout) for p in self.procs]


@contextmanager
def launch(world: int, train_args: list[str]):
    """Starts the ranks (env:// rendezvous on a free port); kills whatever is left on exit."""
    env = {**os.environ, "WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "OMP_NUM_THREADS": "1"}
    procs, logs = [], []
    try:
        for rank in range(world):
            log = tempfile.TemporaryFile(mode="w+")
            logs.append(log)
            procs.append(subprocess.Popen([sys.executable, "-m", "pyruntime", "train", *train_args],
                                          env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
                                          stdout=subprocess.DEVNULL, stderr=log))
        yield Ranks(procs, logs)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        for f in logs:
            f.close()
