"""The loader's reads, in one process: any row range of a local parameter (a tp block of one
tensor, fused blocks of several, a row-parallel column block, the vocabulary's zero padding)
equals the same rows cut from the whole tensors, and reads exactly the file rows that hold
them; HFInit.value_range(p, start, stop) is the flat range of p's value, read from the rows
that cover it (ZeRO-3's shard of a parameter), also from bf16 files."""
import math

import pytest
import torch
from safetensors.torch import load_file

from pyruntime.hf.load import HFDir, HFInit, SliceReader, hf_name, read_rows
from pyruntime.model import Transformer
from pyruntime.parallel.tensor.unshard import TPSpec
from tests.pyruntime.hf.hf_models import save_hf


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    path = tmp_path_factory.mktemp("slices") / "m"
    save_hf("llama_gqa", path, shard_kb=20, vocab_size=99)  # 99 rows: tp 2 pads one
    return HFDir.open(path)


def whole(hf) -> dict[str, torch.Tensor]:
    return {k: v for f in set(hf.files.values()) for k, v in load_file(f).items()}


def local_value(spec: TPSpec, tensors, tp_rank: int) -> torch.Tensor:
    """The local parameter from whole tensors: each one's tp block along spec.dim, padded."""
    if spec.dim is None:
        return tensors[hf_name(spec.full[0])]
    blocks = []
    for ref, n in zip(spec.full, spec.local_sizes):
        t = tensors[hf_name(ref)].movedim(spec.dim, 0)
        t = torch.cat([t, t.new_zeros((n * 2 - t.shape[0], *t.shape[1:]))])  # padded to 2 blocks
        blocks.append(t[tp_rank * n:(tp_rank + 1) * n].movedim(0, spec.dim))
    return torch.cat(blocks, dim=spec.dim)


SPECS = [TPSpec("embed_tokens.weight", ("embed_tokens.weight",), 0, (50,), (99,)),  # padded vocab
         TPSpec("layers.0.self_attn.qkv_proj.weight", tuple(f"layers.0.self_attn.{x}_proj.weight" for x in "qkv"),
                0, (16, 8, 8), (32, 16, 16)),  # fused q, k, v (GQA)
         TPSpec("layers.1.self_attn.o_proj.weight", ("layers.1.self_attn.o_proj.weight",), 1, (16,), (32,)),
         TPSpec("layers.1.input_layernorm.weight", ("layers.1.input_layernorm.weight",))]


@pytest.mark.parametrize("spec", SPECS, ids=[s.local for s in SPECS])
@pytest.mark.parametrize("tp_rank", [0, 1])
def test_row_ranges_equal_the_whole_tensors_cut(hf, spec, tp_rank):
    want = local_value(spec, whole(hf), tp_rank)
    n = want.shape[0]
    for r0, r1 in [(0, n), (0, 1), (n - 1, n), (3, n - 5), (n // 2, n // 2 + 2)]:
        reader = SliceReader(hf)
        out = torch.full((r1 - r0, *want.shape[1:]), float("nan"))
        read_rows(spec, reader, tp_rank, out, r0, r1)
        assert torch.equal(out, want[r0:r1]), (r0, r1)
        assert reader.bytes_read == file_elements(spec, tp_rank, want.shape, r0, r1) * 4


def file_elements(spec: TPSpec, tp_rank: int, shape, r0: int, r1: int) -> int:
    """Elements of the files behind local rows [r0, r1): the padding rows have none."""
    if spec.dim != 0:
        return (r1 - r0) * math.prod(shape[1:])
    rows, base = 0, 0
    for n, size in zip(spec.local_sizes, spec.full_sizes):
        rows += sum(1 for r in range(max(r0, base), min(r1, base + n)) if tp_rank * n + r - base < size)
        base += n
    return rows * math.prod(shape[1:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_value_range_reads_only_the_rows_covering_it(tmp_path, dtype):
    save_hf("qwen2_bias_tied", tmp_path, dtype=dtype, shard_kb=20)
    hf = HFDir.open(tmp_path)
    with torch.device("meta"):
        model = Transformer(hf.model)
    init = HFInit(model, hf, None, torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    for name, p in model.named_parameters():
        full = init.value(p).reshape(-1)
        assert full.dtype == torch.float32
        row = p.numel() // p.shape[0]
        for _ in range(3):
            start, stop = sorted(torch.randint(0, p.numel() + 1, (2,), generator=gen).tolist())
            stop = max(stop, start + 1)
            before = init.reader.bytes_read
            got = init.value_range(p, start, stop)
            assert torch.equal(got, full[start:stop]), name
            rows = -(-stop // row) - start // row
            assert init.reader.bytes_read - before == rows * row * dtype.itemsize, name
