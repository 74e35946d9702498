"""`python -m pyruntime generate`: what a (fine-tuned) model writes, in one process, with a KV
cache.

    generate --from runs/x/checkpoints --prompt "def main(" --max-new-tokens 64
    generate --from out/hf --prompt "Question: 2+2?" --temperature 0.7 --top-p 0.9
    generate --from out/hf --chat --prompt "What is 2 + 2?"   # a user turn, as instruction data is rendered

--from is a training checkpoint (a step_N dir, or a checkpoints/ folder: its latest) or a
Hugging Face model directory. The tokenizer is --tokenizer, else the directory's
tokenizer.json, else the byte tokenizer (the embedded corpus's) when the vocabulary is
bytes. The prompt runs once through the model (prefill) and each new token then runs alone
against the cached keys and values of every layer (rotary positions continue from the
cache; a sliding window sees only its last keys), so a step costs one token's work, not
the whole sequence's.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

from pyruntime.config import ConfigError
from pyruntime.model.llama import Transformer, apply_rotary, attend, model_rotary


class KVCache:
    """Per layer, the rotated keys and the values of every position so far: (B, Hkv, T, hd)."""

    def __init__(self, n_layers: int):
        self.k: list[torch.Tensor | None] = [None] * n_layers
        self.v: list[torch.Tensor | None] = [None] * n_layers

    @property
    def length(self) -> int:
        return 0 if self.k[0] is None else self.k[0].shape[2]

    def append(self, i: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.k[i] = k if self.k[i] is None else torch.cat([self.k[i], k], dim=2)
        self.v[i] = v if self.v[i] is None else torch.cat([self.v[i], v], dim=2)
        return self.k[i], self.v[i]


@torch.no_grad()
def forward_cached(model: Transformer, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """Logits (B, T, V) of `tokens` (B, T), the positions after the cache's; extends the cache.
    The same math as Transformer.forward (model/llama.py), split at the attention so the keys
    and values of earlier positions are reused."""
    start = cache.length
    h = model.embed_tokens(tokens)  # (B, T, C)
    B, T, _ = h.shape
    cos, sin = model_rotary(model.cfg, T, h.device, h.dtype, start=start)
    for i, block in enumerate(model.layers.values()):
        attn = block.self_attn
        x = block.input_layernorm(h)
        q = attn.q_proj(x).view(B, T, -1, attn.head_dim).transpose(1, 2)  # (B, Hq, T, hd)
        k = attn.k_proj(x).view(B, T, -1, attn.head_dim).transpose(1, 2)
        v = attn.v_proj(x).view(B, T, -1, attn.head_dim).transpose(1, 2)
        k_all, v_all = cache.append(i, apply_rotary(k, cos, sin), v)
        h = h + attn.o_proj(attend(apply_rotary(q, cos, sin), k_all, v_all, attn.window))
        h = h + block.mlp(block.post_attention_layernorm(h))
    return model.lm_head(model.norm(h))


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> int:
    """Greedy at temperature 0; otherwise a draw from the smallest set of tokens whose
    probability reaches top_p (nucleus sampling), at that temperature."""
    if temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    sorted_p, order = probs.sort(descending=True)
    keep = sorted_p.cumsum(0) - sorted_p < top_p  # the token that crosses top_p stays
    sorted_p = sorted_p * keep
    return int(order[torch.multinomial(sorted_p / sorted_p.sum(), 1, generator=generator)])


def generate(model: Transformer, prompt: list[int], max_new_tokens: int, *, temperature: float = 0.0,
             top_p: float = 1.0, eos_id: int | None = None, seed: int = 0) -> list[int]:
    """New token ids after `prompt` (stops after eos_id, or at max_new_tokens)."""
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    cache = KVCache(len(model.layers))
    logits = forward_cached(model, torch.tensor([prompt]), cache)[0, -1]
    out: list[int] = []
    for _ in range(max_new_tokens):
        nxt = sample_next(logits, temperature, top_p, gen)
        out.append(nxt)
        if nxt == eos_id or cache.length >= model.cfg.max_seq_len:
            break
        logits = forward_cached(model, torch.tensor([[nxt]]), cache)[0, -1]
    return out


def load_model(source: str | Path) -> tuple[Transformer, Path | None]:
    """(model with its weights, the Hugging Face directory if source is one)."""
    from pyruntime.hf.load import HFDir, HFInit

    source = Path(source)
    if (source / "config.json").is_file():
        hf = HFDir.open(source, kernels="reference")
        with torch.device("meta"):
            model = Transformer(hf.model)
        HFInit(model, hf, None, torch.device("cpu")).materialize([model])
        return model, source
    from pyruntime.hf.export import read_checkpoint_weights

    cfg, tensors = read_checkpoint_weights(source)
    model = Transformer(cfg)
    model.load_state_dict(tensors, strict=True)
    return model, None


class _Bytes:
    """The byte tokenizer (data/tokenizer.py) behind the TextTokenizer interface."""

    eos_id = None

    def encode_batch(self, texts):
        from pyruntime.data.tokenizer import encode
        return [encode(t).tolist() for t in texts]

    def decode(self, ids):
        from pyruntime.data.tokenizer import decode
        return decode([i for i in ids if i < 256])


def pick_tokenizer(explicit: str | None, hf_dir: Path | None, vocab_size: int):
    from pyruntime.data.tokenize import load_tokenizer

    if explicit:
        tok = load_tokenizer(explicit)
    elif hf_dir is not None and (hf_dir / "tokenizer.json").is_file():
        tok = load_tokenizer(hf_dir)
    elif vocab_size <= 260:  # the byte vocabulary (256, padded by the tests' 259)
        return _Bytes()
    else:
        raise ConfigError(f"the model has a vocabulary of {vocab_size} and no tokenizer.json; pass --tokenizer")
    if tok.vocab_size > vocab_size:
        raise ConfigError(f"the tokenizer has {tok.vocab_size} tokens, more than the model's vocabulary of {vocab_size}")
    return tok


def add_generate_parser(sub) -> None:
    p = sub.add_parser("generate", help="sample text from a checkpoint or a Hugging Face directory (KV cache)")
    p.add_argument("--from", dest="source", required=True, metavar="CHECKPOINT_OR_HF_DIR",
                   help="a checkpoint (step_N or a run's checkpoints/, its latest) or a Hugging Face model directory")
    p.add_argument("--prompt", required=True, help="the text to continue")
    p.add_argument("--max-new-tokens", type=int, default=64,
                   help="tokens to add at most (default 64; fewer at EOS or the model's context length)")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass, in (0, 1]")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (with --temperature > 0)")
    p.add_argument("--tokenizer", help="tokenizer.json or a directory holding it")
    p.add_argument("--chat", action="store_true",
                   help="send --prompt as a user turn through the tokenizer's chat template, as `tokenize` "
                        "renders instruction data, and print only the reply")


def run_generate(args: argparse.Namespace) -> int:
    if args.max_new_tokens < 1 or not 0 <= args.temperature < math.inf or not 0 < args.top_p <= 1:
        raise ConfigError(f"generate needs --max-new-tokens >= 1, a finite --temperature >= 0 and --top-p in (0, 1]; "
                          f"got {args.max_new_tokens}, {args.temperature}, {args.top_p}")
    if not 0 <= args.seed < 2**63:  # torch.Generator's range
        raise ConfigError(f"--seed must be in [0, 2**63 - 1], got {args.seed}")
    model, hf_dir = load_model(args.source)
    tok = pick_tokenizer(args.tokenizer, hf_dir, model.cfg.vocab_size)
    if args.chat:  # the template writes its own BOS where the model expects one
        from pyruntime.data.tokenize import chat_prompt

        if getattr(tok, "chat_template", None) is None:  # then instruction data trains as prompt + response
            raise ConfigError("--chat needs a tokenizer with a chat template (tokenizer_config.json's chat_template); "
                              "without one, instruction records train as the bare prompt + response: drop --chat")
        prompt = tok.encode_batch([chat_prompt(tok, args.prompt)])[0]
    else:
        prompt = tok.encode_batch([args.prompt])[0]
        bos = getattr(tok, "bos", None)
        if bos and tok.tok.token_to_id(bos) is not None:  # as the model was trained (Llama: <|begin_of_text|>)
            prompt = [tok.tok.token_to_id(bos)] + prompt
    if not prompt:
        raise ConfigError("--prompt encodes to no tokens")
    if len(prompt) >= model.cfg.max_seq_len:
        raise ConfigError(f"--prompt is {len(prompt)} tokens; the model's context is {model.cfg.max_seq_len}")
    new = generate(model, prompt, args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                   eos_id=tok.eos_id, seed=args.seed)
    ended = bool(new) and new[-1] == tok.eos_id
    if ended:  # the model's end of the reply, not text
        new = new[:-1]
    elif len(new) < args.max_new_tokens:  # on stderr: stdout stays the text alone
        print(f"generate: stopped after {len(new)} new token(s) at the model's context of {model.cfg.max_seq_len} "
              f"(prompt {len(prompt)})", file=sys.stderr, flush=True)
    print((tok.decode(new) if args.chat else args.prompt + tok.decode(new)), flush=True)
    return 0
