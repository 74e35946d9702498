"""Checkpoints that any layout resumes from, and safetensors export / import of the weights.

    path = save_checkpoint(trainer, "runs/x/checkpoints", step)   # collective -> .../step_<step>
    step = load_checkpoint(trainer, "runs/x/checkpoints")         # follows `latest`; any layout
    export_safetensors(trainer, "model.safetensors")               # collective; rank 0 writes
    import_safetensors(trainer, "model.safetensors")               # weights; moments reset

What is saved does not depend on the layout (dp, pp, tp, ZeRO stage, sequence parallelism):
for every parameter of the reference model (reference name, full unpadded shape, fp32) its
master weight and both AdamW moments, as "model.<name>", "optim.exp_avg.<name>" and
"optim.exp_avg_sq.<name>"; the optimizer's step count "optim.step"; the training step
"train.step" (the sampler is counter-based: the step IS the data position); each rank's RNG
state "rng.cpu.<rank>" (and "rng.cuda.<rank>"). They go through torch.distributed.checkpoint
(DCP, FileSystemWriter): every rank passes the full tensors of the parameters it holds under
the same keys, and DCP's planner keeps one writer per key, so each tensor is written once.

Memory: a rank materialises full fp32 tensors (weight and two moments) of every parameter it
holds: its pipeline stage's whole model state, gathered over dp (ZeRO) and tp, i.e. up to
3 x 4 bytes x (stage parameters) on top of training state, for the time of a save or a load.

On disk:
    <dir>/step_<N>/   DCP's __<rank>_0.distcp files and .metadata, then meta.json (written last)
    <dir>/latest      the text "step_<N>", replaced atomically
A save writes into step_<N>.tmp, renames it to step_<N> once complete, then replaces latest.
A crash at any point leaves the previous checkpoint and `latest` intact; a directory without
meta.json is incomplete and never loaded. meta.json holds the format version, the step, the
model config, the saving layout and a crc32 per tensor: DCP's files carry no checksum, and a
flipped bit must be an error, not a silently different run.

Loading checks everything it can on every rank before any collective (path, meta.json, model
shape, tensor names and shapes), so bad input fails everywhere with one CheckpointError line.
Each rank then reads, with DCP and without coordination, just the full tensors its parameters
need, checks their crc32, and all ranks agree on success (one all-reduce) before each cuts its
own shard: tp blocks (unshard.local_shards: fused q/k/v and gate/up rows, zero vocab padding),
ZeRO flat shards (the engine's import_local_state), or the replicated tensor.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import warnings
import zlib
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from pyruntime.config import ModelConfig
from pyruntime.train.ckpt_dirs import (META, CheckpointError, WatchedFileSystem, commit, failed_save, fsync_dir,
                                       resolve_checkpoint)
from pyruntime.model.llama import reference_shapes
from pyruntime.train.faults import os_cause
from pyruntime.parallel.tensor.unshard import full_tensors, local_shards, tp_param_specs

FORMAT = "pyruntime-checkpoint"
VERSION = 1
# State entry -> key prefix in the checkpoint (entries as the engines' export_local_state).
PREFIXES = {"param": "model.", "exp_avg": "optim.exp_avg.", "exp_avg_sq": "optim.exp_avg_sq."}
SCALARS = ("train.step", "optim.step")
# What DCP raises: its CheckpointException derives from BaseException, not Exception.
DCP_ERRORS = (Exception, dcp.CheckpointException)
# Fields that change the weights' shapes or the function they compute; kernels and
# max_seq_len do neither, so a run may change them.
MODEL_FIELDS = ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "rope_theta", "norm_eps",
                "head_size", "rope_scaling", "rope_factor", "rope_low_freq_factor", "rope_high_freq_factor",
                "rope_original_max_seq_len", "qkv_bias", "o_bias", "mlp_bias", "tie_embeddings", "sliding_window")


# -- helpers ---------------------------------------------------------------------------------
def _one_line(e: BaseException) -> str:
    failures = getattr(e, "failures", None)  # DCP's CheckpointException: {rank: (error, traceback)}
    if isinstance(failures, dict) and failures:
        first = next(iter(failures.values()))
        e = first[0] if isinstance(first, tuple) else first
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:300]}" if text else type(e).__name__


def _crc(t: torch.Tensor) -> int:
    flat = t.detach().reshape(-1).cpu().contiguous()
    return zlib.crc32(flat.view(torch.uint8).numpy()) if flat.numel() else 0


def _comm_device(trainer) -> torch.device:
    return trainer.device if trainer.device.type == "cuda" else torch.device("cpu")  # nccl needs CUDA


def _agree(trainer, error: str | None, what: str) -> None:
    """Raise on every rank if any rank failed: a rank that went on alone would wait forever
    in the next collective. The failing rank raises its own message."""
    rank, world = dist.get_rank(), dist.get_world_size()
    flags = torch.zeros(world, dtype=torch.int32, device=_comm_device(trainer))
    flags[rank] = error is not None
    dist.all_reduce(flags)
    if error is not None:
        raise CheckpointError(error)
    bad = flags.nonzero().flatten().tolist()
    if bad:
        raise CheckpointError(f"{what} failed on rank(s) {bad}; see their error")


def _full_state(trainer, moments: bool = True) -> dict[str, dict[str, torch.Tensor]]:
    """{reference name: {"param", "exp_avg", "exp_avg_sq"}} full fp32 tensors of every
    parameter this rank holds, the same on every dp and tp rank of its pipeline stage.
    A collective over dp (ZeRO shards) and tp; one entry kind at a time, to cap memory."""
    local = trainer.data_parallel.export_local_state(moments)
    group = trainer.dims.group("tp")
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key in (PREFIXES if moments else ["param"]):
        full = full_tensors(trainer.model, group, {name: entry.pop(key) for name, entry in local.items()})
        for ref, t in full.items():
            out.setdefault(ref, {})[key] = t
    return out


def _needed_names(trainer) -> list[str]:
    """Reference names of the tensors this rank's parameters are cut from."""
    return [ref for spec in tp_param_specs(trainer.model) for ref in spec.full]


# -- save ------------------------------------------------------------------------------------
def save_checkpoint(trainer, directory: str | os.PathLike, step: int, *, keep: int | None = None) -> Path:
    """Save the training state after `step` steps into <directory>/step_<step> and point
    <directory>/latest at it; returns that path. A collective over the whole world. keep: how
    many complete checkpoints to leave (the newest by step), None for all."""
    if keep is not None and keep < 1:
        raise CheckpointError(f"keep must be >= 1 checkpoints, got {keep}")
    directory = Path(directory)
    final = directory / f"step_{step}"
    tmp = directory / f"step_{step}.tmp"
    rank, world = dist.get_rank(), dist.get_world_size()
    dims = trainer.dims

    state: dict[str, torch.Tensor] = {}
    for name, entry in _full_state(trainer).items():
        for key, t in entry.items():
            state[PREFIXES[key] + name] = t
    state["train.step"] = torch.tensor(step, dtype=torch.int64)
    state["optim.step"] = torch.tensor(trainer.data_parallel.optimizer_steps(), dtype=torch.int64)
    state[f"rng.cpu.{rank}"] = torch.get_rng_state()
    cuda_rng = trainer.device.type == "cuda"
    if cuda_rng:
        state[f"rng.cuda.{rank}"] = torch.cuda.get_rng_state(trainer.device)

    # crc32s: the dp x tp ranks of a pipeline stage hold the same keys, so each takes its
    # share of them (by a hash of the key); a rank's own keys (its RNG) it checksums itself.
    slot, slots = dims.axis_rank("dp") * dims.tp + dims.axis_rank("tp"), dims.dp * dims.tp
    checksums = {key: _crc(t) for key, t in state.items()
                 if key.startswith("rng.") or zlib.crc32(key.encode()) % slots == slot}

    cause = None
    if rank == 0:
        try:
            directory.mkdir(parents=True, exist_ok=True)
            for stale in directory.glob("step_*.tmp"):  # left by a save that crashed: never loadable
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir()
        except OSError as e:
            cause = f"cannot create {e.filename or tmp}: {os_cause(e) or e}"
    _agree_on_cause(trainer, cause, tmp, directory)  # in place of a barrier
    writer = dcp.FileSystemWriter(tmp)
    writer.fs = WatchedFileSystem()
    try:
        dcp.save(state, storage_writer=writer)
    except DCP_ERRORS as e:  # noqa: BLE001 - DCP coordinates: every rank gets here together
        cause = writer.fs.cause or _one_line(e)
    del state
    _agree_on_cause(trainer, cause, tmp, directory)
    gathered = [None] * world if rank == 0 else None
    dist.gather_object(checksums, gathered, dst=0)
    if rank == 0:
        try:
            _finish_save(trainer, tmp, final, keep, step, gathered, cuda_rng)
        except OSError as e:
            cause = os_cause(e) or str(e)
    _agree_on_cause(trainer, cause, tmp, directory)  # every rank returns once the checkpoint is in place
    return final


def _agree_on_cause(trainer, cause: str | None, tmp: Path, directory: Path) -> None:
    """If a save failed on any rank (full or read-only disk, EIO), raise the same one line on
    every rank: the first cause a rank's own OSError named (DCP's pickled copies of other
    ranks' errors lose theirs), after rank 0 removed the partial save and checked which
    complete checkpoint stands. A collective over the world."""
    causes: list = [None] * dist.get_world_size()
    dist.all_gather_object(causes, cause)
    failed = [c for c in causes if c is not None]
    if not failed:
        return
    best = next((c for c in failed if "(E" in c), failed[0])  # one naming an errno, if any
    message = failed_save(tmp, directory, best) if dist.get_rank() == 0 else None
    shared = [message]
    dist.broadcast_object_list(shared, src=0)
    raise CheckpointError(shared[0])


def _finish_save(trainer, tmp: Path, final: Path, keep, step: int, gathered, cuda_rng: bool) -> None:
    """Rank 0: meta.json (last: its presence marks the checkpoint complete), then commit."""
    world = dist.get_world_size()
    meta = {"format": FORMAT, "version": VERSION, "step": step,
            "optimizer_steps": trainer.data_parallel.optimizer_steps(),
            "model": dataclasses.asdict(trainer.cfg.model),
            "layout": {**dataclasses.asdict(trainer.cfg.parallel), "world_size": world},
            "cuda_rng": cuda_rng, "torch": torch.__version__,
            # the Hugging Face directory the run started from: export's default tokenizer source,
            # and a directory an export must not replace
            "init_from": str(Path(trainer.cfg.train.init_from).resolve()) if trainer.cfg.train.init_from else None,
            "checksums": {k: v for part in gathered for k, v in sorted(part.items())}}
    with open(tmp / META, "w") as f:
        json.dump(meta, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(tmp)
    commit(tmp.parent, tmp, final, keep)


# -- load ------------------------------------------------------------------------------------
def read_meta(ckpt: Path) -> dict[str, Any]:
    try:
        meta = json.loads((ckpt / META).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {ckpt}: unreadable {META} ({_one_line(e)})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{ckpt / META} is not a {FORMAT} file")
    if meta.get("version") != VERSION:
        raise CheckpointError(f"checkpoint {ckpt} has format version {meta.get('version')}; "
                              f"this pyruntime reads version {VERSION}")
    for field, kind in (("step", int), ("model", dict), ("layout", dict), ("checksums", dict)):
        if not isinstance(meta.get(field), kind):
            raise CheckpointError(f"{ckpt / META} is corrupt: no valid '{field}'")
    return meta


def check_model(saved: dict[str, Any], run: ModelConfig, what: str = "checkpoint") -> None:
    """One line naming the first field in which the saved model config differs from the run's."""
    try:
        ref = ModelConfig(**{k: v for k, v in saved.items() if k in {f.name for f in dataclasses.fields(ModelConfig)}})
    except TypeError as e:  # a field missing
        raise CheckpointError(f"{what} unreadable model config ({_one_line(e)})") from None
    for name in MODEL_FIELDS:
        a, b = (ref.kv_heads, run.kv_heads) if name == "n_kv_heads" else (getattr(ref, name), getattr(run, name))
        if a != b:
            raise CheckpointError(f"{what} model.{name} {a} != run's {b}")


def _check_keys(saved: dict[str, Any], expected: dict[str, tuple[int, ...]], ckpt: Path) -> None:
    """The checkpoint's tensors are exactly the run's model state, shapes included."""
    missing = [k for k in expected if k not in saved]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"checkpoint {ckpt} lacks tensor '{missing[0]}'{more}")
    extra = sorted(k for k in saved if k not in expected and not k.startswith("rng."))
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise CheckpointError(f"checkpoint {ckpt} has tensor '{extra[0]}'{more}, which the run's model does not")
    for key, shape in expected.items():
        got = tuple(getattr(saved[key], "size", ()) or ())
        if got != shape:
            raise CheckpointError(f"checkpoint {ckpt}: tensor '{key}' has shape {got}, the run's model needs {shape}")


def _check_files(metadata, ckpt: Path) -> None:
    """Every byte range DCP's metadata points at exists: a missing or truncated data file is
    found here, from the file sizes alone, not when the tensors are read."""
    sizes: dict[str, int] = {}
    for index, info in metadata.storage_data.items():
        name = info.relative_path
        if name not in sizes:
            try:
                sizes[name] = (ckpt / name).stat().st_size
            except OSError as e:
                raise CheckpointError(f"checkpoint {ckpt}: data file {name} of tensor '{index.fqn}' is unreadable "
                                      f"({os_cause(e)})") from None
        if sizes[name] < info.offset + info.length:
            raise CheckpointError(f"checkpoint {ckpt} is truncated: {name} holds {sizes[name]} bytes, tensor "
                                  f"'{index.fqn}' needs bytes {info.offset}-{info.offset + info.length}")


def check_checkpoint(ckpt: Path, meta: dict[str, Any], model: ModelConfig):
    """Everything about checkpoint `ckpt` (its meta.json read: read_meta) that can be checked
    without reading its tensors, against the run's model: the model config, DCP's metadata,
    the tensor names and shapes, the data files' sizes. Returns (DCP reader, DCP's tensor
    metadata); raises one CheckpointError line. train's preflight runs it before any process
    group, and every rank again at load time."""
    check_model(meta.get("model", {}), model, f"checkpoint {ckpt}:")
    reader = dcp.FileSystemReader(ckpt)
    try:
        metadata = reader.read_metadata()
    except DCP_ERRORS as e:  # noqa: BLE001 - any failure here is a broken checkpoint
        raise CheckpointError(f"checkpoint {ckpt}: unreadable DCP metadata ({_one_line(e)})") from None
    expected = {prefix + name: shape for name, shape in reference_shapes(model).items()
                for prefix in PREFIXES.values()}
    expected.update(dict.fromkeys(SCALARS, ()))
    _check_keys(metadata.state_dict_metadata, expected, ckpt)
    _check_files(metadata, ckpt)
    return reader, metadata.state_dict_metadata


def load_checkpoint(trainer, path: str | os.PathLike) -> int:
    """Restore the state saved by save_checkpoint (at any layout) into `trainer` (at its own
    layout); returns the step to continue from (the next train_step's argument). A collective
    over the whole world; bad input raises CheckpointError, on every rank."""
    ckpt = resolve_checkpoint(path)
    meta = read_meta(ckpt)
    reader, saved = check_checkpoint(ckpt, meta, trainer.cfg.model)  # shapes checked: saved's are the model's

    rank = dist.get_rank()
    rng_rank = rank if rank < meta["layout"].get("world_size", 1) else 0  # a larger world: rank 0's state
    names = _needed_names(trainer)
    request: dict[str, torch.Tensor] = {prefix + n: torch.empty(tuple(saved[prefix + n].size), dtype=torch.float32)
                                        for n in names for prefix in PREFIXES.values()}
    request.update({k: torch.zeros((), dtype=torch.int64) for k in SCALARS})
    rng_keys = {"cpu": f"rng.cpu.{rng_rank}"}
    if meta.get("cuda_rng") and trainer.device.type == "cuda":
        rng_keys["cuda"] = f"rng.cuda.{rng_rank}"
    error = None
    for key in rng_keys.values():
        if key not in saved:
            error = f"checkpoint {ckpt} lacks tensor '{key}'"
        else:
            request[key] = torch.empty(tuple(saved[key].size), dtype=torch.uint8)
    if error is None:
        error = _read_tensors(reader, request, meta, ckpt)
    _agree(trainer, error, f"loading checkpoint {ckpt}")

    group = trainer.dims.group("tp")
    local: dict[str, dict[str, torch.Tensor]] = {}
    for key, prefix in PREFIXES.items():
        shards = local_shards(trainer.model, group, {n: request.pop(prefix + n) for n in names})
        for name, t in shards.items():
            local.setdefault(name, {})[key] = t.to(trainer.device)
    trainer.data_parallel.import_local_state(local, int(request["optim.step"]))
    torch.set_rng_state(request[rng_keys["cpu"]])
    if "cuda" in rng_keys:
        torch.cuda.set_rng_state(request[rng_keys["cuda"]], trainer.device)
    return int(request["train.step"])


def _read_tensors(reader, request: dict[str, torch.Tensor], meta: dict[str, Any], ckpt: Path) -> str | None:
    """DCP-load `request` in place without coordination (each rank asks for other keys) and
    verify the crc32s; the error line, or None."""
    try:
        with warnings.catch_warnings():  # no_dist warns that it is not coordinated: intended
            warnings.simplefilter("ignore")
            dcp.load(request, storage_reader=reader, no_dist=True)
    except DCP_ERRORS as e:  # noqa: BLE001 - a truncated or garbled file: one line
        return f"checkpoint {ckpt} is corrupt: {_one_line(e)}"
    checksums = meta.get("checksums", {})
    for key, t in request.items():
        if key in checksums and _crc(t) != checksums[key]:
            return f"checkpoint {ckpt} is corrupt: tensor '{key}' does not match its checksum"
    if int(request["train.step"]) != meta.get("step"):
        return f"checkpoint {ckpt} is corrupt: train.step {int(request['train.step'])} != {META}'s {meta.get('step')}"
    return None


# -- safetensors -----------------------------------------------------------------------------
def _hf_name(name: str) -> str:
    """Hugging Face's Llama names: the decoder under "model.", the head outside it."""
    return name if name == "lm_head.weight" else f"model.{name}"


def export_safetensors(trainer, path: str | os.PathLike, *, dtype: torch.dtype = torch.float32,
                       hf_names: bool = False) -> Path:
    """Write the full model (master weights, reference names, `dtype`) as ONE .safetensors
    file from global rank 0. A collective over the world: pipeline stages send their
    weights to rank 0 (one sender per stage: its dp 0, tp 0 rank). hf_names: Hugging Face's
    Llama names ("model.layers.0...."), which import_safetensors also reads."""
    from safetensors.torch import save_file

    path = Path(path)
    tensors = gather_weights(trainer, dtype)
    error = None
    if dist.get_rank() == 0:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp")
            save_file({(_hf_name(n) if hf_names else n): tensors[n].contiguous() for n in sorted(tensors)},
                      str(tmp), metadata={"format": "pt", "producer": "pyruntime",
                                          "model": json.dumps(dataclasses.asdict(trainer.cfg.model))})
            os.replace(tmp, path)
        except Exception as e:  # noqa: BLE001 - OSError, or safetensors' own error for a full disk
            error = f"cannot write {path}: {os_cause(e) or _one_line(e)}"
    _agree(trainer, error, f"export to {path}")  # also: the file exists when any rank returns
    return path


def gather_weights(trainer, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """{reference name: full master weight in `dtype`, CPU} on global rank 0 ({} elsewhere).
    A collective over the world: pipeline stages send their weights to rank 0 (one sender
    per stage: its dp 0, tp 0 rank); raises CheckpointError on every rank if one is missing."""
    rank, world = dist.get_rank(), dist.get_world_size()
    full = {name: entry["param"] for name, entry in _full_state(trainer, moments=False).items()}
    sender = trainer.dims.axis_rank("dp") == 0 and trainer.dims.axis_rank("tp") == 0
    listed: list = [None] * world
    dist.all_gather_object(listed, sorted(full) if sender and rank != 0 else [])
    shapes = reference_shapes(trainer.cfg.model)
    tensors = {name: t.to("cpu", dtype) for name, t in full.items()} if rank == 0 else {}
    for src, names in enumerate(listed):
        for name in names:
            if rank == src:
                dist.send(full[name].contiguous(), dst=0)
            elif rank == 0:
                buf = torch.empty(shapes[name], dtype=torch.float32, device=_comm_device(trainer))
                dist.recv(buf, src=src)
                tensors[name] = buf.to("cpu", dtype)
    missing = sorted(set(shapes) - set(tensors)) if rank == 0 else []
    _agree(trainer, f"export: no rank sent '{missing[0]}'" if missing else None, "gathering the weights")
    return tensors


def import_safetensors(trainer, path: str | os.PathLike) -> None:
    """Load full weights from a .safetensors file (pyruntime's reference names or Hugging
    Face's Llama names, any float dtype) into this layout; the optimizer restarts (moments
    zero, step count 0). Every rank reads just the tensors it needs. Raises CheckpointError
    for a missing, extra or mis-shaped tensor, on every rank."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no safetensors file at {path}")
    shapes = reference_shapes(trainer.cfg.model)
    names = _needed_names(trainer)
    error, full = None, {}
    try:
        f = safe_open(str(path), framework="pt")
    except Exception as e:  # noqa: BLE001 - a bad header
        raise CheckpointError(f"{path} is not a readable safetensors file ({_one_line(e)})") from None
    with f:
        keys = {(k[len("model."):] if k.startswith("model.") else k): k
                for k in f.keys() if not k.endswith("rotary_emb.inv_freq")}  # old HF files keep this buffer
        missing = [n for n in shapes if n not in keys]
        extra = sorted(keys[n] for n in keys if n not in shapes)
        if missing:
            raise CheckpointError(f"{path} lacks tensor '{missing[0]}'"
                                  + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        if extra:
            raise CheckpointError(f"{path} has tensor '{extra[0]}', which the run's model does not")
        for name, shape in shapes.items():
            got = tuple(f.get_slice(keys[name]).get_shape())
            if got != shape:
                raise CheckpointError(f"{path}: tensor '{keys[name]}' has shape {got}, the run's model needs {shape}")
        try:
            full = {n: f.get_tensor(keys[n]).to(torch.float32) for n in names}
        except Exception as e:  # noqa: BLE001 - truncated data
            error = f"{path} is corrupt: {_one_line(e)}"
    _agree(trainer, error, f"import of {path}")
    shards = local_shards(trainer.model, trainer.dims.group("tp"), full)
    state = {}
    for name, t in shards.items():
        t = t.to(trainer.device, torch.float32)
        state[name] = {"param": t, "exp_avg": torch.zeros_like(t), "exp_avg_sq": torch.zeros_like(t)}
    trainer.data_parallel.import_local_state(state, 0)
