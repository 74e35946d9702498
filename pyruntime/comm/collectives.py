"""Asynchronous collectives over one explicit process group, with byte counting and a debug
delay.

    comm = Collectives(group, CommStats(), CommDebug.from_env())
    pending = comm.all_reduce_sum(flat)        # issued now (async_op=True), runs in the background
    ...                                        # compute overlaps with it
    pending.wait()                             # flat now holds the sum over the group

Every gradient / parameter collective of data parallelism and ZeRO goes through here, so:

- `CommStats` counts the logical bytes of each collective when it is issued: the full
  tensor of an all-reduce, the full (input) buffer of a reduce-scatter, the full (output)
  buffer of an all-gather. Those are the volumes the ZeRO paper compares (DDP moves 1x the
  gradients in all-reduces; ZeRO-3 moves 1x in reduce-scatters and 2x in all-gathers); the
  bytes on the wire per rank are (world - 1) / world of them (reduce-scatter, all-gather) or
  twice that (ring all-reduce).
- `CommDebug(delay_s > 0)` makes a missing `wait()` fail loudly instead of passing by luck:
  each collective is issued only after sleeping `delay_s`; its result lands in a scratch
  buffer while the real output holds NaN (an all-reduce runs on a copy of its tensor and the
  tensor itself is poisoned); `wait()` sleeps again, then copies the result in. Code that
  reads an output before waiting therefore sees NaN or the un-reduced values, whatever the
  timing of the backend.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.distributed as dist

from pyruntime.comm.raw import all_gather_into, reduce_scatter_into

DEBUG_DELAY_ENV = "PYRUNTIME_COMM_DEBUG_DELAY_S"
KINDS = ("all_reduce", "reduce_scatter", "all_gather")


@dataclass
class CommStats:
    """Bytes and calls per collective kind, counted as they are issued (see module docstring)."""

    bytes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    calls: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))

    def record(self, kind: str, nbytes: int) -> None:
        self.bytes[kind] += nbytes
        self.calls[kind] += 1

    def total_bytes(self) -> int:
        return sum(self.bytes.values())

    def take(self) -> dict[str, int]:
        """The counters as flat metric fields (comm_<kind>_bytes / _calls), then reset them."""
        out = {f"comm_{k}_bytes": self.bytes[k] for k in KINDS}
        out.update({f"comm_{k}_calls": self.calls[k] for k in KINDS})
        self.bytes = dict.fromkeys(KINDS, 0)
        self.calls = dict.fromkeys(KINDS, 0)
        return out


@dataclass(frozen=True)
class CommDebug:
    """delay_s > 0: sleep before issuing and before completing each collective, and hide its
    result until wait() (see module docstring). Also honoured by the ZeRO optimizer step."""

    delay_s: float = 0.0

    @staticmethod
    def from_env(environ: dict[str, str] | None = None) -> "CommDebug":
        raw = (os.environ if environ is None else environ).get(DEBUG_DELAY_ENV, "")
        try:
            return CommDebug(delay_s=float(raw) if raw else 0.0)
        except ValueError:
            raise ValueError(f"{DEBUG_DELAY_ENV} must be a number of seconds, got '{raw}'") from None

    @property
    def enabled(self) -> bool:
        return self.delay_s > 0

    def pause(self) -> None:
        if self.delay_s > 0:
            time.sleep(self.delay_s)


class Pending:
    """An issued collective. wait() blocks until it is complete (on CUDA: makes the current
    stream wait for it), then runs the completion step once; later calls return at once."""

    def __init__(self, work, debug: CommDebug, finish: Callable[[], None] | None = None,
                 keep: tuple[torch.Tensor, ...] = ()):
        # keep: the buffers the backend reads or writes, held until completion whatever the caller does
        self._work, self._debug, self._finish, self._keep = work, debug, finish, keep
        self.done = False

    def is_completed(self) -> bool:
        """Whether wait() would return without blocking on the backend. Under the debug delay
        only a waited collective counts, so the delay still exposes a missing wait()."""
        if self.done:
            return True
        if self._debug.enabled:
            return False
        return self._work is None or self._work.is_completed()

    def wait(self) -> None:
        if self.done:
            return
        if self._work is not None:
            self._work.wait()
        self._debug.pause()
        if self._finish is not None:
            self._finish()
        self.done = True
        self._work = self._finish = None
        self._keep = ()


class _Works:
    """Several backend works that complete together."""

    def __init__(self, works: list):
        self.works = works

    def is_completed(self) -> bool:
        return all(w.is_completed() for w in self.works)

    def wait(self) -> None:
        for w in self.works:
            w.wait()


class Collectives:
    """The async collectives of data parallelism over `group`, counted into `stats`."""

    def __init__(self, group: dist.ProcessGroup, stats: CommStats, debug: CommDebug = CommDebug()):
        self.group, self.stats, self.debug = group, stats, debug
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.global_ranks = dist.get_process_group_ranks(group)

    def all_reduce_sum(self, tensor: torch.Tensor) -> Pending:
        """tensor <- sum of tensor over the group, in place, once wait() returns. (DDP divides
        by dp where it copies the gradients in, so the sum is the mean without a pass of its
        own; gloo's AVG is a sum plus one.)"""
        self.stats.record("all_reduce", tensor.numel() * tensor.element_size())
        self.debug.pause()
        if not self.debug.enabled:
            return Pending(dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group, async_op=True),
                           self.debug, keep=(tensor,))
        scratch = tensor.clone()
        work = dist.all_reduce(scratch, op=dist.ReduceOp.SUM, group=self.group, async_op=True)
        tensor.fill_(float("nan"))  # the backend reads `scratch`; a premature reader sees NaN
        return Pending(work, self.debug, lambda: tensor.copy_(scratch), keep=(scratch,))

    def reduce_scatter_avg(self, out: torch.Tensor, inp: torch.Tensor, *, scratch_input: bool = False) -> Pending:
        """out <- this rank's 1/size slice of the mean of inp over the group.
        inp: (size * n,), out: (n,); inp must stay untouched until wait().

        scratch_input=True: the caller gives inp up (its contents are undefined afterwards).
        On CPU (gloo) the reduction then runs in place: gloo implements a reduce-scatter as
        a clone of the input, an all-reduce of the clone and a copy of the slice on wait(),
        so in place saves the clone (a whole input-sized buffer held while the collective is
        in flight), and the all-reduce's completion can be polled (Pending.is_completed;
        gloo's reduce-scatter work only completes in wait()). The bytes counted are the
        reduce-scatter's either way (see the module docstring)."""
        if inp.numel() != out.numel() * self.size:
            raise ValueError(f"reduce_scatter: input of {inp.numel()} elements does not split into "
                             f"{self.size} outputs of {out.numel()}")
        self.stats.record("reduce_scatter", inp.numel() * inp.element_size())
        if scratch_input and inp.device.type == "cpu":
            self.debug.pause()
            work = dist.all_reduce(inp, op=dist.ReduceOp.AVG, group=self.group, async_op=True)
            if self.debug.enabled:
                out.fill_(float("nan"))  # a premature reader sees NaN
            mine = inp[self.rank * out.numel():(self.rank + 1) * out.numel()]
            return Pending(work, self.debug, lambda: out.copy_(mine), keep=(out, inp))
        return self._issue(out, inp, lambda dst: reduce_scatter_into(dst, inp, self.group, True, dist.ReduceOp.AVG))

    def all_gather(self, out: torch.Tensor, inp: torch.Tensor) -> Pending:
        """out <- the concatenation of every rank's inp, in rank order.
        inp: (n,), out: (size * n,); inp must stay untouched until wait().

        On CPU (gloo) it runs as one broadcast per rank into its slice of out: gloo's own
        all-gather receives into a temporary buffer the size of out and copies from it at the
        end, so a prefetched all-gather would hold a unit twice while compute runs; the
        broadcasts write in place and move the same bytes."""
        if out.numel() != inp.numel() * self.size:
            raise ValueError(f"all_gather: output of {out.numel()} elements does not hold "
                             f"{self.size} inputs of {inp.numel()}")
        self.stats.record("all_gather", out.numel() * out.element_size())
        if out.device.type == "cpu":
            return self._issue(out, inp, lambda dst: self._broadcast_slices(dst, inp))
        return self._issue(out, inp, lambda dst: all_gather_into(dst, inp, self.group, True))

    def _broadcast_slices(self, out: torch.Tensor, inp: torch.Tensor) -> "_Works":
        n = inp.numel()
        out[self.rank * n:(self.rank + 1) * n].copy_(inp)
        return _Works([dist.broadcast(out[r * n:(r + 1) * n], src=src, group=self.group, async_op=True)
                       for r, src in enumerate(self.global_ranks)])

    def _issue(self, out: torch.Tensor, inp: torch.Tensor, launch: Callable[[torch.Tensor], object]) -> Pending:
        self.debug.pause()
        if not self.debug.enabled:
            return Pending(launch(out), self.debug, keep=(out, inp))
        scratch = torch.empty_like(out)
        work = launch(scratch)
        out.fill_(float("nan"))
        return Pending(work, self.debug, lambda: out.copy_(scratch), keep=(scratch, inp))
