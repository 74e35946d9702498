"""Training data: byte tokenizer, token corpora (built-in stdlib corpus or a --data file) and
a sampler whose batches are identical under every parallel layout.

Read in this order: tokenizer.py (ids are bytes), corpus.py (where tokens come from, how
they split), sampler.py (which windows each step, rank and micro-batch gets).
"""
from pyruntime.data.corpus import (
    DEFAULT_MAX_BYTES, DEFAULT_VAL_FRACTION, TOKEN_FILE_SUFFIXES, Corpus, DataError,
    DataFileNotFoundError, check_vocab, load_corpus, max_token_id, stdlib_files,
    write_token_file,
)
from pyruntime.data.sampler import BatchSampler, validation_batches
from pyruntime.data.tokenizer import TOKEN_DTYPE, VOCAB_SIZE, decode, encode, encode_bytes

__all__ = [
    "DEFAULT_MAX_BYTES", "DEFAULT_VAL_FRACTION", "TOKEN_DTYPE", "TOKEN_FILE_SUFFIXES",
    "VOCAB_SIZE", "BatchSampler", "Corpus", "DataError", "DataFileNotFoundError",
    "check_vocab", "decode", "encode", "encode_bytes", "load_corpus", "max_token_id",
    "stdlib_files", "validation_batches", "write_token_file",
]
