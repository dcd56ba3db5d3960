"""Data options (configs/data/*.yaml)."""

from dataclasses import dataclass, field
from typing import List


@dataclass
class DataConfig:
    # stdlib: this Python's own standard-library sources (exists offline on every machine)
    # text:   files matched by `paths` globs (.txt/.md/... read whole, .jsonl one document per line)
    # memmap: pre-tokenized flat shards (`paths` for train, `val_paths` for validation)
    source: str = "stdlib"
    paths: List[str] = field(default_factory=list)
    val_paths: List[str] = field(default_factory=list)
    jsonl_field: str = "text"
    memmap_dtype: str = "uint16"  # uint16 | uint32
    val_fraction: float = 0.05  # share of documents held out when no val_paths are given
    max_corpus_bytes: int = 6_000_000  # cap on raw text read (0 = no cap)
    tokenizer: str = "bpe"  # "bpe" = train a byte-level BPE of model.vocab_size, or a tokenizer.json path
    cache_dir: str = ""  # tokenizer + tokenized-corpus cache; "" = $SPARSETRON_CACHE or ~/.cache/sparsetron
    prefetch: int = 2  # batches prepared ahead of the step (pinned on GPU)
