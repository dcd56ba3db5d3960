"""Byte-level BPE tokenizer: trained on the training split with the `tokenizers` library, or
loaded from a local HF tokenizer.json. The one a run used is saved beside the run."""

import hashlib
import os
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from .corpus import DataError

EOS = "<|endoftext|>"


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def load(path: str) -> Tokenizer:
    try:
        return Tokenizer.from_file(os.path.expanduser(path))
    except Exception as err:  # tokenizers raises a bare Exception on a bad file
        raise DataError(f"data.tokenizer: cannot load {path!r} as a HF tokenizer.json ({err})") from None


def eos_id(tok: Tokenizer) -> int:
    for candidate in (EOS, "</s>", "<|end_of_text|>", "<eos>"):
        idx = tok.token_to_id(candidate)
        if idx is not None:
            return idx
    raise DataError("data.tokenizer: the tokenizer has no end-of-text token (<|endoftext|>, </s>, ...)")


def digest(tok: Tokenizer) -> str:
    return hashlib.sha256(tok.to_str().encode()).hexdigest()[:16]


def save_atomic(tok: Tokenizer, path: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    tok.save(tmp)
    os.replace(tmp, path)
