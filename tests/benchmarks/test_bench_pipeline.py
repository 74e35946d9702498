"""pyruntime/bench/pp.py (`python -m pyruntime bench pp`) at its smallest: the tiny
model, 4 micro-batches of 16 tokens, one timed step. Checks what the benchmark promises
besides speed (speed is never asserted in tests): on every schedule pair our executor and
torch.distributed.pipelining get the same first-step loss and gradients, and the table and
the bubble lines come out. One spawned world of 2 gloo ranks, a few seconds."""
from pyruntime.bench import pp as bench_pipeline
from pyruntime.bench import run


def test_same_loss_and_gradients_as_torch_pipelining_and_table():
    args = bench_pipeline.Args(preset="tiny", seq_len=16, micro_batch=1, microbatches=4, warmup=0, steps=1)
    rows = bench_pipeline.run_benchmark(args, timeout_s=120)
    assert [r["schedule"] for r in rows] == ["gpipe", "1f1b", "interleaved"]
    assert [r["torch"] for r in rows] == ["ScheduleGPipe", "Schedule1F1B", "ScheduleInterleaved1F1B"]
    for r in rows:
        assert abs(r["loss_ours"] - r["loss_torch"]) <= 1e-5, r
        assert 4.0 < r["loss_ours"] < 7.0, r  # ~ln(256) for an untrained byte model: a real loss
        assert r["grad_rel_err"] <= 1e-5, r
        assert r["ours_ms"] > 0 and r["torch_ms"] > 0 and r["ratio"] > 0
        assert len(r["bubble"]) == len(r["sim_bubble"]) == 2
        assert all(0.0 <= b < 1.0 for b in r["bubble"] + r["sim_bubble"]), r
    text = bench_pipeline.format_table(rows)
    assert "torch/ours" in text and "ScheduleInterleaved1F1B" in text and "interleaved v=2" in text
    md = bench_pipeline.format_table(rows, markdown=True)
    assert md.splitlines()[1].startswith("|---|") and len(md.splitlines()) == 2 + len(rows)
    assert all(bench_pipeline.gap_line(r).startswith(r["schedule"] + ": pipeline ") for r in rows)


def test_bench_pp_is_dispatched_and_refuses_bad_input(capsys):
    assert run(["pp", "--schedules", "zb"]) == 2  # no world is spawned for bad input
    assert "--schedules takes gpipe,1f1b,interleaved" in capsys.readouterr().err
    assert run(["pp", "--preset", "tiny", "--schedules", "interleaved", "--microbatches", "3"]) == 2
