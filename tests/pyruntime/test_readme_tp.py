"""README.md, "Use the fused tensor-parallel layers in your own model": the code block is taken
from the README itself (so the documentation cannot drift from the code) and run as the README
says, `torchrun --nproc-per-node 2`, on gloo. The block asserts its own loss and gradients
against the unsharded nn.Embedding / nn.Linear model; the lines appended here also check the
padded vocabulary shards (embedding, LM head) and the biases, then print one line per rank."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pyruntime.parallel.tensor import scatter_sequence

README = Path(__file__).resolve().parents[2] / "README.md"
SECTION = "## Use the fused tensor-parallel layers in your own model"
LAST_LINE = "dist.destroy_process_group()"

EXTRA_CHECKS = '''
from pyruntime.parallel.tensor.layers import shard_rows
assert t_emb.weight.shape[0] * n > vocab and t_head.weight.shape[0] * n > vocab  # padded: 1001 on 2 ranks
torch.testing.assert_close(t_emb.weight.grad, shard_rows(emb.weight.grad, tp, pad=True))
torch.testing.assert_close(t_head.weight.grad, shard_rows(head.weight.grad, tp, pad=True))
torch.testing.assert_close(t_up.bias.grad, up.bias.grad.chunk(n)[r])
torch.testing.assert_close(t_down.bias.grad, down.bias.grad)
print(f"README tp example: rank {r} of {n} matches the unsharded model", flush=True)
'''


def readme_block() -> str:
    text = README.read_text()
    assert SECTION in text, f"README.md has no section '{SECTION}'"
    block = re.search(r"```python\n(.*?)```", text.split(SECTION, 1)[1], re.S)
    assert block, "the README's tp section has no python code block"
    return block.group(1)


def test_readme_tensor_parallel_example_runs_under_torchrun_on_two_ranks(tmp_path):
    code = readme_block()
    assert code.rstrip().endswith(LAST_LINE)
    # The extra checks need the process group: they go in before the block's last line.
    script = tmp_path / "tp_example.py"
    script.write_text(code.rstrip()[: -len(LAST_LINE)] + EXTRA_CHECKS + LAST_LINE + "\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    for rank in (0, 1):
        assert f"rank {rank} of 2 matches the unsharded model" in proc.stdout, proc.stdout


def test_scatter_sequence_names_a_length_that_does_not_divide():
    class TwoRanks:  # a stand-in group: only size() is read before the check refuses
        def size(self):
            return 2

    with pytest.raises(ValueError, match=r"scatter_sequence: the sequence \(dim 1 of shape \(2, 15, 4\)\) must "
                                         r"divide by tp 2"):
        scatter_sequence(torch.zeros(2, 15, 4), TwoRanks())
