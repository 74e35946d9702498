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
