"""Fused AdamW over a flat shard: the reference against torch.optim.AdamW (weight decay on
matrices only, several steps, a changing lr), the Triton kernel (interpreted on CPU, see
tests/conftest.py) against the reference, and how adamw_step dispatches."""
import importlib.util

import pytest
import torch

from pyruntime.ops import BackendUnavailable
from pyruntime.ops.adamw import DecayMask, adamw_step
from pyruntime.ops.flat import flat_pack, plan_flat_layout

from support.kernels import DEVICE, needs_triton

# Matrices (decayed) and vectors (not), odd sizes so alignment gaps sit between them.
SHAPES = [(7, 5), (13,), (3, 33), (1,), (64, 2), (29,)]
HYPER = {"betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1}
LRS = [1e-3, 3e-3, 2e-3, 5e-4]


def _params(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen) for s in SHAPES]


def _grads(step, seed=0):
    gen = torch.Generator().manual_seed(1000 * seed + step)
    return [torch.randn(s, generator=gen) * 10 ** (step % 3 - 1) for s in SHAPES]  # varied magnitudes


def _flat_state(params):
    """The flat buffers ZeRO keeps: master, m, v over one planned layout, and its decay mask."""
    layout = plan_flat_layout([p.numel() for p in params], world_size=1, align=16)
    segments = [(o, o + p.numel()) for o, p in zip(layout.offsets, params) if p.dim() >= 2]
    decay = DecayMask.from_segments(layout.total_numel, segments, DEVICE)
    master = flat_pack([p.to(DEVICE) for p in params], layout)
    return layout, master, torch.zeros_like(master), torch.zeros_like(master), decay


def _run_flat(backend, steps=len(LRS)):
    params = _params()
    layout, master, m, v, decay = _flat_state(params)
    for step in range(1, steps + 1):
        grad = flat_pack([g.to(DEVICE) for g in _grads(step)], layout)
        adamw_step(master, grad, m, v, decay, lr=LRS[step - 1], step=step, backend=backend, **HYPER)
    return layout, master, m, v


def test_reference_matches_torch_adamw_with_decay_on_matrices_only():
    params = [p.clone().requires_grad_(True) for p in _params()]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": HYPER["weight_decay"]},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=LRS[0], betas=HYPER["betas"], eps=HYPER["eps"], foreach=True)
    for step in range(1, len(LRS) + 1):
        for p, g in zip(params, _grads(step)):
            p.grad = g
        for group in opt.param_groups:
            group["lr"] = LRS[step - 1]
        opt.step()
    layout, master, m, v = _run_flat("reference")
    for i, p in enumerate(params):
        o = layout.offsets[i]
        got = master[o:o + p.numel()].view(p.shape).cpu()
        assert torch.equal(got, p.detach()), f"tensor {i} differs from torch.optim.AdamW"
        assert torch.equal(m[o:o + p.numel()].view(p.shape).cpu(), opt.state[p]["exp_avg"])
    # Gaps between tensors stay exactly zero (zero grad, zero weight: no update).
    gaps = torch.ones(layout.total_numel, dtype=torch.bool)
    for o, n in zip(layout.offsets, layout.numels):
        gaps[o:o + n] = False
    assert bool((master.cpu()[gaps] == 0).all())


@needs_triton
def test_triton_matches_reference():
    _, p_ref, m_ref, v_ref = _run_flat("reference")
    _, p_tri, m_tri, v_tri = _run_flat("triton")
    torch.testing.assert_close(p_tri, p_ref, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(m_tri, m_ref, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(v_tri, v_ref, rtol=1e-6, atol=1e-9)


@needs_triton
@pytest.mark.parametrize("numel", [1, 1000, 70001])  # one element, one block, several blocks
@pytest.mark.parametrize("weight_decay,with_mask", [(0.0, True), (0.1, False), (0.1, True)])
@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.float16])
def test_triton_odd_sizes_masks_and_grad_dtypes(numel, weight_decay, with_mask, grad_dtype):
    gen = torch.Generator().manual_seed(numel)
    p = torch.randn(numel, generator=gen).to(DEVICE)
    g = torch.randn(numel, generator=gen).to(DEVICE, grad_dtype)
    m, v = (torch.rand(numel, generator=gen).to(DEVICE) for _ in range(2))
    decay = DecayMask.from_segments(numel, [(0, numel // 3), (numel // 2, numel)], DEVICE) if with_mask else None
    outs = []
    for backend in ("reference", "triton"):
        state = [t.clone() for t in (p, m, v)]
        adamw_step(state[0], g, state[1], state[2], decay, lr=1e-2, betas=(0.9, 0.999), eps=1e-8,
                   weight_decay=weight_decay, step=3, backend=backend)
        outs.append(state)
    for got, want in zip(outs[1], outs[0]):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    if with_mask and weight_decay and numel > 3:  # a decayed and an undecayed element really differ
        lone = [t.clone() for t in (p, m, v)]
        adamw_step(lone[0], g, lone[1], lone[2], None, lr=1e-2, betas=(0.9, 0.999), eps=1e-8,
                   weight_decay=0.0, step=3, backend="reference")
        assert torch.equal(outs[0][0][numel // 3:numel // 2], lone[0][numel // 3:numel // 2])
        assert not torch.equal(outs[0][0][:numel // 3], lone[0][:numel // 3])


def test_decay_mask_merges_segments_and_rejects_out_of_range():
    d = DecayMask.from_segments(10, [(5, 8), (0, 2), (2, 3), (7, 9), (4, 4)])
    assert d.segments == ((0, 3), (5, 9))
    assert d.mask.tolist() == [True] * 3 + [False] * 2 + [True] * 4 + [False]
    with pytest.raises(ValueError, match="outside a buffer of 10"):
        DecayMask.from_segments(10, [(8, 11)])


def test_bad_inputs_and_dispatch():
    x = torch.zeros(4)
    with pytest.raises(ValueError, match="step counts from 1"):
        adamw_step(x, x, x.clone(), x.clone(), None, lr=1.0, betas=(0.9, 0.9), eps=1e-8, weight_decay=0, step=0)
    with pytest.raises(ValueError, match="decay mask of 3 elements"):
        adamw_step(x, x, x.clone(), x.clone(), DecayMask.from_segments(3, []), lr=1.0, betas=(0.9, 0.9),
                   eps=1e-8, weight_decay=0, step=1)
    with pytest.raises(BackendUnavailable, match="no 'cpp' backend"):  # the C++ op is CPU-only
        m = x.to("meta")
        adamw_step(m, m, m.clone(), m.clone(), None, lr=1.0, betas=(0.9, 0.9), eps=1e-8, weight_decay=0,
                   step=1, backend="cpp")
    if importlib.util.find_spec("triton") is not None:
        from pyruntime.triton_kernels.adamw import adamw_step_
        with pytest.raises(ValueError, match="exp_avg must be float32"):
            adamw_step_(x, x, x.half(), x.clone(), None, decay_factor=1.0, beta1=0.9, beta2=0.9, eps=1e-8,
                        step_size=-1.0, bias_correction2_sqrt=1.0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="on CUDA auto picks the kernel")
def test_auto_picks_the_reference_on_cpu():
    # The interpreter is for tests only: far too slow to be chosen automatically; the C++ op
    # only when asked for (ops/adamw.py _candidates).
    from pyruntime.ops.adamw import _candidates
    from pyruntime.ops.dispatch import choose
    assert choose("adamw", "auto", torch.device("cpu"), _candidates(torch.device("cpu"))) == "reference"
