"""The one helper for multi-process tests: runs `fn(rank, world_size, *args)` on
`world_size` spawned CPU processes joined in a gloo process group, and returns each rank's
return value (a failure on any rank re-raises here with that rank's traceback).

Spawning costs about a second per rank on CI's 2 cores: put several checks into one world.
"""
from __future__ import annotations

import os
import queue as queue_mod
import tempfile
import time
import traceback

import torch.multiprocessing as mp

TIMEOUT_S = 300


def _entry(rank: int, world_size: int, store_path: str, queue, fn, args) -> None:
    import datetime

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank)})
    try:
        store = dist.FileStore(store_path, world_size)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=TIMEOUT_S))
        result = fn(rank, world_size, *args)
        queue.put((rank, True, result))
    except BaseException:  # noqa: BLE001 - forwarded to the parent with its traceback
        queue.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_world(world_size: int, fn, *args, timeout: float = TIMEOUT_S) -> list:
    """Run fn on every rank of a fresh gloo world; results ordered by rank."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        store_path = os.path.join(tmp, "store")
        procs = [ctx.Process(target=_entry, args=(r, world_size, store_path, queue, fn, args))
                 for r in range(world_size)]
        for p in procs:
            p.start()
        results, errors = {}, []
        deadline = time.monotonic() + timeout
        while len(results) < world_size and not errors:
            try:
                rank, ok, payload = queue.get(timeout=1.0)
            except queue_mod.Empty:
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in results]
                if dead:
                    errors.append(f"rank(s) {dead} died with exit code(s) {[procs[r].exitcode for r in dead]}")
                elif time.monotonic() > deadline:
                    errors.append(f"world of {world_size} timed out after {timeout:.0f} s")
                continue
            if ok:
                results[rank] = payload
            else:  # the other ranks may now be stuck in a collective: stop waiting for them
                errors.append(f"rank {rank} failed:\n{payload}")
        for p in procs:
            p.join(timeout=5 if errors else timeout)
            if p.is_alive():
                p.kill()
        if errors:
            raise AssertionError("\n".join(errors))
    return [results[r] for r in range(world_size)]
