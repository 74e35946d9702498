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
straddles a prompt/response boundary. --workers N (default: every CPU) splits the input into
chunks of whole lines that N processes read, parse, render and encode (one thread each); the
output is the same file whatever N. With --workers 1 one process encodes in tokenizers' own
thread pool (encode_batch).
"""
from __future__ import annotations

import itertools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from pyruntime.data.tokenize_inputs import TokenizeError, check_paths, tokenizer_config
from pyruntime.data.tokens import TokenWriter

EOS_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<|im_end|>", "<eos>")
BPE_EOS = "<|endoftext|>"
# .jsonl bytes per work unit: a few hundred per worker on a large input (load balance), big
# enough that shipping results back costs little next to encoding them.
CHUNK_BYTES = 1 << 20

Segment = tuple[str, bool]  # (text, counts in the loss)


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


def _tokenizers():
    """The `tokenizers` package (the optional "hf" extra), or one line saying how to get it."""
    try:
        import tokenizers
    except ImportError:
        raise TokenizeError('real tokenizers need the tokenizers package, which is not installed: '
                            'pip install "pyruntime[hf]" (or pip install tokenizers)') from None
    return tokenizers


def load_tokenizer(path: str | os.PathLike) -> TextTokenizer:
    """tokenizer.json, or a model directory holding it (with tokenizer_config.json for the EOS
    and BOS tokens and the chat template)."""
    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise TokenizeError(f"no tokenizer at {path}: expected tokenizer.json or a directory holding it")
    try:
        tok = _tokenizers().Tokenizer.from_file(str(file))
    except Exception as e:  # noqa: BLE001 - the Rust error, as one line
        raise TokenizeError(f"{file} is not a tokenizers file ({' '.join(str(e).split())[:200]})") from None
    config = tokenizer_config(file.parent / "tokenizer_config.json")
    eos = config.get("eos_token") or next((t for t in EOS_CANDIDATES if tok.token_to_id(t) is not None), None)
    if eos is None or tok.token_to_id(eos) is None:
        raise TokenizeError(f"{file}: no EOS token (looked for tokenizer_config.json's eos_token and {', '.join(EOS_CANDIDATES)})")
    return TextTokenizer(tok, eos, config.get("bos_token"), config.get("chat_template"))


def train_bpe(texts: Iterator[str], vocab_size: int, save_to: str | os.PathLike) -> TextTokenizer:
    """A byte-level BPE of vocab_size tokens (256 bytes, EOS, merges) trained on texts;
    written to save_to (tokenizer.json). Any byte string round-trips."""
    tk = _tokenizers()
    if vocab_size < 258:
        raise TokenizeError(f"--train-bpe {vocab_size}: a byte-level BPE needs at least 258 tokens (256 bytes, EOS, a merge)")
    if vocab_size > 2**32:
        raise TokenizeError(f"--train-bpe {vocab_size}: a token file holds ids below 2**32, so at most 4294967296 tokens")
    tok = tk.Tokenizer(tk.models.BPE())
    tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BPE_EOS], show_progress=False,
                                     initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet())
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


def chat_prompt(tokenizer: TextTokenizer, user_text: str) -> str:
    """One user turn and the assistant's cue through the tokenizer's chat template, as
    `prompt` / `response` records are rendered for training (generate --chat; the tokenizer
    must have a template: without one those records train as the bare prompt + response)."""
    return _template(tokenizer)([{"role": "user", "content": user_text}], True)


def _template(tokenizer: TextTokenizer):
    if tokenizer.chat_template is None:
        def plain(messages, generation_prompt):
            text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
            return text + ("assistant: " if generation_prompt else "")
        return plain
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TokenizeError(f"chat template: {message}")

    from jinja2 import TemplateError

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    try:
        template = env.from_string(tokenizer.chat_template)
    except TemplateError as e:
        raise TokenizeError(f"the tokenizer's chat template does not parse: {e}") from None

    def render(messages, generation_prompt):
        try:
            return template.render(messages=messages, add_generation_prompt=generation_prompt,
                                   bos_token=tokenizer.bos or "", eos_token=tokenizer.eos)
        except TemplateError as e:
            raise TokenizeError(f"the tokenizer's chat template failed: {e}") from None
    return render


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


@dataclass(frozen=True)
class Chunk:
    """Bytes [start, stop) of an input file, whole lines: a unit of work. A plain-text file is
    one chunk (one document); a .jsonl file is cut at line ends every ~chunk_bytes."""

    path: str
    start: int
    stop: int


def plan_chunks(paths: list[str], chunk_bytes: int = CHUNK_BYTES) -> list[Chunk]:
    """The inputs as chunks, in order; a missing file is named before any work starts."""
    chunks = []
    for name in paths:
        path = Path(name)
        if not path.is_file():
            raise TokenizeError(f"input file not found: {path}")
        size = path.stat().st_size
        if size == 0:
            raise TokenizeError(f"input file {path} is empty; give a .jsonl of records or a text file")
        if path.suffix != ".jsonl":
            chunks.append(Chunk(name, 0, size))
            continue
        with open(path, "rb") as f:
            start = 0
            while start < size:
                f.seek(min(size, start + chunk_bytes))
                f.readline()  # on to the next line end (or the end of the file)
                stop = min(size, f.tell())
                chunks.append(Chunk(name, start, stop))
                start = stop
    return chunks


class _Where:
    """"file:line" of a record, the line number counted only if an error message needs it
    (a worker reading a chunk does not know how many lines come before it)."""

    def __init__(self, path: str, start: int, offset: int):
        self.path, self.start, self.offset = path, start, offset

    def __str__(self) -> str:
        with open(self.path, "rb") as f:
            before = f.read(self.start).count(b"\n")
        return f"{self.path}:{before + self.offset}"


def chunk_documents(chunk: Chunk, tokenizer: TextTokenizer | None, text_field: str) -> Iterator[list[Segment]]:
    """Every document of a chunk as segments (tokenizer None: plain text only, for BPE training)."""
    path = Path(chunk.path)
    if path.suffix != ".jsonl":
        yield [(path.read_text(encoding="utf-8", errors="replace"), True)]
        return
    with open(path, "rb") as f:
        f.seek(chunk.start)
        data = f.read(chunk.stop - chunk.start)
    for n, raw in enumerate(data.split(b"\n"), 1):
        if not raw.strip():
            continue
        where = _Where(chunk.path, chunk.start, n)
        try:
            record = json.loads(raw)
        except ValueError:  # UnicodeDecodeError included
            raise TokenizeError(f"{where}: not valid JSON (UTF-8)") from None
        if tokenizer is None:  # BPE training reads all the text there is
            yield [(t, True) for t in _texts(record, text_field)]
        else:
            yield record_segments(record, tokenizer, text_field, where)


def documents(paths: list[str], tokenizer: TextTokenizer | None, text_field: str) -> Iterator[list[Segment]]:
    """Every input document as segments, in order."""
    for chunk in plan_chunks(paths):
        yield from chunk_documents(chunk, tokenizer, text_field)


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


def encode_chunk(chunk: Chunk, tokenizer: TextTokenizer, text_field: str) -> tuple[np.ndarray, np.ndarray]:
    return encode_documents(list(chunk_documents(chunk, tokenizer, text_field)), tokenizer)


_WORKER: tuple[TextTokenizer, str] | None = None  # set in each worker process by _init_worker


def _init_worker(tokenizer: TextTokenizer, text_field: str) -> None:
    global _WORKER
    _WORKER = (tokenizer, text_field)


def _encode_in_worker(chunk: Chunk) -> tuple[np.ndarray, np.ndarray]:
    ids, mask = encode_chunk(chunk, *_WORKER)
    return ids.astype(np.uint32), mask  # half the bytes through the pipe (ids < 2**32)


def encoded_chunks(chunks: list[Chunk], tokenizer: TextTokenizer, text_field: str,
                   workers: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(ids, mask) of each chunk, in order: in this process (tokenizers' threads encode each
    batch) when workers is 1, else in `workers` processes, each reading, parsing, rendering
    and encoding its chunks on one thread. Encoding is per text, so the result does not
    depend on how the input is cut or shared out; an error is raised at its chunk's turn, so
    the first one in input order is reported, as in one process."""
    if workers <= 1 or len(chunks) <= 1:
        yield from (encode_chunk(c, tokenizer, text_field) for c in chunks)
        return
    import multiprocessing

    ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    # One thread per process (the processes are the parallelism); set before the fork also
    # because tokenizers' thread pool does not survive one (it would warn and turn it off).
    saved = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        pool = ctx.Pool(min(workers, len(chunks)), _init_worker, (tokenizer, text_field))
    finally:
        if saved is None:
            del os.environ["TOKENIZERS_PARALLELISM"]
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = saved
    with pool:
        yield from pool.imap(_encode_in_worker, chunks)


def check_workers(workers: int) -> None:
    if workers < 1:
        raise TokenizeError(f"--workers {workers}: the number of processes must be at least 1")


def tokenize_files(inputs: list[str], output: str | os.PathLike, tokenizer: TextTokenizer,
                   text_field: str = "text", workers: int = 1, chunk_bytes: int = CHUNK_BYTES) -> tuple[int, int]:
    """Write the token file (and its mask when some token does not count); returns (tokens,
    counted). The mask is kept only if needed, so plain text gives a mask-free file. The
    file is the same whatever `workers` (processes) and `chunk_bytes` (the work unit)."""
    check_workers(workers)
    chunks = plan_chunks(inputs, chunk_bytes)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    counted = 0
    from pyruntime.train.faults import writing

    with writing("the token file (--output)", output), TokenWriter(output, tokenizer.vocab_size, with_mask=True) as writer:
        for ids, mask in encoded_chunks(chunks, tokenizer, text_field, workers):
            writer.write(ids, mask)
            counted += int(mask.sum())
        total = writer.count
        if total == 0:  # raised inside the writer: it leaves no file
            raise TokenizeError(f"{', '.join(inputs)}: no documents (only blank lines); nothing to write")
    return total, counted  # a mask where every token counted was not kept (TokenWriter)


# -- command line ------------------------------------------------------------------------------
def add_tokenize_parser(sub) -> None:
    p = sub.add_parser("tokenize", help="text / JSON lines / instruction data -> a token file for train --data")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--tokenizer", metavar="PATH", help="tokenizer.json, or a model directory holding it")
    src.add_argument("--train-bpe", type=int, metavar="N", help="train a byte-level BPE of N tokens on the input")
    p.add_argument("--input", nargs="+", required=True, metavar="FILE", help=".jsonl records or plain-text files")
    p.add_argument("--output", required=True, help="token file to write (its loss mask goes to OUTPUT.mask)")
    p.add_argument("--text-field", default="text", help="the .jsonl key of plain-text records (default text)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, metavar="N",
                   help="processes that read and encode the input (default: the CPU count); same output for any N")
    p.add_argument("--save-tokenizer", metavar="PATH",
                   help="with --train-bpe: where tokenizer.json goes (default: next to --output)")


def run_tokenize(args) -> int:
    from pyruntime.data.corpus import DataError

    save = partial = None
    try:
        check_workers(args.workers)
        check_paths(args)
        if args.train_bpe is not None:
            # written as .partial and renamed once the token file is complete: input the
            # tokenize pass refuses (a record without text) leaves no tokenizer.json behind
            save = Path(args.save_tokenizer or Path(args.output).parent / "tokenizer.json")
            partial = save.with_name(save.name + ".partial")
            texts = (text for doc in documents(args.input, None, args.text_field) for text, _ in doc)
            tokenizer = train_bpe(texts, args.train_bpe, partial)
        else:
            tokenizer = load_tokenizer(args.tokenizer)
        total, counted = tokenize_files(args.input, args.output, tokenizer, args.text_field, args.workers)
        if partial is not None:
            os.replace(partial, save)
            print(f"trained a byte-level BPE of {tokenizer.vocab_size} tokens: {save}")
    except TokenizeError as e:
        raise DataError(str(e)) from None
    finally:
        if partial is not None:
            partial.unlink(missing_ok=True)
    mask = f", {counted} of them in the loss (mask: {args.output}.mask)" if counted < total else ""
    print(f"wrote {args.output}: {total} tokens, vocabulary {tokenizer.vocab_size}{mask}")
    return 0
