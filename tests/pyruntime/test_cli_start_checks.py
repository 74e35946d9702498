"""What the CLI settles before any work: the demo's printed command pastes back and parses, the
micro-batch default fits the layout, and the pictures' optional dependency (matplotlib, the
"plots" extra) and output directory are checked at the start, in one line, exit 2."""
import shlex
import subprocess
import sys

import pytest
from torch.distributed.run import get_args_parser

from pyruntime.cli import build_parser, check_outputs, config_from_args, main
from pyruntime.config import ConfigError


def parse(*argv, world_size=1):
    return config_from_args(build_parser().parse_args(["train", *argv]), world_size)


@pytest.fixture
def no_matplotlib(monkeypatch):
    """As if matplotlib were not installed: find_spec answers None, an import raises."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)


def test_demo_prints_a_command_that_pastes_back_and_parses(monkeypatch, capsys, tmp_path):
    ran = []
    monkeypatch.setattr(subprocess, "call", lambda cmd, env=None: ran.append(cmd) or 0)  # run_demo's launch
    out = str(tmp_path / "a dir with spaces")
    assert main(["demo", "--steps", "3", "--out", out]) == 0
    line = capsys.readouterr().out.strip().splitlines()[0]
    assert line.startswith("demo: ")
    words = shlex.split(line[len("demo: "):])
    assert words[0] == "OMP_NUM_THREADS=1" and words[1:] == ran[0]  # exactly what was run
    assert words[2:4] == ["-m", "torch.distributed.run"] and "" not in words
    launcher = get_args_parser().parse_args(words[4:])  # torchrun's own parser takes it
    assert launcher.module and launcher.training_script == "pyruntime"
    train = build_parser().parse_args(launcher.training_script_args)
    assert (train.command, train.steps, train.out, train.timeline) == ("train", 3, out, out)
    cfg = config_from_args(train, world_size=int(launcher.nproc_per_node))
    assert (cfg.parallel.dp, cfg.parallel.pp, cfg.parallel.tp) == (2, 2, 2)


@pytest.mark.parametrize("argv, world, micro_batch", [
    (["--dp", "4", "--global-batch", "16"], 4, 4),      # was: 16 does not divide into dp 4 x 8
    (["--global-batch", "24"], 2, 6),                   # 12 per rank: the largest divisor up to 8
    (["--global-batch", "64"], 2, 8),                   # never above 8
    (["--global-batch", "16"], 1, 8),                   # the old default where it fitted
    (["--dp", "4", "--global-batch", "16", "--micro-batch", "2"], 4, 2),  # a given one is kept
    (["--global-batch", "16", "--microbatches", "4"], 2, 2),
])
def test_micro_batch_default_fits_the_dp_share(argv, world, micro_batch):
    assert parse(*argv, world_size=world).data.micro_batch == micro_batch


def test_micro_batch_from_a_config_file_is_kept(tmp_path):
    path = tmp_path / "run.json"
    path.write_text('{"data": {"global_batch": 16, "micro_batch": 2}}')
    assert parse("--config", str(path), "--dp", "2", world_size=2).data.micro_batch == 2


def test_schedule_png_without_matplotlib_is_one_line_before_any_work(no_matplotlib, capsys, tmp_path):
    png = tmp_path / "s.png"
    assert main(["schedule", "--pp", "2", "--microbatches", "4", "--png", str(png)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "schedule --png needs matplotlib" in err and "pyruntime[plots]" in err
    assert not png.exists()


def test_timeline_is_checked_before_training(no_matplotlib, tmp_path):
    with pytest.raises(ConfigError, match=r"--timeline needs matplotlib, which is not installed"):
        check_outputs(parse("--pp", "2", "--timeline", str(tmp_path / "tl"), world_size=2), quiet=True)
    with pytest.raises(ConfigError, match=r"--timeline draws the measured pipeline schedule: it needs --pp >= 2"):
        check_outputs(parse("--timeline", str(tmp_path / "tl")), quiet=True)


def test_timeline_directory_that_cannot_be_made_is_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match=r"timeline directory \(--timeline\) .*file/tl is under .*file, which is "
                                          r"a file; give a directory"):
        check_outputs(parse("--pp", "2", "--timeline", str(blocker / "tl"), world_size=2), quiet=True)
    check_outputs(parse("--pp", "2", "--timeline", str(tmp_path / "ok"), world_size=2), quiet=True)
    assert (tmp_path / "ok").is_dir()


def test_train_without_matplotlib_says_so_at_the_start_and_trains(no_matplotlib, capsys, tmp_path):
    code = main(["train", "--preset", "tiny", "--steps", "1", "--global-batch", "2", "--seq-len", "16",
                 "--eval-every", "0", "--out", str(tmp_path)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    notice = f"pyruntime: matplotlib is not installed, so {tmp_path / 'loss.png'} will not be written"
    assert captured.err.startswith(notice)  # the first thing said, not discovered after training
    assert (tmp_path / "metrics.jsonl").exists() and not (tmp_path / "loss.png").exists()
