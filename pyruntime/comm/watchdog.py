"""PeerWatchdog: a rank that dies, hangs or fails must not leave the others waiting forever.

A gloo/NCCL collective whose peer was SIGKILLed either blocks until the process-group
timeout (minutes) or fails with "Connection closed by peer [ip]:port", which does not say
which rank is gone. The watchdog answers that with a heartbeat on the c10d store:

* every `interval_s` each rank's daemon thread does ONE `set` of its own key
  `pyruntime/heartbeat/<rank>` (an increasing counter) and ONE `multi_get` of the others'
  and of the verdict (`poll()`);
* a peer whose value has not changed for `timeout_s` is lost. Ages are measured with this
  process's monotonic clock from the moment the value was last seen to change, so clocks
  on different machines are never compared;
* the heartbeat value doubles as the rank's final state: "done" (finished normally: never
  reported), "failed" (left with an error: reported at once, not after the timeout),
  "failed|<code>|<line>" (left with a user-facing one-line error, e.g. a full disk: every
  peer prints that line, naming the rank, and exits with that code) or "exiting" (read a
  verdict and leaves), so the traffic stays one key per rank;
* the first rank to see a loss writes the verdict (ranks, exit code, line) once
  (compare-and-set), and every rank reports that same verdict: one line on stderr, then
  `os._exit(code)`, since the main thread may be blocked inside a C++ collective where no
  Python exception can reach it;
* the rank hosting the TCPStore never exits while a live peer may still read the store:
  after a verdict it waits (at most timeout_s) until every live peer has acknowledged it
  ("exiting", "done" or "failed"). Otherwise a peer polling a moment later finds the store
  gone and blames the healthy host instead of the rank that died;
* if the store itself stops answering (the host died) that is reported the same way,
  naming the host rank when it is known.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import os
import sys
import threading
import time
from typing import Callable, Sequence

import torch.distributed as dist

KEY_PREFIX = "pyruntime/heartbeat/"
# The first rank to detect a loss writes the verdict here as JSON {"ranks", "code", "message"},
# so every rank reports the same culprit with the same exit code.
VERDICT_KEY = "pyruntime/lost"
NO_VERDICT = b"-"
DONE = b"done"
FAILED = b"failed"
EXITING = b"exiting"
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


def failed_state(code: int, line: str) -> bytes:
    """The final heartbeat of a rank leaving with a user-facing error: peers print `line`."""
    return FAILED + f"|{code}|{' '.join(line.split())}".encode()


def _failure(value: bytes | None) -> tuple[int, str] | None:
    """(exit code, line) of a "failed|<code>|<line>" state, else None."""
    if not value or not value.startswith(FAILED + b"|"):
        return None
    code, _, line = value[len(FAILED) + 1:].decode(errors="replace").partition("|")
    return (int(code), line) if code.isdigit() else None


def _finished(value: bytes | None) -> bool:
    """The peer has left the run on its own terms (and will read the store no more)."""
    return value in (DONE, EXITING) or bool(value and value.startswith(FAILED))


def exit_with_message(message: str, code: int = EXIT_CODE) -> None:
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
        os._exit(code)


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
    init_process_group). `on_lost(message, ranks)` replaces the print-and-exit action (tests;
    `exit_code` then holds the code it would have used); `ranks` is empty when the store itself
    was lost. `describe_error(exc)` -> (exit code, line) marks the errors that are the user's
    to read (bad input, a full disk): peers print that line instead of "exited with an error".
    `clock` is for tests that play out an exact order of events through `poll()`.

    On leaving the `with` block:
    * normally: the rank marks itself done; the rank hosting the store then waits until every
      peer has finished (or is reported lost), so the store outlives everyone who reads it;
    * with a communication error: it keeps beating and waits (up to timeout_s plus two
      intervals) for the watchdog to name the lost rank, which by default ends the process;
      otherwise the error propagates unchanged;
    * with any other error: the rank marks itself failed (with its line, if describe_error
      gives one), so peers name it at once; the host waits until they have read it.
    """

    def __init__(self, rank: int, world_size: int, timeout_s: float = 60.0, interval_s: float = 1.0,
                 store: dist.Store | None = None, describe_rank: Callable[[int], str] | None = None,
                 on_lost: Callable[[str, list[int]], None] | None = None,
                 store_host_rank: int | None = None,
                 describe_error: Callable[[BaseException], tuple[int, str] | None] | None = None,
                 clock: Callable[[], float] = time.monotonic):
        if timeout_s <= 0 or interval_s <= 0:
            raise ValueError(f"timeout_s and interval_s must be > 0, got {timeout_s}, {interval_s}")
        self.rank, self.world_size = rank, world_size
        self.timeout_s = timeout_s
        # A few beats per timeout, so one late beat is never mistaken for a dead rank.
        self.interval_s = min(interval_s, timeout_s / 4)
        self._store = store
        self._describe = describe_rank or (lambda r: f"rank {r}")
        self._on_lost = on_lost or (lambda message, ranks: exit_with_message(message, self.exit_code))
        self._describe_error = describe_error or (lambda exc: None)
        self._clock = clock
        self.store_host_rank = store_host_rank
        self.exit_code = EXIT_CODE
        self._peers = [r for r in range(world_size) if r != rank]
        self._own_key = KEY_PREFIX + str(rank)
        self._keys = [KEY_PREFIX + str(r) for r in self._peers]
        self._beat = 0
        self._final: bytes | None = None  # written instead of the counter once finishing
        self._verdict: dict | None = None  # the verdict the host is waiting to see acknowledged
        self._verdict_at = 0.0
        self._stop = threading.Event()
        self._wake = threading.Event()  # cuts the interval short (finishing)
        self._reported = threading.Event()
        # One final line per process: once the main thread leaves with its own error, the
        # thread reports nothing more (and if the thread is already reporting, the main thread
        # waits here until the thread's exit ends the process).
        self._report_lock = threading.Lock()
        self._leaving = False
        self._peers_finished = threading.Event()
        self._lost: list[int] = []
        self._last_values: dict[int, bytes] = {}
        self._last_change: dict[int, float] = {}
        self._last_round = 0.0
        self._thread: threading.Thread | None = None

    # -- public -------------------------------------------------------------------------

    def start(self, thread: bool = True) -> "PeerWatchdog":
        """Publish this rank's first beat and start polling (thread=False: the caller polls)."""
        if self._thread is not None:
            return self
        if self._store is None:
            self._store, cloned = _default_store_clone()
            if cloned:
                # Only our own connection gets the short timeout: a request to a host that
                # vanished without closing the socket must not block for the pg timeout.
                self._store.set_timeout(datetime.timedelta(seconds=self.timeout_s))
        store = self._store
        store.set(self._own_key, b"0")
        # Create the peers' keys if they have not started yet ("" = only if absent), so the
        # multi_get below never blocks on a missing key; an existing value is left alone.
        for key in self._keys:
            store.compare_set(key, "", "0")
        store.compare_set(VERDICT_KEY, "", NO_VERDICT.decode())
        now = self._clock()
        self._last_change = dict.fromkeys(self._peers, now)
        self._last_round = now
        if thread:
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
        """Publish the final state and stop. The store host first waits until its peers have
        finished too (bounded by their liveness: a silent peer is reported lost, or, when this
        rank is failing itself, counted as gone) unless told otherwise."""
        if wait_for_peers is None:
            wait_for_peers = self.rank == self.store_host_rank
        self._final = state
        if wait_for_peers and self._thread is not None and self._thread.is_alive() and self._peers:
            self._wake.set()
            while not (self._peers_finished.wait(0.05) or self._reported.is_set()
                       or not self._thread.is_alive()):
                pass
        self.stop()
        try:  # the thread may not have written the final state; once more, synchronously
            self._store.set(self._own_key, state)
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
            with self._report_lock:
                self._leaving = True
            described = self._describe_error(exc)
            self.finish(failed_state(*described) if described else FAILED)
        else:  # KeyboardInterrupt / SystemExit: just go; peers time out on our silence
            self.stop()
        return False

    # -- one round ----------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set() and self.poll():
            if self._final is not None or self._verdict is not None:
                self._stop.wait(0.05)  # finishing or awaiting acks: others are waiting on us
            else:
                self._wake.wait(self.interval_s)
                self._wake.clear()

    def poll(self) -> bool:
        """One round: write this rank's beat (or final state), read the peers' and the
        verdict, act on them. False once there is nothing more to do (reported, or stopped)."""
        self._beat += 1
        own = self._final or (EXITING if self._verdict else str(self._beat).encode())
        try:
            self._store.set(self._own_key, own)
            *values, verdict = self._store.multi_get([*self._keys, VERDICT_KEY])
        except Exception as e:  # noqa: BLE001 - any store failure means the store is gone
            if not self._stop.is_set():
                self._store_lost(e)
            return False
        now = self._clock()
        if now - self._last_round > self.timeout_s / 2:
            # This thread itself was not scheduled for a long time (process stopped,
            # machine overloaded): the peers' silence is no evidence, start over.
            self._last_change = dict.fromkeys(self._peers, now)
        self._last_round = now
        for r, value in zip(self._peers, values):
            if value != self._last_values.get(r):
                self._last_values[r], self._last_change[r] = value, now
        if self._verdict is not None:
            return self._await_acks(now)
        failing = self._final is not None and self._final.startswith(FAILED)
        if verdict != NO_VERDICT and not failing:  # another rank already named the lost one(s)
            return self._conclude(json.loads(verdict), now)
        failed = [r for r in self._peers if (self._last_values.get(r) or b"").startswith(FAILED)]
        stale = [r for r in self._peers if not _finished(self._last_values.get(r))
                 and now - self._last_change[r] >= self.timeout_s]
        if failing:  # we leave with our own error: peers that left or went silent are gone
            if all(_finished(self._last_values.get(r)) or r in stale for r in self._peers):
                self._peers_finished.set()
            return True
        if failed or stale:
            return self._publish(self._verdict_for(failed, stale, now), now)
        if all(_finished(self._last_values.get(r)) for r in self._peers):
            self._peers_finished.set()
        return True

    def _verdict_for(self, failed: Sequence[int], stale: Sequence[int], now: float) -> dict:
        parts, codes = [], set()
        plain = [r for r in failed if _failure(self._last_values.get(r)) is None]
        for r in failed:
            if (described := _failure(self._last_values.get(r))) is not None:
                parts.append(f"{self._describe(r)}: {described[1]}")
                codes.add(described[0])
        if plain:
            parts.append(f"{self._names(plain)} exited with an error (see its output)")
        if stale:
            age = max(now - self._last_change[r] for r in stale)
            parts.append(f"{self._names(stale)} stopped responding {age:.1f} s ago (killed or hung)")
        if plain or stale or len(codes) != 1:
            return {"ranks": sorted([*failed, *stale]), "code": EXIT_CODE,
                    "message": "; ".join(parts) + "; exiting so no rank waits forever"}
        return {"ranks": sorted(failed), "code": codes.pop(), "message": "; ".join(parts)}

    def _publish(self, verdict: dict, now: float) -> bool:
        """Write the verdict unless another rank wrote one first; act on whichever stands."""
        try:
            current = self._store.compare_set(VERDICT_KEY, NO_VERDICT.decode(), json.dumps(verdict))
            verdict = json.loads(current)
        except Exception:  # noqa: BLE001 - the store is gone too: each rank decides alone
            self._report_verdict(verdict)
            return False
        return self._conclude(verdict, now)

    def _conclude(self, verdict: dict, now: float) -> bool:
        """Act on the standing verdict: acknowledge it and report, except the store host,
        which first waits for every live peer's acknowledgement (its exit ends the store)."""
        if self.rank != self.store_host_rank:
            try:
                self._store.set(self._own_key, EXITING)
            except Exception:  # noqa: BLE001 - the store is gone: the host no longer waits for us
                pass
            self._report_verdict(verdict)
            return False
        self._verdict, self._verdict_at = verdict, now
        return self._await_acks(now)

    def _await_acks(self, now: float) -> bool:
        lost = set(self._verdict["ranks"])
        waiting = [r for r in self._peers if r not in lost and not _finished(self._last_values.get(r))]
        if waiting and now - self._verdict_at < self.timeout_s:
            return True
        self._report_verdict(self._verdict)
        return False

    def _store_lost(self, error: BaseException) -> None:
        host = self.store_host_rank
        last_host_value = self._last_values.get(host) if host is not None else None
        if self._final is not None and (self._final.startswith(FAILED) or last_host_value == DONE):
            return  # we are leaving anyway (with our own error, or the host finished too)
        if host is not None and (last_host_value or b"").startswith(FAILED):
            self._report_verdict(self._verdict_for([host], [], self._clock()))
            return
        where = f"hosted by {self._describe(host)}" if host is not None else "(host unknown)"
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        self._report(f"lost the c10d store {where} ({reason}); the host was killed or hung; "
                     "exiting so no rank waits forever",
                     [host] if host is not None and host != self.rank else [])

    def _names(self, ranks: Sequence[int]) -> str:
        names = [self._describe(r) for r in sorted(ranks)]
        return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]

    def _report_verdict(self, verdict: dict) -> None:
        self.exit_code = int(verdict.get("code", EXIT_CODE))
        self._report(str(verdict["message"]), [int(r) for r in verdict["ranks"]])

    def _report(self, message: str, ranks: list[int]) -> None:
        try:
            with self._report_lock:
                if self._leaving:
                    return
                self._lost = sorted(ranks)
                self._on_lost(message, self.lost_ranks())
        finally:
            # Set only after the action: a main thread waiting in __exit__ must not go on to
            # print its own traceback while the default action is still writing its line.
            self._reported.set()


def watch_peers(rank: int, world_size: int, timeout_s: float,
                coords: Callable[[int], dict[str, int]] | None = None,
                describe_error: Callable[[BaseException], tuple[int, str] | None] | None = None):
    """The watchdog a launched run uses (a no-op context for a single process): heartbeats on
    the default process group's store, ranks named with their mesh coordinates. The store is
    hosted by rank 0 under a plain env:// launch, by torchrun's agent process under torchrun."""
    if world_size <= 1:
        return contextlib.nullcontext()
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    return PeerWatchdog(rank, world_size, timeout_s=timeout_s,
                        describe_rank=describe_by_coords(coords) if coords else None,
                        store_host_rank=None if agent_store else 0, describe_error=describe_error)
