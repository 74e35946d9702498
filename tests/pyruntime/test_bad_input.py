"""Bad input, as a new user types it: every case exits 2 with exactly one line on stderr that
names the offending key, flag or path, no traceback, and no process group created.

The table runs `main(["train", ...])` in-process (fast); the few cases that need a real
process (torchrun's environment, a real interpreter's stderr) run as subprocesses below.
`{d}` in an argument is a directory of prepared files (see `files`).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from pyruntime.cli import main
from pyruntime.data.tokens import write_tokens

# (argv, text the one line must contain: the key / flag / path it names)
BAD = {
    # settings the layout would not use
    "schedule without pp": (["--schedule", "zb"], "--schedule zb needs --pp > 1"),
    "pp-layout without pp": (["--pp-layout", "1,1"], "--pp-layout 1,1 needs --pp > 1"),
    "recompute-ops without selective": (["--recompute", "full", "--recompute-ops", "norm"],
                                        "--recompute-ops 'norm' needs --recompute selective, got --recompute full"),
    # numbers out of range or not finite
    "lr inf": (["--lr", "inf"], "optim.lr must be a finite number"),
    "lr nan": (["--lr", "nan"], "optim.lr must be a finite number"),
    "lr negative": (["--lr", "-1"], "optim.lr must be in (0, 3.4e+38], got -1.0"),
    "lr zero": (["--lr", "0"], "optim.lr must be in (0, 3.4e+38], got 0.0"),
    "lr not a number": (["--lr", "abc"], "argument --lr: invalid float value: 'abc'"),
    "grad-clip nan": (["--grad-clip", "nan"], "optim.grad_clip must be a finite number"),
    "grad-clip inf": (["--grad-clip", "inf"], "optim.grad_clip must be a finite number"),
    "grad-clip negative": (["--grad-clip", "-1"], "optim.grad_clip must be >= 0"),
    "warmup negative": (["--warmup", "-1"], "optim.warmup_steps must be >= 0"),
    "seed negative": (["--seed", "-1"], "train.seed must be in [0, "),
    "seed too large": (["--seed", str(2**64)], "train.seed must be in [0, "),
    "seed not an int": (["--seed", "1e3"], "argument --seed: invalid int value: '1e3'"),
    "steps zero": (["--steps", "0"], "train.steps must be >= 1, got 0"),
    "steps negative": (["--steps", "-3"], "train.steps must be >= 1, got -3"),
    "steps not an int": (["--steps", "abc"], "invalid int value: 'abc'"),
    "log-every zero": (["--log-every", "0"], "train.log_every must be >= 1"),
    "save-every negative": (["--save-every", "-1"], "train.save_every must be >= 0"),
    "eval-every negative": (["--eval-every", "-1"], "train.eval_every must be >= 0"),
    "eval-batches zero": (["--eval-batches", "0"], "train.eval_batches must be >= 1 when eval_every is 50"),
    "eval-batches beyond the validation split": (["--eval-batches", "100000"], "validation split of"),
    "peer-timeout nan": (["--peer-timeout", "nan"], "train.peer_timeout_s must be a finite number"),
    "peer-timeout zero": (["--peer-timeout", "0"], "train.peer_timeout_s must be in (0, 86400]"),
    "peer-timeout negative": (["--peer-timeout", "-5"], "train.peer_timeout_s must be in (0, 86400]"),
    "peer-timeout huge": (["--peer-timeout", "1e300"], "train.peer_timeout_s must be in (0, 86400]"),
    "seq-len zero": (["--seq-len", "0"], "data.seq_len must be >= 1, got 0"),
    "seq-len beyond the model": (["--seq-len", "4096"], "seq_len 4096 exceeds model.max_seq_len 2048"),
    "global-batch zero": (["--global-batch", "0"], "data.global_batch must be in [1, 16777216], got 0"),
    "micro-batch zero": (["--micro-batch", "0"], "data.micro_batch must be >= 1"),
    "batch does not divide": (["--global-batch", "10", "--micro-batch", "4"],
                              "global batch 10 does not divide into dp 1 x micro-batch 4"),
    "microbatches zero": (["--microbatches", "0"], "--microbatches 0"),
    "microbatches do not divide": (["--microbatches", "3"], "--microbatches 3"),
    "dp zero with microbatches": (["--dp", "0", "--microbatches", "2"], "parallel.dp must be >= 1, got 0"),
    "microbatches and micro-batch": (["--microbatches", "4", "--micro-batch", "8"],
                                     "--microbatches 4 and --micro-batch 8 both set the micro-batch size"),
    "dp negative": (["--dp", "-1"], "parallel.dp must be >= 1"),
    "zero stage 4": (["--zero", "4"], "parallel.zero must be 0, 1, 2 or 3, got 4"),
    "bucket-mb zero": (["--bucket-mb", "0"], "parallel.bucket_mb must be > 0"),
    "bucket-mb nan": (["--bucket-mb", "nan"], "parallel.bucket_mb must be a finite number"),
    "virtual-stages zero": (["--virtual-stages", "0"], "parallel.virtual_stages must be >= 1"),
    # enums and names
    "kernels bogus": (["--kernels", "bogus"], "unknown kernel backend 'bogus' (model.kernels)"),
    "kernels triton without CUDA": (["--kernels", "triton"], "--kernels triton (model.kernels) cannot run here"),
    "kernels cpp (the model's ops have none)": (["--kernels", "cpp"], "--kernels cpp (model.kernels) cannot run"),
    "preset unknown": (["--preset", "huge"], "unknown preset 'huge'"),
    "schedule unknown": (["--schedule", "bogus"], "unknown pipeline schedule 'bogus' (parallel.schedule)"),
    "mesh-order incomplete": (["--mesh-order", "dp,tp"], "parallel.mesh_order must order dp, pp and tp"),
    "flag unknown": (["--bogus"], "unrecognized arguments: --bogus"),
    # layouts
    "tp beyond the world": (["--tp", "2"], "does not match world size 1"),
    "tp does not divide the heads": (["--tp", "3"], "tp 3 does not divide model.n_heads 4"),
    "sp without tp": (["--sp"], "sequence parallelism / tp overlap need tp > 1"),
    "pp beyond the layers": (["--pp", "8"], "the model has 4 layer(s), fewer than pp x virtual stages = 8"),
    "pp-layout wrong sum": (["--pp", "2", "--pp-layout", "3,3"], "--pp-layout '3,3' sums to 6 layers"),
    "interleaved without virtual stages": (["--pp", "2", "--schedule", "interleaved"],
                                           "schedule interleaved needs virtual_stages >= 2"),
    # paths
    "data missing": (["--data", "/nonexistent/corpus.txt"], "data file not found: /nonexistent/corpus.txt"),
    "data is a directory": (["--data", "{d}/adir"], "data path {d}/adir is a directory"),
    "data is instruction jsonl": (["--data", "{d}/sft.jsonl"], "{d}/sft.jsonl: a .jsonl file is not read as "
                                  "training data"),
    "data is a loss mask": (["--data", "{d}/masked.bin.mask"], "{d}/masked.bin.mask is the loss mask of "
                            "{d}/masked.bin; give --data {d}/masked.bin"),
    "data without its loss mask": (["--data", "{d}/unmasked.bin"], "{d}/unmasked.bin was written with a loss mask "
                                   "and {d}/unmasked.bin.mask is missing"),
    "out is a file": (["--out", "{d}/afile"], "output directory (--out) {d}/afile is a file"),
    "out under a file": (["--out", "{d}/afile/run"], "is under {d}/afile, which is a file"),
    "out in a read-only place": (["--out", "/sys/pyruntime-run"], "cannot create output directory (--out) /sys/"),
    "metrics is a directory": (["--metrics", "{d}/adir"], "metrics file (--metrics) {d}/adir is a directory"),
    "metrics under a file": (["--metrics", "{d}/afile/m.jsonl"], "is under {d}/afile, which is a file"),
    "checkpoints dir is a file": (["--save-every", "5", "--out", "{d}/ckfile"],
                                  "checkpoint directory {d}/ckfile/checkpoints is a file"),
    "export-hf is a file": (["--export-hf", "{d}/afile"], "export directory (--export-hf) {d}/afile is a file"),
    "resume missing": (["--resume", "{d}/nowhere"], "no checkpoint at {d}/nowhere"),
    "resume not a checkpoint": (["--resume", "{d}/adir"], "{d}/adir is not a checkpoint"),
    "resume auto with a broken latest": (["--resume", "auto", "--out", "{d}/brokenrun"],
                                         "{d}/brokenrun/checkpoints/latest names 'step_7'"),
    # config files
    "config missing": (["--config", "{d}/missing.json"], "config file not found: {d}/missing.json"),
    "config is a directory": (["--config", "{d}/adir"], "config file {d}/adir is a directory"),
    "config string for an int": (["--config", "{d}/seq_str.json"], "data.seq_len must be an integer, got '128'"),
    "config string for a float (TOML)": (["--config", "{d}/lr_str.toml"], "optim.lr must be a finite number, got '3e-4'"),
    "config number for a pair": (["--config", "{d}/betas.json"], "optim.betas must be a list of 2 items"),
    "config pair out of range": (["--config", "{d}/betas_range.json"], "optim.betas must be in [0, 1) each"),
    "config bool for an int": (["--config", "{d}/steps_bool.json"], "train.steps must be an integer, got True"),
    "config null for an int": (["--config", "{d}/seq_null.json"], "data.seq_len must be an integer, got None"),
    "config float for an int (TOML)": (["--config", "{d}/steps_float.toml"], "train.steps must be an integer, got 1.5"),
    "config NaN literal": (["--config", "{d}/lr_nan.json"], "optim.lr must be a finite number, got nan"),
    "config int for a string": (["--config", "{d}/kernels_int.json"], "model.kernels must be a string, got 5"),
    "config top level a list": (["--config", "{d}/list.json"], "the top level must be a table/object of sections"),
    "config top level a number": (["--config", "{d}/number.json"], "the top level must be a table/object"),
    "config section not a table": (["--config", "{d}/section_int.json"], "config section 'train' must be a table"),
    "config unknown section": (["--config", "{d}/unknown_section.json"], "unknown config section(s): trainer"),
    "config unknown key": (["--config", "{d}/unknown_key.json"], "unknown key(s) in [train]: stepz"),
    "config in UTF-16": (["--config", "{d}/utf16.json"], "config file {d}/utf16.json is not UTF-8 text"),
    "config malformed JSON": (["--config", "{d}/broken.json"], "cannot parse config file {d}/broken.json as JSON"),
    "config malformed TOML": (["--config", "{d}/broken.toml"], "cannot parse config file {d}/broken.toml as TOML"),
    "config heads do not divide dim": (["--config", "{d}/heads.json"], "model.dim 128 is not divisible by n_heads 3"),
    "config rope scaling unknown": (["--config", "{d}/rope.json"], "unknown rope scaling 'yarn' (model.rope_scaling)"),
    "config sliding window zero": (["--config", "{d}/window.json"], "model.sliding_window must be >= 1, got 0"),
    "export-dtype unknown": (["--export-dtype", "int8"], "unknown export dtype 'int8' (train.export_dtype)"),
    "export-shard-mb zero": (["--export-shard-mb", "0"], "train.export_shard_mb must be >= 1e-06, got 0.0"),
}

CONFIG_FILES = {
    "seq_str.json": json.dumps({"data": {"seq_len": "128"}}),
    "lr_str.toml": '[optim]\nlr = "3e-4"\n',
    "betas.json": json.dumps({"optim": {"betas": 0.9}}),
    "betas_range.json": json.dumps({"optim": {"betas": [0.9, 1.5]}}),
    "steps_bool.json": json.dumps({"train": {"steps": True}}),
    "seq_null.json": json.dumps({"data": {"seq_len": None}}),
    "steps_float.toml": "[train]\nsteps = 1.5\n",
    "lr_nan.json": '{"optim": {"lr": NaN}}',
    "kernels_int.json": json.dumps({"model": {"kernels": 5}}),
    "list.json": "[1, 2]",
    "number.json": "3",
    "section_int.json": json.dumps({"train": 5}),
    "unknown_section.json": json.dumps({"trainer": {}}),
    "unknown_key.json": json.dumps({"train": {"stepz": 1}}),
    "broken.json": '{"train": {"steps": 3,}}',
    "broken.toml": "[train\nsteps = 3\n",
    "heads.json": json.dumps({"model": {"n_heads": 3, "n_kv_heads": 3}}),
    "rope.json": json.dumps({"model": {"rope_scaling": "yarn"}}),
    "window.json": json.dumps({"model": {"sliding_window": 0}}),
}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad_input")
    for name, text in CONFIG_FILES.items():
        (d / name).write_text(text)
    (d / "utf16.json").write_text(json.dumps({"train": {"steps": 3}}), encoding="utf-16")
    (d / "afile").write_text("not a directory")
    (d / "adir").mkdir()
    (d / "sft.jsonl").write_text(json.dumps({"prompt": "2 + 2?", "response": "4"}) + "\n")
    write_tokens(d / "masked.bin", np.arange(4096) % 256, 256, mask=np.arange(4096) % 2)
    (d / "unmasked.bin").write_bytes((d / "masked.bin").read_bytes())  # copied without its mask
    (d / "ckfile").mkdir()
    (d / "ckfile" / "checkpoints").write_text("not a directory")
    (d / "brokenrun" / "checkpoints").mkdir(parents=True)
    (d / "brokenrun" / "checkpoints" / "latest").write_text("step_7\n")
    return d


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_exit_2(case, files, no_process_group, tmp_path, monkeypatch, capsys):
    argv, expected = BAD[case]
    monkeypatch.chdir(tmp_path)  # the default --out (runs/latest) lands here
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # a user's shell: Triton needs CUDA
    assert main(["train", *[a.replace("{d}", str(files)) for a in argv]]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pyruntime: error: ") and err.count("\n") == 1, err
    assert expected.replace("{d}", str(files)) in err, err
    assert "Traceback" not in err and not no_process_group
    assert not list(tmp_path.rglob("metrics.jsonl"))  # a refused run leaves no empty record behind


def test_the_table_is_large_enough():
    assert len(BAD) + len(REAL_PROCESS) >= 60


# -- in a real process --------------------------------------------------------------------------
REAL_PROCESS = {
    "preset unknown": (["--preset", "nope"], "unknown preset 'nope'"),
}


@pytest.mark.parametrize("case", list(REAL_PROCESS))
def test_bad_input_in_a_real_process(case, tmp_path):
    argv, expected = REAL_PROCESS[case]
    proc = subprocess.run([sys.executable, "-m", "pyruntime", "train", *argv], capture_output=True, text=True,
                          cwd=tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("pyruntime: error: ") and expected in proc.stderr, proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


def test_bad_input_under_torchrun_is_one_line_per_rank(tmp_path):
    """--peer-timeout nan under torchrun: every rank says it in one line and exits 2 at once,
    before any rendezvous of its own (the issue saw a traceback on every rank)."""
    logs = tmp_path / "logs"
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--log-dir", str(logs), "--redirects", "3", "-m", "pyruntime", "train",
                           "--peer-timeout", "nan"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=180,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode != 0
    errs = sorted(logs.rglob("stderr.log"))
    assert len(errs) == 2, proc.stderr[-3000:]
    for path in errs:
        err = path.read_text()
        assert err == "pyruntime: error: train.peer_timeout_s must be a finite number, got nan (float)\n", err
    assert "exitcode  : 2" in proc.stderr or "exitcode: 2" in proc.stderr.replace(" ", ""), proc.stderr[-3000:]
    print(f"torchrun returned {time.monotonic() - t0:.1f} s after its start")
