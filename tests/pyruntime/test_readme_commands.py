"""Every `train` command in README.md's shell blocks is a layout train accepts at its torchrun
world size (parsed and validated as train does before any process group, nothing run): a
README command that a new user copies must not end in a refusal. Commands that need files the
README has the user make first (--config, --init-from, --data) are run by their own tests."""
import re
import shlex
from pathlib import Path

import pytest

from pyruntime.cli import build_parser, config_from_args

README = Path(__file__).resolve().parents[2] / "README.md"
NEEDS_FILES = ("--config", "--init-from", "--data")


def _train_commands() -> list[str]:
    blocks = re.findall(r"```(?:bash|sh)\n(.*?)```", README.read_text(), flags=re.S)
    lines = "\n".join(blocks).replace("\\\n", " ").splitlines()
    return [line.split(" #")[0].strip() for line in lines if "-m pyruntime train" in line]


COMMANDS = _train_commands()


def test_the_readme_has_train_commands():
    assert len(COMMANDS) >= 8, COMMANDS


@pytest.mark.parametrize("command", [c for c in COMMANDS if not any(f in c.split() for f in NEEDS_FILES)])
def test_readme_train_command_is_accepted(command):
    words = shlex.split(command)
    world = 1
    for flag in ("--nnodes", "--nproc_per_node", "--nproc-per-node"):
        world *= int(words[words.index(flag) + 1]) if flag in words else 1
    argv = words[words.index("train"):]
    cfg = config_from_args(build_parser().parse_args(argv), world)
    assert cfg.parallel.dp * cfg.parallel.tp * cfg.parallel.pp == world
