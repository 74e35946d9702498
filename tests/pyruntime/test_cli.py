"""CLI: flags and config files fill the config; bad input exits 2 with one line."""
import json
import subprocess
import sys

import pytest

from pyruntime.cli import build_parser, config_from_args, main


def parse(*argv, world_size=1):
    return config_from_args(build_parser().parse_args(["train", *argv]), world_size)


def test_flags_map_onto_config():
    cfg = parse("--preset", "small", "--steps", "7", "--global-batch", "12", "--micro-batch", "3",
                "--seq-len", "64", "--lr", "0.01", "--seed", "5", "--metrics", "m.jsonl", "--out", "o")
    assert (cfg.train.preset, cfg.model.dim, cfg.train.steps, cfg.train.seed) == ("small", 256, 7, 5)
    assert (cfg.data.global_batch, cfg.data.micro_batch, cfg.data.seq_len) == (12, 3, 64)
    assert cfg.optim.lr == 0.01 and str(cfg.metrics_path) == "m.jsonl" and cfg.train.out == "o"


@pytest.mark.parametrize("suffix", [".json", ".toml"])
def test_config_file_then_flags_override(tmp_path, suffix):
    path = tmp_path / f"c{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps({"train": {"steps": 11}, "model": {"n_layers": 2}, "data": {"seq_len": 32}}))
    else:
        path.write_text("[train]\nsteps = 11\n[model]\nn_layers = 2\n[data]\nseq_len = 32\n")
    cfg = parse("--config", str(path), "--seq-len", "48")
    assert (cfg.train.steps, cfg.model.n_layers, cfg.data.seq_len) == (11, 2, 48)


BAD = [
    (["--preset", "huge"], "unknown preset 'huge'"),
    (["--steps", "-3"], "train.steps must be >= 1, got -3"),
    (["--seq-len", "0"], "data.seq_len must be >= 1, got 0"),
    (["--global-batch", "10", "--micro-batch", "4"], "global batch 10 does not divide into dp 1 x micro-batch 4"),
    (["--data", "/nonexistent/corpus.txt"], "data file not found: /nonexistent/corpus.txt"),
    (["--steps", "abc"], "invalid int value: 'abc'"),
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["--tp", "2"], "does not match world size 1"),
]


@pytest.mark.parametrize("argv,message", BAD)
def test_bad_input_exits_2_with_one_line(argv, message, capsys):
    assert main(["train", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "Traceback" not in err


def test_bad_input_in_a_real_process_has_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pyruntime", "train", "--preset", "nope"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("pyruntime: error: unknown preset 'nope'")
    assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1


def test_train_command_runs_single_process(tmp_path, capsys):
    metrics = tmp_path / "m.jsonl"
    code = main(["train", "--preset", "tiny", "--steps", "2", "--global-batch", "2", "--micro-batch", "1",
                 "--seq-len", "16", "--out", str(tmp_path), "--metrics", str(metrics), "--eval-every", "0"])
    assert code == 0
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == [1, 2]
    assert "step 2/2" in capsys.readouterr().out
