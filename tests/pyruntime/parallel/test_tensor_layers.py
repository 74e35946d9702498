"""Tensor-parallel layers against their unsharded counterparts (nn.Linear, nn.Embedding,
F.cross_entropy, RMSNorm): outputs and input/weight gradients within 1e-5 relative, for
tp 2 and 4 in ONE spawned world of 4 ranks (tp 2 on rank pairs), with and without sequence
parallelism and overlap, odd shapes, a vocabulary that divides by neither tp; then the
overlapped layers and the cross-entropy once more on the Triton kernels (interpreted); and a
tp 2 model with sequence parallelism and overlap under bf16 autocast (as on CUDA) against
the unsharded one under the same autocast."""
from support import tp_checks
from support.world import run_world
from pyruntime.comm.overlap import chunk_sizes


def test_layers_match_unsharded_reference_for_tp_2_and_4():
    results = run_world(4, tp_checks.layer_checks)
    expected = ["overlap refused once, indivisible sequence refused"] + [
        item for tp in (2, 4) for item in (
            f"tp{tp} sp=False overlap=False", f"tp{tp} sp=True overlap=False", f"tp{tp} sp=True overlap=True",
            f"tp{tp} gather/scatter/ce/norm/chunks")] + ["tp2 triton kernels", "tp2 sp overlap model under bf16 autocast"]
    assert results == [expected] * 4


def test_chunk_sizes_cover_every_row_once():
    assert chunk_sizes(6, 4) == [2, 2, 1, 1]
    assert chunk_sizes(3, 8) == [1, 1, 1]
    assert chunk_sizes(12, 3) == [4, 4, 4]
    assert chunk_sizes(1, 1) == [1]

