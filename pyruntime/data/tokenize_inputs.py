"""What `tokenize` reads besides the documents and where it writes, checked before any work:
the tokenizer's tokenizer_config.json and the output paths (none of them an input). Each
problem is one TokenizeError / ConfigError line (pyruntime/data/tokenize.py is the command)."""
from __future__ import annotations

import json
from pathlib import Path


class TokenizeError(ValueError):
    """Bad tokenize input: one line naming the file (and line) and what is expected."""


def _token_text(value) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


def tokenizer_config(path: Path) -> dict:
    """What load_tokenizer uses of tokenizer_config.json: eos_token / bos_token (strings) and
    chat_template (a string, or transformers' list of named templates: its "default")."""
    if not path.is_file():
        return {}
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:  # UnicodeDecodeError included
        raise TokenizeError(f"{path} is not valid JSON ({' '.join(str(e).split())[:200]})") from None
    if not isinstance(raw, dict):
        raise TokenizeError(f"{path} must hold a JSON object, got {type(raw).__name__}")
    out = {key: _token_text(raw.get(key)) for key in ("eos_token", "bos_token")}
    template = raw.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": "..."}, {"name": "tool_use", ...}]
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"),
                        None)
    out["chat_template"] = template
    for key, value in out.items():
        if value is not None and not isinstance(value, str):
            raise TokenizeError(f"{path}: {key} must be a string, got {value!r}")
    return out


def check_paths(args) -> None:
    """--output (and --save-tokenizer) are files that can be written and that are none of the
    inputs: the token file replaces what is at its path."""
    from pyruntime.train.preflight import file_to_write

    if args.save_tokenizer is not None and args.train_bpe is None:
        raise TokenizeError("--save-tokenizer goes with --train-bpe (where the trained tokenizer.json goes); "
                            "with --tokenizer nothing is saved: drop it")
    inputs = {Path(p).resolve() for p in args.input}
    if args.tokenizer is not None:  # the tokenizer's files are inputs too
        tok = Path(args.tokenizer)
        folder = tok if tok.is_dir() else tok.parent
        inputs |= {(folder / "tokenizer.json").resolve(), (folder / "tokenizer_config.json").resolve(), tok.resolve()}
    outputs = [("--output", Path(args.output))]
    if args.train_bpe is not None:
        outputs.append(("--save-tokenizer", Path(args.save_tokenizer or Path(args.output).parent / "tokenizer.json")))
    for flag, path in outputs:
        file_to_write(path, flag)
        if path.resolve() in inputs:
            raise TokenizeError(f"{flag} {path} is also an input (--input or the tokenizer's files); writing it "
                                "would replace that input")
    if len(outputs) == 2 and outputs[0][1].resolve() == outputs[1][1].resolve():
        raise TokenizeError(f"--output and --save-tokenizer are the same file {args.output}")
