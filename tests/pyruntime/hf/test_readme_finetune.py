"""Every command of README.md's "Fine-tune a Hugging Face model" block, run as written on a
tiny local model (MODEL: a saved Qwen2 directory with tied embeddings and a BPE tokenizer;
sft.jsonl: instruction records), with only the run's size shrunk (flags appended to train,
which override the README's). `torchrun` runs as a real 2-process launch; `python -m
pyruntime ...` and `python -c ...` run in this process (pyruntime.cli.main / exec, in the
same working directory), which saves an interpreter start-up each on CI's 2 cores."""
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from pyruntime.cli import main
from pyruntime.data.tokenize import train_bpe
from pyruntime.data.tokens import read_tokens
from tests.pyruntime.hf.hf_models import save_hf

README = Path(__file__).resolve().parents[3] / "README.md"
SHRINK = ["--seq-len", "16", "--global-batch", "8", "--steps", "2", "--save-every", "2", "--eval-every", "0",
          "--warmup", "1"]


def readme_commands() -> list[list[str]]:
    text = README.read_text()
    section = text.split("## Fine-tune a Hugging Face model", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [shlex.split(line) for line in block.replace("\\\n", " ").splitlines() if line.strip()]


def run(argv: list[str], model: Path, capsys) -> str:
    """One README command; returns its stdout."""
    argv = [str(model) if a == "MODEL" else a for a in argv]
    if argv[0] == "torchrun":
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(README.parent)}
        done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--log-dir", "", *argv[1:], *SHRINK],
                              env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"{shlex.join(argv)}\n{done.stderr[-3000:]}"
        return done.stdout
    capsys.readouterr()
    if argv[:3] == ["python", "-m", "pyruntime"]:
        assert main(argv[3:]) == 0, f"{shlex.join(argv)}\n{capsys.readouterr().err}"
    else:
        assert argv[:2] == ["python", "-c"], argv
        exec(argv[2], {})  # noqa: S102 - the README's own line
    return capsys.readouterr().out


def test_readme_finetune_commands_run(tmp_path, monkeypatch, capsys):
    model = tmp_path / "model"
    save_hf("qwen2_bias_tied", model, vocab_size=300)
    rows = [{"prompt": f"What is {i} + {i}?", "response": f" {2 * i}."} for i in range(200)]
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    train_bpe(iter([r["prompt"] + r["response"] for r in rows]), 300, model / "tokenizer.json")
    commands = readme_commands()
    assert [c[0] for c in commands] == ["python", "torchrun", "python", "python", "python"]
    monkeypatch.chdir(tmp_path)
    outputs = [run(argv, model, capsys) for argv in commands]
    ids, mask, vocab = read_tokens(tmp_path / "data/sft.bin")
    assert vocab == 300 and mask is not None and 0 < int(mask.sum()) < len(ids)
    hf, bf16 = tmp_path / "runs/sft/hf", tmp_path / "runs/sft/hf-bf16"
    a, b = load_file(hf / "model.safetensors"), load_file(bf16 / "model.safetensors")
    assert set(a) == set(b) and "lm_head.weight" not in a  # tied: the table once
    for k in a:  # the end-of-run export and the checkpoint's export hold the same weights
        assert b[k].dtype == torch.bfloat16 and torch.equal(a[k].to(torch.bfloat16), b[k]), k
    assert not torch.equal(a["model.embed_tokens.weight"], load_file(next(model.glob("*.safetensors")))
                           ["model.embed_tokens.weight"])  # it trained
    assert (bf16 / "tokenizer.json").is_file() and outputs[3].startswith("What is 2 + 2?")
