"""Token arrays on disk (flat uint16/uint32 memmaps, the nanoGPT/Megatron habit), built once per
(corpus, tokenizer) and cached; written to a temp file and renamed so a crash never leaves half a file."""

import os
from typing import Iterable, List

import numpy as np
from tokenizers import Tokenizer

from .corpus import DataError


def token_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32


def write_tokens(tok: Tokenizer, texts: Iterable[str], eos: int, path: str, batch: int = 64) -> None:
    """Tokenize documents, each followed by EOS, into one flat array at `path`."""
    dtype = token_dtype(tok.get_vocab_size())
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as out:
        pending: List[str] = []

        def flush():
            for enc in tok.encode_batch(pending, add_special_tokens=False):
                out.write(np.asarray(enc.ids + [eos], dtype=dtype).tobytes())
            pending.clear()

        for text in texts:
            pending.append(text)
            if len(pending) == batch:
                flush()
        flush()
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, path)


def open_tokens(paths: List[str], dtype: str) -> np.ndarray:
    """Memory-map one or more flat token shards as one array (concatenated if several)."""
    arrays = []
    for p in paths:
        size = os.path.getsize(p)
        itemsize = np.dtype(dtype).itemsize
        if size == 0 or size % itemsize:
            raise DataError(f"{p}: size {size} is not a positive multiple of {dtype} ({itemsize} bytes); "
                            f"check data.memmap_dtype")
        arrays.append(np.memmap(p, dtype=dtype, mode="r"))
    return arrays[0] if len(arrays) == 1 else np.concatenate(arrays)
