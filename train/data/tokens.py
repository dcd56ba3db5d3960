"""Token arrays on disk (flat uint16/uint32 memmaps, the nanoGPT/Megatron habit), built once per
(corpus, tokenizer) and cached; written to a temp file and renamed so a crash never leaves half a file."""

import hashlib
import json
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


class ShardedTokens:
    """Several memory-mapped shards read as one flat token array, without loading them: a slice
    reads only the shards it spans (np.concatenate of the memmaps would read every shard into RAM)."""

    def __init__(self, shards: List[np.ndarray], start: int = 0, stop: int = -1):
        self.shards = shards
        self.offsets = np.cumsum([0] + [len(s) for s in shards])
        self.start, self.stop = start, int(self.offsets[-1]) if stop < 0 else stop

    def __len__(self) -> int:
        return self.stop - self.start

    def view(self, lo: int, hi: int) -> "ShardedTokens":
        """Tokens [lo, hi) of this array, still lazy."""
        return ShardedTokens(self.shards, self.start + lo, self.start + hi)

    def __getitem__(self, key: slice) -> np.ndarray:
        lo, hi, step = key.indices(len(self))
        if step != 1:
            raise ValueError("ShardedTokens supports contiguous slices only")
        lo, hi = self.start + lo, self.start + max(hi, lo)
        first = int(np.searchsorted(self.offsets, lo, side="right")) - 1
        parts = []
        for i in range(first, len(self.shards)):
            a, b = self.offsets[i], self.offsets[i + 1]
            if a >= hi:
                break
            parts.append(self.shards[i][max(lo, a) - a : min(hi, b) - a])
        return parts[0] if len(parts) == 1 else np.concatenate(parts)


def open_tokens(paths: List[str], dtype: str) -> ShardedTokens:
    """Memory-map one or more flat token shards as one lazy array."""
    arrays = []
    for p in paths:
        size = os.path.getsize(p)
        itemsize = np.dtype(dtype).itemsize
        if size == 0 or size % itemsize:
            raise DataError(f"{p}: size {size} is not a positive multiple of {dtype} ({itemsize} bytes); "
                            f"check data.memmap_dtype")
        arrays.append(np.memmap(p, dtype=dtype, mode="r"))
    return ShardedTokens(arrays)


CHECK_CHUNK = 1 << 24  # tokens per read when scanning a shard (32-64 MB)


def _max_id(path: str, dtype: str) -> int:
    arr = np.memmap(path, dtype=dtype, mode="r")
    top = 0
    for lo in range(0, len(arr), CHECK_CHUNK):
        top = max(top, int(arr[lo : lo + CHECK_CHUNK].max()))
    return top


def _first_at_least(path: str, dtype: str, limit: int) -> int:
    arr = np.memmap(path, dtype=dtype, mode="r")
    for lo in range(0, len(arr), CHECK_CHUNK):
        bad = np.flatnonzero(arr[lo : lo + CHECK_CHUNK] >= limit)
        if len(bad):
            return lo + int(bad[0])
    return -1


def shard_max_id(path: str, dtype: str, cache_dir: str) -> int:
    """The largest token id in a shard, scanned completely once and cached by (path, size, mtime):
    later runs on the same unchanged file read only the small verdict."""
    st = os.stat(path)
    key = {"path": os.path.abspath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "dtype": str(dtype)}
    name = hashlib.sha1(key["path"].encode()).hexdigest()[:20] + ".json"
    cached = os.path.join(cache_dir, "token-checks", name)
    try:
        with open(cached) as f:
            record = json.load(f)
        if {k: record.get(k) for k in key} == key:
            return int(record["max_id"])
    except (OSError, ValueError, KeyError):
        pass  # no or stale verdict: scan
    top = _max_id(path, dtype)
    try:
        os.makedirs(os.path.dirname(cached), exist_ok=True)
        tmp = f"{cached}.tmp.{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump({**key, "max_id": top}, f)
        os.replace(tmp, cached)
    except OSError:
        pass  # a read-only cache only costs a rescan next time
    return top


def check_ids(paths: List[str], dtype: str, vocab_size: int, field: str, cache_dir: str) -> None:
    """Every token id of every shard < vocab_size, or one DataError naming the shard and position."""
    for p in paths:
        if shard_max_id(p, dtype, cache_dir) >= vocab_size:
            pos = _first_at_least(p, dtype, vocab_size)
            bad = int(np.memmap(p, dtype=dtype, mode="r")[pos])
            raise DataError(f"{field}: {p}: token id {bad} at position {pos} >= model.vocab_size={vocab_size}; "
                            f"check data.memmap_dtype or model.vocab_size")
