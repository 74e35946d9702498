"""Token files: a 32-byte header, then the ids; the loss mask, when there is one, alongside.

    write_tokens("data.bin", ids, vocab_size=32000, mask=mask)   # data.bin + data.bin.mask
    tokens, mask, vocab = read_tokens("data.bin")                # np.memmap views, never read whole

Header (little-endian): magic b"PYRTOKS1", uint32 version (2), uint16 bytes per id (2 or 4:
uint32 when the vocabulary exceeds 65535), uint16 flags (bit 0: a mask file belongs to these
ids), uint64 vocabulary size, uint64 id count. The mask file `<path>.mask` holds one uint8 per
id (1: the id counts as a target in the loss, 0: it does not, e.g. a prompt token of
instruction data), with the same header but 1 byte per entry, so a mask can never be paired
with the wrong token file silently (counts must match), nor lost silently: ids flagged as
masked without their mask file are an error, not a run that learns the prompts too.
Version 1 (a uint32 bytes-per-id field: the same bytes with flags 0) still reads, as does a
file without the magic, the old headerless little-endian uint16 format (no vocabulary
recorded, no mask).
"""
from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np

MAGIC = b"PYRTOKS1"
VERSION = 2
READS = (1, 2)  # version 1: no flags (its uint32 width reads as width + zero flags)
HEADER = struct.Struct("<8sIHHQQ")  # magic, version, bytes per entry, flags, vocab size, count
MASKED = 1  # flags bit: the ids have a mask file
HEADER_BYTES = HEADER.size  # 32
DTYPES = {2: np.dtype("<u2"), 4: np.dtype("<u4"), 1: np.dtype("u1")}


class TokenFileError(ValueError):
    """A token or mask file that cannot be used; the message is one line naming it."""


def id_dtype(vocab_size: int) -> np.dtype:
    """uint16 while every id fits, uint32 beyond 65536 ids."""
    return DTYPES[2] if vocab_size <= 65536 else DTYPES[4]


def mask_path(path: str | os.PathLike) -> Path:
    return Path(str(path) + ".mask")


def _write(path: Path, arr: np.ndarray, vocab_size: int, flags: int = 0) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(HEADER.pack(MAGIC, VERSION, arr.dtype.itemsize, flags, vocab_size, arr.size))
        arr.tofile(f)
    os.replace(tmp, path)


def write_tokens(path: str | os.PathLike, ids, vocab_size: int, mask=None) -> Path:
    """Write ids (any integer array) with a header; mask (same length, 0/1) into <path>.mask.
    Raises TokenFileError for an id outside [0, vocab_size) or a mask of another length."""
    path = Path(path)
    arr = np.asarray(ids).reshape(-1)
    if arr.size and (int(arr.min()) < 0 or int(arr.max()) >= vocab_size):
        raise TokenFileError(f"{path}: token ids span [{int(arr.min())}, {int(arr.max())}], outside the "
                             f"vocabulary of {vocab_size}")
    m = None if mask is None else np.asarray(mask).reshape(-1)
    if m is not None and m.size != arr.size:
        raise TokenFileError(f"{path}: mask has {m.size} entries for {arr.size} tokens")
    _write(path, arr.astype(id_dtype(vocab_size)), vocab_size, MASKED if m is not None else 0)
    if m is None:
        mask_path(path).unlink(missing_ok=True)  # an old mask would pair with the new ids
    else:
        _write(mask_path(path), (m != 0).astype(np.uint8), vocab_size)
    return path


def _read_header(path: Path) -> tuple[int, int, int, int] | None:
    """(bytes per entry, flags, vocab size, count), or None for a headerless file."""
    with open(path, "rb") as f:
        head = f.read(HEADER_BYTES)
    if not head.startswith(MAGIC):
        return None
    if len(head) < HEADER_BYTES:
        raise TokenFileError(f"{path}: truncated header")
    _, version, width, flags, vocab, count = HEADER.unpack(head)
    if version not in READS:
        raise TokenFileError(f"{path}: token file version {version}; this pyruntime reads versions "
                             f"{', '.join(map(str, READS))}")
    if width not in DTYPES:
        raise TokenFileError(f"{path}: {width} bytes per entry is not a token format (1, 2 or 4)")
    size = path.stat().st_size - HEADER_BYTES
    if size != width * count:
        raise TokenFileError(f"{path}: header says {count} entries of {width} bytes, the file holds {size} bytes")
    return width, flags, vocab, count


def read_tokens(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray | None, int | None]:
    """(ids, mask or None, vocabulary size or None for the old headerless format), memory-mapped."""
    path = Path(path)
    header = _read_header(path)
    if header is None:  # the old format: raw uint16
        size = path.stat().st_size
        if size % 2:
            raise TokenFileError(f"token file size {size} is not a multiple of 2 bytes (uint16): {path}")
        return np.memmap(path, dtype=DTYPES[2], mode="r"), None, None
    width, flags, vocab, count = header
    ids = np.memmap(path, dtype=DTYPES[width], mode="r", offset=HEADER_BYTES, shape=(count,)) if count else \
        np.zeros(0, DTYPES[width])
    mask = None
    mpath = mask_path(path)
    if flags & MASKED and not mpath.is_file():
        raise TokenFileError(f"{path} was written with a loss mask and {mpath} is missing: copy it alongside, "
                             "or tokenize again")
    if mpath.is_file():
        mhead = _read_header(mpath)
        if mhead is None or mhead[0] != 1 or mhead[3] != count:
            raise TokenFileError(f"{mpath} does not match {path} ({count} tokens)")
        mask = np.memmap(mpath, dtype=DTYPES[1], mode="r", offset=HEADER_BYTES, shape=(count,)) if count else \
            np.zeros(0, DTYPES[1])
    return ids, mask, vocab


class TokenWriter:
    """Appends ids (and mask entries) to a token file in chunks, so a large corpus is never held
    whole; the header's count is written at close. Use as a context manager. A mask in which
    every entry counts is dropped at close (it would say nothing): the ids are then unflagged."""

    def __init__(self, path: str | os.PathLike, vocab_size: int, with_mask: bool):
        self.path, self.vocab_size, self.count = Path(path), vocab_size, 0
        self.masked_out = 0  # mask entries of 0 written so far
        self.dtype = id_dtype(vocab_size)
        self.files = {"ids": self._open(self.path)}
        if with_mask:
            self.files["mask"] = self._open(mask_path(self.path))
        else:
            mask_path(self.path).unlink(missing_ok=True)

    @staticmethod
    def _open(path: Path):
        f = open(path.with_name(f".{path.name}.{os.getpid()}.tmp"), "wb")
        f.write(b"\0" * HEADER_BYTES)  # the header, with the count, is written at close
        return f

    def write(self, ids: np.ndarray, mask: np.ndarray | None = None) -> None:
        ids = np.asarray(ids).reshape(-1)
        if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size):
            raise TokenFileError(f"{self.path}: token id {int(ids.max())} outside the vocabulary of {self.vocab_size}")
        # file.write, not ndarray.tofile: a full disk is then an OSError with its errno (ENOSPC),
        # not numpy's "N requested and M written"
        self.files["ids"].write(np.ascontiguousarray(ids, dtype=self.dtype).data)
        if "mask" in self.files:
            m = np.ascontiguousarray(np.asarray(mask, dtype=np.uint8).reshape(-1))
            self.masked_out += int(m.size - np.count_nonzero(m))
            self.files["mask"].write(m.data)
        self.count += ids.size

    def __enter__(self) -> "TokenWriter":
        return self

    def __exit__(self, kind, *_) -> None:
        if kind is not None:  # an error while writing: leave no half file behind
            self._discard()
            return
        if "mask" in self.files and not self.masked_out:  # every id counts: no mask
            f = self.files.pop("mask")
            f.close()
            Path(f.name).unlink()
            mask_path(self.path).unlink(missing_ok=True)  # an old mask would pair with the new ids
        try:  # the final flush can meet a full disk too: then no file is replaced
            for key, f in self.files.items():
                width = 1 if key == "mask" else self.dtype.itemsize
                flags = MASKED if key == "ids" and "mask" in self.files else 0
                f.seek(0)
                f.write(HEADER.pack(MAGIC, VERSION, width, flags, self.vocab_size, self.count))
                f.close()
        except OSError:
            self._discard()
            raise
        for key, f in self.files.items():
            os.replace(f.name, self.path if key == "ids" else mask_path(self.path))

    def _discard(self) -> None:
        for f in self.files.values():
            try:
                f.close()
            except OSError:  # its buffer could not be flushed: the file goes anyway
                pass
            Path(f.name).unlink(missing_ok=True)
