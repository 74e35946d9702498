"""tokenize: a trained byte-level BPE round-trips text; token files with headers (uint16 /
uint32 by vocabulary, the loss mask alongside) round-trip and the old headerless uint16 files
still read; instruction and chat data mask exactly the prompt tokens; bad input is one line."""
import json

import numpy as np
import pytest

from pyruntime.cli import main
from pyruntime.data import DataError, load_corpus
from pyruntime.data.tokenize import TokenizeError, load_tokenizer, tokenize_files, train_bpe
from pyruntime.data.tokens import TokenFileError, mask_path, read_tokens, write_tokens

TEXT = "Fine-tuning: naïve café, 日本語 and emoji 🙂.\n\tTabs, \"quotes\" and trailing spaces   \n" * 3
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    d = tmp_path_factory.mktemp("bpe")
    return train_bpe(iter([TEXT, "question answer response prompt " * 20]), 320, d / "tokenizer.json"), d


def test_trained_bpe_round_trips_and_has_its_size(bpe):
    tok, d = bpe
    assert tok.vocab_size == 320 and tok.eos_id is not None
    ids = tok.encode_batch([TEXT])[0]
    assert len(ids) < len(TEXT.encode()) and tok.decode(ids) == TEXT  # merges learnt, lossless
    assert load_tokenizer(d).decode(ids) == TEXT  # the saved tokenizer.json is the same tokenizer


@pytest.mark.parametrize("vocab,width", [(300, 2), (65536, 2), (70000, 4), (200_000, 4)])
def test_token_files_round_trip_with_their_dtype(tmp_path, vocab, width):
    ids = np.array([0, 1, vocab - 1, 12345 % vocab, 7], dtype=np.int64)
    mask = np.array([0, 1, 1, 0, 1])
    path = write_tokens(tmp_path / "t.bin", ids, vocab, mask=mask)
    assert path.stat().st_size == 32 + width * len(ids)
    got, got_mask, got_vocab = read_tokens(path)
    assert got.dtype.itemsize == width and got_vocab == vocab
    assert np.array_equal(got, ids) and np.array_equal(got_mask, mask)
    corpus = load_corpus(path, val_fraction=0.2)
    assert np.array_equal(corpus.train_mask, mask[:4]) and np.array_equal(corpus.val, ids[4:])


def test_old_headerless_uint16_files_still_read(tmp_path):
    ids = np.arange(100, dtype="<u2")
    ids.tofile(tmp_path / "old.bin")
    corpus = load_corpus(tmp_path / "old.bin", val_fraction=0.1)
    assert np.array_equal(np.concatenate([corpus.train, corpus.val]), ids) and corpus.train_mask is None


def test_a_lost_mask_is_an_error_and_version_1_files_still_read(tmp_path):
    """Ids written with a mask are flagged in their header: without the mask file (copied alone)
    they are refused, not trained on unmasked. A version-1 file (a uint32 width, no flags)
    reads as before, with or without its mask."""
    import struct

    from pyruntime.data.tokens import HEADER_BYTES, TokenWriter

    ids, mask = np.arange(40) % 300, np.arange(40) % 2
    path = write_tokens(tmp_path / "m.bin", ids, 300, mask=mask)
    (tmp_path / "alone.bin").write_bytes(path.read_bytes())
    with pytest.raises(DataError, match="alone.bin was written with a loss mask and .*alone.bin.mask is missing"):
        load_corpus(tmp_path / "alone.bin")
    with TokenWriter(tmp_path / "w.bin", 300, with_mask=True) as w:  # every id counts: no mask, no flag
        w.write(ids, np.ones_like(ids))
    assert not mask_path(tmp_path / "w.bin").exists() and read_tokens(tmp_path / "w.bin")[1] is None
    for name in ("m.bin", "m.bin.mask"):  # rewrite as version 1: b"PYRTOKS1", 1, uint32 width, vocab, count
        raw = (tmp_path / name).read_bytes()
        _, _, width, _, vocab, count = struct.unpack("<8sIHHQQ", raw[:HEADER_BYTES])
        (tmp_path / f"v1_{name}").write_bytes(struct.pack("<8sIIQQ", b"PYRTOKS1", 1, width, vocab, count)
                                              + raw[HEADER_BYTES:])
    got, got_mask, vocab = read_tokens(tmp_path / "v1_m.bin")
    assert vocab == 300 and np.array_equal(got, ids) and np.array_equal(got_mask, mask)
    mask_path(tmp_path / "v1_m.bin").unlink()
    assert read_tokens(tmp_path / "v1_m.bin")[1] is None  # version 1 cannot say it had one


def test_bad_token_files_fail_in_one_line(tmp_path):
    with pytest.raises(TokenFileError, match="outside the vocabulary of 10"):
        write_tokens(tmp_path / "a.bin", [3, 10], 10)
    path = write_tokens(tmp_path / "b.bin", np.arange(50), 300, mask=np.ones(50))
    with open(path, "ab") as f:
        f.write(b"\0\0")
    with pytest.raises(DataError, match="header says 50 entries of 2 bytes, the file holds 102 bytes"):
        load_corpus(path)
    path = write_tokens(tmp_path / "c.bin", np.arange(50), 300, mask=np.ones(50))
    write_tokens(tmp_path / "d.bin", np.arange(49), 300, mask=np.ones(49))
    mask_path(tmp_path / "d.bin").replace(mask_path(path))
    with pytest.raises(DataError, match="does not match"):
        load_corpus(path)
    with pytest.raises(DataError, match="made with a vocabulary of 300, larger than the model's 256"):
        load_corpus(write_tokens(tmp_path / "e.bin", np.arange(50), 300), vocab_size=256)


def _counted_text(tok, path):
    ids, mask, _ = read_tokens(path)
    return tok.decode(np.asarray(ids)[np.asarray(mask) == 1]), tok.decode(np.asarray(ids)[np.asarray(mask) == 0])


def test_instruction_mask_covers_exactly_the_response(bpe, tmp_path):
    tok, _ = bpe
    (tmp_path / "i.jsonl").write_text(json.dumps({"prompt": "question: 2+2?", "response": " answer: 4"}) + "\n")
    total, counted = tokenize_files([str(tmp_path / "i.jsonl")], tmp_path / "i.bin", tok)
    assert counted < total
    assert _counted_text(tok, tmp_path / "i.bin") == (" answer: 4<|endoftext|>", "question: 2+2?")


def test_chat_template_masks_every_assistant_turn(bpe, tmp_path):
    tok = load_tokenizer(bpe[1])  # a copy: the fixture's stays as trained
    tok.tok.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    tok.chat_template, tok.eos = CHATML, "<|im_end|>"
    chat = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"}, {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"}]
    (tmp_path / "c.jsonl").write_text(json.dumps({"messages": chat}) + "\n")
    tokenize_files([str(tmp_path / "c.jsonl")], tmp_path / "c.bin", tok)
    counted, other = _counted_text(tok, tmp_path / "c.bin")
    assert counted == "hello<|im_end|>\n4<|im_end|>\n<|im_end|>"
    assert other == ("<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
                     "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n")


def test_tokenize_command_and_its_errors(tmp_path, capsys):
    (tmp_path / "doc.txt").write_text(TEXT)
    assert main(["tokenize", "--train-bpe", "300", "--input", str(tmp_path / "doc.txt"),
                 "--output", str(tmp_path / "doc.bin")]) == 0
    tok = load_tokenizer(tmp_path / "tokenizer.json")
    ids, mask, vocab = read_tokens(tmp_path / "doc.bin")
    assert vocab == 300 and mask is None and tok.decode(ids) == TEXT + "<|endoftext|>"
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"prompt": "p"}\n')
    capsys.readouterr()
    assert main(["tokenize", "--tokenizer", str(tmp_path), "--input", str(tmp_path / "bad.jsonl"),
                 "--output", str(tmp_path / "bad.bin")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "bad.jsonl:2: instruction records need string 'prompt' and 'response'" in err
    assert main(["tokenize", "--train-bpe", "100", "--input", str(tmp_path / "doc.txt"),
                 "--output", str(tmp_path / "x.bin")]) == 2
    # --train-bpe on input the tokenize pass refuses: neither a tokenizer.json nor a token file is left
    out = tmp_path / "fresh"
    assert main(["tokenize", "--train-bpe", "300", "--input", str(tmp_path / "bad.jsonl"),
                 "--output", str(out / "bad.bin")]) == 2
    assert "bad.jsonl:2: instruction records" in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir())


def test_workers_write_the_same_files_as_one_process(bpe, tmp_path, capsys):
    """--workers 2 over small chunks (many per file, cut mid-way through the records) writes
    token and mask files bit-identical to one process; a bad record is still named by its line."""
    tok, d = bpe
    lines = [json.dumps({"prompt": f"q{i}: " + TEXT[:i % 40], "response": f" a{i} " + TEXT[i % 30:]})
             if i % 3 else json.dumps({"text": TEXT[: 7 * i % 90]}) for i in range(60)]
    (tmp_path / "a.jsonl").write_text("\n".join(lines[:40]) + "\n\n")
    (tmp_path / "b.jsonl").write_text("\n".join(lines[40:]))  # no final newline
    (tmp_path / "c.txt").write_text(TEXT)
    inputs = [str(tmp_path / n) for n in ("a.jsonl", "c.txt", "b.jsonl")]
    one = tokenize_files(inputs, tmp_path / "one.bin", tok, workers=1)
    two = tokenize_files(inputs, tmp_path / "two.bin", tok, workers=2, chunk_bytes=500)
    assert one == two and one[1] < one[0]
    for suffix in ("", ".mask"):
        assert (tmp_path / f"one.bin{suffix}").read_bytes() == (tmp_path / f"two.bin{suffix}").read_bytes()
    (tmp_path / "bad.jsonl").write_text("\n".join(lines[:30] + ['{"prompt": 1}'] + lines[30:]) + "\n")
    with pytest.raises(TokenizeError, match=r"bad.jsonl:31: instruction records need"):
        tokenize_files([str(tmp_path / "bad.jsonl")], tmp_path / "bad.bin", tok, workers=2, chunk_bytes=500)
    assert main(["tokenize", "--tokenizer", str(d), "--input", inputs[0], "--output", str(tmp_path / "w.bin"),
                 "--workers", "0"]) == 2
    assert "--workers 0: the number of processes must be at least 1" in capsys.readouterr().err


def test_without_the_tokenizers_package_each_command_says_how_to_get_it(tmp_path, capsys, monkeypatch):
    """The optional "hf" extra missing: tokenize (and export / generate, which load tokenizers
    the same way) end in one line naming the package and the pip command, exit 2."""
    import sys

    (tmp_path / "doc.txt").write_text("hello world\n")
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # import tokenizers -> ImportError
    assert main(["tokenize", "--train-bpe", "300", "--input", str(tmp_path / "doc.txt"),
                 "--output", str(tmp_path / "doc.bin")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and 'pip install "pyruntime[hf]"' in err and "Traceback" not in err, err
    assert not (tmp_path / "doc.bin").exists()
