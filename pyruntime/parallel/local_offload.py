"""dp 1 with `--offload optimizer` (one replica: a single GPU, or tp / pp without data
parallelism): each parameter's gradient goes to the host as soon as the step's last
accumulation of it lands, so the copies run during the rest of the backward (a side stream on
CUDA) instead of after it, as ZeRO-Offload does on one GPU.

    engine = LocalOffloadEngine(model, HostAdamW(groups, cfg))   # parallel/data.py picks it
    with engine.micro_batch(last=True):
        loss.backward()                # each final gradient is copied to its host copy here
    grads, _ = engine.gradient_pieces()  # the host copies: clipping scales what the step reads
    engine.optimizer.step()            # reads the host copies; copies no gradient itself

The device keeps its .grad (earlier micro-batches accumulate there, and the pipeline's tied
embedding is summed over the stages in it after the backward: gradient_pieces copies that one
again). On CPU the "host" copy is a second buffer in the same memory: the path is the one CUDA
takes, checked there, at the cost of one gradient's bytes.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn as nn

from pyruntime.parallel.accounting import storage_bytes
from pyruntime.parallel.engine import DataParallelEngine, GradReadyTracker, Replicas
from pyruntime.parallel.offload import HostAdamW, host_zeros
from pyruntime.parallel.tied import tied_copy


class LocalOffloadEngine(DataParallelEngine):
    """dp 1, --offload optimizer: gradients reach the host during the backward."""

    def __init__(self, model: nn.Module, optimizer: HostAdamW):
        super().__init__(model, optimizer)
        self.host = [host_zeros(p.numel(), p.device, p.dtype).view_as(p) for p in self.params]
        optimizer.host_grads.update(zip(self.params, self.host))
        # one group per parameter: its gradient is final at its own last accumulation
        self.tracker = GradReadyTracker([[p] for p in self.params], self._to_host)

    def describe(self) -> str:
        return "data parallel: off (dp 1); each gradient copied to the host as the backward finishes it"

    @contextlib.contextmanager
    def micro_batch(self, last: bool) -> Iterator[None]:
        self.tracker.reset(armed=last)  # earlier micro-batches only accumulate on the device
        yield
        self.tracker.flush()

    def _to_host(self, i: int) -> None:
        grad = self.params[i].grad
        if grad is not None:  # none: the step skips the parameter, as torch.optim does
            self.optimizer.transfers.copy(("grad", i), self.host[i], grad)

    def gradient_pieces(self, replicas: Replicas | None = None) -> tuple[list[torch.Tensor], list[int]]:
        """The host copies (clipping scales what the step reads), once every copy has landed."""
        _, counts = super().gradient_pieces(replicas)
        return self.optimizer.landed_grads(self.params, tied_copy(self.model)), counts

    # -- memory accounting: the host's masters and gradient copies ------------------------------
    def held_param_bytes(self) -> int:
        return storage_bytes([*self.params, *self.optimizer.master_tensors()])

    def held_grad_bytes(self) -> int:
        return storage_bytes([*(p.grad for p in self.params), *self.host])

    def held_host_bytes(self) -> int:
        return self.optimizer.host_bytes() + storage_bytes(self.host)

    def step_metrics(self) -> dict:
        counts = self.optimizer.transfers.take_counts()
        return {**super().step_metrics(), "host_state_bytes": self.held_host_bytes(),
                "offload_grad_copies": counts.get("grad", 0), "offload_param_copies": counts.get("param", 0)}
