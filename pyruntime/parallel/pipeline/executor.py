"""The pipeline executor: runs this rank's action list (schedule.py) for one training step.

    executor = PipelineExecutor(chunks, actions[pp_rank], PipelineSpec(...), loss_fn=..., engine=...)
    loss_sum = executor.run_step(micro_batches)       # summed micro-batch losses (last stage)

Communication follows the executor convention written in csrc/core/schedule.h (one
batch_isend_irecv per run of SEND/RECV actions, posting never blocks, an F or B waits just
before it runs for the receive of its input, sends are waited for at the end of the
step). On gloo a batch's receives
are posted one compute earlier than listed (see receive_ahead), so the transfer overlaps
that compute. Receive buffers are allocated from the shapes the config fixes (micro-batch,
sequence or sequence shard, hidden size), so there is no per-message handshake. With
debug=True (PYRUNTIME_PP_DEBUG=1) every message is preceded by a small header batch (kind,
micro-batch, stage, shape, dtype) that the receiver checks against what it expects, naming
both sides on a mismatch instead of hanging or reading garbage. Every wait has a deadline:
a peer that does not answer is named in the error.

Compute: F runs a chunk's forward (the last stage also the loss, divided by the number of
micro-batches so the accumulated gradient is the mean, exactly as single-process training);
B its backward from the received output gradient (or the loss); with a zero-bubble schedule
B is that backward with every GEMM's weight gradient deferred (ops/wgrad.py: the GEMM stashes
its input and output gradient) and W runs the stashed dW GEMMs, so B + W do one backward's
work and W walks no graph (the first stage, which needs no input gradient, does its whole
backward in W). Activations and their graphs are dropped as soon as the last
backward that needs them has run.

Data parallelism composes through the engine (parallel/data.py): gradient collectives are
armed only for each chunk's last action that accumulates a parameter's gradient (its last B,
or with zero bubble its last W for the deferred GEMM weights), so buckets / ZeRO units are
reduced once per step, while the remaining backward still runs.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.distributed as dist

from pyruntime.ops import wgrad
from pyruntime.parallel.pipeline.schedule import Action, TimedEvent
from pyruntime.parallel.pipeline.split import StageChunk

DEBUG_ENV = "PYRUNTIME_PP_DEBUG"
_KIND_CODE = {"SEND_F": 1, "RECV_F": 1, "SEND_B": 2, "RECV_B": 2}
_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
_HEADER_LEN = 8  # kind, micro-batch, sender stage, dtype, ndim, up to 3 dims


class PipelineError(RuntimeError):
    """A message that does not match, or a peer that does not answer."""


@dataclass(frozen=True)
class PipelineSpec:
    """What every rank knows without talking: the layout and the activation shape."""

    pp: int
    pp_rank: int
    virtual_stages: int
    microbatches: int
    activation_shape: tuple[int, ...]   # (micro-batch, tokens per rank, hidden)
    activation_dtype: torch.dtype
    timeout_s: float = 300.0
    debug: bool = False

    @property
    def num_stages(self) -> int:
        return self.pp * self.virtual_stages

    def stage(self, chunk: int, rank: int | None = None) -> int:
        return chunk * self.pp + (self.pp_rank if rank is None else rank)


def debug_from_env() -> bool:
    return os.environ.get(DEBUG_ENV, "0") not in ("", "0")


@dataclass
class _Slot:
    """One (chunk, micro-batch) on this rank during a step."""

    input: torch.Tensor | None = None       # received activation (requires grad) or tokens
    output: torch.Tensor | None = None      # activation to send, or the logits (last stage)
    output_grad: torch.Tensor | None = None  # received gradient of the output (or of the logits)
    loss: torch.Tensor | None = None        # last stage: scaled loss of the detached logits
    logits: torch.Tensor | None = None      # ... and those detached logits
    input_grad: torch.Tensor | None = None  # to send to the previous stage
    deferred: wgrad.WeightGradStore | None = None  # zero bubble: the GEMMs' dW after B, until W


@dataclass
class _InFlight:
    """A posted batch holding receives, until the computes that consume them wait for them."""

    actions: list[Action]
    works: list
    tensors: list[torch.Tensor]
    posted: float  # seconds from the step's start

    @property
    def per_op(self) -> bool:
        """One work per op (gloo): a receive can be waited for alone. Else (NCCL's coalesced
        group) the batch's works complete together and are waited for together."""
        return len(self.works) == len(self.actions)


@dataclass
class StepRecord:
    """Timed actions of the last step (seconds from the step's start), for the timeline."""

    events: list[TimedEvent] = field(default_factory=list)
    duration: float = 0.0
    wall_start: float = 0.0  # time.time() at the step's start: aligns the ranks' records
    # (start, end) of every stretch the rank sat blocked on a message: receives its next
    # compute needs, sends at the end of the step (posting time is in the comm events)
    waits: list[tuple[float, float]] = field(default_factory=list)

    def blocked(self) -> float:
        return sum(end - start for start, end in self.waits)

    def busy(self) -> float:
        return sum(e.duration for e in self.events if e.kind in ("F", "B", "W"))


class PipelineExecutor:
    def __init__(self, chunks: Sequence[StageChunk], actions: Sequence[Action], spec: PipelineSpec, *,
                 pp_group: dist.ProcessGroup, device: torch.device,
                 loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                 engine=None, autocast: contextlib.AbstractContextManager | None = None):
        self.chunks, self.actions, self.spec = list(chunks), list(actions), spec
        self.group, self.device, self.loss_fn, self.engine = pp_group, device, loss_fn, engine
        self.autocast = autocast or contextlib.nullcontext()
        self.split_backward = any(a.kind == "W" for a in self.actions)
        if self.split_backward:  # the model's plain nn.Linear GEMMs too (ops' GEMMs already are)
            for model in {id(c.model): c.model for c in self.chunks}.values():
                wgrad.make_linears_deferrable(model)
        # Chunks that send an input gradient record deferrable GEMMs; the first stage's
        # backward is whole (in W), so its plain GEMMs are faster.
        self.defers = [self.split_backward and not c.is_first for c in self.chunks]
        # Global ranks of the pp peers: batch_isend_irecv takes global ranks.
        self.peer_global = {r: dist.get_global_rank(pp_group, r) for r in range(spec.pp)}
        # chunk -> index of its last action accumulating weight gradients (W with zero bubble:
        # the deferred GEMM weights) and, with zero bubble, of its last B (the other parameters)
        self.last_grad_action = self._last_actions("W" if self.split_backward else "B")
        self.last_backward = self._last_actions("B") if self.split_backward else {}
        # [begin, end) of each compute action and of each run of comm actions (one batch)
        self.segments: list[tuple[int, int]] = []
        for i, a in enumerate(self.actions):
            if a.is_comm and i > 0 and self.actions[i - 1].is_comm:
                self.segments[-1] = (self.segments[-1][0], i + 1)
            else:
                self.segments.append((i, i + 1))
        # gloo runs every op as its own work, in the background, with no stream to hold up:
        # there a batch's receives are posted one compute ahead of their place in the list
        # (per-peer order kept), so their data is in when the consumer starts, as PyTorch's
        # runtime does. Not on NCCL (a group occupies the communicator's stream, which the
        # simulator's convention models) and not in debug mode (headers mirror batches).
        self.receive_ahead = dist.get_backend(pp_group) == "gloo" and not spec.debug
        self.chunk_params = [c.parameters_of_chunk() for c in self.chunks]
        self.record = StepRecord()

    def _last_actions(self, kind: str) -> dict[int, int]:
        """Index of each chunk's last action of `kind`."""
        return {a.chunk: i for i, a in enumerate(self.actions) if a.kind == kind}

    # -- one step ----------------------------------------------------------------------------
    def run_step(self, micro: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """Runs the schedule over the micro-batches; returns the sum of their (unscaled)
        losses on the last stage's rank, zero elsewhere."""
        if len(micro) != self.spec.microbatches:
            raise PipelineError(f"pipeline: got {len(micro)} micro-batches, the schedule was built for "
                                f"{self.spec.microbatches}")
        self.slots: dict[tuple[int, int], _Slot] = {}
        self.micro = micro
        self.loss_sum = torch.zeros((), device=self.device)
        self.pending_sends: list[tuple[list, list[torch.Tensor]]] = []
        self.in_flight: dict[tuple[str, int, int], _InFlight] = {}  # (RECV_*, chunk, mb) -> batch
        self.record = StepRecord(wall_start=time.time())
        self.t0 = time.perf_counter()
        if self.engine is not None:
            self.engine.begin_pipeline_step()
        self.deferred_ids: dict[int, set[int]] = {}  # chunk -> ids of the parameters W accumulates
        self.posted_ahead: set[int] = set()  # action indices of receives already posted
        for k, (begin, end) in enumerate(self.segments):
            if self.actions[begin].is_comm:
                self._communicate(begin, end)
                continue
            if self.receive_ahead and k + 1 < len(self.segments) and self.actions[self.segments[k + 1][0]].is_comm:
                self._post_receives_ahead(*self.segments[k + 1])
            self._compute(begin)
        for key in list(self.in_flight):  # none for validated schedules: all consumed
            if key in self.in_flight:
                self._receive(key)
        for works, _tensors in self.pending_sends:
            self._wait(works, "SEND batch at the end of the step", None)
        self.pending_sends = []
        if self.engine is not None:
            self.engine.end_pipeline_step()
        leftover = [k for k, s in self.slots.items() if s.output is not None or s.input is not None]
        if leftover:  # the validator makes this impossible for accepted schedules
            raise PipelineError(f"pipeline: activations of (chunk, micro-batch) {leftover} outlived the step")
        self.record.duration = time.perf_counter() - self.t0
        return self.loss_sum

    def _slot(self, a: Action) -> _Slot:
        return self.slots.setdefault((a.chunk, a.microbatch), _Slot())

    def _now(self) -> float:
        return time.perf_counter() - self.t0

    # -- compute -----------------------------------------------------------------------------
    def _compute(self, index: int) -> None:
        a = self.actions[index]
        if self.engine is not None and self.last_backward.get(a.chunk) == index and a.chunk in self.deferred_ids:
            # zero bubble: the parameters B accumulates (norms, ...) get their last gradient now;
            # the deferred GEMM weights wait for the last W (armed below)
            deferred = self.deferred_ids[a.chunk]
            self.engine.arm_gradient_sync([p for p in self.chunk_params[a.chunk] if id(p) not in deferred])
        if self.engine is not None and self.last_grad_action.get(a.chunk) == index:
            self.engine.arm_gradient_sync(self.chunk_params[a.chunk])
        if a.kind != "W":  # F consumes a received activation, B a received gradient
            key = ("RECV_" + a.kind, a.chunk, a.microbatch)
            if key in self.in_flight:
                self._receive(key)
        start = self._now()
        with wgrad.deferrable_forward() if self.defers[a.chunk] else contextlib.nullcontext():
            {"F": self._forward, "B": self._backward, "W": self._weight_grad}[a.kind](a)
        if self.engine is not None:
            self.engine.after_pipeline_action()
        self.record.events.append(TimedEvent(self.spec.pp_rank, a.kind, a.microbatch, a.chunk, start, self._now()))

    def _forward(self, a: Action) -> None:
        chunk, slot = self.chunks[a.chunk], self._slot(a)
        x, y = self.micro[a.microbatch]
        if chunk.is_first:
            slot.input = x.to(self.device)
        elif slot.input is None:
            raise PipelineError(f"pipeline: rank {self.spec.pp_rank} F(mb={a.microbatch}, chunk={a.chunk}) "
                                "ran before its activation was received")
        with self.autocast:
            slot.output = chunk(slot.input)
            if chunk.is_last:
                # The loss hangs off a detached copy of the logits, so its backward runs once
                # (B, below) and gives the logits' gradient; the chunk's own backward then
                # starts from that like any other stage's. (The vocab-parallel loss writes its
                # gradient over the saved logits: it cannot run twice, as a split B/W would.)
                slot.logits = slot.output.detach().requires_grad_()
                loss = self.loss_fn(slot.logits, y.to(self.device))
                self.loss_sum += loss.detach()
                slot.loss = loss / self.spec.microbatches

    def _backward(self, a: Action) -> None:
        chunk, slot = self.chunks[a.chunk], self._slot(a)
        if chunk.is_last:
            slot.loss.backward()
            slot.output_grad, slot.loss, slot.logits = slot.logits.grad, None, None
        grad = slot.output_grad
        if grad is None:
            raise PipelineError(f"pipeline: rank {self.spec.pp_rank} B(mb={a.microbatch}, chunk={a.chunk}) "
                                "ran before its output gradient was received")
        if self.split_backward and chunk.is_first:
            return  # no input gradient to send: W runs the whole backward
        if self.split_backward:  # one backward, the GEMMs' weight gradients stashed for W
            slot.deferred = wgrad.WeightGradStore()
            with wgrad.deferring(slot.deferred):
                torch.autograd.backward(slot.output, grad)
            if a.chunk not in self.deferred_ids:  # the same GEMMs every micro-batch
                self.deferred_ids[a.chunk] = slot.deferred.params()
        else:
            torch.autograd.backward(slot.output, grad)
        if not chunk.is_first:
            slot.input_grad = slot.input.grad
        self._release(slot)  # the graph is gone (with zero bubble W needs only the stash)

    def _weight_grad(self, a: Action) -> None:
        slot = self._slot(a)
        if slot.deferred is not None:
            slot.deferred.flush()
            slot.deferred = None
        else:  # the first stage needs no input gradient: B did nothing, W is its whole backward
            torch.autograd.backward(slot.output, slot.output_grad, inputs=self.chunk_params[a.chunk])
            self._release(slot)

    @staticmethod
    def _release(slot: _Slot) -> None:
        slot.output = slot.output_grad = slot.loss = slot.logits = None
        slot.input = None  # its .grad (if any) lives on in slot.input_grad until sent

    # -- communication -----------------------------------------------------------------------
    def _post_receives_ahead(self, begin: int, end: int) -> None:
        todo = [i for i in range(begin, end) if self.actions[i].kind.startswith("RECV")]
        if todo:
            self._post([self.actions[i] for i in todo])
            self.posted_ahead.update(todo)

    def _communicate(self, begin: int, end: int) -> None:
        batch = [self.actions[i] for i in range(begin, end) if i not in self.posted_ahead]
        if batch:
            self._post(batch)

    def _post(self, batch: list[Action]) -> None:
        """Posts `batch` as one batch_isend_irecv; receives are waited for by their consumers,
        sends at the end of the step."""
        start = self._now()
        has_recv = any(a.kind.startswith("RECV") for a in batch)
        if self.spec.debug:
            self._exchange_headers(batch, has_recv)
        ops, tensors = [], []
        for a in batch:
            t = self._message_tensor(a)
            tensors.append(t)
            op = dist.isend if a.kind.startswith("SEND") else dist.irecv
            ops.append(dist.P2POp(op, t, self.peer_global[a.peer], group=self.group))
        works = dist.batch_isend_irecv(ops)
        sends = [i for i, a in enumerate(batch) if a.kind.startswith("SEND")]
        if has_recv:  # each receive waited for by the compute that consumes it
            flight = _InFlight(list(batch), works, tensors, start)
            for a in batch:
                if a.kind.startswith("RECV"):
                    self.in_flight[(a.kind, a.chunk, a.microbatch)] = flight
            # Its sends: waited at the step's end with their own works (gloo); in a coalesced
            # group, with the batch (a work is never waited twice: gloo's would wait for
            # another message). The flight keeps their tensors alive until then.
            if sends and flight.per_op:
                self.pending_sends.append(([works[i] for i in sends], [tensors[i] for i in sends]))
        else:
            self.pending_sends.append((works, tensors))
        for a in batch:
            if a.kind == "SEND_B":
                self._slot(a).input_grad = None  # the pending list keeps the tensor alive
        posted = self._now()
        for a in batch:
            if not (has_recv and a.kind.startswith("RECV")):
                self.record.events.append(TimedEvent(self.spec.pp_rank, a.kind, a.microbatch, a.chunk, start,
                                                     posted, a.peer))

    def _receive(self, key: tuple[str, int, int]) -> None:
        """Waits for the receive `key` (per op, or its whole batch) and hands what arrived to
        the slots; the receives' timeline events span from posting to the end of this wait."""
        flight = self.in_flight[key]
        if flight.per_op:
            i = next(i for i, a in enumerate(flight.actions) if (a.kind, a.chunk, a.microbatch) == key)
            self._wait([flight.works[i]], self._describe(flight.actions[i]), [flight.actions[i]])
            done_ops = [i]
        else:
            self._wait(flight.works, "batch " + ", ".join(self._describe(a) for a in flight.actions), flight.actions)
            done_ops = [i for i, a in enumerate(flight.actions) if a.kind.startswith("RECV")]
        done = self._now()
        for i in done_ops:
            a, t = flight.actions[i], flight.tensors[i]
            del self.in_flight[(a.kind, a.chunk, a.microbatch)]
            if a.kind == "RECV_F":
                self._slot(a).input = t.requires_grad_()
            else:
                self._slot(a).output_grad = t
            self.record.events.append(TimedEvent(self.spec.pp_rank, a.kind, a.microbatch, a.chunk, flight.posted,
                                                 done, a.peer))

    def _message_tensor(self, a: Action) -> torch.Tensor:
        slot = self._slot(a)
        if a.kind == "SEND_F":
            if slot.output is None:
                raise PipelineError(f"pipeline: rank {self.spec.pp_rank} {self._describe(a)} before its forward")
            return slot.output.detach()
        if a.kind == "SEND_B":
            if slot.input_grad is None:
                raise PipelineError(f"pipeline: rank {self.spec.pp_rank} {self._describe(a)} before its backward")
            return slot.input_grad.contiguous()
        return torch.empty(self.spec.activation_shape, dtype=self.spec.activation_dtype, device=self.device)

    def _describe(self, a: Action) -> str:
        where = "to" if a.kind.startswith("SEND") else "from"
        return f"{a.kind}(mb={a.microbatch}, chunk={a.chunk}) {where} pp rank {a.peer}"

    def _wait(self, works, what: str, batch: Sequence[Action] | None) -> None:
        start = self._now()
        try:
            self._wait_all(works, what, batch)
        finally:
            self.record.waits.append((start, self._now()))

    def _wait_all(self, works, what: str, batch: Sequence[Action] | None) -> None:
        timeout = datetime.timedelta(seconds=self.spec.timeout_s)
        for w in works:
            try:
                ok = w.wait(timeout)
            except RuntimeError as e:
                raise PipelineError(self._lost_message(what, batch, str(e).splitlines()[0])) from None
            if ok is False:
                raise PipelineError(self._lost_message(what, batch, "timed out"))

    def _lost_message(self, what: str, batch: Sequence[Action] | None, cause: str) -> str:
        peers = sorted({a.peer for a in batch}) if batch else []
        names = ", ".join(f"pp rank {p} (global rank {self.peer_global[p]})" for p in peers)
        return (f"pipeline: pp rank {self.spec.pp_rank} waited {self.spec.timeout_s:g} s at most for {what}; "
                f"no answer from {names or 'its peers'} ({cause}): is that rank dead or stuck?")

    # -- debug headers -----------------------------------------------------------------------
    def _header(self, a: Action, t: torch.Tensor | None) -> torch.Tensor:
        """What a message carries (sender side: from the tensor; receiver side: expected)."""
        if a.kind.startswith("SEND"):
            stage = self.spec.stage(a.chunk)
            shape, dtype = tuple(t.shape), t.dtype
        else:  # the sender is the neighbouring stage
            mine = self.spec.stage(a.chunk)
            stage = mine - 1 if a.kind == "RECV_F" else mine + 1
            shape, dtype = self.spec.activation_shape, self.spec.activation_dtype
        dims = list(shape) + [0] * (3 - len(shape))
        code = _DTYPES.index(dtype) if dtype in _DTYPES else -1
        return torch.tensor([_KIND_CODE[a.kind], a.microbatch, stage, code, len(shape), *dims[:3]],
                            dtype=torch.int64)

    def _exchange_headers(self, batch: Sequence[Action], has_recv: bool) -> None:
        """A batch of headers mirroring the payload batch (same ops, same order, so the
        convention's deadlock-freedom carries over); receivers compare before posting the
        payload receives."""
        ops, headers = [], []
        for a in batch:
            if a.kind.startswith("SEND"):
                h = self._header(a, self._message_tensor(a))
                ops.append(dist.P2POp(dist.isend, h, self.peer_global[a.peer], group=self.group))
            else:
                h = torch.empty(_HEADER_LEN, dtype=torch.int64)
                ops.append(dist.P2POp(dist.irecv, h, self.peer_global[a.peer], group=self.group))
            headers.append(h)
        works = dist.batch_isend_irecv(ops)
        if not has_recv:
            self.pending_sends.append((works, headers))
            return
        self._wait(works, "header batch", batch)
        for a, got in zip(batch, headers):
            if a.kind.startswith("RECV"):
                want = self._header(a, None)
                if not torch.equal(got, want):
                    raise PipelineError(f"pipeline debug: pp rank {self.spec.pp_rank} {self._describe(a)} expected "
                                        f"{_show(want)} but pp rank {a.peer} sent {_show(got)}")


def _show(h: torch.Tensor) -> str:
    kind, mb, stage, code, ndim, *dims = h.tolist()
    dtype = _DTYPES[code] if 0 <= code < len(_DTYPES) else f"dtype#{code}"
    what = {1: "activation", 2: "gradient"}.get(kind, f"kind#{kind}")
    return f"{what} of micro-batch {mb} from stage {stage}, shape {tuple(dims[:ndim])}, {dtype}"
