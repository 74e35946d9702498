"""PeerWatchdog: a dead or hung rank is named and nobody waits forever.

Unit tests simulate the peers on one in-process store (their heartbeat keys are written by
hand, or never); the integration test SIGKILLs one of three real `pyruntime train` ranks.
"""
import datetime
import json
import os
import signal
import subprocess
import threading
import time

import pytest
import torch.distributed as dist

from pyruntime.cli import build_parser, config_from_args
from pyruntime.comm.watchdog import (DONE, FAILED, KEY_PREFIX, VERDICT_KEY, PeerWatchdog,
                                     describe_by_coords, is_comm_error)
from pyruntime.mesh import ParallelDims

from support.launch import launch

TIMEOUT = 1.0  # generous against thread scheduling jitter on a loaded 2-core CI box
INTERVAL = 0.1


class Recorder:
    """on_lost for tests: remembers the report instead of ending pytest."""

    def __init__(self):
        self.calls: list[tuple[str, list[int], float]] = []
        self.event = threading.Event()

    def __call__(self, message, ranks):
        self.calls.append((message, ranks, time.monotonic()))
        self.event.set()


class Beater:
    """A simulated live peer: advances its heartbeat key every INTERVAL until stopped."""

    def __init__(self, store, rank):
        self.store, self.key, self.stop = store, KEY_PREFIX + str(rank), threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        n = 0
        while not self.stop.wait(INTERVAL):
            n += 1
            self.store.set(self.key, str(n))

    def close(self):
        self.stop.set()
        self.thread.join()


def watchdog(store, rank=0, world_size=3, timeout_s=TIMEOUT, **kw):
    rec = Recorder()
    kw.setdefault("describe_rank", describe_by_coords(ParallelDims(world_size, 1, 1, world_size).coords))
    wd = PeerWatchdog(rank, world_size, timeout_s=timeout_s, interval_s=INTERVAL, store=store,
                      on_lost=rec, **kw)
    return wd, rec


def test_silent_rank_is_named_after_the_timeout():
    store = dist.HashStore()
    wd, rec = watchdog(store)
    beater = Beater(store, 1)  # rank 1 lives, rank 2 never beats
    t0 = time.monotonic()
    try:
        wd.start()
        assert rec.event.wait(5), "silent rank 2 was never reported"
    finally:
        wd.stop()
        beater.close()
    (message, ranks, at), = rec.calls
    assert ranks == [2] and wd.lost_ranks() == [2]
    assert message.startswith("rank 2 (dp 2, pp 0, tp 0) stopped responding") and "killed or hung" in message
    assert "rank 1" not in message
    assert TIMEOUT <= at - t0 < TIMEOUT + 1.0  # after the timeout, not much later
    # The verdict is published, so every other rank names the same culprit.
    assert json.loads(store.get(VERDICT_KEY)) == {"ranks": [2], "code": 3, "message": message}


def test_rank_that_stops_beating_later_is_named():
    store = dist.HashStore()
    wd, rec = watchdog(store)
    beaters = [Beater(store, 1), Beater(store, 2)]
    try:
        wd.start()
        time.sleep(1.5 * TIMEOUT)
        assert not rec.calls  # both alive: nothing to report
        beaters[0].close()  # rank 1 "is killed"
        killed = time.monotonic()
        assert rec.event.wait(5)
    finally:
        wd.stop()
        for b in beaters:
            b.close()
    (message, ranks, at), = rec.calls
    assert ranks == [1] and message.startswith("rank 1 (dp 1, pp 0, tp 0) stopped responding")
    assert TIMEOUT - 2 * INTERVAL <= at - killed < TIMEOUT + 1.0


def test_done_ranks_are_not_reported_and_stop_is_prompt():
    store = dist.HashStore()
    wd, rec = watchdog(store)
    store.set(KEY_PREFIX + "2", DONE)  # rank 2 finished before we even started
    beater = Beater(store, 1)
    try:
        wd.start()
        time.sleep(2 * TIMEOUT)
        assert not rec.calls
    finally:
        beater.close()
    t = time.monotonic()
    wd.stop()
    assert time.monotonic() - t < 0.5 and not wd._thread.is_alive()


def test_stop_does_not_wait_for_the_interval():
    store = dist.HashStore()
    wd = PeerWatchdog(0, 2, timeout_s=60, interval_s=5.0, store=store, on_lost=Recorder()).start()
    time.sleep(0.1)  # the thread is now sleeping in its interval
    t = time.monotonic()
    wd.stop()
    assert time.monotonic() - t < 0.5 and not wd._thread.is_alive() and wd._thread.daemon


def test_failed_rank_is_named_at_once():
    store = dist.HashStore()
    wd, rec = watchdog(store, timeout_s=30)  # a failure must not wait for the (long) timeout
    beater = Beater(store, 1)
    try:
        wd.start()
        t0 = time.monotonic()
        store.set(KEY_PREFIX + "2", FAILED)
        assert rec.event.wait(5)
    finally:
        wd.stop()
        beater.close()
    (message, ranks, at), = rec.calls
    assert ranks == [2] and "rank 2 (dp 2, pp 0, tp 0) exited with an error" in message
    assert at - t0 < 1.0


def test_verdict_of_another_rank_is_adopted():
    store = dist.HashStore()
    wd, rec = watchdog(store, rank=1)
    beater = Beater(store, 0)
    try:
        wd.start()
        store.set(VERDICT_KEY, json.dumps({"ranks": [2], "code": 3,
                                           "message": "rank 2 (dp 2, pp 0, tp 0) stopped responding 5.0 s ago"}))
        assert rec.event.wait(5)
    finally:
        wd.stop()
        beater.close()
    assert rec.calls[0][:2] == ("rank 2 (dp 2, pp 0, tp 0) stopped responding 5.0 s ago", [2])


def test_lost_store_names_its_host():
    host = dist.TCPStore("127.0.0.1", 0, 2, True, timeout=datetime.timedelta(seconds=5),
                         wait_for_workers=False)
    client = dist.TCPStore("127.0.0.1", host.port, 2, False, timeout=datetime.timedelta(seconds=5))
    wd, rec = watchdog(client, rank=1, world_size=2, timeout_s=30, store_host_rank=0)
    try:
        wd.start()
        time.sleep(2 * INTERVAL)
        t0 = time.monotonic()
        del host  # the store server goes away, as when rank 0 is killed
        assert rec.event.wait(5)
    finally:
        wd.stop()
    (message, ranks, at), = rec.calls
    assert message.startswith("lost the c10d store hosted by rank 0 (dp 0, pp 0, tp 0)")
    assert ranks == [0] and at - t0 < 2.0


def test_context_manager_exits():
    # Clean exit: "done" is published.
    store = dist.HashStore()
    wd, rec = watchdog(store, rank=1, world_size=2)
    with wd:
        pass
    assert store.get(KEY_PREFIX + "1") == DONE and not rec.calls

    # A non-communication error: "failed" is published so peers need not wait the timeout.
    store = dist.HashStore()
    wd, rec = watchdog(store, rank=1, world_size=2)
    with pytest.raises(ValueError):
        with wd:
            raise ValueError("bug in this rank")
    assert store.get(KEY_PREFIX + "1") == FAILED and not rec.calls

    # A communication error: wait until the silent peer is named, keep beating meanwhile
    # (so nobody blames this rank), then let the error through.
    store = dist.HashStore()
    wd, rec = watchdog(store, rank=1, world_size=2)
    t0 = time.monotonic()
    with pytest.raises(RuntimeError):
        with wd:
            raise RuntimeError("[gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:4242")
    assert rec.calls and rec.calls[0][1] == [0] and wd.lost_ranks() == [0]
    assert TIMEOUT <= time.monotonic() - t0 < TIMEOUT + 1.5
    assert store.get(KEY_PREFIX + "1") not in (DONE, FAILED)


def test_store_host_waits_for_peers_before_leaving():
    store = dist.HashStore()
    dogs = [watchdog(store, rank=r, store_host_rank=0) for r in range(3)]
    for wd, _ in dogs:
        wd.start()
    finished = {}

    def finish(r, delay):
        time.sleep(delay)
        dogs[r][0].finish(DONE)
        finished[r] = time.monotonic()

    threads = [threading.Thread(target=finish, args=(r, d)) for r, d in ((0, 0.0), (1, 0.3), (2, 0.8))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert not any(rec.calls for _, rec in dogs)  # longer than the timeout, still nobody lost
    assert finished[0] >= finished[2]  # the host's store outlived the last reader
    assert all(store.get(KEY_PREFIX + str(r)) == DONE for r in range(3))


# -- the store host's exit and the verdict: every order of events ----------------------------
class HostedStore:
    """One in-process store that goes away when its host (rank 0) exits, as rank 0's TCPStore
    does under a plain env:// launch."""

    def __init__(self):
        self.inner, self.alive = dist.HashStore(), True

    def __getattr__(self, name):  # set, get, multi_get, compare_set
        if not self.alive:
            raise dist.DistNetworkError("Connection reset by peer")
        return getattr(self.inner, name)


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def stepped_world(store, clock, world_size=3, **kw):
    """Watchdogs polled by hand (no threads): the test decides who polls when. Rank 0 hosts
    the store: its report (its exit) takes the store down."""
    dogs = []
    for r in range(world_size):
        rec = Recorder()
        if r == 0:
            def host_exits(message, ranks, rec=rec):
                rec(message, ranks)
                store.alive = False
            on_lost = host_exits
        else:
            on_lost = rec
        wd = PeerWatchdog(r, world_size, timeout_s=TIMEOUT, interval_s=INTERVAL, store=store, on_lost=on_lost,
                          store_host_rank=0, clock=clock,
                          describe_rank=describe_by_coords(ParallelDims(world_size, 1, 1, world_size).coords), **kw)
        dogs.append((wd, rec))
    return dogs


def beat_until_just_before_timeout(dogs, clock):
    """The live ranks beat every interval (a jump of more than half the timeout would look
    like a descheduled watchdog thread and restart the ages); rank 2 stays silent."""
    for wd, _ in dogs:
        wd.start(thread=False)
    while clock.now < TIMEOUT - INTERVAL:
        for wd, _ in dogs:
            assert wd.poll()
        clock.now += INTERVAL
    clock.now = TIMEOUT + 0.01


# Poll orders after rank 2 went silent: host first (the race the issue saw: the host used to
# exit on its own verdict, and rank 1 then found the store gone and blamed rank 0), peer first,
# host twice before the peer, peer detects while the host is mid-wait.
ORDERS = {"host first": [0, 1, 0], "peer first": [1, 0], "host polls twice first": [0, 0, 1, 0],
          "interleaved": [0, 1, 1, 0, 0]}


@pytest.mark.parametrize("order", list(ORDERS))
def test_dead_rank_is_named_by_every_survivor_in_every_order(order):
    store, clock = HostedStore(), Clock()
    dogs = stepped_world(store, clock)
    beat_until_just_before_timeout(dogs[:2], clock)
    for r in ORDERS[order]:
        if not dogs[r][1].calls:
            dogs[r][0].poll()
    for r in (0, 1):
        wd, rec = dogs[r]
        (message, ranks, _), = rec.calls
        assert ranks == [2] and wd.exit_code == 3, (r, message)
        assert message.startswith("rank 2 (dp 2, pp 0, tp 0) stopped responding"), (r, message)
    assert not store.alive  # the host did leave, but only after rank 1 had read the verdict


def test_host_waits_for_acknowledgement_at_most_the_timeout():
    store, clock = HostedStore(), Clock()
    dogs = stepped_world(store, clock)
    beat_until_just_before_timeout(dogs[:2], clock)
    host, rec = dogs[0]
    for _ in range(3):  # rank 1 (alive, but its watchdog stalls) never acknowledges
        assert host.poll() and not rec.calls
        clock.now += TIMEOUT / 3 - 0.01
    clock.now += 0.05
    assert not host.poll() and rec.calls[0][1] == [2]  # bounded: a stalled peer cannot hold it


def test_a_rank_leaving_with_a_user_error_has_every_rank_print_its_line():
    store, clock = HostedStore(), Clock()
    dogs = stepped_world(store, clock, describe_error=lambda e: (2, str(e)) if isinstance(e, OSError) else None)
    for wd, _ in dogs:
        wd.start(thread=False)
        wd.poll()
    with pytest.raises(OSError):
        with dogs[1][0]:  # thread=False: __exit__ only publishes the final state
            raise OSError("cannot write metrics file /x/m.jsonl: no space left on device")
    for r in (0, 2, 0):
        if not dogs[r][1].calls:
            dogs[r][0].poll()
    for r in (0, 2):
        wd, rec = dogs[r]
        (message, ranks, _), = rec.calls
        assert message == "rank 1 (dp 1, pp 0, tp 0): cannot write metrics file /x/m.jsonl: no space left on device"
        assert ranks == [1] and wd.exit_code == 2


def test_ranks_failing_together_print_one_line_each():
    """A save that fails on every rank at once (DCP agrees on it): each leaves with its own line,
    or with a peer's identical one (code 2) if its watchdog read that first, never both; the
    host waits until its peers have left."""
    store = dist.HashStore()
    dogs = [watchdog(store, rank=r, store_host_rank=0, describe_error=lambda e: (2, str(e))) for r in range(3)]
    for wd, _ in dogs:
        wd.start()
    left = {}

    start = threading.Barrier(3)

    def fail(r):
        start.wait()
        with pytest.raises(OSError):
            with dogs[r][0]:
                raise OSError("saving checkpoint /x/step_4 failed: no space left on device")
        left[r] = time.monotonic()

    threads = [threading.Thread(target=fail, args=(r,)) for r in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(left) == 3 and left[0] >= max(left[1], left[2])
    for wd, rec in dogs:
        assert len(rec.calls) <= 1 and (not rec.calls or wd.exit_code == 2)
        assert all(m.endswith("saving checkpoint /x/step_4 failed: no space left on device") for m, _, _ in rec.calls)
    assert all(store.get(KEY_PREFIX + str(r)).startswith(FAILED + b"|2|") for r in range(3))


def test_comm_errors_are_told_apart():
    assert is_comm_error(RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] "
                                      "Connection closed by peer [127.0.0.1]:1234"))
    assert is_comm_error(dist.DistNetworkError("Broken pipe"))
    assert not is_comm_error(ValueError("shape mismatch"))
    assert not is_comm_error(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))


def test_peer_timeout_flag():
    cfg = config_from_args(build_parser().parse_args(["train", "--peer-timeout", "7.5"]), 1)
    assert cfg.train.peer_timeout_s == 7.5


def test_killed_rank_is_named_and_the_others_exit(tmp_path):
    """Three plain processes (tests/launch.py: no torchrun, whose agent would kill the
    survivors itself and hide the watchdog); rank 1 is SIGKILLed mid-training; ranks 0 (the
    store host) and 2 must name it in one line and exit within the peer timeout + a few s."""
    world, victim, peer_timeout = 3, 1, 5
    metrics = tmp_path / "out" / "metrics.jsonl"
    # Not --quiet: rank 0's metrics file is how we see that training is under way.
    args = ["--preset", "tiny", "--steps", "500", "--seq-len", "32", "--global-batch", "6", "--micro-batch", "2",
            "--dp", str(world), "--eval-every", "0", "--peer-timeout", str(peer_timeout),
            "--out", str(tmp_path / "out")]
    with launch(world, args) as ranks:
        deadline = time.monotonic() + 120
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
            exited = [(r, p.returncode) for r, p in enumerate(ranks.procs) if p.poll() is not None]
            assert not exited, f"rank(s) exited before the kill: {exited}\n" + ranks.all_stderr()
            assert time.monotonic() < deadline, "training never started\n" + ranks.all_stderr()
            time.sleep(0.1)

        os.kill(ranks.procs[victim].pid, signal.SIGKILL)
        killed = time.monotonic()
        codes = {}
        for rank, p in enumerate(ranks.procs):
            if rank != victim:
                try:
                    codes[rank] = p.wait(timeout=max(0.1, killed + 40 - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pytest.fail(f"rank {rank} still running 40 s after rank {victim} was killed (hang)\n"
                                + ranks.all_stderr())
        elapsed = time.monotonic() - killed
        print(f"survivors exited {elapsed:.1f} s after the kill (peer timeout {peer_timeout} s)")
        assert all(code == 3 for code in codes.values()), codes
        assert elapsed < peer_timeout + 8, ranks.all_stderr()
        for rank in codes:
            err = ranks.stderr(rank)
            assert err.startswith(f"pyruntime: error: rank {victim} (dp {victim}, pp 0, tp 0) stopped responding"), \
                f"rank {rank}:\n{err[-3000:]}"
            assert err.count("\n") == 1, f"rank {rank} printed more than one line:\n{err[-3000:]}"
