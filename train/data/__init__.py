"""Data for training: documents -> tokenizer -> cached token arrays -> fixed-length windows."""

import os
from dataclasses import dataclass

import numpy as np

from . import corpus, tokenizer, tokens
from .corpus import DataError
from .dataset import TokenWindows
from .sampler import ResumableSampler


@dataclass
class Data:
    train: TokenWindows
    val: TokenWindows
    vocab_size: int  # the tokenizer's (<= model.vocab_size)
    tokenizer_path: str  # "" for pre-tokenized memmap data without a tokenizer


def cache_root(cfg) -> str:
    root = cfg.cache_dir or os.environ.get("SPARSETRON_CACHE") or "~/.cache/sparsetron"
    return os.path.expanduser(root)


def _build_once(runtime, path: str, build) -> None:
    """Build a cached file on one rank per node (local rank 0), the others wait. Atomic writes make
    concurrent builders on a shared filesystem safe."""
    if runtime.local_rank == 0 and not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        build(path)
    runtime.barrier()


def _memmap(cfg, model_vocab: int, runtime):
    """(train tokens, val tokens, tokenizer path "") for pre-tokenized shards; every id of every train
    and val shard is checked against the vocabulary (once per file version: the verdict is cached)."""
    train_paths = [p for _, p in corpus._user_files(list(cfg.paths))]
    val_paths = [p for _, p in corpus._user_files(list(cfg.val_paths))] if cfg.val_paths else []
    train = tokens.open_tokens(train_paths, cfg.memmap_dtype)  # checks each size first
    val = tokens.open_tokens(val_paths, cfg.memmap_dtype) if val_paths else None
    if runtime.local_rank == 0:  # one scan per node; the other ranks then read the cached verdicts
        for p in train_paths + val_paths:
            tokens.shard_max_id(p, cfg.memmap_dtype, cache_root(cfg))
    runtime.barrier()
    for field, paths in (("data.paths", train_paths), ("data.val_paths", val_paths)):
        tokens.check_ids(paths, cfg.memmap_dtype, model_vocab, field, cache_root(cfg))
    if val is None:  # hold out the tail
        cut = int(len(train) * (1 - cfg.val_fraction))
        train, val = train.view(0, cut), train.view(cut, len(train))
    return train, val, ""


BIG_TEXT_BYTES = 100_000_000  # past this, tokenizing inside the training job is the slow path


def _hint_prepare(source: str, docs, log) -> None:
    total = sum(os.path.getsize(p) for p in {d.path for d in docs})
    if total > BIG_TEXT_BYTES:
        log(f"sparsetron: data={source} reads {total / 1e6:.0f} MB and tokenizes it inside the training job; "
            f"`sparsetron-prepare` does it once, offline, in parallel (then train with data=prepared)")


BPE_SAMPLE_CHARS = 100_000_000  # a BPE trained in the job sees at most this much text (the first documents)


def _sample(texts, limit: int):
    seen = 0
    for t in texts:
        yield t
        seen += len(t)
        if seen >= limit:
            return


def build_data(cfg, runtime, run_dir: str) -> Data:
    d, seq_len, model_vocab = cfg.data, cfg.train.seq_len, cfg.model.vocab_size
    log = print if runtime.rank == 0 else (lambda _msg: None)
    if d.source == "prepared":
        from .blend import build_prepared

        return build_prepared(cfg, runtime, run_dir, log)
    if d.source == "memmap":
        train_tokens, val_tokens, tok_path = _memmap(d, model_vocab, runtime)
        vocab = model_vocab
    else:
        docs = corpus.list_documents(d, log)
        if d.source in ("text", "pycode"):
            _hint_prepare(d.source, docs, log)
        train_docs, val_docs = corpus.split(docs, d.val_fraction)
        key = f"{d.source}-{corpus.fingerprint(docs)}-v{d.val_fraction}"
        tok_path = os.path.join(run_dir, "tokenizer.json")
        if not os.path.exists(tok_path):  # a resumed run keeps the tokenizer it started with
            if d.tokenizer == "bpe":
                cached = os.path.join(cache_root(d), "tokenizers", f"bpe{model_vocab}-{key}.json")
                _build_once(runtime, cached, lambda p: tokenizer.save_atomic(
                    tokenizer.train_bpe(_sample(corpus.read_texts(train_docs, d.jsonl_field), BPE_SAMPLE_CHARS),
                                        model_vocab), p))
                source = cached
            else:
                source = d.tokenizer
            if runtime.rank == 0:
                os.makedirs(run_dir, exist_ok=True)
                tokenizer.save_atomic(tokenizer.load(source), tok_path)
            runtime.barrier()
        tok = tokenizer.load(tok_path)
        vocab = tok.get_vocab_size()
        if vocab > model_vocab:
            raise DataError(f"model.vocab_size={model_vocab} is smaller than the tokenizer's {vocab} tokens "
                            f"({tok_path}); set model.vocab_size>={vocab}")
        eos = tokenizer.eos_id(tok)
        dtype = tokens.token_dtype(vocab)
        arrays = []
        for split_name, split_docs in (("train", train_docs), ("val", val_docs)):
            path = os.path.join(cache_root(d), "tokens", f"{key}-{tokenizer.digest(tok)}-{split_name}.bin")
            _build_once(runtime, path, lambda p, ds=split_docs: tokens.write_tokens(
                tok, corpus.read_texts(ds, d.jsonl_field), eos, p))
            arrays.append(np.memmap(path, dtype=dtype, mode="r"))
        train_tokens, val_tokens = arrays
    train, val = TokenWindows(train_tokens, seq_len), TokenWindows(val_tokens, seq_len)
    for name, windows, field in (("training", train, "data.paths"), ("validation", val, _val_field(d))):
        if len(windows) == 0:
            raise DataError(f"{field}: the {name} split has {len(windows.tokens)} tokens, fewer than "
                            f"train.seq_len+1={seq_len + 1}; inputs: {_inputs(d, name)}")
    return Data(train, val, vocab, tok_path)


def _val_field(d) -> str:
    return "data.val_paths" if d.source == "memmap" and d.val_paths else f"data.val_fraction={d.val_fraction}"


def _inputs(d, split_name: str) -> str:
    """The files behind a split, for an error about it."""
    if d.source in ("stdlib", "pycode"):
        return f"the {d.source} corpus capped by data.max_corpus_bytes={d.max_corpus_bytes}"
    patterns = d.val_paths if split_name == "validation" and d.source == "memmap" and d.val_paths else d.paths
    files = [p for _, p in corpus._user_files(list(patterns))]
    return ", ".join(f"{p} ({os.path.getsize(p)} bytes)" for p in files)


__all__ = ["Data", "DataError", "ResumableSampler", "TokenWindows", "build_data"]
