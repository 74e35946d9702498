import re

import numpy as np
import pytest

from pyruntime.data.corpus import (
    DEFAULT_MAX_BYTES, DataError, DataFileNotFoundError, check_vocab, load_corpus,
    max_token_id, stdlib_files, write_token_file,
)
from pyruntime.data.tokenizer import decode, encode

_HEADER = re.compile(r"^# ---- (\S+) ----$", re.MULTILINE)


@pytest.fixture(scope="module")
def stdlib_corpus():
    return load_corpus(None)


def test_default_corpus_is_deterministic(stdlib_corpus):
    again = load_corpus(None)
    assert again.name == stdlib_corpus.name
    assert np.array_equal(again.train, stdlib_corpus.train)
    assert np.array_equal(again.val, stdlib_corpus.val)


def test_default_corpus_size(stdlib_corpus):
    c = stdlib_corpus
    assert c.train.dtype == np.uint16 and c.val.dtype == np.uint16
    # Every CPython 3.x stdlib holds several MB of .py outside the skipped directories.
    assert 2_000_000 < c.num_tokens <= DEFAULT_MAX_BYTES
    assert 0.02 < len(c.val) / c.num_tokens < 0.10
    assert max_token_id(c.train) < 256


def test_default_corpus_val_documents_disjoint_from_train(stdlib_corpus):
    train_docs = set(_HEADER.findall(decode(stdlib_corpus.train)))
    val_docs = set(_HEADER.findall(decode(stdlib_corpus.val)))
    assert len(val_docs) > 10 and len(train_docs) > 10 * len(val_docs)
    assert not train_docs & val_docs


def test_default_corpus_cap_and_no_val():
    c = load_corpus(None, max_bytes=100_000, val_fraction=0.0)
    assert c.num_tokens == 100_000 and len(c.val) == 0
    # A smaller cap is a prefix of the same document stream.
    small = load_corpus(None, max_bytes=50_000, val_fraction=0.0)
    assert np.array_equal(small.train, c.train[:50_000])


def test_stdlib_files_skips_and_sorts(tmp_path):
    for rel in ["b/c.py", "a.py", "b/a.py", "test/t.py", "pkg/tests/t.py",
                "site-packages/x.py", "__pycache__/y.py", "notes.txt",
                "_sysconfigdata__linux.py", "config-3.11-x86/python-config.py"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("pass\n")
    assert [rel for rel, _ in stdlib_files(tmp_path)] == ["a.py", "b/a.py", "b/c.py"]


def test_text_file(tmp_path):
    text = "".join(f"line {i}: ünïcödé\n" for i in range(500))
    path = tmp_path / "corpus.txt"
    path.write_text(text, encoding="utf-8")
    c = load_corpus(str(path), val_fraction=0.1)
    ids = encode(text)
    assert c.name == str(path)
    assert len(c.val) == int(len(ids) * 0.1)  # the tail
    assert np.array_equal(np.concatenate([c.train, c.val]), ids)


@pytest.mark.parametrize("suffix", [".bin", ".u16"])
def test_token_file_is_memmapped(tmp_path, suffix):
    ids = (np.arange(10_000) * 7) % 1000
    path = tmp_path / f"tokens{suffix}"
    write_token_file(path, ids)
    assert path.stat().st_size == 2 * len(ids)
    c = load_corpus(path, val_fraction=0.05)
    assert isinstance(c.train, np.memmap) and isinstance(c.val, np.memmap)
    assert len(c.train) == 9_500 and len(c.val) == 500
    assert np.array_equal(np.concatenate([c.train, c.val]), ids)
    assert max_token_id(c.train) == 999
    load_corpus(path, vocab_size=1000)  # ids 0..999 fit
    with pytest.raises(DataError, match="token id 999, outside the model vocab of 256"):
        check_vocab(c, 256)
    with pytest.raises(DataError, match="outside the model vocab"):
        load_corpus(path, vocab_size=999)


def test_missing_file(tmp_path):
    path = tmp_path / "nope.bin"
    with pytest.raises(DataFileNotFoundError) as info:
        load_corpus(str(path))
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, ValueError)
    assert str(info.value) == f"data file not found: {path}"


def test_malformed_token_files(tmp_path):
    odd = tmp_path / "odd.bin"
    odd.write_bytes(b"\x01\x00\x02")
    with pytest.raises(DataError, match="not a multiple of 2 bytes"):
        load_corpus(odd)
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match="empty"):
        load_corpus(empty)
    with pytest.raises(DataError, match="65536"):
        write_token_file(tmp_path / "big.bin", [70_000])


def test_too_small_for_one_sequence(tmp_path):
    path = tmp_path / "tiny.txt"
    path.write_text("x" * 100)
    with pytest.raises(DataError, match=r"train split has 100 tokens, fewer than one "
                                        r"sequence of seq_len \+ 1 = 129"):
        load_corpus(path, val_fraction=0.0, seq_len=128)
    with pytest.raises(DataError, match="validation split has 5 tokens"):
        load_corpus(path, val_fraction=0.05, seq_len=16)
    assert load_corpus(path, val_fraction=0.0, seq_len=99).num_tokens == 100


def test_bad_val_fraction():
    with pytest.raises(DataError, match="val_fraction"):
        load_corpus(None, val_fraction=1.0)
