"""Per-step log line with a progress bar, JSON-lines metrics, MFU and peak memory."""
from __future__ import annotations

import json
import os
import resource
from pathlib import Path

import torch

from pyruntime.train.faults import IOFault, writing


def device_peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    from pyruntime.plan.devices import peak_flops_of  # the one device table (with its sources)

    return peak_flops_of(torch.cuda.get_device_name(device))


def peak_memory_mb(device: torch.device) -> float:
    """Peak allocated device memory on CUDA; peak resident set size of the process on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # ru_maxrss is in KiB


def progress_bar(done: int, total: int, width: int = 20) -> str:
    filled = int(width * done / max(1, total))
    return "[" + "#" * filled + "." * (width - filled) + "]"


def format_step(rec: dict, total_steps: int) -> str:
    mfu = f"{100 * rec['mfu']:.1f}%" if rec.get("mfu") is not None else "n/a"
    line = (f"{progress_bar(rec['step'], total_steps)} step {rec['step']:>{len(str(total_steps))}}/{total_steps}"
            f" | loss {rec['loss']:.4f} | lr {rec['lr']:.2e} | grad {rec['grad_norm']:.3f}"
            f" | {rec['tokens_per_s']:,.0f} tok/s | MFU {mfu} | mem {rec['peak_mem_mb']:.0f} MB")
    if rec.get("val_loss") is not None:
        line += f" | val {rec['val_loss']:.4f}"
    return line


class MetricsWriter:
    """Writes one JSON object per step (rank 0 only; other ranks pass enabled=False).

    Each line goes down in one unbuffered write, so nothing waits in a buffer; a failed write
    (full disk, read-only mount, EIO) is cut back to the last whole line and raised as one
    IOFault line, so a resumed run appending to the file never reads half a record."""

    def __init__(self, path: Path, enabled: bool, append: bool = False):
        self.enabled, self.path = enabled, path
        self.records: list[dict] = []
        self._file = None
        if enabled:
            with writing("metrics file", path):
                path.parent.mkdir(parents=True, exist_ok=True)
                # append: a resumed run continues the file
                self._file = open(path, "ab" if append else "wb", buffering=0)

    def write(self, rec: dict) -> None:
        self.records.append(rec)
        if self._file is None:
            return
        data = (json.dumps(rec) + "\n").encode()
        start = self._file.tell()
        try:
            with writing("metrics file", self.path):
                view = memoryview(data)
                while view:
                    view = view[self._file.write(view):]
        except IOFault:
            try:
                os.ftruncate(self._file.fileno(), start)
            except OSError:  # not a regular file (a pipe, /dev/full): nothing to cut back
                pass
            raise

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
