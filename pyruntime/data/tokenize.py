"""`python -m pyruntime tokenize`: text, JSON lines and instruction data -> a token file (with
its loss mask) for `train --data`, through Hugging Face's `tokenizers` (Rust).

    tokenize --tokenizer Llama-3.2-1B --input chat.jsonl --output chat.bin
    tokenize --train-bpe 2048 --input notes.txt --output notes.bin     # trains tokenizer.json too

Inputs, by suffix: `.jsonl` holds one document per line, each either
    {"text": ...}                                  plain text (--text-field names the key),
    {"prompt": ..., "response": ...}               instruction data: only the response counts,
    {"messages": [{"role": ..., "content": ...}]}  a chat: only the assistant turns count;
any other file is one plain-text document. Instruction and chat records are rendered with
the tokenizer's chat template (tokenizer_config.json) where it has one, otherwise as
"role: content" lines. Each document ends with the EOS token. The loss mask (data/tokens.py)
is written only when some token does not count.

The response's tokens are exactly the ones that count: the rendered text is cut at the
boundaries of the template's own rendering of the conversation up to each assistant turn
(with and without the generation prompt), and each piece is encoded on its own, so no token
straddles a prompt/response boundary. Encoding runs in tokenizers' thread pool (encode_batch).
"""
from __future__ import annotations

import itertools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from pyruntime.data.tokens import TokenWriter

EOS_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<|im_end|>", "<eos>")
BPE_EOS = "<|endoftext|>"
CHUNK_DOCS = 4096  # documents encoded per encode_batch call

Segment = tuple[str, bool]  # (text, counts in the loss)


class TokenizeError(ValueError):
    """Bad tokenize input: one line naming the file (and line) and what is expected."""


@dataclass
class TextTokenizer:
    """A `tokenizers.Tokenizer` with what rendering needs: EOS, BOS, chat template."""

    tok: object
    eos: str
    bos: str | None = None
    chat_template: str | None = None

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    @property
    def eos_id(self) -> int:
        return self.tok.token_to_id(self.eos)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)


def _token_text(value) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


def load_tokenizer(path: str | os.PathLike) -> TextTokenizer:
    """tokenizer.json, or a model directory holding it (with tokenizer_config.json for the EOS
    and BOS tokens and the chat template)."""
    from tokenizers import Tokenizer

    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise TokenizeError(f"no tokenizer at {path}: expected tokenizer.json or a directory holding it")
    try:
        tok = Tokenizer.from_file(str(file))
    except Exception as e:  # noqa: BLE001 - the Rust error, as one line
        raise TokenizeError(f"{file} is not a tokenizers file ({' '.join(str(e).split())[:200]})") from None
    config = {}
    if (file.parent / "tokenizer_config.json").is_file():
        config = json.loads((file.parent / "tokenizer_config.json").read_text())
    eos = _token_text(config.get("eos_token")) or next((t for t in EOS_CANDIDATES if tok.token_to_id(t) is not None), None)
    if eos is None or tok.token_to_id(eos) is None:
        raise TokenizeError(f"{file}: no EOS token (looked for tokenizer_config.json's eos_token and {', '.join(EOS_CANDIDATES)})")
    return TextTokenizer(tok, eos, _token_text(config.get("bos_token")), config.get("chat_template"))


def train_bpe(texts: Iterator[str], vocab_size: int, save_to: str | os.PathLike) -> TextTokenizer:
    """A byte-level BPE of vocab_size tokens (256 bytes, EOS, merges) trained on texts;
    written to save_to (tokenizer.json). Any byte string round-trips."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 258:
        raise TokenizeError(f"--train-bpe {vocab_size}: a byte-level BPE needs at least 258 tokens (256 bytes, EOS, a merge)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BPE_EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    Path(save_to).parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(save_to))
    return TextTokenizer(tok, BPE_EOS)


# -- documents ---------------------------------------------------------------------------------
def render_chat(messages: list[dict], tokenizer: TextTokenizer, where: str) -> list[Segment]:
    """A chat as segments: the assistant turns count, everything else does not."""
    if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m and "content" in m
                                                 for m in messages):
        raise TokenizeError(f"{where}: 'messages' must be a list of {{\"role\", \"content\"}} objects")
    render = _template(tokenizer)
    segments, done = [], ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt, full = render(messages[:i], True), render(messages[:i + 1], False)
        if not (prompt.startswith(done) and full.startswith(prompt)):
            raise TokenizeError(f"{where}: the chat template does not render the conversation incrementally")
        segments += [(prompt[len(done):], False), (full[len(prompt):], True)]
        done = full
    rest = render(messages, False)[len(done):]
    return segments + ([(rest, False)] if rest else [])


def _template(tokenizer: TextTokenizer):
    if tokenizer.chat_template is None:
        def plain(messages, generation_prompt):
            text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
            return text + ("assistant: " if generation_prompt else "")
        return plain
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TokenizeError(f"chat template: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    template = env.from_string(tokenizer.chat_template)
    return lambda messages, generation_prompt: template.render(
        messages=messages, add_generation_prompt=generation_prompt, bos_token=tokenizer.bos or "",
        eos_token=tokenizer.eos)


def record_segments(record, tokenizer: TextTokenizer, text_field: str, where: str) -> list[Segment]:
    if not isinstance(record, dict):
        raise TokenizeError(f"{where}: expected a JSON object")
    if "messages" in record:
        return render_chat(record["messages"], tokenizer, where)
    if "prompt" in record or "response" in record:
        if not (isinstance(record.get("prompt"), str) and isinstance(record.get("response"), str)):
            raise TokenizeError(f"{where}: instruction records need string 'prompt' and 'response' fields")
        if tokenizer.chat_template is not None:
            return render_chat([{"role": "user", "content": record["prompt"]},
                                {"role": "assistant", "content": record["response"]}], tokenizer, where)
        return [(record["prompt"], False), (record["response"], True)]
    if isinstance(record.get(text_field), str):
        return [(record[text_field], True)]
    raise TokenizeError(f"{where}: no '{text_field}' field, nor 'prompt' + 'response', nor 'messages'")


def documents(paths: list[str], tokenizer: TextTokenizer | None, text_field: str) -> Iterator[list[Segment]]:
    """Every input document as segments (tokenizer None: plain text only, for BPE training)."""
    for name in paths:
        path = Path(name)
        if not path.is_file():
            raise TokenizeError(f"input file not found: {path}")
        if path.suffix != ".jsonl":
            yield [(path.read_text(encoding="utf-8", errors="replace"), True)]
            continue
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path}:{n}"
                try:
                    record = json.loads(line)
                except ValueError:
                    raise TokenizeError(f"{where}: not valid JSON") from None
                if tokenizer is None:  # BPE training reads all the text there is
                    yield [(t, True) for t in _texts(record, text_field)]
                else:
                    yield record_segments(record, tokenizer, text_field, where)


def _texts(record, text_field: str) -> list[str]:
    if not isinstance(record, dict):
        return []
    if isinstance(record.get("messages"), list):
        return [str(m.get("content", "")) for m in record["messages"] if isinstance(m, dict)]
    return [record[k] for k in (text_field, "prompt", "response") if isinstance(record.get(k), str)]


def encode_documents(docs: list[list[Segment]], tokenizer: TextTokenizer) -> tuple[np.ndarray, np.ndarray]:
    """(ids, mask) of docs, each followed by EOS (which counts when the document's last
    segment does: the model learns to stop after a response). Assembled by numpy from the
    pieces' lengths, not token by token in Python."""
    texts = [text for doc in docs for text, _ in doc]
    encoded = iter(tokenizer.encode_batch(texts))
    pieces, counts, eos = [], [], [tokenizer.eos_id]
    for doc in docs:
        for _, c in doc:
            pieces.append(next(encoded))
            counts.append(c)
        pieces.append(eos)
        counts.append(doc[-1][1] if doc else True)
    lengths = np.fromiter(map(len, pieces), dtype=np.int64, count=len(pieces))
    ids = np.fromiter(itertools.chain.from_iterable(pieces), dtype=np.int64, count=int(lengths.sum()))
    return ids, np.repeat(np.asarray(counts, dtype=np.uint8), lengths)


def tokenize_files(inputs: list[str], output: str | os.PathLike, tokenizer: TextTokenizer,
                   text_field: str = "text") -> tuple[int, int]:
    """Write the token file (and its mask when some token does not count); returns (tokens,
    counted). The mask is kept only if needed, so plain text gives a mask-free file."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    counted = 0
    with TokenWriter(output, tokenizer.vocab_size, with_mask=True) as writer:
        batch: list[list[Segment]] = []
        for doc in documents(inputs, tokenizer, text_field):
            batch.append(doc)
            if len(batch) == CHUNK_DOCS:
                ids, mask = encode_documents(batch, tokenizer)
                writer.write(ids, mask)
                counted += int(mask.sum())
                batch = []
        if batch:
            ids, mask = encode_documents(batch, tokenizer)
            writer.write(ids, mask)
            counted += int(mask.sum())
        total = writer.count
    if counted == total:  # every token counts: no mask file
        (Path(str(output) + ".mask")).unlink(missing_ok=True)
    return total, counted


# -- command line ------------------------------------------------------------------------------
def add_tokenize_parser(sub) -> None:
    p = sub.add_parser("tokenize", help="text / JSON lines / instruction data -> a token file for train --data")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--tokenizer", metavar="PATH", help="tokenizer.json, or a model directory holding it")
    src.add_argument("--train-bpe", type=int, metavar="N", help="train a byte-level BPE of N tokens on the input")
    p.add_argument("--input", nargs="+", required=True, metavar="FILE", help=".jsonl records or plain-text files")
    p.add_argument("--output", required=True, help="token file to write (its loss mask goes to OUTPUT.mask)")
    p.add_argument("--text-field", default="text", help="the .jsonl key of plain-text records (default text)")
    p.add_argument("--save-tokenizer", metavar="PATH",
                   help="with --train-bpe: where tokenizer.json goes (default: next to --output)")


def run_tokenize(args) -> int:
    from pyruntime.data.corpus import DataError

    try:
        if args.train_bpe is not None:
            save = Path(args.save_tokenizer or Path(args.output).parent / "tokenizer.json")
            texts = (text for doc in documents(args.input, None, args.text_field) for text, _ in doc)
            tokenizer = train_bpe(texts, args.train_bpe, save)
            print(f"trained a byte-level BPE of {tokenizer.vocab_size} tokens: {save}")
        else:
            tokenizer = load_tokenizer(args.tokenizer)
        total, counted = tokenize_files(args.input, args.output, tokenizer, args.text_field)
    except TokenizeError as e:
        raise DataError(str(e)) from None
    mask = f", {counted} of them in the loss (mask: {args.output}.mask)" if counted < total else ""
    print(f"wrote {args.output}: {total} tokens, vocabulary {tokenizer.vocab_size}{mask}")
    return 0
