"""ZeRO-1 and ZeRO-2: optimizer states (1) and gradients (2) sharded over dp; parameters stay
replicated.

Gradients are bucketed as in DDP (reverse order of registration, at most bucket_mb each, see
parallel/data.py), but each bucket's flat layout is planned with world_size = dp, and when a
bucket's last gradient has accumulated its flat copy is reduce-scattered (mean over dp)
straight into this rank's slice of the flat fp32 gradient shard, asynchronously, while the
backward goes on. Each rank then updates only its shard (fused AdamW over the flat master
weights, sharded.ShardedAdamW) and the updated shards are all-gathered back into the
replicated parameters. Per step: one reduce-scatter and one all-gather of the parameters'
size, the same volume as DDP's all-reduce.

- ZeRO-1 keeps the full-size .grad tensors (accumulated locally over micro-batches, the
  earlier ones without communication, as DDP) and reduce-scatters once, on the last one.
- ZeRO-2 keeps no full-size gradient: on every micro-batch each bucket is reduce-scattered as
  soon as it is complete and the parameters' .grad is dropped right after packing, so besides
  the bucket being packed at most MAX_IN_FLIGHT flat copies exist; a bucket's first reduction of
  the step lands in its shard slice, later ones are added to it. That trades one reduce-scatter
  per micro-batch for the memory.

A flat copy is dropped as soon as its reduce-scatter is done: every gradient hook completes the
finished ones without blocking (sharded.GradientReductions.reap).
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn as nn

from pyruntime.comm.collectives import Collectives
from pyruntime.config import OptimConfig
from pyruntime.ops.flat import flat_pack, flat_unpack
from pyruntime.parallel.accounting import ModelStateBytes
from pyruntime.parallel.engine import (ALIGN, DataParallelEngine, GradReadyTracker, Replicas, gradient_buckets,
                                     grad_or_zeros, trainable_params)
from pyruntime.parallel.zero.sharded import GradientReductions, ShardedAdamW, ShardedState, plan_groups
from pyruntime.parallel.tied import isolate, tied_copy

# ZeRO-2/3: reduce-scatters (each holding a bucket- or unit-sized flat gradient) in flight when
# the next one is issued. The previous one is completed just before the next is packed: it has
# had the backward of a whole bucket / unit to run, and memory stays at one flat copy in flight.
MAX_IN_FLIGHT = 1


class ZeroBucketEngine(ShardedState, DataParallelEngine):
    def __init__(self, model: nn.Module, comm: Collectives, optim_cfg: OptimConfig, bucket_bytes: int, *,
                 stage: int, kernels: str = "auto"):
        if stage not in (1, 2):
            raise ValueError(f"ZeroBucketEngine implements ZeRO stages 1 and 2, not {stage}")
        params = trainable_params(model)
        if len({p.dtype for p in params}) > 1:
            raise ValueError(f"ZeRO-{stage}: parameters of several dtypes ({ {p.dtype for p in params} }) "
                             "cannot share flat buffers")
        # A tied embedding copy (pp) gets a bucket of its own: its gradient shard is then laid
        # out alike on both stages, for the sum over pp (parallel/tied.py).
        self.groups = plan_groups(isolate(gradient_buckets(params, bucket_bytes), tied_copy(model)), comm.size, ALIGN)
        optimizer = ShardedAdamW(self.groups, comm.rank, optim_cfg, debug=comm.debug, kernels=kernels,
                                 after_step=self._publish, publish_dtype=params[0].dtype if params else None)
        super().__init__(model, optimizer, comm)
        self.stage, self.bucket_bytes = stage, bucket_bytes
        self.reductions = GradientReductions(comm, optimizer)
        self.tracker = GradReadyTracker([g.params for g in self.groups], self._reduce,
                                        on_grad=lambda *_: self.reductions.reap())

    def describe(self) -> str:
        return (f"ZeRO-{self.stage}: dp {self.comm.size}, {len(self.groups)} gradient bucket(s) of <= "
                f"{self.bucket_bytes / 2**20:g} MB reduce-scattered during backward"
                f"{' on every micro-batch' if self.stage == 2 else ''}, parameters all-gathered after the step")

    @contextlib.contextmanager
    def micro_batch(self, last: bool) -> Iterator[None]:
        self.tracker.reset(armed=last or self.stage == 2)
        yield
        self.tracker.flush()
        if self.stage == 2:  # nothing full-size outlives the micro-batch
            self.reductions.drain()

    def _reduce(self, i: int) -> None:
        group = self.groups[i]
        if self.stage == 2:
            self.reductions.drain(MAX_IN_FLIGHT - 1)
        flat = flat_pack([grad_or_zeros(p) for p in group.params], group.layout)
        if self.stage == 2:
            for p in group.params:
                p.grad = None  # the flat copy is all that remains of this bucket's gradients
        self.reductions.issue(i, flat)  # ZeRO-1: once per step, so straight into the shard

    def finish_gradient_sync(self) -> None:
        self.reductions.drain()
        super().finish_gradient_sync()

    def gradient_pieces(self, replicas: Replicas | None = None) -> tuple[list[torch.Tensor], list[int]]:
        return self.optimizer.gradient_pieces(self.comm.rank, replicas)

    @torch.no_grad()
    def _publish(self) -> None:
        """After the step: all-gather every bucket's updated shard into the parameters (all
        issued at once, unpacked in order as they complete)."""
        gathers = []
        for i, g in enumerate(self.groups):
            dtype = g.params[0].dtype
            # the fp32 master, or with offload the device's copy once it is back from the host
            source = self.optimizer.gather_shard(i)
            full = torch.empty(g.full_numel, dtype=dtype, device=source.device)
            gathers.append((g, full, self.comm.all_gather(full, source.to(dtype))))
        for g, full, pending in gathers:
            pending.wait()
            flat_unpack(full, [p.detach() for p in g.params], g.layout)

    # -- checkpoints (see DataParallelEngine, sharded.ShardedState) --------------------
    def import_local_state(self, state: dict[str, dict[str, torch.Tensor]], steps: int) -> None:
        self._import_shards(state, steps)
        self._publish()  # the replicated parameters become the loaded master weights

    # -- memory accounting (held_*: sharded.ShardedState) ---------------------------------
    def planned_bytes(self) -> ModelStateBytes:
        full_grads = 4 * sum(p.numel() for p in self.params) if self.stage == 1 else 0
        return ModelStateBytes.unsharded(self.params, param=self.held_param_bytes(),
                                         grad=full_grads + self._shard_bytes(), optim=self.held_optim_bytes())
