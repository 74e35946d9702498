"""Worker of the Hugging Face layout world (test_hf_layouts.py): each run trains from a
Hugging Face directory (--init-from) and exports one (--export-hf); every rank reports the
bytes and tensor names its loader read, and what it should have read (its own tp blocks of
its own stage's tensors; at ZeRO-3 the rows covering its shard's pieces), computed here from
the shapes (and the flat layout) alone."""
from __future__ import annotations

import math

import pyruntime.hf.load as hf_load
from pyruntime.parallel.tensor.unshard import tp_param_specs
from pyruntime.model.llama import reference_shapes

from support.world import Run, train


class RecordingInit(hf_load.HFInit):
    made: list["RecordingInit"] = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        RecordingInit.made.append(self)


def expected_reads(trainer, itemsize: int) -> tuple[int, set[str]]:
    """Bytes and HF names this rank must read: each local parameter's tp block of each
    reference tensor it stacks (the vocabulary's padding rows are not read)."""
    shapes = reference_shapes(trainer.cfg.model)
    tp_rank = trainer.dims.axis_rank("tp")
    total, names = 0, set()
    for spec in tp_param_specs(trainer.model):
        for i, ref in enumerate(spec.full):
            shape = shapes[ref]
            names.add(hf_load.hf_name(ref))
            if spec.dim is None:
                total += math.prod(shape)
                continue
            n = spec.local_sizes[i]
            rows = max(0, min(n, shape[spec.dim] - tp_rank * n))
            total += rows * math.prod(shape) // shape[spec.dim]
    return total * itemsize, names


def expected_zero3_reads(trainer, itemsize: int) -> int:
    """Bytes a ZeRO-3 rank (tp 1) must read: for each piece of a parameter in its flat shard
    (layout.pieces: an element range of the parameter), the whole rows covering that range."""
    assert trainer.dims.tp == 1, "the ZeRO-3 expectation is written for tp 1"
    engine, total = trainer.data_parallel, 0
    for unit in engine.units:
        group = unit.group
        for piece in group.layout.pieces(engine.comm.rank):
            p = group.params[piece.tensor_index]
            row = p.numel() // p.shape[0]
            rows = -(-(piece.tensor_offset + piece.numel) // row) - piece.tensor_offset // row
            total += rows * row
    return total * itemsize


def read_report(trainer) -> dict:
    init = RecordingInit.made.pop()
    want_bytes, want_names = expected_reads(trainer, itemsize=4)
    if trainer.cfg.parallel.zero == 3:
        want_bytes = expected_zero3_reads(trainer, itemsize=4)
    return {"bytes": init.reader.bytes_read, "names": sorted(init.reader.read_names),
            "want_bytes": want_bytes, "want_names": sorted(want_names),
            "full_bytes": 4 * sum(math.prod(s) for s in reference_shapes(trainer.cfg.model).values())}


def run_hf(rank: int, world_size: int, cfgs: list) -> list:
    hf_load.HFInit = RecordingInit  # hf_init builds the loader through this name
    results = train(rank, world_size, [Run(cfg, inspect=read_report) for cfg in cfgs])
    return [(r.records, r.inspected) for r in results]
