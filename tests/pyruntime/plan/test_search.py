"""Search and step time: every printed command is one `train` accepts at the planned layout;
the seed's 7B fine-tune fits no single 96 GB GPU and the planner names what does."""
import shlex

from pyruntime.cli import build_parser, config_from_args
from pyruntime.config import PRESETS
from pyruntime.plan.devices import device
from pyruntime.plan.layout import Layout, Workload
from pyruntime.plan.search import search, train_command
from pyruntime.plan.timing import Cluster, step_time

WORK_7B = Workload(model=PRESETS["7b"], seq_len=4096, global_batch=16)


def test_every_command_is_the_layout_train_runs():
    cluster = Cluster(device("h100"), 8)
    fits, _ = search(WORK_7B, cluster)
    assert fits and [c.time.step for c in fits] == sorted(c.time.step for c in fits)
    for cand in fits[:20]:
        words = shlex.split(train_command(cand.layout, WORK_7B, cluster, ["--preset", "7b"]))
        cfg = config_from_args(build_parser().parse_args(words[words.index("pyruntime") + 1:]), 8)
        lay, par = cand.layout, cfg.parallel
        assert (par.dp, par.tp, par.pp, par.zero, par.sequence_parallel) == (lay.dp, lay.tp, lay.pp, lay.zero, lay.sp)
        assert cfg.data.micro_batch == lay.micro_batch and cfg.data.global_batch == WORK_7B.global_batch


def test_seed_7b_full_finetune_needs_more_than_one_96gb_gpu():
    one, _ = search(WORK_7B, Cluster(device("gh200"), 1))
    # 16 B/parameter of model states alone is 107.8 GB (optimizer offload, once train has it, is another matter)
    assert not [c for c in one if c.layout.offload == "none"]
    two, _ = search(WORK_7B, Cluster(device("gh200"), 2))
    assert two and all(c.peak <= 96e9 for c in two)
    assert {c.layout.zero for c in two if c.layout.dp == 2} >= {3}  # sharding the states is what makes it fit


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
