"""Byte-level tokenizer: token id == byte value, so the vocabulary is the 256 byte values.

No merges, no special tokens, nothing to download or train: any text (in fact any byte
string) round-trips exactly, which keeps the data path trivially reproducible. Token ids are
stored as uint16 so that token files written for larger vocabularies share one format.
"""
import numpy as np

VOCAB_SIZE = 256
TOKEN_DTYPE = np.dtype("<u2")  # little-endian uint16: the on-disk and in-memory token format


def encode_bytes(data: bytes) -> np.ndarray:
    """Token ids of a byte string: one uint16 id per byte, shape (len(data),)."""
    return np.frombuffer(data, dtype=np.uint8).astype(TOKEN_DTYPE)


def encode(text: str) -> np.ndarray:
    """Token ids of `text`: its UTF-8 bytes as uint16, shape (len(text.encode()),)."""
    return encode_bytes(text.encode("utf-8"))


def decode(ids) -> str:
    """Text of a sequence of token ids (numpy array, CPU tensor or list of ints).

    Byte sequences that are not valid UTF-8 (a model's sample may cut a multi-byte
    character in half) decode to U+FFFD instead of raising. Ids outside [0, 256) raise
    ValueError: they cannot come from this tokenizer.
    """
    arr = np.asarray(ids).reshape(-1)
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"token ids must be integers, got dtype {arr.dtype}")
    if arr.size and (int(arr.min()) < 0 or int(arr.max()) >= VOCAB_SIZE):
        raise ValueError(
            f"token ids must lie in [0, {VOCAB_SIZE}), got range "
            f"[{int(arr.min())}, {int(arr.max())}]"
        )
    return arr.astype(np.uint8).tobytes().decode("utf-8", errors="replace")
