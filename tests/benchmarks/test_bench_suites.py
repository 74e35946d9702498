"""The other microbenchmark suites users run (`python -m pyruntime bench tp|zero|flat|overlap|tpstep|initmem`), each
at its smallest: they run, print a row per kernel / variant with a ratio, and refuse bad input.
Speed is never asserted in tests."""
import pytest

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
    assert run(["zero", "--worlds", "2", "--steps", "1", "--warmup", "0", "--preset", "tiny"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("    2 ")]
    variants = [" ".join(r[1:4]) if r[1] == "ours" else " ".join(r[1:3]) for r in rows]
    assert variants == ["ours --zero 0", "torch DDP", "ours --zero 3", "torch FSDP2"], rows
    assert all(r[5].endswith("x") and float(r[5][:-1]) > 0 for r in rows if r[1] == "ours")  # torch/ours


def test_bench_overlap_checks_its_stand_in_and_reports_every_case(capsys):
    """The stand-in peers (copies on a worker thread here) feed the layers' own overlap code;
    the run first checks its results against the plain ops, then times the four cases."""
    assert run(["overlap", "--tp", "2", "--tokens", "32", "--hidden", "16", "--ffn", "24", "--chunks", "3",
                "--repeat", "1", "--warmup", "0"]) == 0
    lines = capsys.readouterr().out.splitlines()
    for case in ("all-gather + GEMM fwd ", "GEMM + reduce-scatter fwd ", "all-gather + GEMM fwd+bwd",
                 "GEMM + reduce-scatter fwd+bwd"):
        row = [line for line in lines if line.startswith(case)]
        assert len(row) == 1 and row[0].rstrip().endswith("%"), (case, lines)
        assert row[0].split()[-7] == ("3" if "bwd" not in case else "6"), row  # transfers: one per chunk and pass


def test_bench_overlap_refuses_shapes_tp_does_not_divide(capsys):
    assert run(["overlap", "--tp", "3", "--tokens", "32", "--ffn", "24"]) == 2
    assert "sequence length 32 is not divisible by tp 3" in capsys.readouterr().err


@pytest.mark.parametrize("sp", [[], ["--sp"]], ids=["tp", "tp+sp"])
def test_bench_tpstep_checks_loss_and_norm_then_times_both(capsys, sp):
    assert run(["tpstep", "--tp", "2", "--preset", "tiny", "--seq-len", "16", "--batch", "2", "--steps", "1",
                "--warmup", "0", *sp]) == 0
    out = capsys.readouterr().out
    loss_ours, loss_torch = (float(v) for v in out.split("check: loss ")[1].split(",")[0].split(" vs "))
    assert abs(loss_ours - loss_torch) <= 1e-5
    rows = [line for line in out.splitlines() if line.startswith("apply_tp vs parallelize_module")]
    assert [r.split()[3] for r in rows] == ["fwd+bwd", "step"] and all(r.rstrip().endswith("x") for r in rows)


def test_bench_tpstep_refuses_a_tp_the_heads_do_not_divide(capsys):
    assert run(["tpstep", "--tp", "3", "--preset", "tiny"]) == 2
    assert "bench tpstep:" in capsys.readouterr().err


def test_unknown_suite_is_refused_in_one_line(capsys):
    assert run(["nope"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no suite 'nope'" in err and "tp, pp, zero" in err


def test_bench_help_lists_every_suite(capsys):
    from pyruntime.bench import SUITES
    from pyruntime.cli import main

    assert main(["bench", "--help"]) == 0
    out = capsys.readouterr().out
    for suite in SUITES:
        assert any(line.split()[:1] == [suite] and len(line.split()) > 3 for line in out.splitlines()), suite


def test_bench_initmem_builds_both_ways(capsys):
    assert run(["initmem", "--dp", "2", "--dim", "64", "--layers", "2", "--ffn", "96", "--vocab", "256"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith(("deferred", "eager"))]
    assert [r[0] for r in rows] == ["deferred", "eager"] and all(len(r) == 4 for r in rows), rows


@pytest.mark.parametrize("suite", ["tp", "pp", "zero", "flat", "overlap", "tpstep", "initmem", "adam", "recompute", "hf", "plan"])
def test_suite_help_is_a_whole_paragraph_and_bad_options_one_line(suite, capsys):
    assert run([suite, "--help"]) == 0
    out = capsys.readouterr().out
    description = out.split("\n\n")[1]
    assert description.rstrip().endswith((".", ")", ":")), description  # not cut mid-sentence
    assert run([suite, "--no-such-option"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"pyruntime bench {suite}: error:" in err
