"""Pipeline-parallel schedules: which rank computes and communicates what, in which order.

    actions = build_schedule("1f1b", pp=4, microbatches=8)    # actions[rank]: list[Action]
    result = simulate("interleaved", pp=4, microbatches=8, virtual_stages=2)
    result.bubble_fraction, result.peak_activations, result.events
    actions = load_schedule_csv("my_schedule.csv", pp=4)       # user-written, validated

Placement: with pp ranks and v chunks per rank, chunk c of rank r is global stage c*pp + r
(Megatron interleaved); stage 0 holds the embedding, stage pp*v-1 the loss.

Schedules (schedule_names(): the C++ generator's list, the one source of the names):
  naive        one micro-batch at a time through every stage, forward then backward.
  gpipe        all forwards, then all backwards.
  1f1b         pp-rank-1 warm-up forwards, then one forward / one backward, then drain.
  interleaved  Megatron's interleaved 1F1B over v >= 2 chunks per rank (microbatches % pp == 0).
  zb           ZB-H1: 1F1B with B split into B (input grad) and W (weight grad); W trails B by
               `rank` backwards and fills the cool-down. Same activation memory as 1F1B.

Actions: F, B, W compute one (chunk, micro-batch); B is the full backward unless the schedule
has W actions. SEND_F/RECV_F carry activations to the next stage, SEND_B/RECV_B gradients to
the previous one; `peer` is the other rank.

Executor convention (how SEND/RECV actions are posted and waited for; what the simulator
models and why generated lists cannot deadlock on NCCL or gloo): written once, in
csrc/core/schedule.h; the executor (executor.py) implements it.

The generators, the validator and the simulator are C++ (csrc/core/schedule.h, through
pyruntime._C); this module converts their results into the frozen dataclasses below.
"""
from __future__ import annotations

import csv
import os
import re
from dataclasses import dataclass, field, replace
from typing import Sequence, Union

from pyruntime.core import load_core



def schedule_names() -> tuple[str, ...]:
    """The schedules the C++ generator accepts (csrc/core/schedule_gen.cpp holds the list)."""
    return tuple(load_core("pipeline schedules").schedule_names())

COMPUTE_KINDS = ("F", "B", "W")
COMM_KINDS = ("SEND_F", "RECV_F", "SEND_B", "RECV_B")


@dataclass(frozen=True)
class Action:
    """One step of one rank. stage is chunk * pp + rank once a generator or validator filled it."""
    kind: str
    microbatch: int
    chunk: int = 0
    peer: int = -1   # the other rank of a SEND_*/RECV_*; -1 for compute
    stage: int = -1

    @property
    def is_comm(self) -> bool:
        return self.kind in COMM_KINDS


Schedule = Sequence[Sequence[Action]]  # [rank][position]


@dataclass(frozen=True)
class Costs:
    """Time of one micro-batch through a rank's whole share of the model (all its chunks); one
    action on one chunk costs the value / virtual_stages, so schedules with different v compare
    on the same model. comm_latency is per message, not divided."""
    forward: float = 1.0
    backward: float = 2.0          # B of a schedule without W: input + weight gradients
    backward_input: float = 1.0    # B of a schedule with W (zero bubble)
    backward_weight: float = 1.0   # W
    comm_latency: float = 0.0


@dataclass(frozen=True)
class TimedEvent:
    """One action of one rank with its start and end time: from the simulator, or recorded by
    the executor (then in seconds). For comm actions start is when the batch was posted."""
    rank: int
    kind: str
    microbatch: int
    chunk: int
    start: float
    end: float
    peer: int = -1

    @property
    def duration(self) -> float:
        return self.end - self.start


@dataclass(frozen=True)
class SimResult:
    """Simulated run of a schedule. Per-rank tuples are indexed by rank."""
    schedule: str                            # its name, or "custom" for user-written lists
    pp: int
    microbatches: int
    virtual_stages: int
    makespan: float
    busy: tuple[float, ...]                  # compute time
    bubble_fractions: tuple[float, ...]      # (makespan - busy) / makespan
    peak_activations: tuple[int, ...]        # most live (chunk, micro-batch) pairs: F done, B not;
                                             # each holds 1/virtual_stages of the rank's layers
    peak_pending_weight_grads: tuple[int, ...]  # most pairs with B done and W not (zb only)
    events: tuple[TimedEvent, ...] = field(repr=False)

    @property
    def bubble_fraction(self) -> float:
        """Mean over ranks: 1 - total busy time / (pp * makespan)."""
        return sum(self.bubble_fractions) / len(self.bubble_fractions)


def _core():
    return load_core("pipeline schedules")


def _to_core(C, actions: Schedule):
    return [[C.PipelineAction(a.kind, a.microbatch, a.chunk, a.peer, a.stage) for a in rank] for rank in actions]


def _from_core(actions) -> list[list[Action]]:
    return [[Action(a.kind, a.microbatch, a.chunk, a.peer, a.stage) for a in rank] for rank in actions]


def build_schedule(schedule: str, pp: int, microbatches: int, virtual_stages: int = 1, *,
                   communication: bool = True) -> list[list[Action]]:
    """Per-rank action lists of a named schedule (one of schedule_names()). With communication=False
    only the F/B/W order, e.g. to edit and pass to insert_communication or a CSV file.

    Raises ValueError (naming the numbers) for pp < 1, microbatches < 1, 1f1b/zb/interleaved
    with microbatches < pp, interleaved with virtual_stages < 2 or microbatches % pp != 0,
    virtual_stages != 1 for the others, and unknown names.
    """
    C = _core()
    make = C.generate_schedule if communication else C.generate_compute_order
    return _from_core(make(schedule, pp, microbatches, virtual_stages))


def insert_communication(actions: Schedule, pp: int, microbatches: int,
                         virtual_stages: int = 1) -> list[list[Action]]:
    """Adds the SEND/RECV actions to compute-only lists, at places that cannot deadlock under
    the executor convention (csrc/core/schedule.h explains how they are chosen)."""
    C = _core()
    return _from_core(C.insert_communication(_to_core(C, actions), pp, microbatches, virtual_stages))


def simulate(schedule: Union[str, Schedule], pp: int, microbatches: int, virtual_stages: int = 1,
             costs: Costs | None = None, *, events: bool = True) -> SimResult:
    """Validates and simulates a named schedule or per-rank action lists.

    Raises ValueError naming the rank, the action's position and the action when the lists
    are not executable: unmatched or out-of-order messages, an action before the data it
    needs, duplicates, a missing F/B/W, or a deadlock. events=False (named schedules): the
    result's events are empty and no action crosses into Python, which is what makes the
    planner's search of thousands of layouts fast.
    """
    C = _core()
    c = costs or Costs()
    timing = dict(forward=c.forward, backward=c.backward, backward_input=c.backward_input,
                  backward_weight=c.backward_weight, comm_latency=c.comm_latency)
    if isinstance(schedule, str) and not events:
        name, r = schedule, C.simulate_named(schedule, pp, microbatches, virtual_stages, **timing)
    else:
        if isinstance(schedule, str):
            name, core_actions = schedule, C.generate_schedule(schedule, pp, microbatches, virtual_stages)
        else:
            name, core_actions = "custom", _to_core(C, schedule)
        r = C.validate_schedule(core_actions, pp, microbatches, virtual_stages, **timing)
    timed = tuple(TimedEvent(e.rank, e.kind, e.microbatch, e.chunk, e.start, e.end, e.peer) for e in r.events)
    return SimResult(name, pp, microbatches, virtual_stages, r.makespan, tuple(r.busy), tuple(r.bubble_fraction),
                     tuple(r.peak_activations), tuple(r.peak_pending_weight_grads), timed)


def live_peaks(schedule: str, pp: int, microbatches: int, virtual_stages: int = 1) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Per rank, the most live activations ((chunk, micro-batch) pairs with F done and B not)
    and pending weight gradients (B done, W not) of a named schedule: simulate's
    peak_activations / peak_pending_weight_grads, read from the compute order alone (they do
    not depend on timing), so without inserting messages or simulating."""
    activations, pending = _core().live_peaks(schedule, pp, microbatches, virtual_stages)
    return tuple(activations), tuple(pending)


# ---- user-written schedules --------------------------------------------------------------

_CSV_HEADER = "rank,kind,microbatch,chunk,peer"
_FIELDS_HELP = "expected 'rank,kind,microbatch[,chunk[,peer]]'"


def _default_peer(kind: str, rank: int, chunk: int, pp: int, virtual_stages: int) -> int:
    # The rank of the neighbouring stage; out of range is left to the validator to report.
    stage = chunk * pp + rank
    other = stage + 1 if kind in ("SEND_F", "RECV_B") else stage - 1
    return other % pp if 0 <= other < pp * virtual_stages else -1


def _parse_row(row: list[str], where: str, pp: int, virtual_stages: int) -> tuple[int, Action]:
    cells = [c.strip() for c in row]
    if not 3 <= len(cells) <= 5:
        raise ValueError(f"{where}: {_FIELDS_HELP}, got {','.join(row)!r}")
    try:
        rank, microbatch = int(cells[0]), int(cells[2])
        chunk = int(cells[3]) if len(cells) > 3 and cells[3] else 0
        peer = int(cells[4]) if len(cells) > 4 and cells[4] else None
    except ValueError:
        raise ValueError(f"{where}: rank, microbatch, chunk and peer must be integers, got "
                         f"{','.join(row)!r}") from None
    kind = cells[1].upper()
    if kind not in COMPUTE_KINDS + COMM_KINDS:
        raise ValueError(f"{where}: unknown action kind {cells[1]!r}; expected one of "
                         f"{', '.join(COMPUTE_KINDS + COMM_KINDS)}")
    if not 0 <= rank < pp:
        raise ValueError(f"{where}: rank {rank} out of range for pp={pp}")
    if peer is None:
        peer = _default_peer(kind, rank, chunk, pp, virtual_stages) if kind in COMM_KINDS else -1
    return rank, Action(kind, microbatch, chunk, peer)


def _read_csv(path: str | os.PathLike, pp: int, virtual_stages: int) -> tuple[list[list[Action]], list[list[int]]]:
    actions: list[list[Action]] = [[] for _ in range(pp)]
    lines: list[list[int]] = [[] for _ in range(pp)]
    with open(path, newline="") as f:
        for number, line in enumerate(f, start=1):
            text = line.split("#", 1)[0].strip()
            if not text or text.lower().startswith("rank"):
                continue
            rank, action = _parse_row(next(csv.reader([text])), f"{path}:{number}", pp, virtual_stages)
            actions[rank].append(action)
            lines[rank].append(number)
    return actions, lines


def load_schedule_csv(path: str | os.PathLike, pp: int, virtual_stages: int = 1,
                      microbatches: int | None = None) -> list[list[Action]]:
    """Reads a user-written schedule and validates it with the same C++ checks as generated ones.

    Format: one action per line, ``rank,kind,microbatch[,chunk[,peer]]``; each rank's actions
    run in the order of their lines (lines of different ranks may interleave). kind is F, B, W,
    SEND_F, RECV_F, SEND_B or RECV_B (any case); chunk defaults to 0; peer may be left out for
    messages (it is the rank of the neighbouring stage) and must be left out for compute.
    Blank lines, ``#`` comments and a header line starting with "rank" are skipped::

        # 1F1B on 2 ranks, 2 micro-batches: compute only, messages are added
        rank,kind,microbatch
        0,F,0
        0,F,1
        0,B,0
        0,B,1
        1,F,0
        1,B,0
        1,F,1
        1,B,1

    Write compute actions only (recommended) and the messages are inserted as for generated
    schedules, deadlock-free; or write every SEND/RECV yourself and they are checked as given.
    microbatches defaults to 1 + the largest micro-batch index. save_schedule_csv writes this
    format, so a generated schedule is a good starting point.

    Raises ValueError naming ``path:line`` for malformed lines and for actions the validator
    rejects (inserted messages have no line; then the rank and position are named).
    """
    rows, lines = _read_csv(path, pp, virtual_stages)
    if not any(rows):
        raise ValueError(f"{path}: no actions")
    if microbatches is None:
        microbatches = 1 + max(a.microbatch for rank in rows for a in rank)
    explicit = any(a.is_comm for rank in rows for a in rank)
    actions = rows
    try:
        if not explicit:
            actions = insert_communication(rows, pp, microbatches, virtual_stages)
        simulate(actions, pp, microbatches, virtual_stages)
    except ValueError as e:
        raise ValueError(_locate(str(e), path, actions, lines, inserted=actions is not rows)) from None
    return [[replace(a, stage=a.chunk * pp + rank) for a in rank_actions] for rank, rank_actions in enumerate(actions)]


def _locate(message: str, path, actions: Schedule, lines: list[list[int]], inserted: bool) -> str:
    """Prefixes the validator's first "rank R action #I" with the file line that wrote that
    action. With inserted messages the k-th compute action of a rank is its k-th line, and the
    messages themselves have none."""
    m = re.search(r"rank (\d+) action #(\d+)", message)
    if m is None:
        return f"{path}: {message}"
    rank, index = int(m.group(1)), int(m.group(2))
    if inserted:
        if actions[rank][index].is_comm:
            return f"{path}: {message}"
        index = sum(1 for a in actions[rank][:index] if not a.is_comm)
    return f"{path}:{lines[rank][index]}: {message}"


def save_schedule_csv(actions: Schedule, path: str | os.PathLike) -> None:
    """Writes per-rank action lists in the format load_schedule_csv reads."""
    with open(path, "w", newline="") as f:
        f.write(f"{_CSV_HEADER}\n")
        for rank, rank_actions in enumerate(actions):
            for a in rank_actions:
                peer = a.peer if a.is_comm else ""
                f.write(f"{rank},{a.kind},{a.microbatch},{a.chunk},{peer}\n")
