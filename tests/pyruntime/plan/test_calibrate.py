"""`plan --calibrate`: the profile it writes, and how plans use it (the measured collectives'
line, the model's timed blocks). Accuracy against measured steps is `bench plan`'s job."""
import dataclasses
import json

import pytest

from pyruntime.cli import main
from pyruntime.config import PRESETS
from pyruntime.plan.calibrate import load_profile, tp_local_model
from pyruntime.plan.devices import Device, fit_key, line_fit
from pyruntime.plan.layout import Layout, Workload
from pyruntime.plan.timing import Cluster, collective, step_time

TINY = PRESETS["tiny"]


def test_calibrate_with_a_model_times_its_blocks_and_plans_use_them(tmp_path, capsys):
    profile = tmp_path / "profile.json"
    code = main(["plan", "--calibrate", "--preset", "tiny", "--seq-len", "32", "--gpus", "2",
                 "--profile", str(profile)])
    out = capsys.readouterr().out
    assert code == 0 and "blocks timed at seq 32 for tp 1, 2" in out, out
    dev = load_profile(profile)
    assert {k for k, *_ in dev.block_fits} == {fit_key(TINY, 32, 1), fit_key(TINY, 32, 2)}
    assert all(min(fit) >= 0 and fit[0] + fit[1] > 0 for _, *fit in dev.block_fits)
    kinds = {k for k, _, _ in dev.comm_times}
    assert kinds == {"allreduce", "gather", "p2p"} and all(t > 0 for _, _, t in dev.comm_times)

    code = main(["plan", "--profile", str(profile), "--preset", "tiny", "--seq-len", "32", "--tp", "2",
                 "--gpus", "2", "--global-batch", "4"])
    assert code == 0 and "compute from this model's blocks" in capsys.readouterr().out
    code = main(["plan", "--profile", str(profile), "--preset", "tiny", "--seq-len", "64", "--gpus", "1"])
    assert code == 0 and "compute from FLOPs" in capsys.readouterr().out  # not timed at seq 64


def test_timed_blocks_set_the_compute_time():
    """One rank, no pipeline: forward + backward of a micro-batch = layers x block + rest, and
    the step adds only the optimizer and the step overhead to micro-batches x that."""
    work = Workload(model=TINY, seq_len=64, global_batch=8)
    a, b, c, d = 1e-3, 2e-3, 3e-3, 4e-4
    dev = dataclasses.replace(Device("probe", 1e12, 1e12, 1e9, 1e9, "test", cuda=False, step_overhead=5e-3),
                              block_fits=((fit_key(TINY, 64, 1), a, b, c, d),))
    for mb in (1, 2, 8):
        t = step_time(work, Layout(micro_batch=mb), Cluster(dev, 1, 1))
        per_micro = TINY.n_layers * (a + b * mb) + c + d * mb
        assert t.measured_blocks
        assert t.forward + t.backward == pytest.approx(per_micro, rel=1e-12)
        assert t.step == pytest.approx(8 // mb * per_micro + t.optimizer + 5e-3, rel=1e-12)
    other = step_time(Workload(model=TINY, seq_len=128, global_batch=8), Layout(), Cluster(dev, 1, 1))
    assert not other.measured_blocks


def test_measured_collectives_are_a_least_squares_line():
    assert line_fit([(0, 1.0), (10, 3.0), (20, 5.0)]) == pytest.approx((1.0, 0.2))
    assert line_fit([(4, 2.0)]) == (2.0, 0.0)  # one size: flat
    assert line_fit([(0, 5.0), (10, 1.0)])[1] == 0.0  # never faster with size
    times = (("allreduce", 0, 1e-3), ("allreduce", 1000, 2e-3), ("gather", 0, 4e-3))
    dev = Device("probe", 1e12, 1e12, 1e9, 1e9, "test", comm_times=times)
    two = Cluster(dev, 8, 8)
    assert collective(two, "allreduce", 500, 1, 2) == pytest.approx(1.5e-3)
    assert collective(two, "allreduce", 500, 1, 4) == pytest.approx(1.5e-3 * 1.5)  # a ring's 2 (g-1) / g
    assert collective(two, "gather", 10**6, 1, 2) == pytest.approx(4e-3)
    # p2p not measured: the device's latency + bytes / bandwidth; nor across nodes
    assert collective(two, "p2p", 1e9, 1, 2) == pytest.approx(1.0 + dev.p2p_latency)
    assert collective(Cluster(dev, 8, 2), "allreduce", 500, 2, 2) == pytest.approx(2 * 0.5 * 500 / 1e9 + dev.latency)


def test_tp_local_model_is_one_ranks_share():
    m = dataclasses.replace(TINY, vocab_size=255)
    local = tp_local_model(m, 2)
    assert (local.n_heads, local.kv_heads, local.head_dim, local.ffn_dim, local.vocab_size, local.dim) == \
        (m.n_heads // 2, m.kv_heads // 2, m.head_dim, m.ffn_dim // 2, 128, m.dim)
    assert tp_local_model(m, 1) is m


def test_a_profile_from_before_the_measured_tables_still_loads(tmp_path):
    old = {k: v for k, v in dataclasses.asdict(Device("old", 1e12, 1e12, 1e9, 1e9, "older calibrate")).items()
           if k not in ("comm_times", "block_fits")}
    path = tmp_path / "old.json"
    path.write_text(json.dumps(old))
    dev = load_profile(path)
    assert dev.comm_times == () and dev.block_fits == ()


def test_a_model_too_big_to_probe_is_refused_before_anything_is_measured(tmp_path, monkeypatch, capsys):
    import pyruntime.plan.calibrate as calibrate

    monkeypatch.setattr(calibrate, "_free_memory", lambda cuda: 10**9)

    def measured():
        raise AssertionError("measured before refusing")
    monkeypatch.setattr(calibrate, "gemm_flops", measured)
    code = main(["plan", "--calibrate", "--preset", "7b", "--seq-len", "4096", "--profile", str(tmp_path / "p.json")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "needs about 30.8 GB" in err and "1.0 GB free" in err, err
    assert not (tmp_path / "p.json").exists()
