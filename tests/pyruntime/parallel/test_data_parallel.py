"""Data parallelism (--zero 0) and what every stage shares: parity with single-process training,
the bytes each step communicates, overlap with backward, the debug delay that catches a
missing wait, the comm layer itself, and bad input. The spawned worlds are in conftest.py."""
import json
import time

import pytest
import torch
import torch.distributed as dist

from pyruntime.cli import main
from pyruntime.comm.collectives import DEBUG_DELAY_ENV, CommDebug, CommStats, Collectives
from pyruntime.config import ConfigError, OptimConfig, ParallelConfig
from pyruntime.mesh import Launch, init_distributed
from pyruntime.model import Transformer
from pyruntime.parallel.ddp import BucketedDataParallel
from pyruntime.parallel.engine import FIRST_BUCKET_BYTES, gradient_buckets

from support.dp_cases import VARIANTS, ZEROS, assert_losses_match
from support.configs import TEST_MODEL


def padded16(n: int) -> int:
    return -(-n // 16) * 16


def model_numels() -> list[int]:
    return [p.numel() for p in Transformer(TEST_MODEL).parameters()]


@pytest.mark.parametrize("dp", [2, 4])
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("zero", ZEROS)
def test_losses_match_single_process(world_results, reference_records, dp, zero, variant):
    per_rank = world_results(dp)["train"][(zero, variant)]
    losses = [[r["loss"] for r in records] for records in per_rank]
    assert all(rank_losses == losses[0] for rank_losses in losses)  # the logged loss is the dp mean
    reference = reference_records(dp, variant)
    assert_losses_match(losses[0], [r["loss"] for r in reference])
    val = [(r["step"], r["val_loss"]) for r in per_rank[0] if "val_loss" in r]
    want = [(r["step"], r["val_loss"]) for r in reference if "val_loss" in r]
    assert [s for s, _ in val] == [s for s, _ in want] == ([10, 20] if VARIANTS[variant]["eval_every"] else [])
    assert_losses_match([v for _, v in val], [v for _, v in want])
    if VARIANTS[variant]["grad_clip"]:  # the clip really acted: every step's norm was above it
        assert min(r["grad_norm"] for r in per_rank[0]) > VARIANTS[variant]["grad_clip"]


@pytest.mark.parametrize("dp", [2, 4])
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("zero", ZEROS)
def test_first_gradient_norm_equals_single_process(world_results, reference_records, dp, zero, variant):
    """Squared norms summed in fp64 (train/optim.py): the first step's norm does not depend on
    how the gradient is cut (buckets, shards, replicas) to 1e-6, so clipping cannot drift."""
    got = world_results(dp)["train"][(zero, variant)][0][0]["grad_norm"]
    want = reference_records(dp, variant)[0]["grad_norm"]
    assert abs(got - want) <= 1e-6 * want, (got, want)


def test_one_long_gradient_shard_at_dp_3_matches_single_process(world_results, reference_records):
    """dp 3, ZeRO-2, one bucket over the whole model (each rank's gradient shard is one long
    flat tensor), the CLI's optimizer defaults (clipping at 1.0): 20 steps of losses within
    1e-5 and the first norm within 1e-6 of single-process training."""
    got = world_results(3)["train"][(2, "one_bucket")][0]
    want = reference_records(3, "one_bucket")
    assert_losses_match([r["loss"] for r in got], [r["loss"] for r in want])
    assert abs(got[0]["grad_norm"] - want[0]["grad_norm"]) <= 1e-6 * want[0]["grad_norm"]
    assert got[0]["comm_reduce_scatter_calls"] == 1  # one bucket: one reduce-scatter per step


@pytest.mark.parametrize("dp", [2, 4])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_ddp_all_reduces_the_gradients_once_per_step(world_results, dp, variant):
    """Stage 0 moves exactly the (16-aligned) gradients once per step in all-reduces, one per
    bucket: the earlier micro-batches of accumulation communicate nothing."""
    records = world_results(dp)["train"][(0, variant)][0]
    want = 4 * sum(padded16(n) for n in model_numels())
    buckets = records[0]["comm_all_reduce_calls"]
    for r in records:
        assert r["comm_all_reduce_bytes"] == want
        assert r["comm_reduce_scatter_bytes"] == r["comm_all_gather_bytes"] == 0
        assert r["comm_all_reduce_calls"] == buckets
    # 25 MB: everything in one bucket; 0.01 MB (~2600 floats): several.
    assert (buckets == 1) if VARIANTS[variant]["bucket_mb"] == 25.0 else (buckets > 3)


@pytest.mark.parametrize("zero", [0, 3])
def test_collectives_are_issued_while_backward_still_runs(world_results, zero):
    """By the time the backward reaches the embedding (its last step), the collectives of the
    later layers are already under way, and the rest follow by the end."""
    for probe in world_results(2)["overlap"][zero]:
        kind = "all_reduce" if zero == 0 else "reduce_scatter"
        assert 0 < probe[f"mid_{kind}"] < probe[f"end_{kind}"]
        if zero == 3:  # the embedding was re-gathered (prefetched) before its backward began
            assert probe["mid_all_gather"] == probe["end_all_gather"]


@pytest.mark.parametrize("zero", ZEROS)
def test_debug_delay_before_and_after_collectives_gives_the_same_losses(world_results, reference_records,
                                                                         zero):
    """With the debug delay, every result is NaN (or un-reduced) until its wait(), and the
    optimizer step is delayed too: a missing wait would show up as a different loss or NaN."""
    losses = [r["loss"] for r in world_results(2)["delay"][zero][0]]
    assert_losses_match(losses, [r["loss"] for r in reference_records(2, "delay")])


def test_gradient_buckets_reverse_order_small_first_bucket_and_cap():
    params = [torch.nn.Parameter(torch.empty(n)) for n in (700_000, 120_000, 200_000, 50_000, 10, 100_000)]
    buckets = gradient_buckets(params, bucket_bytes=3_000_000)
    assert [p for b in buckets for p in b] == params[::-1]  # every parameter once, last layer first
    sizes = [4 * sum(padded16(p.numel()) for p in b) for b in buckets]
    assert sizes[0] <= FIRST_BUCKET_BYTES < sizes[0] + 4 * padded16(buckets[1][0].numel())  # 1 MB cap, full
    assert [len(b) for b in buckets] == [3, 2, 1] and sizes[1] <= 3_000_000  # then the 3 MB cap
    assert gradient_buckets(params, bucket_bytes=1000)[0] == [params[-1]]  # a lone oversized tensor
    assert gradient_buckets([], bucket_bytes=1000) == []


# ---- the comm layer, on this process's world-1 group --------------------------------------

@pytest.fixture(scope="module")
def world1():
    init_distributed(Launch(rank=0, world_size=1, local_rank=0), torch.device("cpu"))
    return dist.group.WORLD


def test_stats_count_logical_bytes_and_take_resets(world1):
    stats = CommStats()
    comm = Collectives(world1, stats)
    comm.all_reduce_sum(torch.ones(10)).wait()
    comm.reduce_scatter_avg(torch.empty(6), torch.ones(6)).wait()
    comm.all_gather(torch.empty(6, dtype=torch.float64), torch.ones(6, dtype=torch.float64)).wait()
    taken = stats.take()
    assert (taken["comm_all_reduce_bytes"], taken["comm_reduce_scatter_bytes"], taken["comm_all_gather_bytes"]) \
        == (40, 24, 48)
    assert taken["comm_all_reduce_calls"] == taken["comm_all_gather_calls"] == 1
    assert stats.total_bytes() == 0 and stats.take()["comm_all_reduce_calls"] == 0


def test_debug_mode_hides_every_result_until_wait(world1):
    comm = Collectives(world1, CommStats(), CommDebug(delay_s=0.001))
    t = torch.arange(4.0)
    pending = comm.all_reduce_sum(t)
    assert bool(t.isnan().all())  # a reader that forgot to wait sees NaN
    pending.wait()
    assert torch.equal(t, torch.arange(4.0))
    out = torch.zeros(4)
    pending = comm.all_gather(out, torch.arange(4.0))
    assert bool(out.isnan().all())
    pending.wait()
    pending.wait()  # idempotent
    assert torch.equal(out, torch.arange(4.0))
    out = torch.zeros(3)
    pending = comm.reduce_scatter_avg(out, torch.ones(3))
    assert bool(out.isnan().all())
    pending.wait()
    assert torch.equal(out, torch.ones(3))


def test_reduce_scatter_of_a_scratch_input_runs_in_place_and_can_be_polled(world1):
    """CPU: an all-reduce in place of gloo's clone + all-reduce; its completion is observable
    (gloo's own reduce-scatter work only completes inside wait()), the result the same."""
    stats = CommStats()
    comm = Collectives(world1, stats)
    inp, out = torch.arange(6.0), torch.zeros(6)
    pending = comm.reduce_scatter_avg(out, inp, scratch_input=True)
    deadline = time.monotonic() + 30
    while not pending.is_completed() and time.monotonic() < deadline:
        time.sleep(0.001)
    assert pending.is_completed()  # before wait(): polled, not forced
    pending.wait()
    assert torch.equal(out, torch.arange(6.0)) and stats.take()["comm_reduce_scatter_bytes"] == 24
    debug = Collectives(world1, CommStats(), CommDebug(delay_s=0.001))
    out = torch.zeros(3)
    pending = debug.reduce_scatter_avg(out, torch.ones(3), scratch_input=True)
    assert bool(out.isnan().all()) and not pending.is_completed()  # under the delay: only once waited
    pending.wait()
    assert pending.is_completed() and torch.equal(out, torch.ones(3))


def test_gradients_live_in_the_buckets_accumulate_there_and_are_divided_once(world1):
    """--zero 0: each new gradient is moved into its bucket (the .grad becomes a view), later
    micro-batches accumulate in place, the step's last accumulation divides by dp and the
    all-reduce sums the bucket itself. On one rank the sum is the identity, so with the
    divisor of dp 2 every gradient must come out as half a plain backward's: also one that
    only an earlier micro-batch produced, and zeros for one no micro-batch produced."""
    torch.manual_seed(0)
    plain = Transformer(TEST_MODEL)
    model = Transformer(TEST_MODEL)
    model.load_state_dict(plain.state_dict())
    engine = BucketedDataParallel(model, Collectives(world1, CommStats()), OptimConfig(), bucket_bytes=20_000)
    engine.scale = 0.5  # as with dp 2
    assert len(engine.buckets) > 2
    xs = [torch.randint(0, TEST_MODEL.vocab_size, (2, 8), generator=torch.Generator().manual_seed(i))
          for i in range(2)]
    skipped = (model.layers["0"].self_attn.q_proj.weight, plain.layers["0"].self_attn.q_proj.weight)
    # step 0: every parameter in every micro-batch; step 1: `skipped` only in the first one;
    # step 2: `skipped` in none
    for step, skip_in in enumerate([(), (1,), (0, 1)]):
        for i, x in enumerate(xs):
            for p in skipped:
                p.requires_grad_(i not in skip_in)
            with engine.micro_batch(last=i == 1):
                model(x).logsumexp(-1).mean().backward()
            plain(x).logsumexp(-1).mean().backward()
        engine.finish_gradient_sync()
        for bucket in engine.buckets:
            assert all(p.grad.data_ptr() == view.data_ptr() for p, view in zip(bucket.params, bucket.views))
            assert not bucket.scaled
        for (name, p), q in zip(model.named_parameters(), plain.parameters()):
            want = torch.zeros_like(p) if q.grad is None else 0.5 * q.grad
            torch.testing.assert_close(p.grad, want, rtol=1e-6, atol=1e-7, msg=f"step {step}: {name}")
        engine.optimizer.zero_grad(set_to_none=True)
        plain.zero_grad(set_to_none=True)
    for p in skipped:
        p.requires_grad_(True)


def test_collective_size_mismatch_and_bad_delay_are_refused(world1):
    comm = Collectives(world1, CommStats())
    with pytest.raises(ValueError, match="does not split into 1 outputs of 2"):
        comm.reduce_scatter_avg(torch.empty(2), torch.empty(3))
    with pytest.raises(ValueError, match="does not hold 1 inputs of 3"):
        comm.all_gather(torch.empty(2), torch.empty(3))
    assert CommDebug.from_env({}).delay_s == 0 and CommDebug.from_env({DEBUG_DELAY_ENV: "0.5"}).delay_s == 0.5
    with pytest.raises(ValueError, match=DEBUG_DELAY_ENV):
        CommDebug.from_env({DEBUG_DELAY_ENV: "soon"})


# ---- configuration and command line -------------------------------------------------------

@pytest.mark.parametrize("fields,message", [
    ({"bucket_mb": 0.0}, "parallel.bucket_mb must be > 0, got 0.0"),
    ({"bucket_mb": -2.0}, "parallel.bucket_mb must be > 0, got -2.0"),
    ({"zero": 4}, "parallel.zero must be 0, 1, 2 or 3, got 4"),
])
def test_bad_parallel_config(fields, message):
    with pytest.raises(ConfigError, match=message):
        ParallelConfig(**fields).validate()


@pytest.mark.parametrize("argv,message", [
    (["--bucket-mb", "0"], "parallel.bucket_mb must be > 0, got 0.0"),
    (["--zero", "7"], "parallel.zero must be 0, 1, 2 or 3, got 7"),
    (["--dp", "3", "--global-batch", "8", "--micro-batch", "8"], "global batch 8 does not divide into dp 3 x micro-batch 8"),
    (["--dp", "3", "--global-batch", "8"], "global batch 8 does not divide into dp 3 x micro-batch 2"),
    (["--dp", "2", "--global-batch", "16", "--zero", "1"], "does not match world size 1"),
])
def test_bad_flags_exit_2_with_one_line(argv, message, capsys):
    assert main(["train", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "Traceback" not in err


def test_zero_with_dp_1_says_it_does_nothing_and_trains(tmp_path, capsys):
    metrics = tmp_path / "m.jsonl"
    code = main(["train", "--zero", "3", "--bucket-mb", "1", "--steps", "2", "--global-batch", "2",
                 "--micro-batch", "1", "--seq-len", "16", "--out", str(tmp_path), "--metrics", str(metrics),
                 "--eval-every", "0"])
    assert code == 0
    out = capsys.readouterr().out
    assert out.count("--zero 3 with dp 1: nothing to shard over, ZeRO does nothing here") == 1
    assert "model state per rank: params" in out
    rec = json.loads(metrics.read_text().splitlines()[-1])
    assert rec["param_bytes"] == rec["unsharded_param_bytes"] > 0 and rec["grad_bytes"] == rec["unsharded_grad_bytes"]
