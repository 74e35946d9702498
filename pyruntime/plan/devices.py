"""Accelerators the planner knows: memory, peak dense bf16 FLOP/s, and the bandwidth a GPU
has to its peers inside a node and to other nodes, each figure with its source.

Bandwidths are per GPU and per direction (bytes/s), which is what a ring collective's bus
bandwidth can reach: NVLink's advertised "900 GB/s" is both directions together, so 450 here;
inter-node is the GPU's own NIC (one 400 Gb/s NDR port per GPU on a DGX H100 = 50 GB/s).
Peak FLOP/s are dense (the datasheets' headline figures with sparsity are twice these).
Explicit --gpu-mem / --tflops / --intra-bw / --inter-bw, or a `--calibrate` profile, replace
any of them.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from pyruntime.plan.layout import PlanError

GB, TB = 1e9, 1e12


@dataclass(frozen=True)
class Device:
    name: str
    memory: float
    """Bytes of device memory (as sold: GB = 1e9, or GiB where the vendor says so)."""
    peak_flops: float
    """Dense bf16 (fp16 where there is no bf16) tensor-core FLOP/s."""
    intra_bw: float
    """Bytes/s per direction to a GPU of the same node."""
    inter_bw: float
    """Bytes/s per direction to a GPU of another node."""
    source: str
    mem_bw: float = 2e12
    """Bytes/s of device memory (the optimizer step is bound by it)."""
    latency: float = 10e-6
    """Seconds per all-reduce before bandwidth counts (a typical NCCL small-message latency;
    `--calibrate` measures it)."""
    gather_latency: float = 10e-6
    """The same for an all-gather / reduce-scatter as the runtime issues them (on gloo: one
    broadcast per rank, or an all-reduce of a packed copy)."""
    p2p_latency: float = 10e-6
    """The same for one pipeline send / receive."""
    overlap: bool = True
    """Whether communication runs beside compute (GPUs: NCCL on its own stream). A CPU rank
    has one core for both, so its collectives count in full."""
    step_overhead: float = 2e-3
    """Seconds per step outside forward / backward / communication: the optimizer's and the
    gradient clipping's dispatch, the sampler, metrics; calibrated with a tiny trainer."""
    micro_overhead: float = 0.0
    """Seconds per micro-batch and chunk outside the blocks (embedding, rotary tables, loss,
    hooks); calibrated on CPU."""
    gemm_efficiency: float = 0.6
    """Fraction of peak_flops a large training GEMM sustains (MFU reports of Megatron-LM and
    torchtitan on H100 / A100 are 0.4-0.6 for whole steps); `--calibrate` measures it."""
    block_overhead: float = 100e-6
    """Seconds per block and micro-batch (forward + backward) that do no arithmetic: op
    dispatch and kernel launches (~40 kernels of a few microseconds); calibrated on CPU, where
    it dominates small models."""
    cuda: bool = True
    """Whether the trainer runs it with bf16 autocast (activations 2 bytes, ZeRO-3 units bf16)."""
    host_bw: float = 300e9
    """Bytes/s of a node's host memory, which the host AdamW of its ranks share (--offload
    optimizer). Assumed: a DGX-class node's two sockets of 8 DDR5-4800 channels (614 GB/s)
    at the ~50% a streaming kernel reaches. A CPU device (cuda False) is its own host: its
    mem_bw is used."""
    link_bw: float = 25e9
    """Bytes/s per direction of pinned copies between host memory and the device (offload):
    PCIe Gen4 x16 (32 GB/s) less protocol overhead; Gen5 parts 50 GB/s. On a CPU device a copy
    reads and writes memory: mem_bw / 2 is used."""
    comm_times: tuple[tuple[str, int, float], ...] = ()
    """Measured (kind, bytes, seconds) of single collectives between 2 ranks, kind one of
    "allreduce", "gather" (the runtime's all-gather / reduce-scatter) and "p2p"; where present
    (a `--calibrate` profile) the line through them replaces latency + bytes / bandwidth
    inside one node."""
    block_fits: tuple[tuple[str, float, float, float, float], ...] = ()
    """Measured times of one model's pieces on this machine (`plan --calibrate` given a model):
    (fit_key(model, seq_len, tp), a, b, c, d): one block's forward + backward takes a + b * mb
    seconds at micro-batch mb, the rest of a micro-batch (embedding, final norm, head, loss)
    c + d * mb. Plans of that model at that sequence length and tp use them instead of FLOPs
    over gemm_efficiency plus the dispatch overheads."""

    def comm_seconds(self, kind: str, nbytes: float) -> float | None:
        """Seconds of one 2-rank collective of nbytes: the least-squares line through
        comm_times' sizes of that kind; None where none was measured."""
        points = [(b, t) for k, b, t in self.comm_times if k == kind]
        if not points:
            return None
        intercept, slope = line_fit(points)
        return intercept + slope * nbytes

    def block_fit(self, key: str) -> tuple[float, float, float, float] | None:
        for k, *fit in self.block_fits:
            if k == key:
                return tuple(fit)
        return None


def line_fit(points: list[tuple[float, float]]) -> tuple[float, float]:
    """(intercept, slope) of the least-squares line through (x, y) points, both kept >= 0
    (a time never falls with size; one point gives a flat line)."""
    n = len(points)
    mx, my = sum(x for x, _ in points) / n, sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    slope = max(sum((x - mx) * (y - my) for x, y in points) / sxx, 0.0) if sxx > 0 else 0.0
    intercept = my - slope * mx
    if intercept < 0:  # through the origin instead
        intercept, slope = 0.0, sum(x * y for x, y in points) / max(sum(x * x for x, _ in points), 1e-30)
    return intercept, slope


def fit_key(model, seq_len: int, tp: int) -> str:
    """What block_fits are measured for: the tp-local block and head shapes and the sequence."""
    return (f"dim {model.dim} heads {model.n_heads} kv {model.kv_heads} head_dim {model.head_dim} "
            f"ffn {model.ffn_dim} vocab {model.vocab_size} tied {int(model.tie_embeddings)} "
            f"bias {int(model.qkv_bias)}{int(model.o_bias)}{int(model.mlp_bias)} window {model.sliding_window} "
            f"seq {seq_len} tp {tp}")


_NDR, _HDR, _EDR = 50 * GB, 25 * GB, 12.5 * GB  # InfiniBand 400 / 200 / 100 Gb/s per GPU

def _gpu(name: str, memory_gb: float, tflops: float, intra_gbs: float, inter: float, hbm_tbs: float,
         source: str, link_gbs: float = 25) -> Device:
    """link_gbs: host <-> device per direction, effective (PCIe Gen3 12, Gen4 25, Gen5 50)."""
    return Device(name, memory_gb * GB, tflops * TB, intra_gbs * GB, inter, source, mem_bw=hbm_tbs * TB,
                  link_bw=link_gbs * GB)


DEVICES: dict[str, Device] = {d.name: d for d in (
    _gpu("h100", 80, 989, 450, _NDR, 3.35,
         "NVIDIA H100 Tensor Core GPU datasheet (SXM5): 80 GB HBM3 at 3.35 TB/s, BF16 1,979 TFLOPS with "
         "sparsity (989 dense), NVLink 900 GB/s, PCIe Gen5 128 GB/s both directions; DGX H100: 8x ConnectX-7 "
         "400 Gb/s", link_gbs=50),
    _gpu("h100-nvl", 94, 835, 300, _NDR, 3.9,
         "NVIDIA H100 datasheet (H100 NVL): 94 GB at 3.9 TB/s, BF16 1,671 TFLOPS with sparsity (835 dense), "
         "NVLink bridge 600 GB/s, PCIe Gen5 128 GB/s both directions", link_gbs=50),
    _gpu("gh200", 96, 989, 450, _NDR, 4.0,
         "NVIDIA GH200 Grace Hopper Superchip datasheet: 96 GB HBM3 at 4 TB/s, BF16 1,979 TFLOPS with "
         "sparsity (989 dense), NVLink 900 GB/s, NVLink-C2C to the Grace CPU 900 GB/s both directions", link_gbs=450),
    _gpu("h200", 141, 989, 450, _NDR, 4.8,
         "NVIDIA H200 Tensor Core GPU datasheet (SXM): 141 GB HBM3e at 4.8 TB/s, BF16 1,979 TFLOPS with "
         "sparsity (989 dense), NVLink 900 GB/s, PCIe Gen5 128 GB/s both directions", link_gbs=50),
    _gpu("a100", 80, 312, 300, _HDR, 2.039,
         "NVIDIA A100 Tensor Core GPU datasheet (80GB SXM): 2,039 GB/s, BF16 312 TFLOPS dense, NVLink "
         "600 GB/s, PCIe Gen4 64 GB/s both directions; DGX A100: 8x ConnectX-6 200 Gb/s"),
    _gpu("a100-40gb", 40, 312, 300, _HDR, 1.555,
         "NVIDIA A100 Tensor Core GPU datasheet (40GB SXM): 1,555 GB/s, BF16 312 TFLOPS dense, NVLink 600 GB/s"),
    _gpu("v100", 32, 125, 150, _EDR, 0.9,
         "NVIDIA V100 datasheet (SXM2 32GB): 900 GB/s, no bf16: FP16 tensor 125 TFLOPS, NVLink 300 GB/s; "
         "PCIe Gen3 32 GB/s both directions; DGX-1: 4x 100 Gb/s EDR InfiniBand for 8 GPUs (12.5 GB/s per "
         "port)", link_gbs=12),
    _gpu("l40s", 48, 362, 32, _NDR, 0.864,
         "NVIDIA L40S datasheet: 48 GB GDDR6 at 864 GB/s, BF16 733 TFLOPS with sparsity (362 dense), no "
         "NVLink: PCIe Gen4 x16 64 GB/s both directions"),
    _gpu("a10g", 24, 125, 32, _EDR, 0.6,
         "NVIDIA A10 Tensor Core GPU datasheet (AWS's A10G is its cloud variant): 24 GB GDDR6 at 600 GB/s, "
         "BF16 250 TFLOPS with sparsity (125 dense), no NVLink: PCIe Gen4 x16 64 GB/s both directions"),
    _gpu("mi300x", 192, 1307, 448, _NDR, 5.3,
         "AMD Instinct MI300X datasheet: 192 GB HBM3 at 5.3 TB/s, BF16 1,307.4 TFLOPS dense, 7 Infinity "
         "Fabric links of 64 GB/s per direction, PCIe Gen5 x16 host link", link_gbs=50),
)}


def peak_flops_of(gpu_name: str) -> float | None:
    """The table's dense bf16 peak for a GPU as torch names it ("NVIDIA H100 80GB HBM3",
    "NVIDIA H100 NVL"): the longest table name inside it; None for a GPU the table lacks."""
    name = "-".join(gpu_name.lower().replace("_", " ").split())
    known = sorted((k for k in DEVICES if k in name), key=len, reverse=True)
    return DEVICES[known[0]].peak_flops if known else None


def device(name: str) -> Device:
    key = name.lower()
    if key not in DEVICES:
        raise PlanError(f"unknown device '{name}'; choose from {', '.join(DEVICES)} "
                        f"(or give --gpu-mem, --tflops, --intra-bw and --inter-bw)")
    return DEVICES[key]


def custom(base: Device | None, *, memory_gb: float | None = None, tflops: float | None = None,
           intra_gbs: float | None = None, inter_gbs: float | None = None) -> Device:
    """base with the explicit figures replacing its own; without a base all four are needed."""
    given = {"memory": memory_gb and memory_gb * GB, "peak_flops": tflops and tflops * TB,
             "intra_bw": intra_gbs and intra_gbs * GB, "inter_bw": inter_gbs and inter_gbs * GB}
    for name, value in given.items():
        if value is not None and value <= 0:
            raise PlanError(f"--{name.replace('_', '-')} must be > 0")
    if base is None:
        missing = [k for k, v in given.items() if v is None]
        if missing:
            raise PlanError("without --device, give --gpu-mem, --tflops, --intra-bw and --inter-bw "
                            f"(missing: {', '.join(missing)})")
        return Device("custom", source="given on the command line", **given)
    changes = {k: v for k, v in given.items() if v is not None}
    if not changes:
        return base
    return dataclasses.replace(base, name=base.name + "*", source=base.source + "; overridden: " + ", ".join(changes),
                               **changes)
