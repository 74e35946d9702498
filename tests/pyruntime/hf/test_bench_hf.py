"""bench hf runs (tokenize part, tiny): both sides tokenize the same documents and the table
names the ratio, for one process and for two."""
from pyruntime.bench.hf import main


def test_bench_hf_tokenize_part_prints_the_ratio(capsys):
    assert main(["--part", "tokenize", "--docs", "200", "--workers", "2"]) == 0
    out = capsys.readouterr().out
    assert "tokenize: 200 JSON lines" in out and out.rstrip().endswith("x |")
    assert "| tokens/s, --workers 1 |" in out and "| tokens/s, --workers 2 |" in out


def test_bench_hf_load_part_times_both_loaders_in_fresh_processes(capsys):
    assert main(["--part", "load", "--dim", "64", "--layers", "2", "--heads", "4", "--kv-heads", "2", "--ffn", "128",
                 "--vocab", "512", "--repeat", "1"]) == 0
    out = capsys.readouterr().out
    assert "each load in a new process" in out and "| dp 1 load, run 1 (ours first)" in out
    assert "| dp 1 load, median" in out and out.count("x the full fp32 model") == 2
