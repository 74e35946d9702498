"""Flat-buffer ops of data parallelism / ZeRO against PyTorch equivalents, over the parameter
list of a preset model: flat_pack / flat_unpack (C++ op; CUDA kernel on GPU) vs torch.cat and
torch._foreach_copy_ into views of a flat buffer, and the fused AdamW step over one flat fp32
buffer (Triton on CUDA, the flat PyTorch reference on CPU) vs torch.optim.AdamW over the list
of tensors (foreach=True, and fused=True on CUDA).

    python -m pyruntime bench flat                  # "small" on CPU, "1b" on CUDA
    python -m pyruntime bench flat --preset tiny --repeat 50
"""
from __future__ import annotations

import argparse
import sys

import torch

from pyruntime.bench.harness import compare, print_table, require, suite_parser
from pyruntime.config import PRESETS
from pyruntime.model import Transformer
from pyruntime.ops.adamw import DecayMask, adamw_step
from pyruntime.ops.flat import flat_pack, flat_unpack, plan_flat_layout
from pyruntime.parallel.optimizer import is_decayed


def model_shapes(preset: str) -> list[torch.Size]:
    with torch.device("meta"):
        return [p.shape for p in Transformer(PRESETS[preset]).parameters()]


def pack_rows(tensors, layout, repeat):
    n = layout.total_numel
    flat = torch.empty(n, device=tensors[0].device)
    views = [flat[o:o + t.numel()].view(t.shape) for o, t in zip(layout.offsets, tensors)]
    moved = 2 * 4 * sum(t.numel() for t in tensors)  # read + write, fp32
    shape = f"{len(tensors)} tensors, {n / 1e6:.1f}M fp32"
    return [
        compare("flat_pack vs cat", shape, lambda: flat_pack(tensors, layout),
                lambda: torch.cat([t.reshape(-1) for t in tensors]), baseline_name="torch.cat",
                bytes_moved=moved, repeat=repeat),
        compare("flat_pack vs foreach_copy_", shape, lambda: flat_pack(tensors, layout),
                lambda: torch._foreach_copy_(views, tensors), baseline_name="_foreach_copy_",
                bytes_moved=moved, repeat=repeat),
        compare("flat_unpack vs foreach_copy_", shape, lambda: flat_unpack(flat, tensors, layout),
                lambda: torch._foreach_copy_(tensors, views), baseline_name="_foreach_copy_",
                bytes_moved=moved, repeat=repeat),
    ]


def adamw_rows(tensors, layout, repeat):
    device = tensors[0].device
    n = layout.total_numel
    master = flat_pack(tensors, layout)
    grad = torch.randn(n, device=device) * 1e-3
    m, v = torch.zeros_like(master), torch.zeros_like(master)
    segments = [(o, o + t.numel()) for o, t in zip(layout.offsets, tensors) if is_decayed(t)]
    decay = DecayMask.from_segments(n, segments, device)
    hyper = {"lr": 1e-4, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1}
    step = [0]

    def ours():
        step[0] += 1
        adamw_step(master, grad, m, v, decay, step=step[0], **hyper)

    def torch_adamw(**impl):
        params = [t.clone().requires_grad_(True) for t in tensors]
        for p in params:
            p.grad = torch.randn_like(p) * 1e-3
        groups = [{"params": [p for p in params if is_decayed(p)], "weight_decay": hyper["weight_decay"]},
                  {"params": [p for p in params if not is_decayed(p)], "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=hyper["lr"], betas=hyper["betas"], eps=hyper["eps"], **impl).step

    moved = 28 * n + n  # read p, g, m, v and write p, m, v (fp32), plus the 1-byte decay mask
    shape = f"{len(tensors)} tensors, {n / 1e6:.1f}M fp32"
    rows = [compare("flat AdamW vs foreach", shape, ours, torch_adamw(foreach=True), baseline_name="AdamW foreach",
                    bytes_moved=moved, repeat=repeat)]
    if device.type == "cuda":
        rows.append(compare("flat AdamW vs torch fused", shape, ours, torch_adamw(fused=True),
                            baseline_name="AdamW fused", bytes_moved=moved, repeat=repeat))
    return rows


def main(argv=None) -> int:
    parser = suite_parser("flat", __doc__)
    parser.add_argument("--preset", default=None, choices=sorted(PRESETS), help="default: small on CPU, 1b on CUDA")
    parser.add_argument("--repeat", type=int, default=30)
    args = parser.parse_args(argv)
    require(parser, args, positive=("repeat",))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    preset = args.preset or ("1b" if device.type == "cuda" else "small")
    gen = torch.Generator().manual_seed(0)
    tensors = [torch.randn(s, generator=gen).to(device) for s in model_shapes(preset)]
    layout = plan_flat_layout([t.numel() for t in tensors], world_size=1, align=16)
    where = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    rows = pack_rows(tensors, layout, args.repeat) + adamw_rows(tensors, layout, args.repeat)
    print_table(rows, title=f"bench_flat | preset {preset} parameters | {where} (base = the named torch op)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
