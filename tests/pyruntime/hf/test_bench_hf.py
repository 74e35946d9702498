"""bench hf runs (tokenize part, tiny): both sides tokenize the same documents and the table
names the ratio, for one process and for two."""
from pyruntime.bench.hf import main


def test_bench_hf_tokenize_part_prints_the_ratio(capsys):
    assert main(["--part", "tokenize", "--docs", "200", "--workers", "2"]) == 0
    out = capsys.readouterr().out
    assert "tokenize: 200 JSON lines" in out and out.rstrip().endswith("x |")
    assert "| tokens/s, --workers 1 |" in out and "| tokens/s, --workers 2 |" in out
