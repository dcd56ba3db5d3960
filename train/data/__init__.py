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


def _memmap(cfg, model_vocab: int):
    """(train tokens, val tokens, tokenizer path "") for pre-tokenized shards."""
    train = tokens.open_tokens([p for _, p in corpus._user_files(list(cfg.paths))], cfg.memmap_dtype)
    if cfg.val_paths:
        val = tokens.open_tokens([p for _, p in corpus._user_files(list(cfg.val_paths))], cfg.memmap_dtype)
    else:  # hold out the tail
        cut = int(len(train) * (1 - cfg.val_fraction))
        train, val = train.view(0, cut), train.view(cut, len(train))
    top = int(np.max(train[: 1 << 20]))
    if top >= model_vocab:
        raise DataError(f"data.paths: token id {top} >= model.vocab_size={model_vocab}; check data.memmap_dtype "
                        f"or model.vocab_size")
    return train, val, ""


def build_data(cfg, runtime, run_dir: str) -> Data:
    d, seq_len, model_vocab = cfg.data, cfg.train.seq_len, cfg.model.vocab_size
    if d.source == "memmap":
        train_tokens, val_tokens, tok_path = _memmap(d, model_vocab)
        vocab = model_vocab
    else:
        docs = corpus.list_documents(d)
        train_docs, val_docs = corpus.split(docs, d.val_fraction)
        key = f"{d.source}-{corpus.fingerprint(docs)}-v{d.val_fraction}"
        tok_path = os.path.join(run_dir, "tokenizer.json")
        if not os.path.exists(tok_path):  # a resumed run keeps the tokenizer it started with
            if d.tokenizer == "bpe":
                cached = os.path.join(cache_root(d), "tokenizers", f"bpe{model_vocab}-{key}.json")
                _build_once(runtime, cached, lambda p: tokenizer.save_atomic(
                    tokenizer.train_bpe(corpus.read_texts(train_docs, d.jsonl_field), model_vocab), p))
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
    if len(val) == 0:
        raise DataError(f"the validation split has fewer than train.seq_len+1={seq_len + 1} tokens")
    return Data(train, val, vocab, tok_path)


__all__ = ["Data", "DataError", "ResumableSampler", "TokenWindows", "build_data"]
