import numpy as np
import pytest
import torch

from pyruntime.data.tokenizer import VOCAB_SIZE, decode, encode, encode_bytes


@pytest.mark.parametrize("text", [
    "", "hello world\n", "def f(x):\n\treturn x ** 2\n",
    "naïve café, Straße", "日本語のテキスト", "emoji 🚀 and math ∑ x²",
])
def test_round_trip(text):
    ids = encode(text)
    assert ids.dtype == np.uint16 and ids.ndim == 1
    assert len(ids) == len(text.encode("utf-8"))
    assert decode(ids) == text


def test_ids_are_bytes():
    assert VOCAB_SIZE == 256
    assert encode("Aé").tolist() == [0x41, 0xC3, 0xA9]
    assert encode_bytes(bytes(range(256))).tolist() == list(range(256))


def test_decode_accepts_tensor_and_list():
    ids = encode("tensor ✓")
    assert decode(torch.from_numpy(ids.astype(np.int64))) == "tensor ✓"
    assert decode(ids.tolist()) == "tensor ✓"


def test_decode_invalid_utf8_replaces():
    cut = encode("é")[:1]  # half of a two-byte character
    assert decode(cut) == "\ufffd"


@pytest.mark.parametrize("bad", [[256], [-1]])
def test_decode_rejects_out_of_vocab(bad):
    with pytest.raises(ValueError, match=r"\[0, 256\)"):
        decode(bad)
