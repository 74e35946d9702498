"""Token streams for training, split into train / validation.

Three sources, chosen by `load_corpus(spec)`:

* `None` -- the built-in corpus: the Python standard library's own `*.py` sources on this
  machine, so a fresh checkout trains with no download. Which files and in what order:
    - root: `sysconfig.get_paths()["stdlib"]`;
    - files: `*.py`, in sorted order of their POSIX relative paths (os.walk order is not
      stable, sorting is);
    - skipped: `site-packages` / `dist-packages` (they change whenever a package is
      installed, which would change the corpus on the same machine), test directories
      (`test`, `tests`, `idle_test`: deliberately odd encodings, huge literals),
      `__pycache__`, `config-*` build directories and the generated `_sysconfigdata*`
      modules (build flags, not code);
    - each file becomes one document, `# ---- <relative path> ----\\n` + its raw bytes
      (read as bytes, never decoded, so no file can fail to load), and documents are
      concatenated until `max_bytes` is reached; the last document is cut there;
    - validation split: documents are held out evenly, document i going to validation when
      floor((i + 1) * val_fraction) > floor(i * val_fraction) -- every 20th document for the
      default 5%. Held-out whole documents are a fairer test than the tail of a sorted file
      list (which would be all `xml*` / `zoneinfo`); the token fraction is therefore only
      close to `val_fraction`, not exact.
  The stdlib differs between Python versions, so different machines may get different
  tokens; the same machine always gets the same tokens. Nothing is cached on disk.
* `path.bin` / `path.u16` -- pre-tokenized ids, opened with np.memmap and never read whole
  into memory: a headered file of `python -m pyruntime tokenize` (data/tokens.py: uint16 or
  uint32 ids, the vocabulary it was made for, and a loss mask alongside for instruction data)
  or the old headerless little-endian uint16 format (`write_token_file`).
* any other path -- a UTF-8 text file, read whole and encoded with the byte tokenizer (for
  large data, pre-tokenize to `.bin` instead). Refused: a directory, a `.mask` file, and
  structured data (`.jsonl`, `.json`, ...: `unreadable_data`), which `tokenize` reads.

For the two file sources the validation split is the last `val_fraction` of the tokens, so
both splits (and their masks) stay zero-copy views of the memmap.

Every problem with the data is a `DataError` (a ValueError) with a one-line message; a
missing file is a `DataFileNotFoundError`, which is also a FileNotFoundError.
"""
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pyruntime.data.tokenizer import TOKEN_DTYPE, encode_bytes
from pyruntime.data.tokens import TokenFileError, read_tokens

DEFAULT_MAX_BYTES = 8 * 1024 * 1024
DEFAULT_VAL_FRACTION = 0.05
TOKEN_FILE_SUFFIXES = (".bin", ".u16")

_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test",
                        "__pycache__"})


class DataError(ValueError):
    """Unusable data: missing or malformed file, corpus too small, ids outside the vocab."""


class DataFileNotFoundError(DataError, FileNotFoundError):
    """The file named by --data does not exist."""


@dataclass(frozen=True)
class Corpus:
    """A token stream split in two. Arrays are 1-D uint16 or uint32 (np.memmap views for token
    files); masks (uint8, 1 = the token counts as a target) only for files that carry one."""

    name: str          # human-readable origin, for logs
    train: np.ndarray  # (N_train,)
    val: np.ndarray    # (N_val,), may be empty when val_fraction == 0
    train_mask: np.ndarray | None = None  # (N_train,)
    val_mask: np.ndarray | None = None    # (N_val,)
    vocab_size: int | None = None         # the vocabulary a headered token file was made for

    @property
    def num_tokens(self) -> int:
        """Tokens in both splits together."""
        return len(self.train) + len(self.val)


def load_corpus(spec: str | os.PathLike | None = None, *,
                max_bytes: int = DEFAULT_MAX_BYTES,
                val_fraction: float = DEFAULT_VAL_FRACTION,
                seq_len: int | None = None,
                vocab_size: int | None = None) -> Corpus:
    """Load the corpus named by `spec` (None: the built-in stdlib corpus; see module doc).

    max_bytes caps the built-in corpus only; a file named by the user is used whole.
    With `seq_len`, the train split (and the validation split when val_fraction > 0) must
    hold at least one sequence of seq_len + 1 tokens; with `vocab_size`, every token id must
    be below it. Either failing raises DataError, as does a missing or malformed file.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must lie in [0, 1), got {val_fraction}")
    if spec is None:
        corpus = _load_stdlib(max_bytes, val_fraction)
    else:
        path = Path(spec)
        refused = unreadable_data(path)
        if refused:
            raise DataFileNotFoundError(refused) if not path.exists() else DataError(refused)
        if path.suffix.lower() in TOKEN_FILE_SUFFIXES:
            corpus = _open_token_file(path, val_fraction)
        else:
            corpus = _split_tail(str(path), encode_bytes(path.read_bytes()), val_fraction)
    if corpus.num_tokens == 0:
        raise DataError(f"corpus {corpus.name} is empty")
    if seq_len is not None:
        _check_fits_one_sequence(corpus, seq_len, check_val=val_fraction > 0)
    if vocab_size is not None:
        check_vocab(corpus, vocab_size)
    return corpus


# Files train could read as text but never should: their bytes are markup, not the text to learn.
STRUCTURED_SUFFIXES = (".jsonl", ".json", ".parquet", ".arrow", ".csv", ".safetensors")


def unreadable_data(path: Path) -> str | None:
    """Why `path` cannot be training data (one line naming what to give instead), or None."""
    if path.is_dir():
        return f"data path {path} is a directory; give a token file (.bin from `python -m pyruntime tokenize`) " \
               "or a text file"
    if not path.is_file():
        return f"data file not found: {path}"
    if path.suffix == ".mask":
        return f"{path} is the loss mask of {path.with_suffix('')}; give --data {path.with_suffix('')}"
    if path.suffix.lower() in STRUCTURED_SUFFIXES:
        return (f"{path}: a {path.suffix} file is not read as training data (its bytes are not text to learn); "
                f"tokenize it first: python -m pyruntime tokenize --tokenizer TOKENIZER --input {path} "
                f"--output {path.with_suffix('.bin')}")
    return None


def max_token_id(tokens: np.ndarray) -> int:
    """Largest id in `tokens` (-1 when empty). Streams through a memmap once."""
    return int(tokens.max()) if len(tokens) else -1


def check_vocab(corpus: Corpus, vocab_size: int) -> None:
    """Raise DataError if the file was made for a larger vocabulary than the model's, or some
    token id in `corpus` is >= vocab_size."""
    if corpus.vocab_size is not None and corpus.vocab_size > vocab_size:
        raise DataError(f"token file {corpus.name} was made with a vocabulary of {corpus.vocab_size}, "
                        f"larger than the model's {vocab_size}")
    top = max(max_token_id(corpus.train), max_token_id(corpus.val))
    if top >= vocab_size:
        raise DataError(f"corpus {corpus.name} has token id {top}, "
                        f"outside the model vocab of {vocab_size}")


def write_token_file(path: str | os.PathLike, tokens) -> None:
    """Write ids as a token file that load_corpus opens with np.memmap (raw little-endian
    uint16, no header). Ids must lie in [0, 65536)."""
    arr = np.asarray(tokens).reshape(-1)
    if arr.size and (int(arr.min()) < 0 or int(arr.max()) > np.iinfo(TOKEN_DTYPE).max):
        raise DataError(f"token ids must lie in [0, 65536) for a uint16 token file: {path}")
    arr.astype(TOKEN_DTYPE).tofile(path)


def stdlib_files(root: str | os.PathLike | None = None) -> list[tuple[str, Path]]:
    """(relative POSIX path, absolute path) of every built-in-corpus file, in corpus order."""
    root = Path(root if root is not None else sysconfig.get_paths()["stdlib"])
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Pruning in place stops os.walk from descending: site-packages alone can be GBs.
        dirnames[:] = [d for d in dirnames
                       if d not in _SKIP_DIRS and not d.startswith("config-")]
        for name in filenames:
            if name.endswith(".py") and not name.startswith("_sysconfigdata"):
                full = Path(dirpath, name)
                found.append((full.relative_to(root).as_posix(), full))
    found.sort()
    return found


def _load_stdlib(max_bytes: int, val_fraction: float) -> Corpus:
    if max_bytes <= 0:
        raise DataError(f"max_bytes must be positive, got {max_bytes}")
    root = sysconfig.get_paths()["stdlib"]
    # Each split has its own byte budget, so a small cap still yields a validation split
    # (with one shared budget, the first few documents would all land in train).
    budget = {"val": int(max_bytes * val_fraction)}
    budget["train"] = max_bytes - budget["val"]
    docs = {"train": [], "val": []}
    used = {"train": 0, "val": 0}
    for i, (rel, full) in enumerate(stdlib_files(root)):
        split = "val" if int((i + 1) * val_fraction) > int(i * val_fraction) else "train"
        room = budget[split] - used[split]
        if room <= 0:
            if all(used[k] >= budget[k] for k in budget):
                break
            continue
        doc = (f"# ---- {rel} ----\n".encode() + full.read_bytes())[:room]
        docs[split].append(doc)
        used[split] += len(doc)
    train_docs, val_docs = docs["train"], docs["val"]
    total = used["train"] + used["val"]
    if total == 0:
        raise DataError(f"no .py files found under the stdlib directory {root}; "
                        "pass a data file instead")
    name = f"python{sysconfig.get_python_version()}-stdlib ({total} bytes)"
    return Corpus(name, encode_bytes(b"".join(train_docs)), encode_bytes(b"".join(val_docs)))


def _open_token_file(path: Path, val_fraction: float) -> Corpus:
    if path.stat().st_size == 0:
        raise DataError(f"token file is empty: {path}")
    try:
        tokens, mask, vocab = read_tokens(path)
    except TokenFileError as e:
        raise DataError(str(e)) from None
    return _split_tail(str(path), tokens, val_fraction, mask, vocab)


def _split_tail(name: str, tokens: np.ndarray, val_fraction: float, mask: np.ndarray | None = None,
                vocab_size: int | None = None) -> Corpus:
    cut = len(tokens) - int(len(tokens) * val_fraction)
    masks = (mask[:cut], mask[cut:]) if mask is not None else (None, None)
    return Corpus(name, tokens[:cut], tokens[cut:], *masks, vocab_size=vocab_size)


def _check_fits_one_sequence(corpus: Corpus, seq_len: int, check_val: bool) -> None:
    need = seq_len + 1  # inputs plus the one-token-shifted targets
    splits = [("train", corpus.train)] + ([("validation", corpus.val)] if check_val else [])
    for split, tokens in splits:
        if len(tokens) < need:
            raise DataError(f"corpus {corpus.name}: {split} split has {len(tokens)} tokens, "
                            f"fewer than one sequence of seq_len + 1 = {need}")

