"""Bad input to the commands besides `train`'s flags (export, generate, tokenize, plan,
schedule, demo, bench) and to the files `train` reads (--init-from's config.json and index,
--export-hf's directory): each exits 2 with one line on stderr naming what is wrong, no
traceback, no process group, and nothing the user already had is deleted or overwritten.

Every case runs `main([...])` in-process; `{d}` in an argument is the directory of prepared
files (see `files`: a tiny Hugging Face directory written by our own exporter, a tiny BPE, a
fake run directory, config.json variants).
"""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from pyruntime.cli import main
from pyruntime.config import PRESETS, ModelConfig
from pyruntime.data.tokenize import train_bpe
from pyruntime.hf.config import hf_config_from_model
from pyruntime.hf.export import write_hf_dir
from pyruntime.model.llama import Transformer
from pyruntime.train.checkpoint import FORMAT, VERSION

TRAIN = ["train", "--steps", "1", "--eval-every", "0", "--quiet", "--global-batch", "2", "--seq-len", "16"]
# (argv, text the one line must contain)
BAD = {
    # export: OUT is replaced whole, so it must be new, empty or an earlier export
    "export over a directory of the user's": (["export", "{d}/adir", "--hf", "{d}/precious"],
                                              "export directory (--hf) {d}/precious holds 'notes.txt'"),
    "export into the run's own directory": (["export", "{d}/run/checkpoints", "--hf", "{d}/run"],
                                            "{d}/run holds 'checkpoints' (and 1 more), which an export does not write"),
    "export to a file": (["export", "{d}/adir", "--hf", "{d}/afile"], "export directory (--hf) {d}/afile is a file"),
    "export shard-mb inf": (["export", "{d}/adir", "--hf", "{d}/new", "--shard-mb", "inf"],
                            "--shard-mb must be a finite number of MB >= 0.000001 (one byte), got inf"),
    "export shard-mb below a byte": (["export", "{d}/adir", "--hf", "{d}/new", "--shard-mb", "1e-9"],
                                     "--shard-mb must be a finite number of MB >= 0.000001"),
    "export tokenizer-from missing": (["export", "{d}/adir", "--hf", "{d}/new", "--tokenizer-from", "{d}/nowhere"],
                                      "--tokenizer-from {d}/nowhere: no such file or directory"),
    "export tokenizer-from a non-JSON file": (["export", "{d}/adir", "--hf", "{d}/new", "--tokenizer-from",
                                               "{d}/afile"], "--tokenizer-from {d}/afile is not a tokenizer.json"),
    "export tokenizer-from without tokenizer files": (
        ["export", "{d}/adir", "--hf", "{d}/new", "--tokenizer-from", "{d}/adir"],
        "--tokenizer-from {d}/adir holds none of tokenizer.json"),
    # train's --export-hf and the export size, refused before training, not after it
    "train export-hf over a run": ([*TRAIN, "--export-hf", "{d}/run"],
                                   "export directory (--export-hf) {d}/run holds 'checkpoints'"),
    "train export-shard-mb below a byte": ([*TRAIN, "--export-shard-mb", "1e-9"],
                                           "train.export_shard_mb must be >= 1e-06, got 1e-09"),
    # --init-from: a config.json or index of the wrong shape
    "init-from config a list": ([*TRAIN, "--init-from", "{d}/cfg_list"],
                                "config.json must hold a JSON object of model fields, got list"),
    "init-from hidden_size a string": ([*TRAIN, "--init-from", "{d}/cfg_str"],
                                       "config.json hidden_size must be an integer, got '32'"),
    "init-from llama3 rope lacking a field": ([*TRAIN, "--init-from", "{d}/cfg_rope3"],
                                              "config.json rope llama3 scaling lacks 'high_freq_factor'"),
    "init-from rope_parameters a list": ([*TRAIN, "--init-from", "{d}/cfg_ropelist"],
                                         "config.json rope_parameters must be a JSON object"),
    "init-from rope_theta a string": ([*TRAIN, "--init-from", "{d}/cfg_theta"],
                                      "config.json rope_theta must be a number, got 'big'"),
    "init-from architectures a string": ([*TRAIN, "--init-from", "{d}/cfg_arch"],
                                         "config.json architectures must be a list such as"),
    "init-from index weight_map a list": ([*TRAIN, "--init-from", "{d}/idx_list"],
                                          "weight_map must map tensor names to shard file names"),
    "plan hf-config a model directory": (["plan", "--hf-config", "{d}/hf"],
                                         "--hf-config {d}/hf is a directory; give the config.json in it"),
    "train --config given an HF config.json": ([*TRAIN, "--config", "{d}/hf/config.json"],
                                               "this is a Hugging Face config.json, not a pyruntime config"),
    "plan hf-config a list": (["plan", "--hf-config", "{d}/cfg_list/config.json"],
                              "config.json must hold a JSON object of model fields"),
    # generate
    "generate temperature nan": (["generate", "--from", "{d}/hf", "--prompt", "x", "--temperature", "nan"],
                                 "a finite --temperature >= 0"),
    "generate temperature inf": (["generate", "--from", "{d}/hf", "--prompt", "x", "--temperature", "inf"],
                                 "a finite --temperature >= 0"),
    "generate seed beyond int64": (["generate", "--from", "{d}/hf", "--prompt", "x", "--seed", str(2**70)],
                                   "--seed must be in [0, 2**63 - 1]"),
    "generate tokenizer missing": (["generate", "--from", "{d}/hf", "--prompt", "x", "--tokenizer", "{d}/nowhere"],
                                   "no tokenizer at {d}/nowhere"),
    "generate tokenizer not JSON": (["generate", "--from", "{d}/hf", "--prompt", "x", "--tokenizer", "{d}/afile"],
                                    "{d}/afile is not a tokenizers file"),
    # tokenize
    "tokenize empty input": (["tokenize", "--tokenizer", "{d}/tok", "--input", "{d}/empty.jsonl", "--output",
                              "{d}/new/t.bin"], "input file {d}/empty.jsonl is empty"),
    "tokenize only blank lines": (["tokenize", "--tokenizer", "{d}/tok", "--input", "{d}/blank.jsonl", "--output",
                                   "{d}/new/t.bin", "--workers", "1"], "{d}/blank.jsonl: no documents"),
    "tokenize output a directory": (["tokenize", "--tokenizer", "{d}/tok", "--input", "{d}/text.jsonl", "--output",
                                     "{d}/adir"], "--output {d}/adir is a directory; give a file name"),
    "tokenize output under a file": (["tokenize", "--tokenizer", "{d}/tok", "--input", "{d}/text.jsonl",
                                      "--output", "{d}/afile/t.bin"], "is under {d}/afile, which is a file"),
    "tokenize output is the input": (["tokenize", "--tokenizer", "{d}/tok", "--input", "{d}/text.jsonl",
                                      "--output", "{d}/adir/../text.jsonl"], "is also an input"),
    "tokenize output is the tokenizer": (["tokenize", "--tokenizer", "{d}/tok", "--input", "{d}/text.jsonl",
                                          "--output", "{d}/tok/tokenizer.json"], "is also an input"),
    "tokenize save-tokenizer without train-bpe": (
        ["tokenize", "--tokenizer", "{d}/tok", "--input", "{d}/text.jsonl", "--output", "{d}/new/t.bin",
         "--save-tokenizer", "{d}/new/tok.json"], "--save-tokenizer goes with --train-bpe"),
    "tokenize save-tokenizer a directory": (
        ["tokenize", "--train-bpe", "300", "--input", "{d}/text.jsonl", "--output", "{d}/new/t.bin",
         "--save-tokenizer", "{d}/adir"], "--save-tokenizer {d}/adir is a directory"),
    "tokenize train-bpe beyond 2**32": (["tokenize", "--train-bpe", str(2**70), "--input", "{d}/text.jsonl",
                                         "--output", "{d}/new/t.bin"], "at most 4294967296 tokens"),
    # train: numbers past what the sampler or a float32 optimizer scalar can hold (a MemoryError and an
    # overflow traceback after the start), a config file named neither .json nor .toml
    "train global-batch huge": ([*TRAIN[:-4], "--global-batch", str(10**12), "--micro-batch", "1"],
                                "data.global_batch must be in [1, 16777216], got 1000000000000"),
    "train lr beyond float32": ([*TRAIN, "--lr", "1e300"], "optim.lr must be in (0, 3.4e+38], got 1e+300"),
    "train config named .yaml": ([*TRAIN, "--config", "{d}/run.yaml"],
                                 "as JSON (a config file is JSON, or TOML when named *.toml)"),
    "train export-hf into its own out": ([*TRAIN, "--out", "{d}/new/run", "--export-hf", "{d}/new/run"],
                                         "--export-hf {d}/new/run is the run's --out directory"),
    "train export-hf above its out": ([*TRAIN, "--out", "{d}/new/a/run", "--export-hf", "{d}/new/a"],
                                      "--export-hf {d}/new/a holds the run's --out directory"),
    "train export-hf into its checkpoints": ([*TRAIN, "--out", "{d}/new/r2", "--export-hf", "{d}/new/r2/checkpoints/hf"],
                                             "is inside the checkpoint directory"),
    "train text data with an init-from model": ([*TRAIN, "--init-from", "{d}/hf", "--data", "{d}/precious/notes.txt"],
                                                "not with the tokenizer of --init-from {d}/hf: tokenize it first"),
    "train export-hf over the init-from model": ([*TRAIN, "--init-from", "{d}/hf", "--export-hf", "{d}/hf"],
                                                 "--export-hf {d}/hf is the --init-from directory"),
    "plan calibrate profile a directory": (["plan", "--calibrate", "--profile", "{d}/adir"],
                                           "calibration profile (--profile) {d}/adir is a directory"),
    "train metrics over the user's file": ([*TRAIN, "--metrics", "{d}/text.jsonl"],
                                           "metrics file (--metrics) {d}/text.jsonl exists and is not a metrics file"),
    "train resume with steps below the checkpoint's": ([*TRAIN, "--resume", "{d}/ckpt/step_7"],
                                                      "--steps 1 is below step 7 of the checkpoint"),
    # a tokenizer directory whose tokenizer_config.json is broken (tracebacks in tokenize and generate)
    "tokenize tokenizer_config not JSON": (["tokenize", "--tokenizer", "{d}/tok_cfg_bad", "--input", "{d}/text.jsonl",
                                            "--output", "{d}/new/t.bin"], "tokenizer_config.json is not valid JSON"),
    "tokenize tokenizer_config a list": (["tokenize", "--tokenizer", "{d}/tok_cfg_list", "--input", "{d}/text.jsonl",
                                          "--output", "{d}/new/t.bin"], "tokenizer_config.json must hold a JSON object"),
    "tokenize eos_token a number": (["tokenize", "--tokenizer", "{d}/tok_eos_int", "--input", "{d}/text.jsonl",
                                     "--output", "{d}/new/t.bin"], "eos_token must be a string, got 5"),
    "tokenize chat template does not parse": (
        ["tokenize", "--tokenizer", "{d}/tok_jinja", "--input", "{d}/chat.jsonl", "--output", "{d}/new/t.bin",
         "--workers", "1"], "the tokenizer's chat template does not parse"),
    "generate tokenizer_config not JSON": (["generate", "--from", "{d}/hf", "--prompt", "x", "--tokenizer",
                                            "{d}/tok_cfg_bad"], "tokenizer_config.json is not valid JSON"),
    "schedule png a directory": (["schedule", "--pp", "2", "--microbatches", "4", "--png", "{d}/adir"],
                                 "schedule --png {d}/adir is a directory; give a file name"),
    # plan: NaN / inf figures, partial device figures named by their flags, a context the model lacks
    "plan bucket-mb nan": (["plan", "--bucket-mb", "nan"], "--bucket-mb must be a finite number > 0, got nan"),
    "plan tokens inf": (["plan", "--tokens", "inf"], "--tokens must be a finite number > 0, got inf"),
    # a search over 1e23 GPUs ran for ever; a plan of them printed absurd figures
    "plan gpus beyond a million": (["plan", "--search", "--gpus", str(10**23)],
                                   f"--gpus must be at most 1048576, got {10**23}"),
    # a pipeline of 16M micro-batches: its schedule took minutes and 9 GB before the first step or plan line
    "train pipeline of millions of micro-batches": (["train", "--preset", "tiny", "--pp", "2", "--global-batch",
                                                     str(2**24), "--micro-batch", "1"],
                                                    "2 x 16777216 x 1 = 33554432 exceeds 262144"),
    "plan pipeline of millions of micro-batches": (["plan", "--pp", "2", "--gpus", "2", "--global-batch", str(2**24),
                                                    "--micro-batch", "1"],
                                                   "2 x 16777216 x 1 = 33554432 exceeds 262144"),
    "plan global batch beyond train's": (["plan", "--global-batch", str(2**24 + 1)],
                                         "--global-batch must be at most 16777216, got 16777217"),
    "plan gpu-mem negative": (["plan", "--gpu-mem", "-1"], "--gpu-mem must be a finite number > 0, got -1.0"),
    "plan device figures incomplete": (["plan", "--gpu-mem", "80"], "(missing: --tflops, --intra-bw, --inter-bw)"),
    "plan seq-len beyond the model": (["plan", "--preset", "tiny", "--seq-len", "100000"],
                                      "--seq-len 100000 exceeds the model's max_seq_len 2048"),
    "plan calibrate with search": (["plan", "--calibrate", "--search", "--gpus", "2"],
                                   "--calibrate measures this machine"),
    # schedule: a size the simulator would take minutes (or overflow) on
    "schedule too large": (["schedule", "--pp", "2", "--microbatches", str(10**11)],
                           "pp x microbatches x virtual stages = 2 x 100000000000 x 1 = 200000000000 exceeds 262144"),
    "schedule too large to simulate": (["schedule", "--pp", "1000", "--microbatches", "1000"], "exceeds 262144"),
    # demo: checked once here, not by 8 ranks under torchrun
    "demo steps zero": (["demo", "--steps", "0", "--out", "{d}/new/demo"], "train.steps must be >= 1, got 0"),
    "demo out a file": (["demo", "--steps", "1", "--out", "{d}/afile"], "output directory (--out) {d}/afile is a file"),
}

# `bench SUITE` with a count it divides by or takes a median over, a preset it lacks, a model it cannot build
BENCH = {
    "flat repeat zero": (["flat", "--repeat", "0"], "bench flat: error: --repeat must be >= 1, got 0"),
    "flat preset unknown": (["flat", "--preset", "huge"], "argument --preset: invalid choice: 'huge'"),
    "overlap tp zero": (["overlap", "--tp", "0"], "bench overlap: error: --tp must be >= 1, got 0"),
    "tp tokens zero": (["tp", "--tokens", "0"], "bench tp: error: --tokens must be >= 1, got 0"),
    "initmem dim not divisible by the heads": (["initmem", "--dim", "3"], "model.dim 3 is not divisible by n_heads 16"),
    "hf heads do not divide dim": (["hf", "--heads", "3", "--part", "load"], "model.dim 2048 is not divisible by n_heads 3"),
    "hf shard-gb nan": (["hf", "--shard-gb", "nan"], "--shard-gb must be a finite number > 0, got nan"),
    "plan profile missing": (["plan", "--profile", "{d}/nowhere.json"], "calibration profile not found"),
    "zero worlds zero": (["zero", "--worlds", "2", "0"], "bench zero: error: --worlds must be >= 1, got 0"),
    "tpstep warmup negative": (["tpstep", "--warmup", "-1"], "--warmup must be >= 0, got -1"),
    "adam sizes beyond this machine's memory": (["adam", "--sizes", "1e15"], "needs about 24000000.0 GB"),
    "adam threads beyond 4 per core": (["adam", "--threads", "100000"], "--threads 100000: at most 4 x the"),
    "tpstep preset unknown": (["tpstep", "--preset", "huge"], "argument --preset: invalid choice: 'huge'"),
}

MODEL = ModelConfig(vocab_size=300, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48, max_seq_len=64)


def _config_variant(d, name: str, edit) -> None:
    raw = json.loads((d / "hf" / "config.json").read_text())
    raw = edit(raw)
    (d / name).mkdir()
    (d / name / "config.json").write_text(json.dumps(raw))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad_input_more")
    (d / "afile").write_text("not a directory")
    (d / "adir").mkdir()
    (d / "precious").mkdir()
    (d / "precious" / "notes.txt").write_text("the user's")
    (d / "run" / "checkpoints" / "step_1").mkdir(parents=True)
    (d / "run" / "metrics.jsonl").write_text("{}\n")
    torch.manual_seed(0)
    with torch.no_grad():
        model = Transformer(MODEL)
    write_hf_dir(dict(model.named_parameters()), MODEL, d / "hf")
    assert json.loads((d / "hf" / "config.json").read_text()) == json.loads(json.dumps(hf_config_from_model(MODEL)))
    train_bpe(iter(["the quick brown fox jumps over the lazy dog " * 20]), 280, d / "tok" / "tokenizer.json")
    (d / "text.jsonl").write_text("".join(json.dumps({"text": f"line {i}"}) + "\n" for i in range(5)))
    (d / "empty.jsonl").write_text("")
    (d / "blank.jsonl").write_text("\n  \n\n")
    (d / "run.yaml").write_text("train: {steps: 3}\n")
    (d / "chat.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                                            {"role": "assistant", "content": "yo"}]}) + "\n")
    for name, text in (("tok_cfg_bad", "{garbage"), ("tok_cfg_list", "[1]"), ("tok_eos_int", '{"eos_token": 5}'),
                       ("tok_jinja", json.dumps({"chat_template": "{% for m in messages %}{{ m.content }"}))):
        (d / name).mkdir()
        (d / name / "tokenizer.json").write_bytes((d / "tok" / "tokenizer.json").read_bytes())
        (d / name / "tokenizer_config.json").write_text(text)
    (d / "ckpt" / "step_7").mkdir(parents=True)  # a checkpoint's meta.json (preflight reads no tensor)
    meta = {"format": FORMAT, "version": VERSION, "step": 7, "model": dataclasses.asdict(PRESETS["tiny"]),
            "layout": {}, "checksums": {}}
    (d / "ckpt" / "step_7" / "meta.json").write_text(json.dumps(meta))
    _config_variant(d, "cfg_list", lambda raw: [raw])
    _config_variant(d, "cfg_str", lambda raw: {**raw, "hidden_size": "32"})
    _config_variant(d, "cfg_rope3", lambda raw: {**raw, "rope_scaling": {"rope_type": "llama3", "factor": 8.0,
                                                                          "low_freq_factor": 1.0}})
    _config_variant(d, "cfg_ropelist", lambda raw: {**raw, "rope_parameters": [1]})
    _config_variant(d, "cfg_theta", lambda raw: {**raw, "rope_theta": "big"})
    _config_variant(d, "cfg_arch", lambda raw: {**raw, "architectures": "LlamaForCausalLM"})
    _config_variant(d, "idx_list", lambda raw: raw)
    (d / "idx_list" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": ["model.safetensors"]}))
    return d


def _run(argv, files, capsys) -> str:
    capsys.readouterr()
    assert main([a.replace("{d}", str(files)) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pyruntime: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("case", [c for c in BAD if not c.startswith("demo")])
def test_bad_input_is_one_line_exit_2(case, files, no_process_group, tmp_path, monkeypatch, capsys):
    argv, expected = BAD[case]
    monkeypatch.chdir(tmp_path)  # train's default --out lands here
    err = _run(argv, files, capsys)
    assert expected.replace("{d}", str(files)) in err, err
    assert not no_process_group
    # nothing the user had is gone or overwritten, and no half-written output stays
    assert (files / "precious" / "notes.txt").read_text() == "the user's"
    assert (files / "run" / "checkpoints" / "step_1").is_dir() and (files / "run" / "metrics.jsonl").is_file()
    assert (files / "afile").read_text() == "not a directory" and not list((files / "adir").iterdir())
    assert (files / "text.jsonl").read_text().startswith('{"text": "line 0"}')
    assert (files / "tok" / "tokenizer.json").read_text().startswith("{")
    assert not (files / "new").exists() or not list((files / "new").iterdir())


@pytest.fixture
def no_launch(monkeypatch):
    """Fails the test if `demo` would start torchrun."""
    import subprocess

    calls = []
    monkeypatch.setattr(subprocess, "call", lambda *a, **k: calls.append(a) or 0)
    return calls


@pytest.mark.parametrize("case", [c for c in BAD if c.startswith("demo")])
def test_demo_checks_before_launching(case, files, no_launch, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    _run(BAD[case][0], files, capsys)
    assert not no_launch


@pytest.mark.parametrize("case", list(BENCH))
def test_bench_bad_options_are_one_line_exit_2(case, files, no_process_group, tmp_path, monkeypatch, capsys):
    argv, expected = BENCH[case]
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert main(["bench", *[a.replace("{d}", str(files)) for a in argv]]) == 2
    captured = capsys.readouterr()
    err = captured.err
    assert err.startswith(f"pyruntime bench {argv[0]}: error: ") and err.count("\n") == 1, err
    assert expected.replace("{d}", str(files)) in err and "Traceback" not in err, err
    assert not no_process_group and "ms" not in captured.out  # nothing was timed


# -- a full disk while writing (ENOSPC raised mid-write): one line naming the file and the cause,
# and no half-written output left behind ------------------------------------------------------
def _enospc(*_args, **_kwargs):
    import errno
    import os

    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_tokenize_on_a_full_disk_leaves_no_file(files, tmp_path, monkeypatch, capsys):
    from pyruntime.data.tokens import TokenWriter

    monkeypatch.setattr(TokenWriter, "write", _enospc)
    err = _run(["tokenize", "--tokenizer", "{d}/tok", "--input", "{d}/text.jsonl", "--output", str(tmp_path / "t.bin"),
                "--workers", "1"], files, capsys)
    assert f"cannot write the token file (--output) {tmp_path / 't.bin'}: no space left on device (ENOSPC)" in err
    assert not list(tmp_path.iterdir())  # neither the file nor its .tmp


def test_schedule_trace_on_a_full_disk_leaves_no_file(files, tmp_path, monkeypatch, capsys):
    import pyruntime.parallel.pipeline.timeline as timeline

    def half_then_full(events, path, name):
        with open(path, "w") as f:
            f.write('{"traceEvents": [')
        _enospc()

    monkeypatch.setattr(timeline, "write_chrome_trace", half_then_full)
    trace = tmp_path / "t.json"
    err = _run(["schedule", "--pp", "2", "--microbatches", "4", "--trace", str(trace)], files, capsys)
    assert f"schedule: cannot write {trace}: no space left on device (ENOSPC)" in err
    assert not trace.exists()
