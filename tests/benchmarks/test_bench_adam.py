"""`python -m pyruntime bench adam` at its smallest: a row per size and torch implementation with
a ratio, the triad table beside it, and one line for bad input. Speed is never asserted."""
from pyruntime.bench import run


def test_bench_adam_rows_and_triad(capsys):
    assert run(["adam", "--sizes", "1000,4097", "--repeat", "1", "--warmup", "0"]) == 0
    lines = capsys.readouterr().out.splitlines()
    for size in ("0.001M", "0.004097M"):
        for peer in ("AdamW fused", "AdamW foreach"):
            row = [line for line in lines if line.startswith(f"C++ AdamW vs {peer} ") and f" {size} " in line]
            assert len(row) == 1 and row[0].rstrip().endswith("x"), (size, peer, lines)
        triad = [line for line in lines if line.startswith(size + " ")]
        assert len(triad) == 1 and triad[0].rstrip().endswith("%"), lines


def test_bench_adam_bad_sizes_one_line(capsys):
    assert run(["adam", "--sizes", "1e6,x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--sizes" in err[0], err
    assert run(["adam", "--repeat", "0"]) == 2
    assert "--repeat must be >= 1" in capsys.readouterr().err
