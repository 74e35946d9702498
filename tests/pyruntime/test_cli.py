"""CLI: flags and config files fill the config (bad input: test_bad_input.py)."""
import json

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


def test_train_command_runs_single_process(tmp_path, capsys):
    metrics = tmp_path / "m.jsonl"
    code = main(["train", "--preset", "tiny", "--steps", "2", "--global-batch", "2", "--micro-batch", "1",
                 "--seq-len", "16", "--out", str(tmp_path), "--metrics", str(metrics), "--eval-every", "0"])
    assert code == 0
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == [1, 2]
    assert "step 2/2" in capsys.readouterr().out


def test_resume_of_a_finished_run_says_nothing_is_left(tmp_path, capsys):
    """A run relaunched as it was (a requeued job) after its last step: exit 0, no step trained,
    and one line saying so (it was silent), naming how to train on."""
    argv = ["train", "--preset", "tiny", "--steps", "2", "--global-batch", "2", "--micro-batch", "1",
            "--seq-len", "16", "--out", str(tmp_path), "--eval-every", "0", "--save-every", "2"]
    assert main(argv) == 0
    assert main([*argv, "--resume", "auto"]) == 0
    out = capsys.readouterr().out
    assert "at step 2: all 2 steps already done, nothing to train (give --steps > 2 to continue)" in out
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_quiet_prints_nothing_and_still_writes_the_metrics(tmp_path, capsys):
    assert main(["train", "--preset", "tiny", "--steps", "2", "--global-batch", "2", "--micro-batch", "1",
                 "--seq-len", "16", "--out", str(tmp_path), "--eval-every", "0", "--quiet"]) == 0
    assert capsys.readouterr().out == ""
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert not (tmp_path / "loss.png").exists()


def test_train_flag_help_is_the_config_docstring():
    """Each setting is explained once, in config.py: the flag's help is the field's docstring
    (an edit there shows up in --help), every flag has one."""
    from pyruntime.cli import TRAIN_FLAGS, build_parser
    from pyruntime.config import SECTIONS
    from pyruntime.schema import field_docs

    train = build_parser()._subparsers._group_actions[0].choices["train"]
    helps = {opt: a.help for a in train._actions for opt in a.option_strings}
    for flag, (section, name) in TRAIN_FLAGS.items():
        doc = field_docs(SECTIONS[section])[name]
        assert doc and helps[flag].startswith(doc.replace("%", "%%")), flag
