"""--offload optimizer: AdamW's state in host memory, stepped by the C++ host AdamW. 20 steps
equal the on-device optimizer (torch.optim.AdamW / the sharded reference step) within 1e-6
relative at one process and, in one 2-rank world, at every ZeRO stage, pp 2 (1f1b, zb) and tp 2."""
import dataclasses

import pytest
import torch

from pyruntime.config import ConfigError
from pyruntime.parallel.offload import HostAdamW
from support.configs import tiny_config, with_parallel
from support.world import Run, build_trainer, run_world, single_process, train

STEPS = 20
LAYOUTS = {f"dp2_zero{z}": dict(dp=2, zero=z) for z in range(4)} | {
    "pp2": dict(pp=2), "pp2_zb": dict(pp=2, schedule="zb"), "tp2_sp": dict(tp=2, sequence_parallel=True)}


def _config(out, offload: str, **parallel):
    cfg = tiny_config(out, steps=STEPS, global_batch=8, micro_batch=2)
    cfg = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, offload=offload))
    return with_parallel(cfg, **parallel)


def _assert_close(got: list[dict], want: list[dict]) -> None:
    for key in ("loss", "grad_norm"):
        torch.testing.assert_close(torch.tensor([r[key] for r in got], dtype=torch.float64),
                                   torch.tensor([r[key] for r in want], dtype=torch.float64), rtol=1e-6, atol=0,
                                   msg=lambda m, k=key: f"{k}: {m}")


def test_single_process_matches_the_device_optimizer(tmp_path):
    _assert_close(single_process(_config(tmp_path / "off", "optimizer")), single_process(_config(tmp_path / "on", "none")))


def test_planner_offload_bytes_equal_one_process(tmp_path):
    """dp 1 (LocalOffloadEngine): the planner's held and host bytes are the engine's (on CPU the
    fp32 parameter is its own master; the plan once counted a master copy besides it)."""
    from pyruntime.plan.startup import workload_layout
    from pyruntime.plan.states import rank_states

    cfg = dataclasses.replace(_config(tmp_path, "optimizer"), train=dataclasses.replace(
        tiny_config(tmp_path).train, steps=1))
    rec = single_process(cfg)[-1]
    states = rank_states(*workload_layout(cfg), 0)
    assert (rec["param_bytes"], rec["grad_bytes"], rec["optim_bytes"], rec["host_state_bytes"]) == (
        states.held.param, states.held.grad, states.held.optim, states.host)


def test_host_state_and_cpp_step(tmp_path):
    trainer = build_trainer(_config(tmp_path, "optimizer"), 0, 1)
    assert isinstance(trainer.optimizer, HostAdamW)
    trainer.train_step(0)
    states = list(trainer.optimizer.state.values())
    assert states and all(s["exp_avg"].device.type == "cpu" and s["step"] == 1 for s in states)
    # the parameters stepped in place: the moments are nonzero where a gradient arrived
    assert any(s["exp_avg"].abs().sum() > 0 for s in states)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("offload")
    cases = [(name, off) for name in LAYOUTS for off in ("none", "optimizer")]
    runs = [Run(_config(out / f"{n}_{o}", o, **LAYOUTS[n])) for n, o in cases]
    per_rank = run_world(2, train, runs, name="offload layouts")
    return {case: per_rank[0][i].records for i, case in enumerate(cases)}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layouts_match_the_device_optimizer(world, layout):
    _assert_close(world[(layout, "optimizer")], world[(layout, "none")])


@pytest.mark.parametrize("zero", [0, 1, 2, 3])
def test_planner_offload_bytes_equal_the_engines(world, tmp_path, zero):
    """plan/states.py's offload figures (held, and of it on the host: master, gradient and
    moment shards) are what the engines report at every ZeRO stage (on CPU in fp32 the
    parameters are their own master: no separate master, nor ZeRO-3 device copy)."""
    from pyruntime.plan.layout import Layout, Workload
    from pyruntime.plan.states import rank_states

    cfg = _config(tmp_path, "optimizer", dp=2, zero=zero)
    p = cfg.parallel
    states = rank_states(Workload(model=cfg.model, seq_len=cfg.data.seq_len, global_batch=cfg.data.global_batch),
                         Layout(dp=2, zero=zero, micro_batch=cfg.data.micro_batch, bucket_mb=p.bucket_mb,
                                offload="optimizer"), 0)
    rec = world[(f"dp2_zero{zero}", "optimizer")][-1]
    assert (rec["param_bytes"], rec["grad_bytes"], rec["optim_bytes"]) == (
        states.held.param, states.held.grad, states.held.optim)
    assert rec["host_state_bytes"] == states.host > 0
    assert rec["offload_grad_copies"] >= 1 and rec["offload_param_copies"] == 0  # CPU: nothing to send back


@pytest.fixture(scope="module")
def comm():
    """A world-1 group in this process (the ZeRO engines' mechanics; the shard is the whole model)."""
    import torch.distributed as dist

    from pyruntime.comm.collectives import CommDebug, CommStats, Collectives
    from pyruntime.mesh import Launch, init_distributed

    init_distributed(Launch(rank=0, world_size=1, local_rank=0), torch.device("cpu"))
    return Collectives(dist.group.WORLD, CommStats(), CommDebug())


def _engine(comm, zero: int, **kwargs):
    from pyruntime.config import OptimConfig
    from pyruntime.model import Transformer
    from pyruntime.model.init import init_weights
    from pyruntime.parallel.zero.stage12 import ZeroBucketEngine
    from pyruntime.parallel.zero.stage3 import FullyShardedEngine
    from support.configs import TEST_MODEL

    model = Transformer(TEST_MODEL)
    init_weights(model, TEST_MODEL, 3)
    cfg = OptimConfig(lr=1e-2, weight_decay=0.1, offload="optimizer")
    if zero == 3:
        return model, FullyShardedEngine(model, comm, cfg, **kwargs)
    return model, ZeroBucketEngine(model, comm, cfg, bucket_bytes=4096, stage=zero)  # several buckets


def _backward(model, engine, events: list, micro: int = 2) -> None:
    """`micro` micro-batches through the engine, logging ("grad", i) for each gradient shard
    sent to the host and "micro-batch" / "backward returned" / "synced" markers."""
    gen = torch.Generator().manual_seed(0)
    for k in range(micro):
        x = torch.randint(0, model.embed_tokens.num_embeddings, (2, 8), generator=gen)
        events.append("micro-batch")
        with engine.micro_batch(last=k == micro - 1):
            (model(x).logsumexp(-1).mean() / micro).backward()
            events.append("backward returned")
    engine.finish_gradient_sync()
    events.append("synced")


@pytest.mark.parametrize("zero", [2, 3])
def test_gradients_go_to_the_host_during_backward(comm, zero):
    """Each reduced gradient shard is copied to its host slice when its reduce-scatter
    completes (drained before the next bucket / unit is issued, so inside the backward); only
    the last one waits for the end of the micro-batch. The step copies no gradient."""
    model, engine = _engine(comm, zero)
    opt, events = engine.optimizer, []
    original = opt.grad_reduced
    opt.grad_reduced = lambda i, shard: (events.append(("grad", i)), original(i, shard))
    _backward(model, engine, events)
    start = len(events) - 1 - events[::-1].index("micro-batch")  # the last micro-batch's
    returned = events.index("backward returned", start)
    during, after = events[start + 1:returned], events[returned + 1:events.index("synced")]
    assert len(opt.groups) >= 3
    # every shard but possibly the last one (drained at the micro-batch's end) during backward
    assert sorted(during + after) == [("grad", i) for i in range(len(opt.groups))], events
    assert len(during) >= len(opt.groups) - 1, events
    # what the host slices hold is the reduced gradient (world 1: the mean of one rank)
    for i in range(len(opt.groups)):
        assert torch.equal(opt.group_grad(i), opt._device_grad(i))
    opt.transfers.take_counts()
    opt.step()
    assert opt.transfers.take_counts().get("grad", 0) == 0


def test_zero0_buckets_reach_the_host_before_the_step(comm):
    """ZeRO 0: each bucket is copied to its host copy when its all-reduce completes (from the
    gradient hooks, or at the latest in finish_gradient_sync), clipping scales the host copies
    and the step reads them: it copies no gradient itself."""
    from pyruntime.config import OptimConfig
    from pyruntime.model import Transformer
    from pyruntime.model.init import init_weights
    from pyruntime.parallel.ddp import BucketedDataParallel
    from pyruntime.train.optim import clip_grad_norm
    from support.configs import TEST_MODEL

    model = Transformer(TEST_MODEL)
    init_weights(model, TEST_MODEL, 3)
    engine = BucketedDataParallel(model, comm, OptimConfig(lr=1e-2, offload="optimizer"), bucket_bytes=4096)
    opt, events = engine.optimizer, []
    assert isinstance(opt, HostAdamW) and len(engine.buckets) >= 3
    _backward(model, engine, events)
    assert opt.transfers.take_counts()["grad"] == len(engine.buckets)
    grads, _ = engine.gradient_pieces()
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, engine.params))
    clip_grad_norm(grads, 1e-3)  # scales the host copies, which the step reads
    assert all(g.data_ptr() == opt.host_grads[p].data_ptr() for g, p in zip(grads, engine.params))
    opt.step()
    assert opt.transfers.take_counts().get("grad", 0) == 0


def test_dp1_gradients_reach_the_host_during_the_last_backward(tmp_path):
    """dp 1 (LocalOffloadEngine): each gradient goes to its host copy from its hook in the last
    micro-batch's backward (none in the earlier ones, which accumulate on the device);
    clipping scales the host copies and the step reads them, copying no gradient itself. The
    held gradient bytes (device gradients and their host copies) are the planner's."""
    from pyruntime.config import OptimConfig
    from pyruntime.model import Transformer
    from pyruntime.model.init import init_weights
    from pyruntime.parallel.local_offload import LocalOffloadEngine
    from pyruntime.parallel.optimizer import build_adamw
    from pyruntime.plan.layout import Layout, Workload
    from pyruntime.plan.states import rank_states
    from pyruntime.train.optim import clip_grad_norm
    from support.configs import TEST_MODEL

    model = Transformer(TEST_MODEL)
    init_weights(model, TEST_MODEL, 3)
    engine = LocalOffloadEngine(model, build_adamw(model.named_parameters(), OptimConfig(lr=1e-2, offload="optimizer")))
    opt, events = engine.optimizer, []
    original = opt.transfers.copy
    opt.transfers.copy = lambda key, dst, src: (events.append(key), original(key, dst, src))
    _backward(model, engine, events)
    first_returned, last_start = events.index("backward returned"), len(events) - 1 - events[::-1].index("micro-batch")
    assert not [e for e in events[:first_returned] if isinstance(e, tuple)], events
    during = [e for e in events[last_start:events.index("backward returned", last_start)] if isinstance(e, tuple)]
    assert sorted(during) == [("grad", i) for i in range(len(engine.params))], events
    grads, _ = engine.gradient_pieces()
    assert all(torch.equal(g, p.grad) and g.data_ptr() != p.grad.data_ptr() for g, p in zip(grads, engine.params))
    clip_grad_norm(grads, 1e-3)  # scales the host copies, which the step reads
    assert all(g.data_ptr() == opt.host_grads[p].data_ptr() for g, p in zip(grads, engine.params))
    opt.transfers.take_counts()
    opt.step()
    assert opt.transfers.take_counts().get("grad", 0) == 0
    states = rank_states(Workload(model=TEST_MODEL, seq_len=8, global_batch=4), Layout(offload="optimizer"), 0)
    assert engine.held_grad_bytes() == states.held.grad == 2 * 4 * sum(p.numel() for p in engine.params)


def test_zero3_bf16_device_copy_written_by_the_host_step(comm):
    """ZeRO-3 with a bf16 compute dtype: the fp32 master stays on the host and the device keeps
    a bf16 copy, written by the C++ step in the same pass (the staging buffer on CUDA) and
    gathered into the units; fp32 on CPU would make the copy the master itself."""
    model, engine = _engine(comm, 3, compute_dtype=torch.bfloat16)
    opt = engine.optimizer
    assert opt.device_params is not opt.master and opt.device_params.dtype == torch.bfloat16
    assert torch.equal(opt.device_params, opt.master.to(torch.bfloat16))  # published at start-up
    before = opt.master.clone()
    _backward(model, engine, [], micro=1)
    opt.step()
    assert not torch.equal(opt.master, before)
    assert torch.equal(opt.device_params, opt.master.to(torch.bfloat16))
    unit = engine.units[1]
    unit.start_gather(comm, opt.gather_source(1))
    unit.wait()
    assert torch.equal(unit.full, unit.group.shard(opt.device_params)[:unit.group.full_numel])
    held = engine.step_metrics()
    assert held["host_state_bytes"] == 4 * 4 * opt.master.numel()  # master, gradient, two moments
    assert held["offload_param_copies"] == 0  # CPU: the step wrote the copy in place, nothing to send
    _, fp32 = _engine(comm, 3)
    assert fp32.optimizer.device_params is fp32.optimizer.master


def test_sharded_offload_keeps_moments_on_the_host(tmp_path):
    from pyruntime.comm.collectives import CommDebug
    from pyruntime.parallel.zero.sharded import ShardedAdamW, plan_groups

    params = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(7))]
    cfg = dataclasses.replace(_config(tmp_path, "optimizer").optim)
    opt = ShardedAdamW(plan_groups([params], 1, 4), 0, cfg, debug=CommDebug())
    assert opt.offload and opt.exp_avg.device.type == "cpu"


def test_unknown_target_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match="offload"):
        _config(tmp_path, "disk").validate()
