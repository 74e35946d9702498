"""ParallelDims: the one topology object.

The world is one rank grid `arange(world).view(dp, pp, tp)`: tp is innermost (tp traffic is
the heaviest, so tp ranks should share a node), dp outermost. `order` changes that (e.g.
("pp", "dp", "tp")): axes listed first are outermost, the last one has adjacent ranks. Every process group is a slice
of that grid, owned by a torch DeviceMesh with named axes "dp", "pp", "tp". The object is
created once at start-up and passed explicitly to whatever needs a group; nothing here is a
module-level global.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from pyruntime.config import ConfigError

AXES = ("dp", "pp", "tp")


@dataclass(frozen=True)
class Launch:
    """What torchrun (or its absence) tells this process."""

    rank: int
    world_size: int
    local_rank: int

    @staticmethod
    def from_env() -> "Launch":
        if "WORLD_SIZE" not in os.environ:
            return Launch(rank=0, world_size=1, local_rank=0)  # not launched by torchrun
        return Launch(rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]),
                      local_rank=int(os.environ.get("LOCAL_RANK", "0")))


@dataclass
class ParallelDims:
    """Sizes of the dp, pp and tp axes; after `build_mesh()` also the mesh and its groups."""

    dp: int
    pp: int
    tp: int
    world_size: int
    mesh: "dist.device_mesh.DeviceMesh | None" = field(default=None, repr=False)
    order: tuple[str, ...] = AXES

    @staticmethod
    def from_config(par, world_size: int) -> "ParallelDims":
        """From a ParallelConfig (its dp / pp / tp sizes and mesh_order)."""
        order = tuple(a.strip() for a in par.mesh_order.split(","))
        return ParallelDims(par.dp, par.pp, par.tp, world_size, order=order)

    def __post_init__(self) -> None:
        if sorted(self.order) != sorted(AXES):
            raise ConfigError(f"mesh order must list dp, pp and tp once each, got {','.join(self.order)}")
        for axis in AXES:
            if getattr(self, axis) < 1:
                raise ConfigError(f"{axis} must be >= 1, got {getattr(self, axis)}")
        if self.dp * self.pp * self.tp != self.world_size:
            raise ConfigError(f"layout dp {self.dp} x pp {self.pp} x tp {self.tp} = "
                              f"{self.dp * self.pp * self.tp} does not match world size {self.world_size}")

    def build_mesh(self, device_type: str) -> "ParallelDims":
        """Create the DeviceMesh (needs an initialised default process group)."""
        from torch.distributed.device_mesh import init_device_mesh
        self.mesh = init_device_mesh(device_type, tuple(getattr(self, a) for a in self.order),
                                     mesh_dim_names=self.order)
        return self

    def group(self, axis: str) -> dist.ProcessGroup:
        """The process group of this rank's slice along `axis`."""
        return self._mesh().get_group(axis)

    def axis_rank(self, axis: str) -> int:
        """This rank's coordinate along `axis`."""
        return self._mesh().get_local_rank(axis)

    def enabled(self, axis: str) -> bool:
        return getattr(self, axis) > 1

    def coords(self, rank: int) -> dict[str, int]:
        """dp, pp and tp coordinates of a global rank (row-major over `order`)."""
        coords = {}
        for axis in reversed(self.order):
            size = getattr(self, axis)
            coords[axis] = rank % size
            rank //= size
        return {a: coords[a] for a in AXES}

    def describe(self) -> str:
        text = f"dp {self.dp} x pp {self.pp} x tp {self.tp} = {self.world_size} rank(s)"
        return text if self.order == AXES else f"{text}, mesh order {','.join(self.order)}"

    def _mesh(self):
        if self.mesh is None:
            raise RuntimeError("ParallelDims.build_mesh() has not been called")
        return self.mesh


def default_device(launch: Launch) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", launch.local_rank)
    return torch.device("cpu")


def init_distributed(launch: Launch, device: torch.device, timeout_s: float = 300.0) -> None:
    """Initialise the default process group: nccl on CUDA, gloo on CPU.

    A single process (not launched by torchrun) gets a world-1 gloo group on an in-memory
    store, so every code path is the same whatever the world size.
    """
    if dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = datetime.timedelta(seconds=timeout_s)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if launch.world_size == 1 and "MASTER_ADDR" not in os.environ:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    elif "TORCHELASTIC_RESTART_COUNT" in os.environ:
        dist.init_process_group(backend, store=_attempt_store(launch, timeout), rank=launch.rank,
                                world_size=launch.world_size, timeout=timeout)
    else:
        dist.init_process_group(backend, rank=launch.rank, world_size=launch.world_size, timeout=timeout)


def _attempt_store(launch: Launch, timeout: datetime.timedelta) -> dist.Store:
    """torchrun's store, with keys scoped to this restart attempt. torchrun (2.13, --standalone)
    keeps one store at one port across `--max-restarts` attempts, so a restarted worker would
    read the previous attempt's gloo addresses (and watchdog heartbeats) and fail to connect."""
    agent_hosts = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), launch.world_size,
                          is_master=not agent_hosts and launch.rank == 0, timeout=timeout)
    return dist.PrefixStore(f"pyruntime/attempt_{os.environ['TORCHELASTIC_RESTART_COUNT']}/", store)
