"""The benchmark tables: every ratio stands right of the two numbers it divides, and every row
names its baseline (formatting only, on made-up figures: no timing here)."""
from pyruntime.bench.harness import Row, print_table
from pyruntime.bench.pp import TABLE_LEGEND, format_table


def test_pp_table_shows_the_ratio_of_its_medians_and_the_paired_median_apart():
    # The figures of the issue: medians 1464 vs 1995 ms, paired median 0.99x.
    row = dict(schedule="1f1b", torch="Schedule1F1B", virtual_stages=1, ours_ms=1464.0, torch_ms=1995.0,
               ratio=0.99, ours_pp_ms=1200.0, torch_pp_ms=1300.0, pp_ratio=1.01, bubble=[0.1, 0.2],
               sim_bubble=[0.1, 0.25])
    head, _, body = format_table([row]).splitlines()
    assert head.split()[:7] == ["schedule", "torch", "schedule", "ours", "ms", "torch", "ms"]
    cells = body.split()
    assert cells[2:6] == ["1464.0", "1995.0", "1.36x", "0.99x"]  # 1995 / 1464 beside them; pairs apart
    assert cells[6:10] == ["1200.0", "1300.0", "1.08x", "1.01x"]
    assert "torch.distributed.pipelining" in TABLE_LEGEND and "ratio of those two medians" in TABLE_LEGEND


def test_kernel_table_names_the_baseline_and_divides_the_times_beside_it(capsys):
    text = print_table([Row("flat_pack vs cat", "39 tensors", ours_s=0.002, base_s=0.005, baseline="torch.cat"),
                        Row("alone", "1", ours_s=0.001)])
    head, _, with_base, alone = text.splitlines()
    assert head.split()[-5:] == ["ours", "ms", "base", "ms", "base/ours"]
    assert with_base.split()[-4:] == ["torch.cat", "2.000", "5.000", "2.50x"]
    assert alone.split()[-1] == "1.000"  # no baseline: no name, no ratio
