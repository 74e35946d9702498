"""`python -m pyruntime bench recompute` at its smallest: one row per mode with the measured
activation bytes and the ratios to none; the run itself checks that the losses are
bit-identical. Speed is never asserted."""
from pyruntime.bench import run


def test_bench_recompute_rows(capsys):
    assert run(["recompute", "--preset", "tiny", "--steps", "1", "--warmup", "0", "--seq-len", "16",
                "--global-batch", "4", "--micro-batch", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line.split() for line in lines if line.split()[:1] in (["none"], ["selective"], ["full"])}
    assert set(rows) == {"none", "selective", "full"}, lines
    mib = {mode: float(row[4]) for mode, row in rows.items()}
    assert mib["full"] < mib["selective"] < mib["none"], rows
    assert rows["none"][5] == "1.00x"


def test_bench_recompute_bad_input_one_line(capsys):
    assert run(["recompute", "--global-batch", "5", "--micro-batch", "2"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
