"""Vocab-parallel cross-entropy: the Triton kernels (interpreted on CPU, see tests/conftest.py)
against the reference and against F.cross_entropy on the unsharded logits; the shards'
padding, targets outside a shard, the in-place gradient; the single-device cross_entropy;
dispatch; and an sm_90 compile check."""

import pytest
import torch
import torch.nn.functional as F

from pyruntime.ops import BackendUnavailable, cross_entropy, vocab_parallel_ce_grad_, vocab_parallel_ce_stats
from pyruntime.ops import dispatch
from pyruntime.ops.cross_entropy import CANDIDATES, cross_entropy_reference

from support.kernels import DEVICE, cuda_only, needs_triton

BACKENDS = [pytest.param("triton", marks=needs_triton), "reference"]

# Stats and losses are fp32 math on the same rounded inputs: tight for every dtype. The
# gradient is stored in the logits' dtype, so its tolerance is that dtype's rounding.
DTYPE_GRAD_TOLS = [
    (torch.float32, 1e-6, 1e-5),
    (torch.float16, 1e-4, 1e-3),
    pytest.param(torch.bfloat16, 1e-3, 1e-2, marks=cuda_only),
]
PAD_VALUE = 1e4  # garbage in padding columns: any read of them would dominate max and sum


def _logits(n, v, dtype, seed=0, scale=3.0):
    gen = torch.Generator().manual_seed(seed)
    x = scale * torch.randn(n, v, generator=gen)
    x[0] = torch.linspace(-20, 20, v)  # the max moves in every block: exercises the rescaling
    return x.to(device=DEVICE, dtype=dtype)


def _shards(logits, tp):
    """Split (N, V) into tp shards of Vs = ceil(V / tp) columns, padding with PAD_VALUE."""
    n, v = logits.shape
    vs = -(-v // tp)
    out = []
    for r in range(tp):
        start = r * vs
        valid = max(0, min(vs, v - start))
        shard = torch.full((n, vs), PAD_VALUE, dtype=logits.dtype, device=logits.device)
        shard[:, :valid] = logits[:, start:start + valid]
        out.append((shard, start, valid))
    return out


def _combine(stats):
    """What the tp layer does with all-reduces: global max, sum-exp and target logit."""
    m = torch.stack([s[0] for s in stats])            # (tp, N)
    gmax = m.max(0).values
    gsum = (torch.stack([s[1] for s in stats]) * torch.exp(m - gmax)).sum(0)
    return gmax, gsum, torch.stack([s[2] for s in stats]).sum(0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tp", [1, 3, 8])
@pytest.mark.parametrize("dtype, atol, rtol", DTYPE_GRAD_TOLS)
def test_sharded_loss_and_grad_match_f_cross_entropy(backend, tp, dtype, atol, rtol):
    """tp=8 over V=300 leaves the last shard 27 valid columns of 38: padding in play."""
    n, v = 11, 300
    logits = _logits(n, v, dtype)
    targets = torch.randint(0, v, (n,), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    targets[:3] = torch.tensor([0, v - 1, 150])

    shards = _shards(logits, tp)
    stats = [vocab_parallel_ce_stats(s, targets, start, valid, backend=backend) for s, start, valid in shards]
    for s in stats:
        assert all(t.dtype == torch.float32 and t.shape == (n,) for t in s)
    gmax, gsum, tgt = _combine(stats)
    loss = torch.log(gsum) + gmax - tgt

    ref_logits = logits.float().requires_grad_(True)
    ref_loss = F.cross_entropy(ref_logits, targets, reduction="none")
    torch.testing.assert_close(loss, ref_loss.detach(), atol=1e-5, rtol=1e-5)
    (ref_grad,) = torch.autograd.grad(ref_loss.mean(), ref_logits)

    for shard, start, valid in shards:
        out = vocab_parallel_ce_grad_(shard, targets, start, valid, gmax, gsum, 1.0 / n, backend=backend)
        assert out is shard and out.dtype == dtype
        torch.testing.assert_close(shard[:, :valid].float(), ref_grad[:, start:start + valid], atol=atol, rtol=rtol)
        assert torch.all(shard[:, valid:] == 0), "padding columns must get an exact zero gradient"


@pytest.mark.parametrize("backend", BACKENDS)
def test_stats_of_one_shard_targets_inside_outside_and_in_padding(backend):
    n, vs, start, valid = 8, 160, 100, 150
    shard = _logits(n, vs, torch.float32, seed=2)
    shard[:, valid:] = PAD_VALUE
    # first / last column of the shard, just before it, the first padding column (= outside).
    targets = torch.tensor([100, 249, 99, 250, 0, 400, 180, 120], device=DEVICE)
    m, s, t = vocab_parallel_ce_stats(shard, targets, start, valid, backend=backend)

    x = shard[:, :valid].double()
    torch.testing.assert_close(m.double(), x.max(1).values)
    torch.testing.assert_close(s.double(), torch.exp(x - x.max(1, keepdim=True).values).sum(1), rtol=1e-5, atol=0)
    want_t = [x[0, 0], x[1, 149], 0, 0, 0, 0, x[6, 80], x[7, 20]]
    torch.testing.assert_close(t.double(), torch.tensor(want_t, dtype=torch.float64, device=DEVICE))

    # Row 3's target points into the padding (column 150): no column may take its "- 1".
    vocab_parallel_ce_grad_(shard, targets, start, valid, m, s, 1.0, backend=backend)
    want = torch.softmax(x, 1)
    for row, col in [(0, 0), (1, 149), (6, 80), (7, 20)]:
        want[row, col] -= 1.0
    torch.testing.assert_close(shard[:, :valid].double(), want, atol=1e-6, rtol=1e-5)
    assert torch.all(shard[:, valid:] == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_shard_and_per_row_scale(backend):
    n = 5
    shard = torch.full((n, 16), PAD_VALUE, device=DEVICE)
    targets = torch.arange(n, device=DEVICE)
    m, s, t = vocab_parallel_ce_stats(shard, targets, 0, 0, backend=backend)
    assert torch.all(m == -float("inf")) and torch.all(s == 0) and torch.all(t == 0)

    # A row-wise scale (reduction="none" upstream), applied row by row.
    logits = _logits(n, 40, torch.float32, seed=3)
    scale = torch.arange(1.0, n + 1, device=DEVICE)
    m, s, _ = vocab_parallel_ce_stats(logits, targets, 0, 40, backend=backend)
    grad = vocab_parallel_ce_grad_(logits.clone(), targets, 0, 40, m, s, scale, backend=backend)
    want = (torch.softmax(logits, 1) - F.one_hot(targets, 40)) * scale[:, None]
    torch.testing.assert_close(grad, want, atol=1e-6, rtol=1e-5)
    grad0 = vocab_parallel_ce_grad_(shard, targets, 0, 0, m, s, scale, backend=backend)
    assert torch.all(grad0 == 0)


@needs_triton
def test_grad_on_strided_rows_is_in_place_and_reported_to_autograd():
    """A column slice of a wider tensor (row stride > Vs): only the slice is written."""
    full = _logits(6, 50, torch.float32, seed=4)
    before = full.clone()
    shard = full[:, 10:40]
    targets = torch.tensor([0, 5, 29, 30, 7, 3], device=DEVICE)  # 30 falls outside (valid = 30)
    m, s, _ = vocab_parallel_ce_stats(shard, targets, 0, 30, backend="triton")
    version = shard._version
    vocab_parallel_ce_grad_(shard, targets, 0, 30, m, s, 2.0, backend="triton")
    assert shard._version > version
    want = 2.0 * (torch.softmax(before[:, 10:40], 1) - F.one_hot(targets.clamp(max=29), 30) * (targets < 30)[:, None])
    torch.testing.assert_close(full[:, 10:40], want, atol=1e-6, rtol=1e-5)
    assert torch.equal(full[:, :10], before[:, :10]) and torch.equal(full[:, 40:], before[:, 40:])


def test_bad_arguments_raise():
    logits, targets = torch.randn(4, 10), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="vocab_valid"):
        vocab_parallel_ce_stats(logits, targets, 0, 11)
    with pytest.raises(ValueError, match="targets"):
        vocab_parallel_ce_stats(logits, targets[:3], 0, 10)
    with pytest.raises(ValueError, match="grad_scale"):
        from pyruntime.triton_kernels.cross_entropy import ce_grad_

        ce_grad_(logits, targets, 0, 10, torch.zeros(4), torch.ones(4), torch.ones(3))


# ----------------------------------------------------------------------------- cross_entropy


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype, atol, rtol", DTYPE_GRAD_TOLS)
def test_cross_entropy_matches_f_cross_entropy(backend, reduction, dtype, atol, rtol):
    gen = torch.Generator().manual_seed(5)
    leaf = _logits(2 * 7, 130, dtype, seed=5).view(2, 7, 130).requires_grad_(True)
    targets = torch.randint(0, 130, (2, 7), generator=gen).to(DEVICE)
    logits = leaf * 1  # a non-leaf, as the LM head's output is: its storage takes the gradient
    loss = cross_entropy(logits, targets, reduction=reduction, backend=backend)
    ref = F.cross_entropy(leaf.detach().float().view(-1, 130), targets.view(-1), reduction=reduction)

    assert loss.dtype == torch.float32 and loss.shape == ref.shape
    torch.testing.assert_close(loss.detach(), ref, atol=1e-5, rtol=1e-5)
    upstream = torch.rand(ref.shape, generator=gen).to(DEVICE) + 0.5
    (grad,) = torch.autograd.grad(loss, leaf, upstream)
    ref_leaf = leaf.detach().float().requires_grad_(True)
    (ref_grad,) = torch.autograd.grad(
        F.cross_entropy(ref_leaf.view(-1, 130), targets.view(-1), reduction=reduction), ref_leaf, upstream)
    assert grad.dtype == dtype
    torch.testing.assert_close(grad.float(), ref_grad, atol=atol, rtol=rtol)


@pytest.mark.parametrize("bad", [-100, 130])
def test_cross_entropy_rejects_out_of_range_targets(bad):
    """No ignore_index: F.cross_entropy would silently skip -100, this op refuses it."""
    targets = torch.zeros(2, 7, dtype=torch.long)
    targets[1, 3] = bad
    with pytest.raises(ValueError, match=r"\[0, 130\)"):
        cross_entropy(torch.randn(2, 7, 130), targets, backend="reference")
    torch.testing.assert_close(cross_entropy_reference(torch.zeros(1, 4), torch.tensor([1])),
                               torch.log(torch.tensor(4.0)))


@needs_triton
def test_cross_entropy_second_backward_fails_loudly():
    """The first backward wrote the gradient over the saved logits."""
    leaf = _logits(4, 20, torch.float32).requires_grad_(True)
    loss = cross_entropy(leaf * 1, torch.arange(4, device=DEVICE), backend="triton")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_auto_on_cpu_picks_reference_and_explicit_triton_needs_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    cpu = torch.device("cpu")
    assert dispatch.choose("vocab_parallel_ce", "auto", cpu, candidates=CANDIDATES) == "reference"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(dispatch, "_triton_importable", lambda: True)
    with pytest.raises(BackendUnavailable, match="vocab_parallel_ce"):
        vocab_parallel_ce_stats(torch.randn(2, 8), torch.zeros(2, dtype=torch.long), 0, 8, backend="triton")
    with pytest.raises(BackendUnavailable, match="cross_entropy"):
        cross_entropy(torch.randn(2, 8), torch.zeros(2, dtype=torch.long), backend="triton")
