"""Reading a Hugging Face model directory: config.json + model.safetensors, or shards +
model.safetensors.index.json, streamed so that no rank ever reads the full model.

    hf = HFDir.open("Llama-3.2-1B")               # config, weight map, every header checked
    init = HFInit(model, hf, tp_group, device)    # a DeferredInit whose values come from the files

HFInit plugs into deferred initialisation (parallel/deferred_init.py): the data-parallel
engine asks for each local parameter's value when it makes it (all at once for DDP and
ZeRO-1/2; at ZeRO-3 only the element range of each parameter that the rank's flat shard
holds, one parameter at a time), and the value is read straight from the mapped file
(SliceReader; safetensors itself reads the headers when the directory is checked): just this
rank's tp block of each reference tensor (rows, or columns for a row-parallel weight), of
this rank's pipeline stages, and at ZeRO-3 just the rows of that block which cover the
shard's range. The block is a view of the mapping, converted to fp32 in the one copy into
the parameter. `bytes_read` counts what was read.
"""
from __future__ import annotations

import json
import math
import mmap
import struct
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from pyruntime.config import ModelConfig
from pyruntime.hf.config import HFError, model_config_from_file
from pyruntime.model.llama import reference_shapes
from pyruntime.parallel.deferred_init import DeferredInit
from pyruntime.parallel.tensor.unshard import TPSpec

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
# Parameters whose reads run ahead of the one being made (at most READ_AHEAD of them and, past
# the first two, READ_AHEAD_BYTES of fp32 values: on a GPU they are host copies on their way),
# on READ_THREADS threads; one larger than SPLIT_BYTES is read in READ_THREADS row blocks
# (measured on the 1B model, 2 cores: a window of 2 whole parameters left one thread idle
# while the other read the 1 GB embedding).
READ_AHEAD = 8
READ_AHEAD_BYTES = 2 << 30
READ_THREADS = 2
SPLIT_BYTES = 64 << 20
# Buffers some older checkpoints store; they are recomputed, never weights.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


# safetensors' dtype names -> torch's (the float ones a checkpoint holds weights in).
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "F8_E4M3": getattr(torch, "float8_e4m3fn", None), "F8_E5M2": getattr(torch, "float8_e5m2", None)}


def hf_name(name: str) -> str:
    """Hugging Face's name of a reference tensor: the decoder under "model.", the head outside."""
    return name if name == "lm_head.weight" else f"model.{name}"


@dataclass
class HFDir:
    """A checked Hugging Face model directory: its raw config, ModelConfig and which file
    holds each tensor (with its shape)."""

    path: Path
    raw_config: dict
    model: ModelConfig
    files: dict[str, Path] = field(default_factory=dict)          # HF tensor name -> file
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)

    @classmethod
    def open(cls, path: str | Path, **overrides) -> "HFDir":
        """Read config.json and the safetensors headers (not the data); HFError names the first
        problem: no config, an unsupported field, a shard the index names that is missing, a
        tensor missing, extra or of the wrong shape."""
        path = Path(path)
        if not (path / "config.json").is_file():
            raise HFError(f"{path} is not a Hugging Face model directory: no config.json")
        try:
            raw = json.loads((path / "config.json").read_text())
        except ValueError as e:
            raise HFError(f"{path / 'config.json'} is not valid JSON ({e})") from None
        hf = cls(path, raw, model_config_from_file(raw, path / "config.json", **overrides))
        hf._read_headers()
        hf._check_tensors()
        return hf

    def _read_headers(self) -> None:
        from safetensors import safe_open

        if (self.path / INDEX).is_file():
            try:
                weight_map = json.loads((self.path / INDEX).read_text())["weight_map"]
            except (ValueError, KeyError, TypeError):
                raise HFError(f"{self.path / INDEX} has no valid weight_map") from None
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise HFError(f"{self.path / INDEX}: weight_map must map tensor names to shard file names")
            shards = sorted(set(weight_map.values()))
        elif (self.path / SINGLE).is_file():
            weight_map, shards = None, [SINGLE]
        else:
            raise HFError(f"{self.path} holds neither {SINGLE} nor {INDEX}")
        for shard in shards:
            file = self.path / shard
            if not file.is_file():
                raise HFError(f"{self.path / INDEX} names shard {shard}, which is missing")
            try:
                with safe_open(str(file), framework="pt") as f:
                    for key in f.keys():
                        if weight_map is not None and weight_map.get(key) != shard:
                            continue  # the index decides which file holds a name
                        view = f.get_slice(key)
                        if DTYPES.get(view.get_dtype()) is None and not key.endswith(IGNORED_SUFFIXES):
                            raise HFError(f"{file}: tensor '{key}' is {view.get_dtype()}, not a float dtype "
                                          f"({', '.join(k for k, v in DTYPES.items() if v is not None)})")
                        self.files[key] = file
                        self.shapes[key] = tuple(view.get_shape())
            except HFError:
                raise
            except Exception as e:  # noqa: BLE001 - a garbled header: one line
                raise HFError(f"{file} is not a readable safetensors file ({' '.join(str(e).split())[:200]})") from None
        lost = sorted(k for k in (weight_map or {}) if k not in self.files)
        if lost:
            raise HFError(f"{self.path / INDEX} maps '{lost[0]}' to {weight_map[lost[0]]}, which does not hold it")

    def _check_tensors(self) -> None:
        expected = {hf_name(n): s for n, s in reference_shapes(self.model).items()}
        present = {k for k in self.files if not k.endswith(IGNORED_SUFFIXES)}
        if self.model.tie_embeddings:
            present.discard("lm_head.weight")  # some tied checkpoints store the copy too
        missing = sorted(set(expected) - present)
        if missing:
            raise HFError(f"{self.path} lacks tensor '{missing[0]}'" + (f" (and {len(missing) - 1} more)"
                                                                         if len(missing) > 1 else ""))
        extra = sorted(present - set(expected))
        if extra:
            raise HFError(f"{self.path} has tensor '{extra[0]}', which the model does not")
        for name, shape in expected.items():
            if self.shapes[name] != shape:
                raise HFError(f"{self.path}: tensor '{name}' has shape {self.shapes[name]}, the model needs {shape}")


@dataclass
class _Mapped:
    """One safetensors file, mapped once: its header's entries and where the data starts."""

    map: mmap.mmap
    data_start: int
    entries: dict


class SliceReader:
    """Reads blocks of tensors from the directory's files, counting the bytes it reads.

    Each file is mapped once (copy-on-write, so torch can view it; nothing writes) and a block
    is a view of the mapping, converted in the one copy into its destination. After the copy
    the block's pages are dropped from the mapping (madvise MADV_DONTNEED: they stay in the
    page cache, only this process stops holding them), so the pages read do not pile up in
    the resident set (a mapping kept as read left the 1B model's tp 2 ranks at 0.88x the full
    fp32 model's bytes; this way 0.53x). Mapping once instead of per read (as safetensors'
    safe_open does) keeps the two read-ahead threads from waiting on each other: every
    map / unmap takes the address space's lock for writing."""

    def __init__(self, hf: HFDir):
        self.hf, self.bytes_read = hf, 0
        self.read_names: set[str] = set()
        self._lock = threading.Lock()  # reads run in HFInit's read-ahead threads too
        self._files: dict[Path, _Mapped] = {}

    def _mapped(self, path: Path) -> _Mapped:
        with self._lock:
            if path not in self._files:
                with open(path, "rb") as f:
                    (size,) = struct.unpack("<Q", f.read(8))
                    entries = json.loads(f.read(size))
                    self._files[path] = _Mapped(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY), 8 + size, entries)
            return self._files[path]

    def read_into(self, out: torch.Tensor, name: str, rows: tuple[int, int],
                  cols: tuple[int, int] | None = None) -> None:
        """out <- rows [rows) (and columns [cols) of a 2-D tensor) of tensor `name` (HF name),
        converted to out's dtype in the one copy from the mapped file."""
        m = self._mapped(self.hf.files[name])
        entry = m.entries[name]
        dtype, shape = DTYPES[entry["dtype"]], entry["shape"]  # a float dtype: HFDir.open checked
        row, size = _row_numel(shape), dtype.itemsize
        begin = m.data_start + entry["data_offsets"][0] + rows[0] * row * size
        count = (rows[1] - rows[0]) * row
        block = torch.frombuffer(m.map, dtype=dtype, count=count, offset=begin).view(rows[1] - rows[0], *shape[1:])
        if cols is not None:
            block = block[:, cols[0]:cols[1]]
        out.copy_(block)
        moved = block.numel() * size
        # Pages shared with a neighbouring tensor that another thread is reading are dropped
        # too; it faults them back from the page cache (nothing ever writes this mapping).
        if hasattr(m.map, "madvise"):  # not on Windows, where pages stay until the load ends
            page = mmap.PAGESIZE
            first, last = begin // page * page, -(-(begin + count * size) // page) * page
            m.map.madvise(mmap.MADV_DONTNEED, first, min(last, len(m.map)) - first)
        with self._lock:
            self.bytes_read += moved
            self.read_names.add(name)


def read_rows(spec: TPSpec, reader: SliceReader, tp_rank: int, out: torch.Tensor, r0: int, r1: int) -> None:
    """out <- rows [r0, r1) (dim 0) of one local parameter: for each reference tensor it
    stacks, the part of this tp rank's block along spec.dim that falls in those rows, zero
    where the block runs past the tensor (the vocabulary's padding)."""
    if spec.dim is None:
        reader.read_into(out, hf_name(spec.full[0]), (r0, r1))
        return
    if spec.dim == 1:  # a row-parallel weight: its rows are the tensor's, its columns a block
        n, size = spec.local_sizes[0], spec.full_sizes[0]
        c0 = tp_rank * n
        real = max(0, min(n, size - c0))
        if real:
            reader.read_into(out[:, :real], hf_name(spec.full[0]), (r0, r1), (c0, c0 + real))
        out[:, real:].zero_()
        return
    base = 0  # local row where this tensor's block starts
    for ref, n, size in zip(spec.full, spec.local_sizes, spec.full_sizes):
        lo, hi = max(r0, base), min(r1, base + n)  # local rows of this block wanted
        if lo < hi:
            f0 = tp_rank * n + lo - base  # the same rows in the file
            real = max(0, min(hi - lo, size - f0))
            dst = out[lo - r0:hi - r0]
            if real:
                reader.read_into(dst[:real], hf_name(ref), (f0, f0 + real))
            dst[real:].zero_()
        base += n


def _row_numel(shape: torch.Size) -> int:
    return math.prod(shape[1:])


class HFInit(DeferredInit):
    """Deferred init whose values are the directory's weights: each local parameter read as
    its tp block of its reference tensors, nothing else (see the module docstring)."""

    def __init__(self, model: nn.Module, hf: HFDir, tp_group, device: torch.device):
        super().__init__(model, hf.model, seed=0, tp_group=tp_group, device=device)
        self.hf, self.reader = hf, SliceReader(hf)
        self.tp_rank = tp_group.rank() if tp_group is not None else 0
        self._ahead: dict[int, tuple] = {}  # id(meta parameter) -> (its value, the reads filling it)
        self._top_up = None

    @torch.no_grad()
    def materialize(self, modules, values: bool = True) -> None:
        """DeferredInit.materialize, with each parameter's read started up to READ_AHEAD
        parameters early in a thread pool (as transformers' loader does): the copies release
        the GIL, so the next tensors' page faults and conversion overlap this one's."""
        if not (values and self.draws):
            return super().materialize(modules, values)
        queue = deque(dict.fromkeys(p for m in modules for p in m.parameters() if p.is_meta))
        with ThreadPoolExecutor(READ_THREADS) as pool:
            def top_up():
                while queue and len(self._ahead) < READ_AHEAD:
                    held = sum(out.numel() * 4 for out, _ in self._ahead.values())
                    if len(self._ahead) >= 2 and held + 4 * queue[0].numel() > READ_AHEAD_BYTES:
                        break
                    p = queue.popleft()
                    self._ahead[id(p)] = self._submit(pool, p)
            self._top_up = top_up
            top_up()
            try:
                super().materialize(modules, values)
            finally:
                self._ahead, self._top_up = {}, None

    def _submit(self, pool: ThreadPoolExecutor, p: nn.Parameter) -> tuple[torch.Tensor, list[Future]]:
        """p's value and the reads filling it: a large one in READ_THREADS row blocks, so no
        thread reads the embedding or the head (a fifth of a Llama 3.2 1B each) alone."""
        shape = p.shape  # p: the meta parameter
        out = torch.empty(shape, dtype=torch.float32)
        spec = self.specs[self.names[id(p)]]
        pieces = max(1, min(READ_THREADS, shape[0], 4 * out.numel() // SPLIT_BYTES))
        bounds = [shape[0] * i // pieces for i in range(pieces + 1)]
        return out, [pool.submit(read_rows, spec, self.reader, self.tp_rank, out[a:b], a, b)
                     for a, b in zip(bounds, bounds[1:])]

    def value(self, p: nn.Parameter) -> torch.Tensor:
        ahead = self._ahead.pop(id(p), None)
        if ahead is None:
            return self._read(p)
        self._top_up()
        out, reads = ahead
        for read in reads:
            read.result()
        return out

    def _read(self, p: nn.Parameter) -> torch.Tensor:
        shape = p.shape  # p: the meta parameter
        out = torch.empty(shape, dtype=torch.float32)
        read_rows(self.specs[self.names[id(p)]], self.reader, self.tp_rank, out, 0, shape[0])
        return out

    def value_range(self, p: nn.Parameter, start: int, stop: int) -> torch.Tensor:
        """Elements [start, stop) of p's flattened value, reading only the rows that hold them
        (ZeRO-3: a rank's shard holds a range of each parameter)."""
        shape = p.shape  # p: the meta parameter
        row = _row_numel(shape)
        r0, r1 = start // row, -(-stop // row)
        out = torch.empty((r1 - r0, *shape[1:]), dtype=torch.float32)
        read_rows(self.specs[self.names[id(p)]], self.reader, self.tp_rank, out, r0, r1)
        return out.reshape(-1)[start - r0 * row:stop - r0 * row]


def check_same_model(hf: ModelConfig, run: ModelConfig, source: str) -> None:
    """One line naming the first model field in which the run differs from the directory's
    (kernels and max_seq_len change no weight and no value the model computes)."""
    import dataclasses

    for f in dataclasses.fields(ModelConfig):
        if f.name in ("kernels", "max_seq_len"):
            continue
        if getattr(hf, f.name) != getattr(run, f.name):
            raise HFError(f"model.{f.name} {getattr(run, f.name)!r} conflicts with {source}'s {getattr(hf, f.name)!r}")


def hf_init(model: nn.Module, cfg, tp_group, device: torch.device) -> HFInit:
    """The HFInit of a run (cfg.train.init_from), its model config checked against the directory's."""
    hf = HFDir.open(cfg.train.init_from, kernels=cfg.model.kernels)
    check_same_model(hf.model, cfg.model, cfg.train.init_from)
    return HFInit(model, hf, tp_group, device)
