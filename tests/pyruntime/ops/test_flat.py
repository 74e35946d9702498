"""Flat layout planner and flat_pack / flat_unpack: C++ op against the PyTorch reference."""
import pickle

import pytest
import torch

from pyruntime.ops import flat
from pyruntime.ops.dispatch import BackendUnavailable
from pyruntime.ops.flat import (FlatLayout, Piece, flat_pack, flat_pack_reference, flat_unpack, plan_buckets,
                                plan_flat_layout)

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.bool, torch.complex64]
SHAPES = [(3, 5), (7,), (), (0,), (2, 3, 4), (1,), (0, 4), (33,)]  # odd sizes, scalar, empties
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def make(shape, dtype, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        t = torch.randint(0, 2, shape, generator=g).bool()
    elif dtype.is_floating_point or dtype.is_complex:
        t = torch.randn(shape, generator=g, dtype=dtype)
    else:
        t = torch.randint(-1000, 1000, shape, generator=g, dtype=dtype)
    return t.to(device)


def non_contiguous(dtype, device="cpu"):
    """Transposed, strided-slice, expanded, storage-offset and channels-last inputs."""
    base = make((6, 10), dtype, device, seed=1)
    return [
        base.t(),                                   # (10, 6), inner stride 10
        base[1:5:2, 3:9:3],                         # (2, 2), both dims strided
        make((3,), dtype, device, 2).expand(4, 3),  # stride 0: elements share memory
        base[2, 1:8],                               # contiguous but storage_offset 21
        make((2, 3, 4, 5), dtype, device, 3).to(memory_format=torch.channels_last),
    ]


# ---- planner -----------------------------------------------------------------------------

def test_offsets_are_aligned_and_total_padded():
    layout = plan_flat_layout([5, 16, 1, 17], world_size=1, align=16)
    assert layout.offsets == (0, 16, 32, 48)
    assert layout.total_numel == 80 and layout.shard_numel == 80
    layout = plan_flat_layout([100], world_size=4, align=8)  # padded to a multiple of 4 * 8
    assert (layout.total_numel, layout.shard_numel) == (128, 32)
    assert [layout.shard_range(r) for r in range(4)] == [(0, 32), (32, 64), (64, 96), (96, 128)]


@pytest.mark.parametrize("numels,world_size,align", [
    ([10, 20], 3, 16), ([5, 0, 16, 0, 3, 40], 4, 4), ([1], 8, 1), ([0, 0], 2, 16), ([7, 9, 33], 1, 16),
    ([100], 5, 4), ([13, 29, 2, 57], 3, 5),
])
def test_pieces_reassemble_every_tensor_once(numels, world_size, align):
    layout = plan_flat_layout(numels, world_size=world_size, align=align)
    tensors = [torch.arange(1, n + 1, dtype=torch.float64) * (i + 1) for i, n in enumerate(numels)]
    buffer = flat_pack_reference(tensors, layout)
    rebuilt = [torch.zeros(n, dtype=torch.float64) for n in numels]
    covered = [torch.zeros(n, dtype=torch.int64) for n in numels]
    for rank in range(world_size):
        begin, end = layout.shard_range(rank)
        shard = buffer[begin:end]
        for p in layout.pieces(rank):
            assert isinstance(p, Piece) and p.numel > 0
            rebuilt[p.tensor_index][p.tensor_offset:p.tensor_offset + p.numel] = \
                shard[p.shard_offset:p.shard_offset + p.numel]
            covered[p.tensor_index][p.tensor_offset:p.tensor_offset + p.numel] += 1
    for t, r, c in zip(tensors, rebuilt, covered):
        assert torch.equal(t, r) and bool((c == 1).all())


def test_layout_equality_hash_and_pickle():
    a = plan_flat_layout([3, 4], world_size=2)
    b = plan_flat_layout((3, 4), world_size=2)
    assert a == b and hash(a) == hash(b) and a != plan_flat_layout([3, 4], world_size=1)
    c = pickle.loads(pickle.dumps(a))
    assert c == a and c.pieces(1) == a.pieces(1)
    assert isinstance(a, FlatLayout) and a.num_tensors == 2


def test_plan_buckets():
    assert plan_buckets([3, 4, 2, 5, 5, 1], bucket_bytes=40, element_size=4) == [(0, 3, 9), (3, 5, 10), (5, 6, 1)]
    # a tensor larger than the cap sits alone
    assert plan_buckets([2, 50, 3], 40, 4) == [(0, 1, 2), (1, 2, 50), (2, 3, 3)]
    # align 4: {3, 3} spans 8 elements, 32 bytes of fp32
    assert plan_buckets([3, 3], 32, 4, align=4) == [(0, 2, 8)]
    assert plan_buckets([3, 3], 28, 4, align=4)[0].end == 1
    assert plan_buckets([], 40, 4) == []


@pytest.mark.parametrize("call,match", [
    (lambda: plan_flat_layout([4, -3]), "numel of tensor 1 must be >= 0, got -3"),
    (lambda: plan_flat_layout([4], world_size=0), "world_size must be >= 1, got 0"),
    (lambda: plan_flat_layout([4], align=0), "align must be >= 1, got 0"),
    (lambda: plan_flat_layout([4], world_size=2).shard_range(2), r"rank must be in \[0, 2\), got 2"),
    (lambda: plan_flat_layout([4], world_size=2).pieces(-1), "got -1"),
    (lambda: plan_flat_layout([2**62, 2**62]), "overflows int64"),
    (lambda: plan_buckets([1], 0, 4), "bucket_bytes must be >= 1, got 0"),
    (lambda: plan_buckets([1], 40, 0), "element_size must be >= 1, got 0"),
])
def test_planner_rejects_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_planner_rejects_non_integer_numels():
    with pytest.raises(TypeError, match="numels must be a sequence of ints"):
        plan_flat_layout([3.5])


# ---- pack / unpack -----------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_pack_matches_reference(dtype, device):
    tensors = [make(s, dtype, device, seed=i) for i, s in enumerate(SHAPES)] + non_contiguous(dtype, device)
    layout = plan_flat_layout([t.numel() for t in tensors], align=16)
    expected = flat_pack_reference(tensors, layout)
    got = flat_pack(tensors, layout, backend="cpp")
    assert got.shape == (layout.total_numel,) and got.dtype == dtype
    assert torch.equal(got, expected)  # padding included: both zero it


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_unpack_matches_reference_and_round_trips(dtype, device):
    tensors = [make(s, dtype, device, seed=i) for i, s in enumerate(SHAPES)]
    layout = plan_flat_layout([t.numel() for t in tensors], world_size=3, align=8)
    packed = flat_pack(tensors, layout, backend="cpp")
    outs = {b: [torch.zeros_like(t) for t in tensors] for b in ("cpp", "reference")}
    for backend, targets in outs.items():
        flat_unpack(packed, targets, layout, backend=backend)
    for t, a, b in zip(tensors, outs["cpp"], outs["reference"]):
        assert torch.equal(a, t) and torch.equal(b, t)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64])
def test_unpack_into_non_contiguous_outs_touches_only_them(dtype):
    sources = [make((3, 5), dtype), make((7,), dtype, seed=1), make((), dtype, seed=2), make((2, 3, 4), dtype, seed=3)]
    layout = plan_flat_layout([t.numel() for t in sources], align=4)
    packed = flat_pack_reference(sources, layout)

    def targets():  # views into larger buffers: strided rows, step 2, a 0-d element, permuted
        bases = [torch.full((3, 8), 7, dtype=dtype), torch.full((15,), 7, dtype=dtype),
                 torch.full((3,), 7, dtype=dtype), torch.full((4, 3, 2), 7, dtype=dtype)]
        return bases, [bases[0][:, 1:6], bases[1][1::2], bases[2][1], bases[3].permute(2, 1, 0)]

    bases_cpp, outs_cpp = targets()
    flat_unpack(packed, outs_cpp, layout, backend="cpp")
    bases_ref, outs_ref = targets()
    flat_unpack(packed, outs_ref, layout, backend="reference")
    assert all(torch.equal(out, src) for out, src in zip(outs_cpp, sources))
    assert all(torch.equal(a, b) for a, b in zip(bases_cpp, bases_ref))  # nothing else written


def test_large_tensors_take_the_parallel_chunked_path():
    # > 1 MiB per tensor: split into chunks; 2 threads so at::parallel_for really fans out.
    tensors = [torch.randn(700_001), torch.randn(300, 1001).t(), torch.randn(5)]
    layout = plan_flat_layout([t.numel() for t in tensors], world_size=2)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        packed = flat_pack(tensors, layout, backend="cpp")
        outs = [torch.empty_like(t) for t in tensors]
        flat_unpack(packed, outs, layout, backend="cpp")
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(packed, flat_pack_reference(tensors, layout))
    assert all(torch.equal(a, b) for a, b in zip(outs, tensors))


def test_only_empty_tensors():
    tensors = [torch.empty(0), torch.empty(0, 3)]
    layout = plan_flat_layout([0, 0], world_size=2)
    packed = flat_pack(tensors, layout, backend="cpp")
    assert packed.shape == (0,)
    flat_unpack(packed, [torch.empty(0), torch.empty(0, 3)], layout, backend="cpp")


def test_pack_gradient_matches_reference():
    shapes = [(3, 4), (5,), (2, 1, 3)]
    layout = plan_flat_layout([torch.Size(s).numel() for s in shapes], align=8)
    weights = torch.randn(layout.total_numel, dtype=torch.float64)
    grads = {}
    for backend in ("cpp", "reference"):
        leaves = [torch.randn(s, dtype=torch.float64, generator=torch.Generator().manual_seed(5)).requires_grad_()
                  for s in shapes]
        (flat_pack(leaves, layout, backend=backend) * weights).sum().backward()
        grads[backend] = [t.grad for t in leaves]
    for a, b in zip(grads["cpp"], grads["reference"]):
        assert torch.equal(a, b)


def test_meta_tensors_use_the_meta_kernel():
    tensors = [torch.empty(3, 5, device="meta"), torch.empty(7, device="meta")]
    layout = plan_flat_layout([15, 7], world_size=2)
    out = flat_pack(tensors, layout, backend="cpp")
    assert out.device.type == "meta" and out.shape == (layout.total_numel,)


# ---- torch.library registration ----------------------------------------------------------

def _pack_samples():
    yield [torch.randn(3, 5), torch.randn(7)], [0, 16], 32
    yield [torch.randn(4, 6).t(), torch.randn(0), torch.randn(2, dtype=torch.float32)], [0, 32, 32], 48
    yield [torch.randn(2, 3, requires_grad=True), torch.randn(4, requires_grad=True)], [0, 8], 16
    yield [torch.randint(0, 9, (5,)), torch.randint(0, 9, (1, 1))], [0, 5], 8


def _to(device, tensors):
    return [t.detach().to(device).requires_grad_(t.requires_grad) for t in tensors]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sample", list(_pack_samples()), ids=["contiguous", "strided", "grad", "int64"])
def test_opcheck_flat_pack(sample, device):
    tensors, offsets, total = sample
    torch.library.opcheck(flat._load_cpp_ops().flat_pack.default, (_to(device, tensors), offsets, total))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("strided", [False, True])
def test_opcheck_flat_unpack(strided, device):
    outs = [torch.empty(5, 4, device=device).t() if strided else torch.empty(4, 5, device=device),
            torch.empty(3, device=device)]
    torch.library.opcheck(flat._load_cpp_ops().flat_unpack.default, (torch.randn(40, device=device), outs, [0, 32]))


# ---- errors ------------------------------------------------------------------------------

@pytest.mark.parametrize("args,match", [
    (([torch.ones(2), torch.ones(2, dtype=torch.float64)], [0, 4], 8), "tensors\\[1\\] has dtype Double"),
    (([torch.ones(2), torch.ones(2)], [0], 8), "got 2 tensors but 1 offsets"),
    (([torch.ones(2), torch.ones(5)], [0, 4], 8), "ends past total_numel 8"),
    (([torch.ones(4), torch.ones(2)], [0, 2], 8), "overlaps the previous tensor, which ends at 4"),
    (([torch.ones(2)], [-1], 8), "offsets\\[0\\] must be >= 0, got -1"),
    (([], [], 8), "empty list of Tensors"),  # the dispatcher's own message: no key to dispatch on
])
def test_cpp_pack_rejects_bad_arguments(args, match):
    with pytest.raises(RuntimeError, match=match):
        flat._load_cpp_ops().flat_pack(*args)


@pytest.mark.parametrize("make_args,match", [
    (lambda f: (f, [torch.empty(2, dtype=torch.int32)], [0]), "outs\\[0\\] has dtype Int but flat has Float"),
    (lambda f: (f, [torch.empty(2)], [0, 4]), "got 1 outs but 2 offsets"),
    (lambda f: (f, [torch.empty(5)], [12]), "ends past the end of flat \\(numel 16\\)"),
    (lambda f: (f.view(4, 4), [torch.empty(2)], [0]), "flat must be 1-D"),
    (lambda f: (f, [torch.empty(1).expand(3)], [0]), "elements sharing memory"),
    (lambda f: (f, [f[4:8]], [0]), "shares memory with flat"),
])
def test_cpp_unpack_rejects_bad_arguments(make_args, match):
    with pytest.raises(RuntimeError, match=match):
        flat._load_cpp_ops().flat_unpack(*make_args(torch.zeros(16)))


@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_wrappers_reject_inputs_that_do_not_fit_the_layout(backend):
    layout = plan_flat_layout([4, 3])
    with pytest.raises(ValueError, match="got 1 tensors but the layout has 2"):
        flat_pack([torch.ones(4)], layout, backend=backend)
    with pytest.raises(ValueError, match="tensors\\[1\\] has 2 elements but the layout expects 3"):
        flat_pack([torch.ones(4), torch.ones(2)], layout, backend=backend)
    with pytest.raises(ValueError, match="tensors\\[1\\] is torch.float16 on cpu, expected torch.float32"):
        flat_pack([torch.ones(4), torch.ones(3, dtype=torch.float16)], layout, backend=backend)
    with pytest.raises(ValueError, match="flat has shape \\(10,\\), the layout needs \\(32,\\)"):
        flat_unpack(torch.zeros(10), [torch.ones(4), torch.ones(3)], layout, backend=backend)
    with pytest.raises(ValueError, match="outs\\[0\\] is torch.int64"):
        flat_unpack(torch.zeros(32), [torch.ones(4, dtype=torch.int64), torch.ones(3)], layout, backend=backend)


def test_unknown_backend_is_rejected():
    layout = plan_flat_layout([4])
    with pytest.raises(BackendUnavailable, match="has no 'triton' backend"):
        flat_pack([torch.ones(4)], layout, backend="triton")
