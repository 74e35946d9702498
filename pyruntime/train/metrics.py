"""Per-step log line with a progress bar, JSON-lines metrics, MFU and peak memory."""
from __future__ import annotations

import json
import resource
import sys
from pathlib import Path

import torch

# Dense bf16 tensor-core peak (FLOP/s) by device-name fragment; MFU is only shown where known.
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12}


def device_peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


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
    """Writes one JSON object per step (rank 0 only; other ranks pass enabled=False)."""

    def __init__(self, path: Path, enabled: bool, append: bool = False):
        self.enabled = enabled
        self.records: list[dict] = []
        self._file = None
        if enabled:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(path, "a" if append else "w")  # append: a resumed run continues the file

    def write(self, rec: dict) -> None:
        self.records.append(rec)
        if self._file is not None:
            self._file.write(json.dumps(rec) + "\n")
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def say(msg: str, enabled: bool = True) -> None:
    if enabled:
        print(msg, file=sys.stdout, flush=True)
