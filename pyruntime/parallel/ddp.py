"""Plain data parallelism (`--zero 0`): replicated parameters and optimizer, gradient buckets
all-reduced while the backward still runs.

DDP (`--zero 0`): parameters are taken in reverse registration order (their gradients arrive
roughly that way in backward) and grouped into buckets of at most bucket_mb
(ops.flat.plan_buckets; the first one at most 1 MB, so communication starts early). Each
bucket owns one flat buffer (laid out by the C++ planner, allocated once) and each
parameter's first gradient of a step is moved into it by its post-accumulate-grad hook, the
.grad becoming a view into the buffer; later micro-batches accumulate in place there. So
what backward produces is what is all-reduced, and the reduced result is the .grad: no
pack / unpack copies (as DDP, which also keeps its buckets). On the last micro-batch the
hook divides each gradient by dp (in the copy when there is one) and counts the gradients
of each bucket; when a bucket's last one has accumulated, its all-reduce (a sum, so the
mean over dp) is issued asynchronously, in place, so it runs while the backward of earlier
layers still computes. The earlier micro-batches of gradient accumulation communicate
nothing. finish_gradient_sync() waits for each bucket.

--offload optimizer (the optimizer is offload.HostAdamW): each bucket also has a host copy
(pinned on CUDA); every gradient hook completes the all-reduces already done, without
blocking, and copies those buckets to the host (a side stream on CUDA), so the gradients reach
the host during the backward. gradient_pieces then hands out the host copies (clipping scales
what the step reads) and the step reads them (HostAdamW.host_grads).

"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn as nn

from pyruntime.comm.collectives import Collectives, Pending
from pyruntime.config import OptimConfig
from pyruntime.ops.flat import FlatLayout, plan_flat_layout
from pyruntime.parallel.accounting import storage_bytes
from pyruntime.parallel.engine import ALIGN, DataParallelEngine, GradReadyTracker, Replicas, gradient_buckets
from pyruntime.parallel.offload import HostAdamW, host_zeros
from pyruntime.parallel.optimizer import build_adamw
from pyruntime.parallel.tied import tied_copy


class _Bucket:
    """A bucket's flat gradient buffer (layout order, padding zero) and each parameter's view
    into it."""

    def __init__(self, params: list[nn.Parameter], layout: FlatLayout):
        self.params, self.layout = params, layout
        self.flat = torch.zeros(layout.total_numel, dtype=params[0].dtype, device=params[0].device)
        self.views = [self.flat[offset:offset + p.numel()].view_as(p) for p, offset in zip(params, layout.offsets)]
        self.scaled: set[int] = set()  # parameters whose gradient is final (scaled) this step

    @torch.no_grad()
    def take(self, j: int, scale: float | None) -> None:
        """Make parameter j's .grad its view into `flat`, holding the gradient it has (zeros if
        none); scale given: that gradient is final for the step, multiply it by `scale` (in the
        copy when there is one, so it costs no pass of its own)."""
        p, view = self.params[j], self.views[j]
        grad = p.grad
        if grad is not None and grad.data_ptr() == view.data_ptr():
            if scale is not None:
                view.mul_(scale)  # accumulated in place over earlier micro-batches
        else:
            if grad is None:
                view.zero_()
            elif scale is None:
                view.copy_(grad)
            else:
                torch.mul(grad, scale, out=view)
            p.grad = view
        if scale is not None:
            self.scaled.add(j)

    def finalize(self, scale: float) -> None:
        """Scale the gradients no counted accumulation reached (zeros where there is none)."""
        for j in range(len(self.params)):
            if j not in self.scaled:
                self.take(j, scale)
        self.scaled.clear()


class BucketedDataParallel(DataParallelEngine):
    """--zero 0: replicated parameters and optimizer, bucketed async all-reduce of gradients."""

    def __init__(self, model: nn.Module, comm: Collectives, optim_cfg: OptimConfig, bucket_bytes: int):
        super().__init__(model, build_adamw(model.named_parameters(), optim_cfg), comm)
        self.buckets = [_Bucket(params, plan_flat_layout([p.numel() for p in params], world_size=1, align=ALIGN))
                        for params in gradient_buckets(self.params, bucket_bytes)]
        self.bucket_bytes = bucket_bytes
        # Every new gradient moves into its bucket (later ones accumulate there); the step's
        # last one is divided by dp on the way, so the all-reduce is a sum.
        self.scale = 1.0 / comm.size
        self.tracker = GradReadyTracker([b.params for b in self.buckets], self._launch, on_grad=self._take)
        self.pending: list[tuple[int, Pending]] = []
        self.host: list[torch.Tensor] | None = None  # --offload optimizer: each bucket's host copy
        if isinstance(self.optimizer, HostAdamW):
            self.host = [host_zeros(b.flat.numel(), b.flat.device, b.flat.dtype) for b in self.buckets]
            for b, host in zip(self.buckets, self.host):
                for p, offset in zip(b.params, b.layout.offsets):
                    self.optimizer.host_grads[p] = host[offset:offset + p.numel()].view_as(p)

    def describe(self) -> str:
        return (f"data parallel: dp {self.comm.size}, {len(self.buckets)} gradient bucket(s) of <= "
                f"{self.bucket_bytes / 2**20:g} MB, all-reduce overlapped with backward")

    @contextlib.contextmanager
    def micro_batch(self, last: bool) -> Iterator[None]:
        self.tracker.reset(armed=last)  # earlier micro-batches only accumulate locally
        yield
        self.tracker.flush()

    def _take(self, i: int, j: int, last: bool) -> None:
        self.buckets[i].take(j, self.scale if last else None)
        if self.host is not None:
            self._complete(block=False)

    def _launch(self, i: int) -> None:
        bucket = self.buckets[i]
        bucket.finalize(self.scale)  # e.g. zeros for a parameter without a gradient (other ranks may have one)
        self.pending.append((i, self.comm.all_reduce_sum(bucket.flat)))

    def _complete(self, block: bool) -> None:
        """Complete the all-reduces, oldest first (block=False: only those already done); with
        offload, each completed bucket goes to its host copy now."""
        while self.pending and (block or self.pending[0][1].is_completed()):
            i, pending = self.pending.pop(0)
            pending.wait()
            if self.host is not None:
                self.optimizer.transfers.copy(("grad", i), self.host[i], self.buckets[i].flat)

    def finish_gradient_sync(self) -> None:
        self._complete(block=True)
        super().finish_gradient_sync()

    # -- memory accounting: with offload also the host's masters and bucket copies ----------
    def held_param_bytes(self) -> int:
        masters = self.optimizer.master_tensors() if self.host is not None else []
        return storage_bytes([*self.params, *masters])

    def held_grad_bytes(self) -> int:
        return storage_bytes([*(p.grad for p in self.params), *(self.host or [])])

    def held_host_bytes(self) -> int:
        return self.optimizer.host_bytes() + storage_bytes(self.host or [])

    def step_metrics(self) -> dict:
        rec = super().step_metrics()
        if self.host is not None:  # the offload metrics of every engine (local_offload, zero/sharded)
            counts = self.optimizer.transfers.take_counts()
            rec["host_state_bytes"] = self.held_host_bytes()
            rec["offload_grad_copies"], rec["offload_param_copies"] = counts.get("grad", 0), counts.get("param", 0)
        return rec

    def gradient_pieces(self, replicas: Replicas | None = None) -> tuple[list[torch.Tensor], list[int]]:
        """With offload, the host copies of the gradients (what the step reads, so clipping
        scales those); otherwise DataParallelEngine's."""
        grads, counts = super().gradient_pieces(replicas)
        if self.host is None:
            return grads, counts
        return self.optimizer.landed_grads(self.params, tied_copy(self.model)), counts


