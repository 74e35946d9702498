"""PeerWatchdog: a rank that dies or hangs must not leave the others waiting forever.

A gloo/NCCL collective whose peer was SIGKILLed either blocks until the process-group
timeout (minutes) or fails with "Connection closed by peer [ip]:port", which does not say
which rank is gone. The watchdog answers that with a heartbeat on the c10d store:

* every `interval_s` each rank's daemon thread does ONE `set` of its own key
  `pyruntime/heartbeat/<rank>` (an increasing counter) and ONE `multi_get` of the others';
* a peer whose value has not changed for `timeout_s` is lost. Ages are measured with this
  process's monotonic clock from the moment the value was last seen to change, so clocks
  on different machines are never compared;
* on loss the thread prints one line naming the rank (with its mesh coordinates when the
  caller gives `describe_rank`) and ends the process with `os._exit(3)`: the main thread
  may be blocked inside a C++ collective, where no Python exception can reach it;
* the heartbeat value doubles as the rank's final state: "done" (finished normally: never
  reported) or "failed" (left with a non-communication error: reported at once instead of
  after the timeout), so the traffic stays one key per rank;
* if the store itself stops answering (the rank hosting the TCPStore died) that is reported
  the same way, naming the host rank when it is known.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import sys
import threading
import time
from typing import Callable, Sequence

import torch.distributed as dist

KEY_PREFIX = "pyruntime/heartbeat/"
# The first rank to detect a loss writes "<ranks>|<message>" here, so every rank reports the
# same culprit even after the store host itself has exited on that verdict.
VERDICT_KEY = "pyruntime/lost"
NO_VERDICT = b"-"
DONE = b"done"
FAILED = b"failed"
EXIT_CODE = 3

# Substrings of the errors a collective raises when a peer vanished or timed out. Only these
# make a rank wait for the watchdog to name the culprit instead of reporting itself failed
# (a survivor that called itself "failed" would be blamed in place of the dead rank).
_COMM_ERROR_MARKERS = ("gloo", "nccl", "connection", "peer", "broken pipe", "socket",
                       "timed out", "timeout", "closed", "reset by")


def is_comm_error(exc: BaseException) -> bool:
    """True for errors a collective raises because some other rank went away."""
    if isinstance(exc, dist.DistError):
        return True
    if not isinstance(exc, RuntimeError):
        return False
    text = str(exc).lower()
    return any(marker in text for marker in _COMM_ERROR_MARKERS)


def describe_by_coords(coords: Callable[[int], dict[str, int]]) -> Callable[[int], str]:
    """`describe_rank` from a coordinates function, e.g. ParallelDims.coords:
    3 -> "rank 3 (dp 1, pp 0, tp 1)"."""
    def describe(rank: int) -> str:
        return f"rank {rank} (" + ", ".join(f"{axis} {i}" for axis, i in coords(rank).items()) + ")"
    return describe


def exit_with_message(message: str) -> None:
    """Default loss action: one line on stderr, then leave without unwinding (the main
    thread may be inside a blocking C++ call; atexit handlers could block the same way)."""
    try:
        sys.stdout.flush()
    except Exception:  # noqa: BLE001 - a closed stdout must not stop the exit
        pass
    try:
        sys.stderr.write(f"pyruntime: error: {message}\n")
        sys.stderr.flush()
    finally:
        os._exit(EXIT_CODE)


def _default_store_clone() -> tuple[dist.Store, bool]:
    """The default process group's store, on a connection of its own when the store can be
    cloned: a TCPStore client serialises its requests, so sharing the main thread's
    connection would stall the heartbeat behind any blocking `wait` the main thread does."""
    from torch.distributed import distributed_c10d

    store = distributed_c10d._get_default_store()
    try:
        return store.clone(), True
    except (RuntimeError, NotImplementedError, AttributeError):
        return store, False


class PeerWatchdog:
    """Heartbeat + loss detection for `world_size` ranks; use as a context manager around the
    training loop. `store` defaults to the default process group's store (call after
    init_process_group). `on_lost(message, ranks)` replaces the print-and-exit action (tests);
    `ranks` is empty when the store itself was lost.

    On leaving the `with` block:
    * normally: the rank marks itself done; the rank hosting the store then waits until every
      peer is done (or reported lost), so the store outlives everyone who still reads it;
    * with a communication error: it keeps beating and waits (up to timeout_s plus two
      intervals) for the watchdog to name the lost rank, which by default ends the process;
      otherwise the error propagates unchanged;
    * with any other error: the rank marks itself failed, so peers name it at once.
    """

    def __init__(self, rank: int, world_size: int, timeout_s: float = 60.0, interval_s: float = 1.0,
                 store: dist.Store | None = None, describe_rank: Callable[[int], str] | None = None,
                 on_lost: Callable[[str, list[int]], None] | None = None,
                 store_host_rank: int | None = None):
        if timeout_s <= 0 or interval_s <= 0:
            raise ValueError(f"timeout_s and interval_s must be > 0, got {timeout_s}, {interval_s}")
        self.rank, self.world_size = rank, world_size
        self.timeout_s = timeout_s
        # A few beats per timeout, so one late beat is never mistaken for a dead rank.
        self.interval_s = min(interval_s, timeout_s / 4)
        self._store = store
        self._describe = describe_rank or (lambda r: f"rank {r}")
        self._on_lost = on_lost or (lambda message, ranks: exit_with_message(message))
        self.store_host_rank = store_host_rank
        self._peers = [r for r in range(world_size) if r != rank]
        self._keys = [KEY_PREFIX + str(r) for r in self._peers]
        self._beat = 0
        self._final: bytes | None = None  # written instead of the counter once finishing
        self._stop = threading.Event()
        self._wake = threading.Event()  # cuts the interval short (finishing)
        self._reported = threading.Event()
        self._peers_finished = threading.Event()
        self._lost: list[int] = []
        self._last_values: dict[int, bytes] = {}
        self._thread: threading.Thread | None = None

    # -- public -------------------------------------------------------------------------

    def start(self) -> "PeerWatchdog":
        if self._thread is not None:
            return self
        if self._store is None:
            self._store, cloned = _default_store_clone()
            if cloned:
                # Only our own connection gets the short timeout: a request to a host that
                # vanished without closing the socket must not block for the pg timeout.
                self._store.set_timeout(datetime.timedelta(seconds=self.timeout_s))
        store = self._store
        store.set(KEY_PREFIX + str(self.rank), b"0")
        # Create the peers' keys if they have not started yet ("" = only if absent), so the
        # multi_get below never blocks on a missing key; an existing value is left alone.
        for key in self._keys:
            store.compare_set(key, "", "0")
        store.compare_set(VERDICT_KEY, "", NO_VERDICT.decode())
        self._thread = threading.Thread(target=self._run, name=f"pyruntime-watchdog-{self.rank}",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """End the thread (returns within about one store round trip)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def lost_ranks(self) -> list[int]:
        """Ranks reported lost so far (empty also when only the store was lost)."""
        return list(self._lost)

    @property
    def reported(self) -> bool:
        return self._reported.is_set()

    def wait_reported(self, timeout: float) -> bool:
        """Block until a loss was reported or `timeout` seconds passed."""
        return self._reported.wait(timeout)

    def finish(self, state: bytes = DONE, wait_for_peers: bool | None = None) -> None:
        """Publish the final state and stop. The store host waits for its peers to finish
        first (at most until they are reported lost) unless told otherwise."""
        if wait_for_peers is None:
            wait_for_peers = self.rank == self.store_host_rank
        self._final = state
        if wait_for_peers and self._thread is not None and self._thread.is_alive() and self._peers:
            self._wake.set()
            if state == DONE:  # bounded by the peers' liveness: a live peer is still working
                while not (self._peers_finished.wait(0.05) or self._reported.is_set()
                           or not self._thread.is_alive()):
                    pass
            else:  # linger a little so peers read "failed" before the store goes away
                self._peers_finished.wait(2 * self.interval_s + 0.5)
        self.stop()
        try:  # the thread may not have written the final state; once more, synchronously
            self._store.set(KEY_PREFIX + str(self.rank), state)
        except Exception:  # noqa: BLE001 - store already gone: nobody is left to read it
            pass

    def __enter__(self) -> "PeerWatchdog":
        return self.start()

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc is None:
            self.finish(DONE)
        elif isinstance(exc, Exception) and is_comm_error(exc):
            # Most likely some peer died; give the heartbeat the time to say which one.
            # Our own beat continues meanwhile, so nobody blames this rank.
            self.wait_reported(self.timeout_s + 2 * self.interval_s)
            self.stop()
        elif isinstance(exc, Exception):
            self.finish(FAILED)
        else:  # KeyboardInterrupt / SystemExit: just go; peers time out on our silence
            self.stop()
        return False

    # -- the thread ---------------------------------------------------------------------

    def _run(self) -> None:
        store = self._store
        own_key = KEY_PREFIX + str(self.rank)
        last_change = {r: time.monotonic() for r in self._peers}
        last_round = time.monotonic()
        while not self._stop.is_set():
            self._beat += 1
            try:
                store.set(own_key, self._final if self._final is not None else str(self._beat))
                *values, verdict = store.multi_get([*self._keys, VERDICT_KEY])
            except Exception as e:  # noqa: BLE001 - any store failure means the store is gone
                if not self._stop.is_set():
                    self._store_lost(e)
                return
            now = time.monotonic()
            if now - last_round > self.timeout_s / 2:
                # This thread itself was not scheduled for a long time (process stopped,
                # machine overloaded): the peers' silence is no evidence, start over.
                last_change = {r: now for r in self._peers}
            last_round = now
            if verdict != NO_VERDICT:  # another rank already named the lost one(s)
                ranks, _, message = verdict.decode().partition("|")
                self._report(message, [int(r) for r in ranks.split(",") if r])
                return
            stale, failed = [], []
            for r, value in zip(self._peers, values):
                if value != self._last_values.get(r):
                    self._last_values[r] = value
                    last_change[r] = now
                if value == FAILED:
                    failed.append(r)
                elif value != DONE and now - last_change[r] >= self.timeout_s:
                    stale.append(r)
            if failed or stale:
                self._peers_lost(failed, stale, {r: now - last_change[r] for r in stale})
                return
            if all(self._last_values.get(r) == DONE for r in self._peers):
                self._peers_finished.set()
            if self._final is not None:  # finishing: poll fast, the host is waiting on us
                self._stop.wait(0.05)
            else:
                self._wake.wait(self.interval_s)
                self._wake.clear()

    def _peers_lost(self, failed: Sequence[int], stale: Sequence[int], ages: dict[int, float]) -> None:
        parts = []
        if failed:
            parts.append(f"{self._names(failed)} exited with an error (see its output)")
        if stale:
            parts.append(f"{self._names(stale)} stopped responding {max(ages.values()):.1f} s ago "
                         "(killed or hung)")
        message = "; ".join(parts) + "; exiting so no rank waits forever"
        ranks = sorted([*failed, *stale])
        try:
            self._store.set(VERDICT_KEY, ",".join(map(str, ranks)) + "|" + message)
        except Exception:  # noqa: BLE001 - the store is gone too: each rank decides alone
            pass
        else:
            if self.rank == self.store_host_rank:
                # Our exit takes the store down: stay one poll longer so the others read the
                # verdict instead of reporting only a lost store.
                time.sleep(2 * self.interval_s)
        self._report(message, ranks)

    def _store_lost(self, error: BaseException) -> None:
        host = self.store_host_rank
        last_host_value = self._last_values.get(host) if host is not None else None
        if host is not None and last_host_value == DONE and self._final is not None:
            return  # the host finished and we are finishing too: nothing is lost
        if host is not None and last_host_value == FAILED:
            self._peers_lost([host], [], {})
            return
        where = f"hosted by {self._describe(host)}" if host is not None else "(host unknown)"
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        self._report(f"lost the c10d store {where} ({reason}); the host was killed or hung; "
                     "exiting so no rank waits forever",
                     [host] if host is not None and host != self.rank else [])

    def _names(self, ranks: Sequence[int]) -> str:
        names = [self._describe(r) for r in sorted(ranks)]
        return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]

    def _report(self, message: str, ranks: list[int]) -> None:
        self._lost = sorted(ranks)
        try:
            self._on_lost(message, self.lost_ranks())
        finally:
            # Set only after the action: a main thread waiting in __exit__ must not go on to
            # print its own traceback while the default action is still writing its line.
            self._reported.set()


def watch_peers(rank: int, world_size: int, timeout_s: float,
                coords: Callable[[int], dict[str, int]] | None = None):
    """The watchdog a launched run uses (a no-op context for a single process): heartbeats on
    the default process group's store, ranks named with their mesh coordinates. The store is
    hosted by rank 0 under a plain env:// launch, by torchrun's agent process under torchrun."""
    if world_size <= 1:
        return contextlib.nullcontext()
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    return PeerWatchdog(rank, world_size, timeout_s=timeout_s,
                        describe_rank=describe_by_coords(coords) if coords else None,
                        store_host_rank=None if agent_store else 0)
