"""The one factory of data-parallel engines: `apply_data_parallel(model, dims, cfg)` picks the
engine of cfg.parallel.zero (engine.py documents what every engine offers)."""
from __future__ import annotations

from typing import Callable

import torch.nn as nn

from pyruntime.comm.collectives import CommDebug, CommStats, Collectives
from pyruntime.config import Config, ConfigError
from pyruntime.mesh import ParallelDims
from pyruntime.parallel.ddp import BucketedDataParallel
from pyruntime.parallel.deferred_init import DeferredInit
from pyruntime.parallel.engine import DataParallelEngine
from pyruntime.parallel.local_offload import LocalOffloadEngine
from pyruntime.parallel.offload import HostAdamW
from pyruntime.parallel.optimizer import build_adamw
from pyruntime.parallel.zero.stage12 import ZeroBucketEngine
from pyruntime.parallel.zero.stage3 import FullyShardedEngine


def apply_data_parallel(model: nn.Module, dims: ParallelDims, cfg: Config, *, init: DeferredInit | None = None,
                        log: Callable[[str], None] = lambda _: None) -> DataParallelEngine:
    """The data-parallel engine of cfg.parallel (zero stage, bucket size) over dims' dp axis.
    Installs hooks on `model` (and, at ZeRO-3, shards its parameters in place). init: `model`
    is on the meta device; its parameters are made here (at ZeRO-3 one unit at a time). log: where
    a remark on the settings goes (rank 0's console in the trainer)."""
    par = cfg.parallel
    fully_sharded = dims.dp > 1 and par.zero == 3
    if init is not None and not fully_sharded:
        init.materialize([model])
    if dims.dp == 1:
        if par.zero > 0:
            log(f"--zero {par.zero} with dp 1: nothing to shard over, ZeRO does nothing here")
        optimizer = build_adamw(model.named_parameters(), cfg.optim)
        if isinstance(optimizer, HostAdamW):  # --offload optimizer: gradients to the host in backward
            return LocalOffloadEngine(model, optimizer)
        return DataParallelEngine(model, optimizer)
    try:
        debug = CommDebug.from_env()
    except ValueError as e:
        raise ConfigError(str(e)) from None
    comm = Collectives(dims.group("dp"), CommStats(), debug)
    bucket_bytes = max(1, int(par.bucket_mb * 2**20))
    if par.zero == 0:
        return BucketedDataParallel(model, comm, cfg.optim, bucket_bytes)
    if par.zero in (1, 2):
        return ZeroBucketEngine(model, comm, cfg.optim, bucket_bytes, stage=par.zero, kernels=cfg.model.kernels)
    return FullyShardedEngine(model, comm, cfg.optim, kernels=cfg.model.kernels, init=init)
