"""Hugging Face directories in and out, one process: config.json + (sharded) safetensors ->
the reference model computing transformers' logits; export -> from_pretrained with no missing
or unexpected keys and the same logits; import -> export bit-exact; bad input in one line."""
import json
import shutil

import pytest
import torch

import transformers  # noqa: E402

from pyruntime.hf.config import HFError  # noqa: E402
from pyruntime.hf.export import plan_shards, write_hf_dir  # noqa: E402
from pyruntime.hf.load import HFDir, HFInit  # noqa: E402
from pyruntime.model import Transformer  # noqa: E402
from tests.pyruntime.hf.hf_models import BASE, save_hf  # noqa: E402

TOKENS = torch.randint(0, BASE["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(1))


def load_ours(path) -> tuple[Transformer, HFInit]:
    hf = HFDir.open(path, kernels="reference")
    with torch.device("meta"):
        model = Transformer(hf.model)
    init = HFInit(model, hf, None, torch.device("cpu"))
    init.materialize([model])
    return model.eval(), init


def rel_err(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("name,shard_kb,dtype", [("llama31_rope_scaling", 20, torch.float32),
                                                 ("qwen2_bias_tied", 10, torch.bfloat16),
                                                 ("mistral_sliding_window", None, torch.float16)])
def test_directory_loads_as_transformers_computes(tmp_path, name, shard_kb, dtype):
    save_hf(name, tmp_path, shard_kb=shard_kb, dtype=dtype)
    if shard_kb:
        assert len(list(tmp_path.glob("model-*.safetensors"))) >= 3
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ours, init = load_ours(tmp_path)
    # every tensor read once, in the file's dtype (a tied model's table once)
    assert init.reader.bytes_read == sum(p.numel() for p in ours.parameters()) * dtype.itemsize
    with torch.no_grad():
        assert rel_err(ours(TOKENS), ref(TOKENS).logits) < 1e-4


@pytest.mark.parametrize("name", ["llama_gqa", "qwen2_bias_tied", "llama_head_dim"])
def test_export_loads_in_transformers_with_the_same_logits(tmp_path, name):
    save_hf(name, tmp_path / "in")
    ours, _ = load_ours(tmp_path / "in")
    with torch.no_grad():  # move the weights away from the source's, as training would
        for p in ours.parameters():
            p.add_(0.01 * torch.randn_like(p))
    out = write_hf_dir(dict(ours.named_parameters()), ours.cfg, tmp_path / "out", max_shard_bytes=30_000)
    assert (out / "model.safetensors.index.json").is_file()
    back, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    with torch.no_grad():
        assert rel_err(ours(TOKENS), back.eval()(TOKENS).logits) < 1e-5


def test_import_then_export_is_bit_exact(tmp_path):
    from safetensors.torch import load_file

    save_hf("qwen2_bias_tied", tmp_path / "in", dtype=torch.bfloat16)
    ours, _ = load_ours(tmp_path / "in")
    out = write_hf_dir(dict(ours.named_parameters()), ours.cfg, tmp_path / "out", dtype="bfloat16",
                       companions_from=tmp_path / "in")
    a, b = load_file(tmp_path / "in" / "model.safetensors"), load_file(out / "model.safetensors")
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype == torch.bfloat16 and torch.equal(a[k], b[k]), k
    assert (out / "generation_config.json").is_file()  # companions travel with the weights


def test_export_takes_a_lone_tokenizer_json(tmp_path):
    """--tokenizer-from a tokenizer.json file (tokenize --train-bpe writes one, not a model
    directory): it goes into the export as tokenizer.json, which transformers then loads."""
    from pyruntime.data.tokenize import train_bpe

    save_hf("llama_gqa", tmp_path / "in", vocab_size=300)
    ours, _ = load_ours(tmp_path / "in")
    bpe = train_bpe(iter(["the quick brown fox " * 40]), 270, tmp_path / "tok" / "my_bpe.json")
    out = write_hf_dir(dict(ours.named_parameters()), ours.cfg, tmp_path / "out",
                       companions_from=tmp_path / "tok" / "my_bpe.json")
    assert (out / "tokenizer.json").read_bytes() == (tmp_path / "tok" / "my_bpe.json").read_bytes()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(out / "tokenizer.json"))
    assert tok.decode(tok("the quick fox")["input_ids"]) == "the quick fox"
    # its EOS id goes into config.json, or transformers' generate would never stop
    assert json.loads((out / "config.json").read_text())["eos_token_id"] == bpe.eos_id
    assert transformers.AutoConfig.from_pretrained(out).eos_token_id == bpe.eos_id
    big = train_bpe(iter([" ".join(f"w{i}x{i * 7}" for i in range(400)) * 3]), 320, tmp_path / "big.json")
    assert big.vocab_size > 300
    with pytest.raises(HFError, match="has 3[0-9][0-9] tokens, more than the model's vocabulary of 300"):
        write_hf_dir(dict(ours.named_parameters()), ours.cfg, tmp_path / "out2", companions_from=tmp_path / "big.json")


def test_export_on_a_full_disk_is_one_line_and_leaves_nothing_half_written(tmp_path, monkeypatch):
    """safetensors reports a full disk as its own error ('... (os error 28)'), not an OSError:
    still one line naming the export and ENOSPC, and no partial directory stays behind; an
    earlier complete export at that path is kept."""
    import safetensors.torch

    save_hf("llama_gqa", tmp_path / "in")
    ours, _ = load_ours(tmp_path / "in")
    tensors = dict(ours.named_parameters())
    kept = write_hf_dir(tensors, ours.cfg, tmp_path / "out")

    def full_disk(*_args, **_kwargs):
        raise safetensors.SafetensorError("Error while serializing: IoError(No space left on device (os error 28))")

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    with pytest.raises(HFError) as err:
        write_hf_dir(tensors, ours.cfg, tmp_path / "out")
    assert str(err.value) == (f"cannot write the Hugging Face export {tmp_path / 'out'}: "
                              "no space left on device (ENOSPC)")
    assert not (tmp_path / "out.tmp").exists() and (kept / "model.safetensors").is_file()


def test_plan_shards_respects_the_limit():
    assert plan_shards({"a": 4, "b": 4, "c": 9, "d": 1}, 8) == [["a", "b"], ["c"], ["d"]]


def _edit_config(path, **changes):
    raw = json.loads((path / "config.json").read_text())
    raw.update(changes)
    (path / "config.json").write_text(json.dumps(raw))


def test_bad_directories_fail_in_one_line(tmp_path):
    src = tmp_path / "src"
    save_hf("llama_gqa", src, shard_kb=20)

    def broken(tag, edit):
        d = tmp_path / tag
        shutil.copytree(src, d)
        edit(d)
        with pytest.raises(HFError) as e:
            HFDir.open(d)
        assert "\n" not in str(e.value)
        return str(e.value)

    arch = broken("arch", lambda d: _edit_config(d, architectures=["GPT2LMHeadModel"]))
    assert arch.startswith(f"{tmp_path / 'arch' / 'config.json'} architectures ['GPT2LMHeadModel']"), arch
    assert "rope scaling type 'yarn'" in broken(
        "yarn", lambda d: _edit_config(d, rope_scaling={"rope_type": "yarn", "factor": 2.0}, rope_parameters=None))
    assert "field 'moe_experts'" in broken("field", lambda d: _edit_config(d, moe_experts=8))
    assert "hidden_act 'gelu'" in broken("act", lambda d: _edit_config(d, hidden_act="gelu"))
    assert "names shard model-00002-of" in broken("shard", lambda d: next(d.glob("model-00002-*")).unlink())
    assert "has shape (97, 32), the model needs (97, 30)" in broken("shape", lambda d: _edit_config(d, hidden_size=30, head_dim=8))

    def int_weight(d):  # a weight stored as integers: refused when the directory is opened
        from safetensors.torch import load_file, save_file

        shard = next(d.glob("model-00001-*"))
        tensors = load_file(shard)
        name = sorted(tensors)[0]
        tensors[name] = tensors[name].to(torch.int32)
        save_file(tensors, shard, metadata={"format": "pt"})
    assert "is I32, not a float dtype (F64, F32, F16, BF16" in broken("int", int_weight)


def test_init_from_conflicts_fail_in_one_line(tmp_path, capsys):
    from pyruntime.cli import main
    from pyruntime.data.tokens import write_tokens

    save_hf("llama_gqa", tmp_path / "m", vocab_size=259)
    (tmp_path / "run.json").write_text(json.dumps({"model": {"dim": 64}}))
    write_tokens(tmp_path / "big.bin", list(range(300)) * 10, 300)
    cases = [(["--preset", "small"], "--preset small and --init-from"),
             (["--config", str(tmp_path / "run.json")], "model.dim 64 conflicts with"),
             (["--data", str(tmp_path / "big.bin"), "--seq-len", "16"], "vocabulary of 300, larger than the model's 259")]
    for extra, message in cases:
        capsys.readouterr()
        assert main(["train", "--init-from", str(tmp_path / "m"), "--quiet", *extra]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err


def test_banner_names_the_hugging_face_directory_not_a_preset(tmp_path):
    import dataclasses
    from types import SimpleNamespace

    from pyruntime.config import Config
    from pyruntime.train.trainer import Trainer

    cfg = Config()
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, init_from=str(tmp_path / "llama")))
    me = SimpleNamespace(cfg=cfg, dims=SimpleNamespace(describe=lambda: "dp 1"), device=torch.device("cpu"),
                         corpus_name="corpus")
    line = Trainer.banner(me)
    assert line.startswith(f"pyruntime | model {tmp_path / 'llama'} (") and "preset" not in line


def test_export_of_a_fine_tune_defaults_to_its_init_from_and_never_replaces_it(tmp_path, capsys):
    """`export CHECKPOINT --hf DIR` of a run started --init-from MODEL: MODEL is refused as DIR
    (it replaced the original weights and deleted its tokenizer), and without --tokenizer-from
    MODEL's tokenizer files travel with the export (they were dropped)."""
    from pyruntime.cli import main
    from pyruntime.data.tokenize import train_bpe

    model = tmp_path / "model"
    save_hf("qwen2_bias_tied", model, vocab_size=300)
    train_bpe(iter(["hello world " * 50]), 300, model / "tokenizer.json")
    run = tmp_path / "run"
    assert main(["train", "--init-from", str(model), "--steps", "1", "--save-every", "1", "--seq-len", "16",
                 "--global-batch", "2", "--eval-every", "0", "--out", str(run)]) == 0
    assert "note: --lr 0.003 is the from-scratch default" in capsys.readouterr().out
    before = (model / "model.safetensors").read_bytes()
    assert main(["export", str(run / "checkpoints"), "--hf", str(model)]) == 2
    assert "is the model directory the run started from (--init-from)" in capsys.readouterr().err
    assert (model / "model.safetensors").read_bytes() == before
    assert main(["export", str(run / "checkpoints"), "--hf", str(tmp_path / "out")]) == 0
    assert "(tokenizer files from" in capsys.readouterr().out
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == (model / "tokenizer.json").read_bytes()
    assert transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out") is not None
