"""`--offload optimizer` for the replicated engines (no ZeRO, or dp 1): AdamW whose moments (and,
for parameters on an accelerator, fp32 master copies) live in host memory and whose step is the
C++ host AdamW (csrc/adamw_cpu.cpp through ops.adamw_step(backend="cpp")). The sharded engines
(ZeRO 1-3) offload inside zero/sharded.ShardedAdamW, each rank only its shard.

    opt = HostAdamW(groups, cfg)     # what build_adamw returns when cfg.offload == "optimizer"
    opt.step(); opt.zero_grad()      # torch.optim.AdamW's interface: param_groups, state, step

The state has torch.optim.AdamW's layout ({"step", "exp_avg", "exp_avg_sq"} per parameter), so
checkpoints and the engines' accounting read it unchanged; tensors put there on the device (a
checkpoint import) are moved to the host at the next step. On a CPU run the host is the device:
the parameter itself is the master and is updated in place. On CUDA each parameter has an fp32
master in pinned host memory (made from the parameter at its first step and again after a
checkpoint import replaced its state); the C++ step writes the parameter's new value (fp32: the
master itself; bf16: a pinned staging copy) in the same pass and it goes back on a side stream
(Transfers) while the next parameter is stepped. Gradients reach the host during the
backward, put in `host_grads` by the engine: ddp.BucketedDataParallel copies each bucket as its
all-reduce completes, local_offload.LocalOffloadEngine (dp 1) each gradient as its last
accumulation of the step lands; a parameter without a host copy (this optimizer used on its
own) has its gradient copied at step time.
"""
from __future__ import annotations

from typing import Sequence

import torch

from pyruntime.config import OptimConfig
from pyruntime.ops.adamw import adamw_step

HOST = torch.device("cpu")


def host_zeros(numel: int, like_device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Zeros in host memory, pinned when the device is CUDA (asynchronous copies)."""
    return torch.zeros(numel, dtype=dtype, pin_memory=like_device.type == "cuda")


class Transfers:
    """The copies between the device and host memory of offload, each under a key (("grad", i):
    a gradient shard going to the host; ("param", i): updated parameters coming back).

    CUDA (a copy with a CUDA side): non_blocking on one side stream, ordered after what the
    current stream has queued (the reduction that produced a gradient, the use of a buffer
    about to be overwritten) and marked by an event; `wait_device(key)` makes the current
    stream wait for it (the host does not block: the first use of the parameters waits, not
    the step), `wait_host(kind)` blocks the host (the step, before it reads gradients or
    rewrites a buffer a copy may still read). CPU: host and device are one memory, so a copy
    is a plain synchronous copy_ and there is nothing to wait for.

    `counts[kind]` counts the copies issued since the last `take_counts()`, so tests and the
    metrics can see when they happen (during backward, not at step time)."""

    def __init__(self):
        self.stream: torch.cuda.Stream | None = None  # made at the first CUDA copy
        self.events: dict[tuple[str, int], torch.cuda.Event] = {}
        self.counts: dict[str, int] = {}

    def copy(self, key: tuple[str, int], dst: torch.Tensor, src: torch.Tensor) -> None:
        self.counts[key[0]] = self.counts.get(key[0], 0) + 1
        if not (dst.is_cuda or src.is_cuda):
            dst.copy_(src)
            return
        if self.stream is None:
            self.stream = torch.cuda.Stream(dst.device if dst.is_cuda else src.device)
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            dst.copy_(src, non_blocking=True)
        for t in (dst, src):
            if t.is_cuda:  # a freed gradient shard is not reused while the copy still reads it
                t.record_stream(self.stream)
        event = torch.cuda.Event()
        event.record(self.stream)
        self.events[key] = event  # kept until the host waits for it (wait_host) or a new copy

    def wait_device(self, key: tuple[str, int]) -> None:
        event = self.events.get(key)
        if event is not None:
            torch.cuda.current_stream().wait_event(event)

    def wait_host(self, kind: str) -> None:
        for key in [k for k in self.events if k[0] == kind]:
            self.events.pop(key).synchronize()

    def take_counts(self) -> dict[str, int]:
        counts, self.counts = self.counts, {}
        return counts


class HostAdamW:
    """AdamW with its state on the host and its step in the C++ op (see the module docstring)."""

    def __init__(self, groups: list[dict], cfg: OptimConfig):
        self.cfg = cfg
        self.param_groups = [{"params": list(g["params"]), "weight_decay": g["weight_decay"], "lr": cfg.lr,
                              "betas": cfg.betas, "eps": cfg.eps} for g in groups]
        self.state: dict[torch.Tensor, dict[str, torch.Tensor]] = {}
        self.transfers = Transfers()
        # parameter -> (its state dict when made, fp32 master on the host, staging in p's dtype
        # or None): a checkpoint import replaces the state dict, and the master is then re-read
        self._masters: dict[torch.Tensor, tuple[dict, torch.Tensor, torch.Tensor | None]] = {}
        # parameter -> its gradient's host copy, kept current by the engine during backward
        # (BucketedDataParallel / LocalOffloadEngine); others are copied at step time
        self.host_grads: dict[torch.Tensor, torch.Tensor] = {}

    def _state(self, p: torch.Tensor) -> dict[str, torch.Tensor]:
        st = self.state.get(p)
        if st is None:
            st = self.state[p] = {"step": torch.tensor(0.0), "exp_avg": host_zeros(p.numel(), p.device).view(p.shape),
                                  "exp_avg_sq": host_zeros(p.numel(), p.device).view(p.shape)}
        for key in ("exp_avg", "exp_avg_sq"):  # a checkpoint import may have put them on the device
            if st[key].device != HOST or st[key].dtype != torch.float32 or not st[key].is_contiguous():
                st[key] = st[key].detach().to(HOST, torch.float32).contiguous()
        return st

    def _master(self, p: torch.Tensor, st: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(fp32 master on the host, the buffer the step writes p's new value into or None).
        On a CPU run with fp32 parameters the parameter is its own master (nothing to copy)."""
        if p.device == HOST and p.dtype == torch.float32 and p.is_contiguous():
            return p.view(-1), None
        entry = self._masters.get(p)
        if entry is None or entry[0] is not st:  # first step, or the state was imported
            master = host_zeros(p.numel(), p.device)
            master.copy_(p.detach().reshape(-1))
            staging = None if p.dtype == torch.float32 else host_zeros(p.numel(), p.device, p.dtype)
            entry = self._masters[p] = (st, master, staging)
        return entry[1], entry[2]

    @torch.no_grad()
    def step(self) -> None:
        """Per parameter: the C++ AdamW over its host master, gradient and moments, writing the
        parameter's new value (its dtype) in the same pass, which then goes back to the device
        (CUDA: on the side stream, while the next parameter is stepped on the host; the current
        stream waits for them all at the end, so the next forward reads the new values and the
        host does not block)."""
        self.transfers.wait_host("grad")
        self.transfers.wait_host("param")  # last step's copies read the masters / staging
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue  # as torch.optim: no gradient, no step and no state change
                st = self._state(p)
                st["step"] += 1
                master, staging = self._master(p, st)
                grad = self.host_grads.get(p)
                if grad is None:
                    grad = p.grad.reshape(-1)
                    grad = grad if grad.device == HOST else grad.to(HOST)
                adamw_step(master, grad.reshape(-1).contiguous(), st["exp_avg"].view(-1), st["exp_avg_sq"].view(-1),
                           None, lr=group["lr"], betas=group["betas"], eps=group["eps"],
                           weight_decay=group["weight_decay"], step=int(st["step"]), backend="cpp", param_copy=staging)
                if master.data_ptr() != p.data_ptr():
                    self.transfers.copy(("param", id(p)), p.detach().view(-1),
                                        master if staging is None else staging)
        for key in [key for key in self.transfers.events if key[0] == "param"]:
            self.transfers.wait_device(key)  # CUDA only: on CPU there are no events

    def landed_grads(self, params: Sequence[torch.Tensor], tied: torch.Tensor | None) -> list[torch.Tensor]:
        """The host copies of the gradients of `params` that have one (p.grad set), for
        clipping and the step, once every copy has landed. tied: the pipeline's tied copy,
        whose gradient is summed over the stages after the backward: copied again first."""
        if tied is not None and tied.grad is not None:
            self.transfers.copy(("grad", -1), self.host_grads[tied], tied.grad)
        self.transfers.wait_host("grad")
        return [self.host_grads[p] for p in params if p.grad is not None]

    def master_tensors(self) -> list[torch.Tensor | None]:
        """The fp32 masters and staging buffers of parameters that are not their own master."""
        return [t for _, master, staging in self._masters.values() for t in (master, staging)]

    def host_bytes(self) -> int:
        """Bytes this optimizer keeps in host memory: moments and step counts, and masters +
        staging of parameters that are not on the host themselves."""
        from pyruntime.parallel.accounting import storage_bytes

        tensors = [st.get(key) for st in self.state.values() for key in ("step", "exp_avg", "exp_avg_sq")]
        return storage_bytes(tensors + self.master_tensors())

    def zero_grad(self, set_to_none: bool = True) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if set_to_none:
                    p.grad = None
                elif p.grad is not None:
                    p.grad.zero_()


class ShardOffload:
    """The --offload optimizer half of zero/sharded.ShardedAdamW (a mixin: it reads the
    optimizer's groups, device, publish_dtype, keep_device_copy, decays and gradient shards):
    host buffers, gradient shards copied to the host as they are reduced, the step on the host,
    and the parameters' new values back to the device."""

    def _init_offload(self, numel: int) -> None:
        """--offload optimizer: the fp32 master shard, both moments and a gradient shard live in
        host memory (pinned on CUDA); the C++ host AdamW steps them (_host_step) and writes, in
        the same pass, the parameters' new values in publish_dtype, which go to the device:
        what ZeRO-1/2 all-gather into the parameters and ZeRO-3 gathers its units from.
        ZeRO-3 (keep_device_copy) keeps them there between steps, `device_params`, instead of
        copying per gather: it gathers each unit twice per micro-batch, and one host-to-device
        copy per step costs less than one per gather; in bf16 that is 2 bytes per shard element
        on the device against the 16 moved to the host. ZeRO-1/2 gather once per step, right
        after it, so each group's copy is a transient device buffer from the step to its
        all-gather (`_inflight`): same traffic, nothing held through forward and backward.
        On CPU the device is the host: with fp32 parameters `device_params` is the master
        itself, in bf16 the buffer the C++ step writes."""
        self.master = host_zeros(numel, self.device)
        self.exp_avg, self.exp_avg_sq = host_zeros(numel, self.device), host_zeros(numel, self.device)
        self.host_grad = host_zeros(numel, self.device)  # what the step reads; filled during backward
        self.transfers = Transfers()
        self._landed: set[int] = set()  # groups whose gradient reached host_grad this step
        self._inflight: dict[int, torch.Tensor] = {}  # group -> its transient device copy
        if self.device.type == "cpu" and self.publish_dtype == torch.float32:
            self.device_params, self._staging = self.master, None
        elif self.device.type == "cpu":  # the C++ step writes the bf16 copy straight into it
            self.device_params = self._staging = torch.zeros(numel, dtype=self.publish_dtype)
        else:  # written by the step on the host (pinned, fp32: the master itself), then copied
            self.device_params = (torch.zeros(numel, dtype=self.publish_dtype, device=self.device)
                                  if self.keep_device_copy else None)
            self._staging = None if self.publish_dtype == torch.float32 else host_zeros(
                numel, self.device, self.publish_dtype)

    @torch.no_grad()
    def publish(self, groups: Sequence[int] | None = None) -> None:
        """Offload: refresh the device's parameter copy of `groups` (default all) from the host
        master (after copy_in / a checkpoint import / the step). On CUDA the copies go on the
        side stream and gather_source waits for them; on CPU they are plain copies or none."""
        if not self.offload or self.device_params is self.master:
            return
        self.transfers.wait_host("param")  # a copy still reading the staging buffer
        indices = list(range(len(self.groups))) if groups is None else list(groups)
        if self._staging is not None:  # not written by a step: converted here
            for i in indices:
                self.groups[i].shard(self._staging).copy_(self.groups[i].shard(self.master))
        self._publish_stepped(indices)

    def gather_shard(self, i: int) -> torch.Tensor:
        """Group i's shard on the device to all-gather from (ZeRO-1/2, once after each step or
        import): the fp32 master, or with offload the copy back from the host, once it has
        landed (the current stream waits; the host does not)."""
        if not self.offload:
            return self.groups[i].shard(self.master)
        self.transfers.wait_device(("param", i))  # CUDA only: on CPU there are no events
        if self.device_params is None:
            return self._inflight.pop(i)
        return self.groups[i].shard(self.device_params)

    def gather_source(self, i: int | None = None) -> torch.Tensor:
        """The flat shard buffer the engines gather parameters from: the fp32 master on the
        device, or with offload the device's copy, once its host-to-device copy for group i
        (None: every group) has landed (the current stream waits; the host does not)."""
        if not self.offload:
            return self.master
        for j in range(len(self.groups)) if i is None else [i]:
            self.transfers.wait_device(("param", j))  # CUDA only: on CPU there are no events
        return self.device_params

    def grad_reduced(self, i: int, shard: torch.Tensor) -> None:
        """A reduction into group i's gradient shard has completed (GradientReductions, from
        the backward's hooks): with offload, copy the shard to its host slice now, overlapped
        with the rest of the backward, so the step finds it there. A later reduction of the
        step (gradient accumulation) copies the sum again; the last copy is the one stepped."""
        if self.offload:
            self.transfers.copy(("grad", i), self.groups[i].shard(self.host_grad), shard)
            self._landed.add(i)

    def _host_step(self, hyper: dict) -> None:
        """The step on the host, from the gradient slices copied there during backward (this
        only waits for the last copies): the C++ AdamW updates master and moments and writes
        the device's parameter copy (bf16 staging, or the master itself in fp32) in one pass;
        each part's copy back to the device starts as soon as that part is stepped."""
        hyper = {**hyper, "backend": "cpp"}
        self.transfers.wait_host("param")  # the previous step's copies back may still read
        if self.grad_per_group:
            parts = [([i], g.shard, d) for i, (g, d) in enumerate(zip(self.groups, self.decays))
                     if i in self._landed or self._grads[i] is not None]
        else:
            parts = [(list(range(len(self.groups))), lambda t: t, self.decays[0])]
        for indices, view, decay in parts:
            for i in indices:
                self.group_grad(i)  # waits for the copies; zeros where nothing landed
            copy = view(self._staging) if self._staging is not None else None
            adamw_step(view(self.master), view(self.host_grad), view(self.exp_avg), view(self.exp_avg_sq), decay,
                       param_copy=copy, **hyper)
            self._publish_stepped(indices)

    def _publish_stepped(self, indices: list[int]) -> None:
        for i in indices:
            view = self.groups[i].shard
            source = self.master if self._staging is None else self._staging
            if self.device_params is None:  # transient (ZeRO-1/2 on CUDA): until gather_shard
                self._inflight[i] = torch.empty(self.groups[i].layout.shard_numel, dtype=self.publish_dtype,
                                                device=self.device)
                self.transfers.copy(("param", i), self._inflight[i], view(source))
            elif view(self.device_params).data_ptr() != view(source).data_ptr():
                self.transfers.copy(("param", i), view(self.device_params), view(source))
