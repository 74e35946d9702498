"""Search and step time: every printed command is one `train` accepts at the planned layout;
the seed's 7B fine-tune fits no single 96 GB GPU and the planner names what does."""
import dataclasses
import shlex

import pytest

from pyruntime.cli import build_parser, config_from_args
from pyruntime.config import PRESETS
from pyruntime.plan.devices import device
from pyruntime.plan.layout import Layout, Workload
from pyruntime.plan.search import search, train_command
from pyruntime.plan.timing import Cluster, step_time

WORK_7B = Workload(model=PRESETS["7b"], seq_len=4096, global_batch=16)


def test_every_command_is_the_layout_train_runs():
    cluster = Cluster(device("h100"), 8)
    fits = search(WORK_7B, cluster).fastest
    assert fits and [c.time.step for c in fits] == sorted(c.time.step for c in fits)
    for cand in fits[:20]:
        words = shlex.split(train_command(cand.layout, WORK_7B, cluster, ["--preset", "7b"]))
        cfg = config_from_args(build_parser().parse_args(words[words.index("pyruntime") + 1:]), 8)
        lay, par = cand.layout, cfg.parallel
        assert (par.dp, par.tp, par.pp, par.zero, par.sequence_parallel) == (lay.dp, lay.tp, lay.pp, lay.zero, lay.sp)
        assert cfg.data.micro_batch == lay.micro_batch and cfg.data.global_batch == WORK_7B.global_batch


def test_seed_7b_full_finetune_needs_more_than_one_96gb_gpu():
    one = search(WORK_7B, Cluster(device("gh200"), 1)).fastest
    # 16 B/parameter of model states alone is 107.8 GB (optimizer offload, once train has it, is another matter)
    assert not [c for c in one if c.layout.offload == "none"]
    two = search(WORK_7B, Cluster(device("gh200"), 2)).fastest
    assert two and all(c.peak <= 96e9 for c in two)
    assert {c.layout.zero for c in two if c.layout.dp == 2} >= {3}  # sharding the states is what makes it fit


def test_search_top_times_only_what_can_win_and_gets_the_full_search_head():
    """With top, layouts are simulated in the order of their bubble-free lower bound and the
    search stops once that bound passes the top-th step: the same head as timing every one."""
    cluster = Cluster(device("h100"), 16)
    work = Workload(model=PRESETS["7b"], seq_len=4096, global_batch=64)
    full, head = search(work, cluster), search(work, cluster, top=7)
    assert full.fitting == head.fitting == len(full.fastest) > 7 and full.smallest_peak == head.smallest_peak
    assert [(c.layout, c.time) for c in head.fastest] == [(c.layout, c.time) for c in full.fastest[:7]]
    assert any(c.layout.pp > 1 for c in full.fastest[:7])  # the bubble is what the bound leaves out
    for c in full.fastest:
        assert step_time(work, c.layout, cluster, bubble=False).step <= c.time.step


def test_step_time_parts_add_up_and_pipeline_bubble_shrinks_with_microbatches():
    cluster = Cluster(device("h100"), 8)
    few = step_time(Workload(model=PRESETS["7b"], seq_len=4096, global_batch=8), Layout(pp=4, dp=2), cluster)
    many = step_time(Workload(model=PRESETS["7b"], seq_len=4096, global_batch=64), Layout(pp=4, dp=2), cluster)
    for t in (few, many):
        assert 0 <= t.step - (t.pipeline + t.dp_exposed + t.optimizer) < 1e-2  # + per-step syncs and overhead
        assert 0 < t.mfu < 1
    assert few.bubble / few.pipeline > many.bubble / many.pipeline


def test_trainer_mfu_peak_comes_from_the_device_table():
    """The trainer's MFU divides by the planner's table (one source of each GPU's peak), matched
    from the name torch reports; the longest table name wins (h100-nvl before h100, gh200
    before h200); a GPU the table lacks gets no MFU."""
    from pyruntime.plan.devices import DEVICES, peak_flops_of

    assert peak_flops_of("NVIDIA H100 80GB HBM3") == DEVICES["h100"].peak_flops == 989e12
    assert peak_flops_of("NVIDIA H100 NVL") == DEVICES["h100-nvl"].peak_flops
    assert peak_flops_of("NVIDIA GH200 480GB") == DEVICES["gh200"].peak_flops
    assert peak_flops_of("NVIDIA A100-SXM4-40GB") == 312e12 and peak_flops_of("NVIDIA A10G") == 125e12
    assert peak_flops_of("NVIDIA GeForce RTX 4090") is None


def test_offload_costs_the_host_step_and_the_copies_the_backward_does_not_hide():
    """--offload optimizer: the optimizer time is the host AdamW over this rank's elements at
    the node's host bandwidth shared by its ranks, against the parameters' copies back (the
    longer counts), plus gradient copies beyond one micro-batch's backward; so an offloaded
    layout is never faster than the same layout on the device, and on one GPU the 7B step
    pays seconds for it. A CPU device pays its copies in full at memory bandwidth."""
    import dataclasses

    h100 = device("h100")
    one = Cluster(h100, 1)
    on_device = step_time(WORK_7B, Layout(recompute="full"), one)
    off = step_time(WORK_7B, Layout(recompute="full", offload="optimizer"), one)
    elements = on_device.optimizer * h100.mem_bw / 28
    host_step, back = 28 * elements / h100.host_bw, 4 * elements / h100.link_bw
    assert off.optimizer >= max(host_step, back) and off.optimizer > 10 * on_device.optimizer
    assert off.step - on_device.step == pytest.approx(off.optimizer - on_device.optimizer, rel=1e-9)
    eight = Cluster(h100, 8)  # eight ranks share the node's host memory
    zero3 = Layout(dp=8, zero=3, offload="optimizer")
    shard = step_time(WORK_7B, dataclasses.replace(zero3, offload="none"), eight).optimizer * h100.mem_bw / 28
    assert step_time(WORK_7B, zero3, eight).optimizer >= 28 * shard / (h100.host_bw / 8)
    cpu = dataclasses.replace(h100, cuda=False, overlap=False)
    small = Workload(model=PRESETS["small"], seq_len=256, global_batch=4)
    plain = step_time(small, Layout(), Cluster(cpu, 1)).optimizer
    elements = plain * cpu.mem_bw / 28
    assert step_time(small, Layout(offload="optimizer"), Cluster(cpu, 1)).optimizer == pytest.approx(
        plain + 4 * elements / (cpu.mem_bw / 2), rel=1e-12)


def test_selective_recompute_costs_its_memory_traffic():
    """Selective recompute reruns elementwise ops (norms, SwiGLU, the k / v repeats): the plan
    charges their bytes at memory bandwidth, so with memory to spare none ranks first."""
    from pyruntime.plan.timing import selective_bytes

    cluster = Cluster(device("h100"), 8)
    layout = Layout(dp=8, zero=3, micro_batch=2)
    none = step_time(WORK_7B, layout, cluster)
    sel = step_time(WORK_7B, dataclasses.replace(layout, recompute="selective"), cluster)
    m = PRESETS["7b"]
    per_block = selective_bytes(WORK_7B, dataclasses.replace(layout, recompute="selective"), 2)
    b, s, bf16 = 2, 4096, 2  # norms read + written, gate / up read + silu written; 7b: no grouped KV
    assert per_block == bf16 * (2 * 2 * b * s * m.dim + 3 * b * s * m.ffn_dim)
    assert sel.backward - none.backward == pytest.approx(m.n_layers * per_block / device("h100").mem_bw, rel=1e-9)
    assert sel.step > none.step
