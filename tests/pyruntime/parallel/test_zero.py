"""ZeRO stages 1-3: the bytes each step communicates against the theoretical volume of each
stage, the model-state bytes each rank holds against the unsharded figure, and ZeRO-3's
mechanics (sharded storage, gather/free, parity with plain AdamW) on a world-1 group in this
process. Loss parity for every stage is in test_data_parallel.py (same spawned worlds)."""
import copy
import time

import pytest
import torch
import torch.distributed as dist

from pyruntime.comm.collectives import CommDebug, CommStats, Collectives
from pyruntime.config import OptimConfig
from pyruntime.mesh import Launch, init_distributed
from pyruntime.model import Transformer
from pyruntime.model.init import full_init, init_weights
from pyruntime.ops.flat import flat_pack
from pyruntime.parallel import deferred_init
from pyruntime.parallel.zero.stage12 import ZeroBucketEngine
from pyruntime.parallel.zero.stage3 import FullyShardedEngine, transformer_units
from pyruntime.parallel.optimizer import build_adamw
from pyruntime.train.optim import clip_grad_norm

from support.dp_cases import VARIANTS
from support.configs import TEST_MODEL


def padded16(n: int) -> int:
    return -(-n // 16) * 16


def flat_size(numels, dp: int) -> int:
    """Elements of a flat buffer planned for dp shards: 16-aligned tensors, total a multiple of 16 x dp."""
    total = sum(padded16(n) for n in numels)
    return -(-total // (16 * dp)) * 16 * dp


def unit_sizes(dp: int) -> list[int]:
    model = Transformer(TEST_MODEL)
    return [flat_size([p.numel() for m in unit for p in m.parameters()], dp) for unit in transformer_units(model)]


def numels() -> list[int]:
    return [p.numel() for p in Transformer(TEST_MODEL).parameters()]


def last_records(world_results, dp, zero, variant) -> list[dict]:
    return [records[-1] for records in world_results(dp)["train"][(zero, variant)]]


# ---- bytes communicated per step -----------------------------------------------------------

@pytest.mark.parametrize("dp", [2, 4])
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("zero", [1, 2])
def test_zero12_volume_is_one_reduce_scatter_and_one_all_gather(world_results, dp, zero, variant):
    micro = VARIANTS[variant]["micro_per_rank"]
    for records in world_results(dp)["train"][(zero, variant)]:
        for r in records:
            buckets = r["comm_all_gather_calls"]
            assert r["comm_all_reduce_bytes"] == 0
            # ZeRO-1 reduces on the last micro-batch only; ZeRO-2 on every one.
            assert r["comm_reduce_scatter_calls"] == buckets * (micro if zero == 2 else 1)
            assert r["comm_reduce_scatter_bytes"] == r["comm_all_gather_bytes"] * (micro if zero == 2 else 1)
            if buckets == 1:
                assert r["comm_all_gather_bytes"] == 4 * flat_size(numels(), dp)
            else:  # each bucket pads to a multiple of 16 x dp on its own
                low = 4 * sum(padded16(n) for n in numels())
                assert low <= r["comm_all_gather_bytes"] < low + 4 * buckets * 16 * dp
        assert (records[0]["comm_all_gather_calls"] == 1) == (VARIANTS[variant]["bucket_mb"] == 25.0)


@pytest.mark.parametrize("dp", [2, 4])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_zero3_volume_is_two_all_gathers_and_one_reduce_scatter_per_micro_batch(world_results, dp, variant):
    """Forward gathers every unit, backward every unit but the last (kept from the forward),
    and every unit's gradients are reduce-scattered, once per micro-batch. A validation pass
    (after the step that logs val_loss; counted in the next step) gathers each unit once per
    batch."""
    micro = VARIANTS[variant]["micro_per_rank"]
    sizes = unit_sizes(dp)
    for records in world_results(dp)["train"][(3, variant)]:
        for previous, r in zip([{}] + records, records):
            evals = 2 if "val_loss" in previous else 0  # layouts.config: eval_batches=2
            assert r["comm_all_gather_bytes"] == 4 * (micro * (2 * sum(sizes) - sizes[-1]) + evals * sum(sizes))
            assert r["comm_all_gather_calls"] == micro * (2 * len(sizes) - 1) + evals * len(sizes)
            assert r["comm_reduce_scatter_bytes"] == 4 * micro * sum(sizes)
            assert r["comm_reduce_scatter_calls"] == micro * len(sizes)
            assert r["comm_all_reduce_bytes"] == 0


# ---- bytes held per rank -------------------------------------------------------------------

# held / unsharded, for (params, grads, optimizer states), as functions of dp
HELD_RATIOS = {
    0: lambda dp: (1, 1, 1),
    1: lambda dp: (1 + 1 / dp, 1 + 1 / dp, 1 / dp),  # replicated params + fp32 master shard
    2: lambda dp: (1 + 1 / dp, 1 / dp, 1 / dp),
    3: lambda dp: (1 / dp, 1 / dp, 1 / dp),
}


@pytest.mark.parametrize("dp", [2, 4])
@pytest.mark.parametrize("zero", [0, 1, 2, 3])
def test_held_bytes_per_rank_follow_the_stage(world_results, dp, zero):
    for r in last_records(world_results, dp, zero, "accum_clip"):
        want = HELD_RATIOS[zero](dp)
        for (kind, ratio) in zip(("param", "grad", "optim"), want):
            # within 3%: alignment padding of the flat buffers (and torch AdamW's step counters)
            assert r[f"{kind}_bytes"] == pytest.approx(ratio * r[f"unsharded_{kind}_bytes"], rel=0.03), kind


@pytest.mark.parametrize("dp", [2, 4])
def test_zero3_peak_is_a_dp_th_of_the_model_state_plus_a_few_gathered_units(world_results, dp):
    """At most two units gathered (current + prefetched), plus one unit's unsharded gradients
    and their fp32 flat copy while it is packed, or one reduce-scatter in flight."""
    for variant in VARIANTS:
        for r in last_records(world_results, dp, 3, variant):
            unsharded = r["unsharded_param_bytes"] + r["unsharded_grad_bytes"] + r["unsharded_optim_bytes"]
            held = r["param_bytes"] + r["grad_bytes"] + r["optim_bytes"]
            assert held == pytest.approx(unsharded / dp, rel=0.03)
            unit = r["largest_unit_bytes"]
            assert unit == 4 * max(unit_sizes(dp))
            assert held + unit < r["peak_model_state_bytes"] <= held + 4 * unit


# ---- ZeRO-3 mechanics on this process's world-1 group --------------------------------------

@pytest.fixture(scope="module")
def comm():
    init_distributed(Launch(rank=0, world_size=1, local_rank=0), torch.device("cpu"))
    return Collectives(dist.group.WORLD, CommStats(), CommDebug())


def _model(seed=3):
    model = Transformer(TEST_MODEL)
    init_weights(model, TEST_MODEL, seed)
    return model


def test_zero3_shards_storage_gathers_for_forward_and_frees_after(comm):
    plain = _model()
    model = copy.deepcopy(plain)
    engine = FullyShardedEngine(model, comm, OptimConfig())
    assert all(p.untyped_storage().nbytes() == 0 for p in model.parameters())
    x = torch.randint(0, TEST_MODEL.vocab_size, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(model(x), plain(x), rtol=0, atol=0)
    assert all(p.untyped_storage().nbytes() == 0 for p in model.parameters())
    assert engine.peak_live <= 2 * max(u.nbytes for u in engine.units)  # current + prefetched


def _clip_and_step_both(engine, reference, reference_model) -> None:
    """The engine's fp32 gradient shards clipped at 0.5 (their global norm equal to the
    reference model's), then both optimizers step."""
    engine.finish_gradient_sync()
    grads, replication = engine.gradient_pieces()
    assert {g.dtype for g in grads} == {torch.float32}
    norm = clip_grad_norm(grads, 0.5, None, replication)
    torch.testing.assert_close(norm, clip_grad_norm([p.grad for p in reference_model.parameters()], 0.5))
    for optimizer in (engine.optimizer, reference):
        optimizer.step()
        optimizer.zero_grad()


def test_zero3_steps_match_plain_adamw(comm):
    """Gradient accumulation, clipping and three AdamW steps on the sharded engine against
    torch.optim.AdamW on an unsharded copy (one rank: the shard is the whole model)."""
    cfg = OptimConfig(lr=1e-2, weight_decay=0.1)
    plain = _model()
    model = copy.deepcopy(plain)
    engine = FullyShardedEngine(model, comm, cfg)
    reference = build_adamw(plain.named_parameters(), cfg)
    gen = torch.Generator().manual_seed(0)
    for step in range(3):
        batches = [torch.randint(0, TEST_MODEL.vocab_size, (2, 8), generator=gen) for _ in range(2)]
        for i, x in enumerate(batches):
            with engine.micro_batch(last=i == 1):
                (model(x).logsumexp(-1).mean() / 2).backward()
            (plain(x).logsumexp(-1).mean() / 2).backward()
        _clip_and_step_both(engine, reference, plain)
    full = torch.cat([p.detach().reshape(-1) for p in plain.parameters()])
    with torch.no_grad():
        for unit in engine.units:
            unit.start_gather(comm, engine.optimizer.master)
            unit.wait()
        gathered = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    torch.testing.assert_close(gathered, full, rtol=1e-6, atol=1e-7)


def test_gradient_pieces_split_by_parameter_when_other_axes_replicate(comm):
    model = _model()
    engine = FullyShardedEngine(model, comm, OptimConfig())
    for i in range(len(engine.units)):
        engine.optimizer.group_grad(i).normal_()
    grads, counts = engine.gradient_pieces(lambda p: 2 if p.dim() == 1 else 1)  # e.g. tp-replicated norms
    assert len(grads) == sum(1 for _ in model.parameters()) and sorted(set(counts)) == [1, 2]
    # in float64: the pieces must cover each element at most once (the rest: alignment gaps)
    inside = sum(g.double().pow(2).sum() for g in grads)
    held = sum(g.double().pow(2).sum() for g in engine.optimizer.held_grads())
    assert inside > 0 and held - inside >= -1e-9 * held
    whole, ones = engine.gradient_pieces(lambda p: 1)
    assert [g.data_ptr() for g in whole] == [g.data_ptr() for g in engine.optimizer.held_grads()]
    assert ones == [1] * len(engine.units)


def test_gradient_reductions_overwrite_first_then_add_and_free_finished_copies(comm):
    """A group's first reduction of a step lands in its (unzeroed) shard, later ones add to it;
    reap() completes finished collectives without a wait, so their flat copies go early."""
    model = _model()
    engine = FullyShardedEngine(model, comm, OptimConfig())
    reductions, n = engine.reductions, engine.units[1].group.layout.shard_numel
    reductions.issue(1, torch.full((n,), 2.0))
    assert reductions.bytes_held() == 4 * n  # the flat copy only: the result goes to the shard
    reductions.issue(1, torch.full((n,), 3.0))
    assert reductions.bytes_held() == 4 * n + 8 * n  # plus the second one's partial result
    deadline = time.monotonic() + 30
    while reductions.items and time.monotonic() < deadline:
        reductions.reap()
    assert torch.equal(engine.optimizer.group_grad(1), torch.full((n,), 5.0))
    assert engine.optimizer.held_grads() == [engine.optimizer.group_grad(1)]  # no other shard made
    engine.optimizer.zero_grad()
    reductions.issue(1, torch.full((n,), 7.0))
    reductions.drain()
    assert torch.equal(engine.optimizer.group_grad(1), torch.full((n,), 7.0))


def test_bad_unit_lists_and_stages_are_refused(comm):
    model = _model()
    units = transformer_units(model)
    with pytest.raises(ValueError, match="embed_tokens.weight are not in exactly one unit"):
        FullyShardedEngine(model, comm, OptimConfig(), units=units[1:])
    with pytest.raises(ValueError, match="not in exactly one unit"):
        FullyShardedEngine(_model(), comm, OptimConfig(), units=units + units[:1])
    with pytest.raises(ValueError, match="stages 1 and 2, not 3"):
        ZeroBucketEngine(_model(), comm, OptimConfig(), 1 << 20, stage=3)


def _storage_bytes_held(model) -> int:
    storages = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes()
                for p in model.parameters() if not p.is_meta}
    return sum(storages.values())


def test_zero3_deferred_init_draws_one_parameter_at_a_time_into_the_shard(comm, monkeypatch):
    """A model built on the meta device: each parameter's value is drawn and copied into the
    shard while the model holds no parameter values at all (neither the model nor a unit is
    ever made), and the result is the eagerly built and initialised model."""
    with torch.device("meta"):
        model = Transformer(TEST_MODEL)
    held_at_each_draw = []

    def recording_full_init(*args, **kw):
        held_at_each_draw.append(_storage_bytes_held(model))
        return full_init(*args, **kw)

    monkeypatch.setattr(deferred_init, "full_init", recording_full_init)
    init = deferred_init.DeferredInit(model, TEST_MODEL, 3, None, torch.device("cpu"))
    engine = FullyShardedEngine(model, comm, OptimConfig(), init=init)
    deferred_init.check_materialized(model)
    n_params = len(list(model.parameters()))  # ints in the asserts: a sharded tensor's repr would crash
    assert len(held_at_each_draw) == n_params  # each value drawn once
    assert max(held_at_each_draw) <= 4 * n_params  # placeholders of one element each
    assert all(p.untyped_storage().nbytes() == 0 for p in model.parameters())
    plain = _model(seed=3)
    x = torch.randint(0, TEST_MODEL.vocab_size, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(model(x), plain(x), rtol=0, atol=0)
    assert engine.optimizer.master.abs().sum() > 0


def test_zero3_bf16_compute_copies_keep_fp32_master_gradients_and_accumulation(comm):
    """The mixed precision of ZeRO-3 on CUDA, run on CPU: units gathered as bf16 copies of the
    fp32 master, each micro-batch's bf16 gradients reduced in fp32 and accumulated in fp32,
    AdamW on the fp32 master. Reference: an unsharded fp32 master copied to a bf16 model for
    every step, its gradients accumulated in fp32."""
    cfg = OptimConfig(lr=1e-2, weight_decay=0.1)
    master = _model()
    model = copy.deepcopy(master)
    engine = FullyShardedEngine(model, comm, cfg, compute_dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    reference = build_adamw(master.named_parameters(), cfg)
    gen = torch.Generator().manual_seed(0)
    for step in range(3):
        low = copy.deepcopy(master).to(torch.bfloat16)
        for p in master.parameters():
            p.grad = torch.zeros_like(p)
        batches = [torch.randint(0, TEST_MODEL.vocab_size, (2, 8), generator=gen) for _ in range(2)]
        for i, x in enumerate(batches):
            with engine.micro_batch(last=i == 1):
                (model(x).float().logsumexp(-1).mean() / 2).backward()
            (low(x).float().logsumexp(-1).mean() / 2).backward()
            for p, q in zip(master.parameters(), low.parameters()):
                p.grad += q.grad.float()  # accumulated in fp32, as the engine's gradient shard
                q.grad = None
        _clip_and_step_both(engine, reference, master)
    names, ref = {id(p): n for n, p in model.named_parameters()}, dict(master.named_parameters())
    for unit in engine.units:  # world 1: a unit's shard is its whole flat buffer
        want = flat_pack([ref[names[id(p)]].detach() for p in unit.group.params], unit.group.layout)
        torch.testing.assert_close(unit.group.shard(engine.optimizer.master), want, rtol=1e-5, atol=1e-7)
