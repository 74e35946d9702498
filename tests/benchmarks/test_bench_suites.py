"""The other microbenchmark suites users run (`python -m pyruntime bench tp|zero|flat`), each
at its smallest: they run, print a row per kernel / variant with a ratio, and refuse bad input.
Speed is never asserted in tests."""
from pyruntime.bench import run


def test_bench_tp_rows_for_every_kernel_and_degree(capsys):
    assert run(["tp", "--tp", "1,2", "--tokens", "32", "--hidden", "32", "--ffn", "48", "--vocab", "101",
                "--repeat", "1", "--warmup", "0"]) == 0
    out = capsys.readouterr().out
    for kernel in ("gemm", "linear+bias+gelu fwd", "swiglu proj fwd+bwd", "vocab-parallel CE"):
        for tp in ("tp=1", "tp=2"):
            assert any(kernel in line and tp in line and line.rstrip().endswith("x") for line in out.splitlines()), \
                (kernel, tp, out)


def test_bench_flat_tiny(capsys):
    assert run(["flat", "--preset", "tiny", "--repeat", "1"]) == 0
    out = capsys.readouterr().out
    assert "flat_pack vs cat" in out and "flat AdamW vs foreach" in out


def test_bench_zero_against_ddp_and_fsdp2(capsys):
    assert run(["zero", "--worlds", "2", "--steps", "1", "--warmup", "0", "--rounds", "1", "--preset", "tiny"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("    2 ")]
    variants = [" ".join(r[1:4]) if r[1] == "ours" else " ".join(r[1:3]) for r in rows]
    assert variants == ["ours --zero 0", "torch DDP", "ours --zero 3", "torch FSDP2"], rows
    assert all(r[5].endswith("x") and float(r[5][:-1]) > 0 for r in rows if r[1] == "ours")  # torch/ours


def test_unknown_suite_is_refused(capsys):
    assert run(["nope"]) == 2
    assert "invalid choice: 'nope'" in capsys.readouterr().err
