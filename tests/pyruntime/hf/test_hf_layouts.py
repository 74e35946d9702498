"""Training from a Hugging Face directory at tp 2 + sp, pp 2 (the tied embedding's copies on
the two stages), dp 2 ZeRO-2 and ZeRO-3 (tied: one parameter in one unit) and dp 2 ZeRO-3
reproduces single-process training from it (losses, gradient norms within 1e-5 relative),
whose first step's loss and gradient norm are transformers' on the same batch (1e-5); each
rank reads only its own slices of the files; every export loads in transformers with no
missing or unexpected keys and equals the single-process one."""
import dataclasses
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import transformers  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from pyruntime.config import ParallelConfig  # noqa: E402
from pyruntime.data import BatchSampler  # noqa: E402
from pyruntime.hf.load import HFDir  # noqa: E402
from pyruntime.train.trainer import open_corpus  # noqa: E402
from support.configs import tiny_config  # noqa: E402
from support.world import run_world, single_process  # noqa: E402
from tests.pyruntime.hf.hf_models import save_hf  # noqa: E402
from tests.pyruntime.hf.hf_world import run_hf  # noqa: E402

STEPS = 3
# 259 tokens: the byte corpus fits, and tp 2 pads the vocabulary
MODELS = {"qwen2_bias_tied": {"vocab_size": 259}, "mistral_sliding_window": {"vocab_size": 259},
          "llama31_rope_scaling": {"vocab_size": 259}}
LAYOUTS = [("qwen2_bias_tied", ParallelConfig(tp=2, sequence_parallel=True)),
           ("qwen2_bias_tied", ParallelConfig(pp=2)),
           ("qwen2_bias_tied", ParallelConfig(dp=2, zero=2)),
           ("qwen2_bias_tied", ParallelConfig(dp=2, zero=3)),
           ("llama31_rope_scaling", ParallelConfig(tp=2, sequence_parallel=True)),
           ("mistral_sliding_window", ParallelConfig(dp=2, zero=3))]


def config(tmp, name, par: ParallelConfig, tag: str):
    src = tmp / name
    cfg = tiny_config(tmp / tag, steps=STEPS, global_batch=8, micro_batch=4, seq_len=16,
                      init_from=str(src), export_hf=str(tmp / tag / "hf"))
    return dataclasses.replace(cfg, model=HFDir.open(src).model, parallel=par)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hf")
    for name, over in MODELS.items():
        save_hf(name, tmp / name, shard_kb=20, **over)
    cfgs = [config(tmp, name, par, f"{name}-{i}") for i, (name, par) in enumerate(LAYOUTS)]
    per_rank = run_world(2, run_hf, cfgs, name="hf layouts")
    refs = {name: single_process(config(tmp, name, ParallelConfig(), f"{name}-single")) for name in MODELS
            if any(n == name for n, _ in LAYOUTS)}
    return tmp, cfgs, per_rank, refs


def transformers_first_step(cfg):
    """transformers' loss and gradient norm on the run's first global batch."""
    model = transformers.AutoModelForCausalLM.from_pretrained(cfg.train.init_from, dtype=torch.float32)
    model.config._attn_implementation = "eager"
    x, y = BatchSampler(open_corpus(cfg).train, seq_len=cfg.data.seq_len, global_batch=cfg.data.global_batch,
                        seed=cfg.train.seed).global_batch_at(0)
    loss = F.cross_entropy(model(x).logits.flatten(0, 1), y.flatten())
    loss.backward()
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))
    return loss.item(), norm.item()


@pytest.mark.parametrize("i", range(len(LAYOUTS)), ids=[f"{n}-{p.dp}dp{p.pp}pp{p.tp}tp" for n, p in LAYOUTS])
def test_layout_reproduces_single_process_from_the_directory(world, i):
    tmp, cfgs, per_rank, refs = world
    name = LAYOUTS[i][0]
    ref = refs[name]
    for rank in range(2):
        records, _ = per_rank[rank][i]
        for key in ("loss", "grad_norm"):
            got, want = [r[key] for r in records], [r[key] for r in ref]
            torch.testing.assert_close(torch.tensor(got, dtype=torch.float64), torch.tensor(want, dtype=torch.float64),
                                       rtol=1e-5, atol=0)
    hf_loss, hf_norm = transformers_first_step(cfgs[i])
    assert abs(ref[0]["loss"] - hf_loss) < 1e-5 and abs(ref[0]["grad_norm"] - hf_norm) < 1e-5 * hf_norm


@pytest.mark.parametrize("i", range(len(LAYOUTS)), ids=[f"{n}-{p.dp}dp{p.pp}pp{p.tp}tp" for n, p in LAYOUTS])
def test_each_rank_reads_only_its_slices(world, i):
    _, cfgs, per_rank, _ = world
    par = cfgs[i].parallel
    for rank in range(2):
        report = per_rank[rank][i][1]
        assert 0 < report["bytes"] <= report["full_bytes"]
        if par.tp > 1 or par.pp > 1:  # dp ranks without ZeRO-3 hold, and read, whole parameters
            assert report["bytes"] < 0.75 * report["full_bytes"]
        if par.zero == 3:  # only the rows covering the pieces of its shard: about half of each tensor
            assert report["bytes"] == report["want_bytes"] and set(report["names"]) <= set(report["want_names"])
            assert report["bytes"] < 0.6 * report["full_bytes"]
        else:
            assert report["bytes"] == report["want_bytes"] and report["names"] == report["want_names"]
    if par.zero == 3:  # the two halves overlap by at most the rows split between the ranks
        both = sum(per_rank[r][i][1]["bytes"] for r in range(2))
        assert report["full_bytes"] <= both < 1.05 * report["full_bytes"]
    if par.pp == 2:  # the first stage never reads the last layer, the last never the first
        assert not any(".layers.1." in n for n in per_rank[0][i][1]["names"])
        assert not any(".layers.0." in n for n in per_rank[1][i][1]["names"])


@pytest.mark.parametrize("i", range(len(LAYOUTS)), ids=[f"{n}-{p.dp}dp{p.pp}pp{p.tp}tp" for n, p in LAYOUTS])
def test_exports_load_in_transformers_and_match_single_process(world, i):
    tmp, cfgs, _, _ = world
    name = LAYOUTS[i][0]
    out = cfgs[i].train.export_hf
    single = tmp / f"{name}-single" / "hf"
    _, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    load = lambda d: {k: v for f in sorted(d.glob("*.safetensors")) for k, v in load_file(f).items()}  # noqa: E731
    got, want = load(Path(out)), load(single)
    assert set(got) == set(want)
    for k in want:  # relative norm: Adam amplifies summation-order noise where a gradient is ~0
        assert ((got[k] - want[k]).norm() / want[k].norm()).item() < 1e-5, k

