"""examples/slurm.sbatch: its srun line is a torchrun command torchrun's own parser takes, and
the train command inside it parses with `train`'s parser and gives a valid layout for the node
count the file asks for (8 GPUs per node), and for twice that."""
import re
import shlex
import string
from pathlib import Path

import pytest
from torch.distributed.run import get_args_parser

from pyruntime.cli import build_parser, config_from_args
from pyruntime.parallel.validate import validate

SBATCH = Path(__file__).resolve().parents[1] / "examples" / "slurm.sbatch"


def srun_command(env: dict[str, str]) -> list[str]:
    text = SBATCH.read_text().replace("\\\n", " ")  # join the continued lines
    [line] = [ln for ln in text.splitlines() if ln.startswith("srun ")]
    return shlex.split(string.Template(line).substitute(env))


def sbatch_nodes() -> int:
    return int(re.search(r"^#SBATCH --nodes=(\d+)$", SBATCH.read_text(), re.M).group(1))


@pytest.mark.parametrize("factor", [1, 2])
def test_slurm_example_launches_a_valid_train_command(factor):
    nodes = factor * sbatch_nodes()
    words = srun_command({"SLURM_NNODES": str(nodes), "GPUS_PER_NODE": "8", "HEAD_NODE": "node0",
                          "SLURM_JOB_ID": "4242"})
    assert words[:2] == ["srun", "torchrun"]
    launcher = get_args_parser().parse_args(words[2:])
    assert (launcher.nnodes, launcher.nproc_per_node) == (str(nodes), "8")
    assert (launcher.rdzv_backend, launcher.rdzv_endpoint, launcher.rdzv_id) == ("c10d", "node0:29500", "4242")
    assert launcher.module and launcher.training_script == "pyruntime"
    args = build_parser().parse_args(launcher.training_script_args)
    assert args.command == "train" and args.out == "runs/4242"
    cfg = config_from_args(args, world_size=nodes * 8)  # flags, ranges, layout vs world
    validate(cfg)  # what tp / pp need of the model and the batch
    assert (cfg.parallel.dp, cfg.parallel.pp, cfg.parallel.tp) == (nodes // 2, 2, 8)
    assert cfg.parallel.sequence_parallel and cfg.parallel.mesh_order.replace(" ", "").endswith("tp")
