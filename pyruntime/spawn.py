"""Run a function on N spawned processes joined in one process group: what the multi-process
tests (tests/multiproc.py) and the multi-process benchmarks (bench pp / zero / tpstep) share.

    results = run_world(2, fn, arg)        # fn(rank, world_size, arg) on each rank, in rank order

A failure on any rank (an exception, with its traceback, or a dead process) raises here at
once, without waiting for ranks that may now be stuck in a collective; those are killed.
`fn` must be importable by name in a spawned process (a module-level function).
"""
from __future__ import annotations

import datetime
import os
import queue as queue_mod
import tempfile
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

TIMEOUT_S = 300.0


def _entry(rank: int, world_size: int, store_path: str, queue, backend: str, threads: int, timeout: float,
           fn, args) -> None:
    torch.set_num_threads(threads)
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank)})
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(backend, store=dist.FileStore(store_path, world_size), rank=rank,
                                world_size=world_size, timeout=datetime.timedelta(seconds=timeout))
        queue.put((rank, True, fn(rank, world_size, *args)))
    except BaseException:  # noqa: BLE001 - forwarded to the parent with its traceback
        queue.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_world(world_size: int, fn, *args, timeout: float = TIMEOUT_S, backend: str = "gloo", threads: int = 1,
              name: str = "") -> list:
    """fn(rank, world_size, *args) on every rank of a fresh world (`threads` torch threads
    each; `timeout` for the whole run and for each collective); results ordered by rank.
    `name` prefixes the error raised when a rank fails, dies or the run times out."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        store_path = os.path.join(tmp, "store")
        procs = [ctx.Process(target=_entry, args=(r, world_size, store_path, queue, backend, threads, timeout,
                                                  fn, args))
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
            raise RuntimeError((f"{name}: " if name else "") + "\n".join(errors))
    return [results[r] for r in range(world_size)]
