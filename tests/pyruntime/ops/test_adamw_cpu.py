"""The C++ AdamW (torch.ops.pyruntime.adamw_step, csrc/adamw_cpu.cpp) through ops.adamw_step on
CPU tensors: torch.optim.AdamW within 1e-6, the reference to the last bit, decay segments,
bf16/fp16 gradients, the parameter copy written in the same pass, opcheck, bad input."""
import pytest
import torch

from pyruntime.ops.adamw import DecayMask, _scalars, adamw_reference, adamw_step

HYPER = dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-8)
SIZES = [1, 7, 4097, 10**6 + 3]


def _state(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    params = torch.randn(n, generator=g)
    grads = [torch.randn(n, generator=g) for _ in range(3)]
    return params, grads


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("n", SIZES)
def test_matches_torch_adamw(n, weight_decay, foreach):
    params, grads = _state(n)
    ours, m, v = params.clone(), torch.zeros(n), torch.zeros(n)
    theirs = params.clone().requires_grad_()
    opt = torch.optim.AdamW([theirs], weight_decay=weight_decay, foreach=foreach, **HYPER)
    for step, grad in enumerate(grads, start=1):
        adamw_step(ours, grad, m, v, None, weight_decay=weight_decay, step=step, backend="cpp", **HYPER)
        theirs.grad = grad.clone()
        opt.step()
    state = opt.state[theirs]
    for got, want in ((ours, theirs.detach()), (m, state["exp_avg"]), (v, state["exp_avg_sq"])):
        # Both of torch's paths round a few scalars differently from ours (1 ulp apart).
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("n", SIZES)
def test_matches_the_reference_with_decay_segments(n):
    # The reference is torch's foreach sequence of ops; the C++ loop rounds as they do (fused
    # multiply-adds where torch's lerp_ / addcmul_ use them), so the moments of one step agree
    # to the last bit; the parameters within 1e-6 (torch's MKL sqrt is not correctly rounded,
    # ours is). Decaying outside the segments would be off by lr * wd * p = 3e-4 * p.
    params, grads = _state(n, seed=1)
    decay = DecayMask.from_segments(n, [(0, n // 3), (n // 2, n - n // 5)])
    a, b = params.clone(), params.clone()
    ma, va, mb, vb = (torch.zeros(n) for _ in range(4))
    for step, grad in enumerate(grads, start=1):
        adamw_step(a, grad, ma, va, decay, weight_decay=0.1, step=step, backend="cpp", **HYPER)
        adamw_reference(b, grad, mb, vb, decay, weight_decay=0.1, step=step, **HYPER)
        assert torch.equal(ma, mb) and torch.equal(va, vb)
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("grad_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("copy_dtype", [None, torch.float32, torch.bfloat16])
def test_low_precision_grads_and_the_parameter_copy(grad_dtype, copy_dtype):
    n = 70001  # more than one chunk, odd tail
    params, grads = _state(n, seed=2)
    a, b = params.clone(), params.clone()
    ma, va, mb, vb = (torch.zeros(n) for _ in range(4))
    copy = torch.full((n,), 7.0, dtype=copy_dtype) if copy_dtype is not None else None
    for step, grad in enumerate(grads, start=1):
        adamw_step(a, grad.to(grad_dtype), ma, va, None, weight_decay=0.1, step=step, backend="cpp",
                   param_copy=copy, **HYPER)
        adamw_reference(b, grad.to(grad_dtype), mb, vb, None, weight_decay=0.1, step=step, **HYPER)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ma, mb, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(va, vb, rtol=1e-6, atol=1e-6)
    if copy is not None:
        assert torch.equal(copy, a.to(copy_dtype))


def test_bf16_copy_rounds_like_torch_on_special_values():
    # Round to nearest even at the halfway points, infinities, NaN, the largest floats, tiny
    # values: with lr = 0 and zero gradients the step leaves params unchanged, so the copy is
    # exactly params.to(bfloat16).
    special = torch.tensor([1.0 + 2**-8, 1.0 + 3 * 2**-8, -1.0 - 2**-8, float("inf"), -float("inf"),
                            float("nan"), 3.4e38, -3.4e38, 1e-40, 0.0, -0.0, 65504.0, 1.00390625])
    params = torch.cat([special, torch.randn(1000)])
    n = params.numel()
    copy = torch.empty(n, dtype=torch.bfloat16)
    before = params.clone()
    adamw_step(params, torch.zeros(n), torch.zeros(n), torch.zeros(n), None, lr=0.0, betas=(0.9, 0.95),
               eps=1e-8, weight_decay=0.0, step=1, backend="cpp", param_copy=copy)
    assert torch.equal(params, before, ) or torch.equal(params.nan_to_num(), before.nan_to_num())
    want = before.to(torch.bfloat16)
    assert torch.equal(copy.view(torch.int16)[~want.isnan()], want.view(torch.int16)[~want.isnan()])
    assert copy[want.isnan()].isnan().all()


def test_threads_do_not_change_the_result():
    n = 10**6 + 3
    params, grads = _state(n, seed=3)
    results = []
    previous = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            p, m, v = params.clone(), torch.zeros(n), torch.zeros(n)
            adamw_step(p, grads[0], m, v, None, weight_decay=0.1, step=1, backend="cpp", **HYPER)
            results.append(p)
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(results[0], results[1])


def _op_args(n: int, copy_dtype, segments):
    s = _scalars(3e-3, (0.9, 0.95), 0.1, 2)
    copy = torch.zeros(n, dtype=copy_dtype) if copy_dtype is not None else None
    return (torch.randn(n), torch.randn(n), torch.randn(n), torch.rand(n), copy, segments,
            s["decay_factor"], s["beta1"], s["beta2"], 1e-8, s["step_size"], s["bias_correction2_sqrt"])


@pytest.mark.parametrize("copy_dtype,segments", [(None, []), (torch.bfloat16, [0, 5, 9, 33]),
                                                  (torch.float32, [0, 40])])
def test_opcheck(copy_dtype, segments):
    import pyruntime._C  # noqa: F401  (registers torch.ops.pyruntime.*)
    torch.library.opcheck(torch.ops.pyruntime.adamw_step.default, _op_args(40, copy_dtype, segments))


@pytest.mark.parametrize("change,message", [
    (lambda a: a.__setitem__(2, a[2].double()), "exp_avg must be float32"),
    (lambda a: a.__setitem__(1, a[1][:-1]), "grads must have 40 elements"),
    (lambda a: a.__setitem__(1, a[1].int()), "grads must be float32, bfloat16 or float16"),
    (lambda a: a.__setitem__(4, torch.zeros(40, dtype=torch.float16)), "param_copy must be float32 or bfloat16"),
    (lambda a: a.__setitem__(5, [10, 20, 5, 30]), "must be sorted and disjoint"),
    (lambda a: a.__setitem__(5, [0, 41]), "ends past the buffer's 40 elements"),
    (lambda a: a.__setitem__(5, [0]), "holds \\[begin, end\\) pairs"),
    (lambda a: a.__setitem__(3, torch.rand(80)[::2]), "contiguous 1-D"),
])
def test_bad_input_is_named(change, message):
    import pyruntime._C  # noqa: F401
    args = list(_op_args(40, None, []))
    change(args)
    with pytest.raises(RuntimeError, match=message):
        torch.ops.pyruntime.adamw_step(*args)


def test_param_copy_shape_is_checked_before_dispatch():
    x = torch.zeros(4)
    with pytest.raises(ValueError, match="param_copy"):
        adamw_step(x, x, x.clone(), x.clone(), None, lr=1.0, betas=(0.9, 0.9), eps=1e-8, weight_decay=0, step=1,
                   param_copy=torch.zeros(5))
