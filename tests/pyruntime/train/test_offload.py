"""--offload optimizer: AdamW's state in host memory, stepped by the C++ host AdamW. 20 steps
equal the on-device optimizer (torch.optim.AdamW / the sharded reference step) within 1e-6
relative at one process and, in one 2-rank world, at every ZeRO stage, pp 2 and tp 2."""
import dataclasses

import pytest
import torch

from pyruntime.config import ConfigError
from pyruntime.parallel.offload import HostAdamW
from support.configs import tiny_config, with_parallel
from support.world import Run, build_trainer, run_world, single_process, train

STEPS = 20
LAYOUTS = {f"dp2_zero{z}": dict(dp=2, zero=z) for z in range(4)} | {
    "pp2": dict(pp=2), "tp2_sp": dict(tp=2, sequence_parallel=True)}


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
