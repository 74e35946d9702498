"""generate: the KV-cache forward equals the full forward; greedy generation from a Hugging
Face directory equals transformers' greedy generate; top-p keeps the nucleus; the command
runs on a checkpoint-free HF directory with its tokenizer."""
import torch
import transformers

from pyruntime.cli import main
from pyruntime.data.tokenize import train_bpe
from pyruntime.generate import KVCache, forward_cached, generate, load_model, sample_next
from tests.pyruntime.hf.hf_models import save_hf


def test_cached_forward_equals_the_full_forward(tmp_path):
    save_hf("mistral_sliding_window", tmp_path)  # window 5 < the 12 positions
    model, _ = load_model(tmp_path)
    x = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(x)
    cache = KVCache(len(model.layers))
    pieces = [forward_cached(model, x[:, :7], cache)] + [forward_cached(model, x[:, t:t + 1], cache) for t in range(7, 12)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-5, atol=1e-5)


def test_greedy_generation_matches_transformers(tmp_path):
    save_hf("llama31_rope_scaling", tmp_path)
    ours, _ = load_model(tmp_path)
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    prompt = [5, 17, 3, 42, 8]
    want = ref.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False, eos_token_id=None,
                        pad_token_id=0)[0, len(prompt):].tolist()
    assert generate(ours, prompt, 20) == want


def test_top_p_samples_only_the_nucleus():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    gen = torch.Generator().manual_seed(0)
    draws = {sample_next(logits, 1.0, 0.7, gen) for _ in range(200)}
    assert draws == {0, 1}  # 0.5 < 0.7: token 1 completes the nucleus; 2 and 3 never


def test_generate_command_on_an_hf_directory(tmp_path, capsys):
    save_hf("qwen2_bias_tied", tmp_path, vocab_size=300)
    train_bpe(iter(["hello world " * 50]), 300, tmp_path / "tokenizer.json")
    assert main(["generate", "--from", str(tmp_path), "--prompt", "hello", "--max-new-tokens", "5",
                 "--temperature", "0.8", "--top-p", "0.9"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("hello") and len(out.strip()) > len("hello")
    assert main(["generate", "--from", str(tmp_path), "--prompt", "x", "--top-p", "0"]) == 2


def test_generation_cut_by_the_context_says_so(tmp_path, capsys):
    """More new tokens than the context holds: the text stops there and stderr says why (it was
    silent); stdout stays the text alone."""
    save_hf("qwen2_bias_tied", tmp_path, vocab_size=300, max_position_embeddings=12)
    train_bpe(iter(["hello world " * 50]), 300, tmp_path / "tokenizer.json")
    assert main(["generate", "--from", str(tmp_path), "--prompt", "hello", "--max-new-tokens", "50"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("hello") and "stopped after" in err and "at the model's context of 12" in err, err


def test_chat_prompt_is_rendered_as_instruction_data_is_for_training(tmp_path, capsys, monkeypatch):
    """--chat: the prompt the model gets is token for token the uncounted part of the
    {"prompt", "response"} record `tokenize` writes for training (the chat template's user turn
    and assistant cue), and only the reply is printed."""
    import json

    import numpy as np

    import pyruntime.generate as gen_module
    from pyruntime.data.tokenize import load_tokenizer, tokenize_files

    chatml = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
              "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    save_hf("qwen2_bias_tied", tmp_path, vocab_size=300)
    train_bpe(iter(["user assistant what is two plus two " * 50]), 300, tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": chatml}))
    (tmp_path / "sft.jsonl").write_text(json.dumps({"prompt": "what is two plus two?", "response": "four"}) + "\n")
    tok = load_tokenizer(tmp_path)
    tokenize_files([str(tmp_path / "sft.jsonl")], tmp_path / "sft.bin", tok)
    from pyruntime.data.tokens import read_tokens

    ids, mask, _ = read_tokens(tmp_path / "sft.bin")
    trained_prompt = np.asarray(ids)[:int(np.argmax(np.asarray(mask)))].tolist()  # before the first counted token

    seen, real = {}, gen_module.generate

    def recording(model, prompt, *args, **kwargs):
        seen["p"] = prompt
        return real(model, prompt, *args, **kwargs)

    monkeypatch.setattr(gen_module, "generate", recording)
    assert main(["generate", "--from", str(tmp_path), "--chat", "--prompt", "what is two plus two?",
                 "--max-new-tokens", "4"]) == 0
    assert seen["p"] == trained_prompt
    out = capsys.readouterr().out
    assert "<|im_start|>" not in out and "what is two plus two" not in out


def test_chat_without_a_chat_template_is_one_line(tmp_path, capsys):
    save_hf("qwen2_bias_tied", tmp_path, vocab_size=300)
    train_bpe(iter(["hello world " * 50]), 300, tmp_path / "tokenizer.json")
    capsys.readouterr()  # transformers' saving progress
    assert main(["generate", "--from", str(tmp_path), "--chat", "--prompt", "hi"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--chat needs a tokenizer with a chat template" in err[0], err
