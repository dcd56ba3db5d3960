"""Data options (configs/data/*.yaml)."""

from dataclasses import dataclass, field
from typing import List


@dataclass
class DataSource:
    """One folder written by `sparsetron-prepare`, drawn with this (relative) weight."""

    path: str = ""
    weight: float = 1.0


@dataclass
class DataConfig:
    # stdlib:   this Python's own standard-library sources (exists offline on every machine)
    # pycode:   every .py file of this Python environment, stdlib + site-packages (hundreds of MB)
    # text:     files matched by `paths` globs (.txt/.md/... read whole, .jsonl one document per line)
    # memmap:   pre-tokenized flat shards (`paths` for train, `val_paths` for validation)
    # prepared: folders written by sparsetron-prepare, blended by weight (`sources`, `val_sources`)
    source: str = "stdlib"
    paths: List[str] = field(default_factory=list)
    val_paths: List[str] = field(default_factory=list)
    # data=prepared: Megatron-style blend; weights are normalised. With no val_sources, validation is the
    # blend (same weights) of each source's held-out split (sparsetron-prepare --val-fraction); a
    # val_sources folder is read whole (all its splits).
    sources: List[DataSource] = field(default_factory=list)
    val_sources: List[DataSource] = field(default_factory=list)
    jsonl_field: str = "text"
    memmap_dtype: str = "uint16"  # uint16 | uint32
    val_fraction: float = 0.05  # share of documents held out when no val_paths are given
    max_corpus_bytes: int = 6_000_000  # cap on the built-in corpora (stdlib, pycode) only (0 = no cap); never on your files
    tokenizer: str = "bpe"  # "bpe" = train a byte-level BPE of model.vocab_size, or a tokenizer.json path
    cache_dir: str = ""  # tokenizer + tokenized-corpus cache; "" = $SPARSETRON_CACHE or ~/.cache/sparsetron
    prefetch: int = 2  # batches prepared ahead of the step (pinned on GPU)


def check_sources(d) -> None:
    """data=prepared: at least one source, each an existing folder with a positive weight."""
    import os

    from .validate import ConfigError

    if not d.sources:
        raise ConfigError("data.sources", "data=prepared needs at least one {path: <sparsetron-prepare folder>, weight: w}")
    for name in ("sources", "val_sources"):
        for i, s in enumerate(getattr(d, name)):
            if not os.path.isdir(os.path.expanduser(s.path)):
                raise ConfigError(f"data.{name}[{i}].path", f"{s.path!r} is not a folder; run sparsetron-prepare first")
            if not s.weight > 0:
                raise ConfigError(f"data.{name}[{i}].weight", f"got {s.weight}, must be > 0")
