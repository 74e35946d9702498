"""`python -m pyruntime bench recompute` at its smallest: one row per mode with the measured
activation bytes and the ratios to none; the run itself checks that the losses are
bit-identical. Speed is never asserted."""
from pyruntime.bench import run


def test_bench_recompute_rows(capsys):
    assert run(["recompute", "--preset", "tiny", "--steps", "1", "--warmup", "0", "--seq-len", "16",
                "--global-batch", "4", "--micro-batch", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {}
    for line in lines:
        words = line.split()
        if "tiny" in words and words[0] in ("none", "selective", "full"):
            at = words.index("tiny")
            rows[" ".join(words[:at])] = words[at + 3:]  # activation MiB, none/mode, step ms, ...
    each = ["selective norm", "selective swiglu", "selective kv_repeat"]  # tiny: 4 heads, 2 KV heads
    default = "selective norm,swiglu,kv_repeat (default)"
    assert set(rows) == {"none", *each, default, "full"}, lines
    mib = {mode: float(row[0]) for mode, row in rows.items()}
    assert mib["full"] < mib[default] < min(mib[m] for m in each)
    assert max(mib[m] for m in each) < mib["none"], rows
    assert rows["none"][1] == "1.00x"


def test_bench_recompute_bad_input_one_line(capsys):
    assert run(["recompute", "--global-batch", "5", "--micro-batch", "2"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    for flag in ("--seq-len", "--micro-batch", "--global-batch"):
        assert run(["recompute", flag, "0"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and flag in err[0], err
