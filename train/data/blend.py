"""data=prepared: folders written by sparsetron-prepare, blended by weight.

Megatron's blend: sample i of the blend comes from the source whose share so far lags its weight the
most (the greedy "largest error" rule), so every prefix of the blend holds each source within one
sample of its weight. Here the rule is run once over a period of PERIOD samples (weights rounded to
1/PERIOD) and the period repeats, so the mapping is a pure function of the index with O(PERIOD)
memory, whatever the corpus size. A blend epoch has as many samples as the sources together (rounded up
to a period); a source drawn more than its size repeats, one drawn less walks on through its samples
epoch after epoch (the sampler's indices carry the epoch), so nothing is left unseen for good. A
source's k-th draw is its sample (k * stride) mod n, stride ~ 0.618 n and coprime with n: a bijection in
O(1) memory that spreads any run of draws over the whole source (not one contiguous region). The
ResumableSampler permutes blend indices as for any dataset, so the guarantees stay: the same samples
for any dp x micro-batch x accumulation split, and an exact resume from consumed_samples alone."""

import hashlib
import math
import os
import shutil
from typing import List, Sequence

import numpy as np
import torch

from .corpus import DataError
from .dataset import TokenWindows
from .prepare import FORMAT, VERSION, read_manifest
from .tokens import ShardedTokens

PERIOD = 10_000


def blend_pattern(weights: Sequence[float], period: int = PERIOD):
    """(source of each position in a period, its occurrence number within the period, per-source counts)."""
    w = np.asarray(weights, dtype=np.float64) / np.sum(weights)
    counts = np.floor(w * period).astype(np.int64)
    for d in np.argsort(-(w * period - counts), kind="stable")[: period - counts.sum()]:
        counts[d] += 1  # largest remainder: the counts add up to the period
    target = counts / period
    taken = np.zeros(len(w), dtype=np.int64)
    source = np.empty(period, dtype=np.int64)
    rank = np.empty(period, dtype=np.int64)
    for i in range(period):
        d = int(np.argmax(target * (i + 1) - taken))
        source[i], rank[i] = d, taken[d]
        taken[d] += 1
    return source, rank, counts


def _stride(n: int) -> int:
    """A step coprime with n near the golden section of n: k -> k*stride mod n visits every sample once
    per n draws, and a run of consecutive draws lands evenly spread over the source."""
    stride = max(1, int(n * 0.6180339887))
    while math.gcd(stride, n) != 1:
        stride += 1
    return stride


class BlendedWindows:
    """seq_len+1-token samples drawn from several TokenWindows by weight (see the module doc)."""

    def __init__(self, parts: List[TokenWindows], weights: Sequence[float], names: Sequence[str], period: int = PERIOD):
        self.parts, self.names, self.period = parts, list(names), period
        self.source, self.rank, self.counts = blend_pattern(weights, period)
        for n, c, name in zip(weights, self.counts, names):
            if c == 0:
                raise DataError(f"data.sources: {name} has weight {n}, below 1/{period} of the total; raise it or "
                                f"drop the source")
        total = sum(len(p) for p in parts)
        self.periods = max(1, -(-total // period))  # one epoch = the sources' own size, in whole periods
        self.num_samples = self.periods * period
        self.seq_len = parts[0].seq_len
        self.strides = [_stride(len(p)) for p in parts]

    def __len__(self) -> int:
        return self.num_samples

    def locate(self, index: int):
        """(source, sample within it) of blend index `index` (which may run past one epoch)."""
        period_no, r = divmod(int(index), self.period)
        d = int(self.source[r])
        k = period_no * int(self.counts[d]) + int(self.rank[r])  # this source's k-th draw, over all epochs
        return d, (k * self.strides[d]) % len(self.parts[d])

    def batch(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.seq_len
        rows = []
        for i in indices:
            d, j = self.locate(i)
            rows.append(np.asarray(self.parts[d].tokens[j * s : j * s + s + 1], dtype=np.int64))
        t = torch.from_numpy(np.stack(rows))
        return t[:, :-1], t[:, 1:]


class PreparedFolder:
    """One sparsetron-prepare output folder, checked against its manifest."""

    def __init__(self, path: str, field: str):
        self.path = os.path.abspath(os.path.expanduser(path))
        self.field = field
        m = read_manifest(self.path)
        if m is None:
            raise DataError(f"{field}: {self.path} has no readable manifest.json; run sparsetron-prepare on it "
                            f"(an interrupted run leaves none)")
        if m.get("format") != FORMAT or m.get("version") != VERSION:
            raise DataError(f"{field}: {self.path}/manifest.json is format {m.get('format')} v{m.get('version')}, "
                            f"expected {FORMAT} v{VERSION}; re-run sparsetron-prepare")
        self.manifest = m
        self.dtype = np.dtype(m["dtype"])
        self.tokenizer_sha = m["tokenizer"]["sha256"]
        self.vocab_size = int(m["tokenizer"]["vocab_size"])
        self.tokenizer_path = os.path.join(self.path, m["tokenizer"]["file"])

    def tokens(self, splits: Sequence[str]):
        shards = []
        for split in splits:
            for s in self.manifest["splits"][split]["shards"]:
                p = os.path.join(self.path, s["tokens"])
                want = s["num_tokens"] * self.dtype.itemsize
                if not os.path.isfile(p) or os.path.getsize(p) != want:
                    raise DataError(f"{self.field}: {p} is missing or not {want} bytes as its manifest says; "
                                    f"re-run sparsetron-prepare")
                shards.append(np.memmap(p, dtype=self.dtype, mode="r"))
        return ShardedTokens(shards) if shards else None


def _open(sources, field: str, splits: Sequence[str], seq_len: int):
    folders, parts = [], []
    for i, s in enumerate(sources):
        f = PreparedFolder(s.path, f"{field}[{i}].path")
        tokens = f.tokens(splits)
        n = len(tokens) if tokens is not None else 0
        if n < seq_len + 1:
            hint = ("; prepare it with --val-fraction > 0 or name data.val_sources" if splits == ("val",) else "")
            raise DataError(f"{field}[{i}]: {f.path} has {n} tokens in split(s) {'+'.join(splits)}, fewer than "
                            f"train.seq_len+1={seq_len + 1}{hint}")
        folders.append(f)
        parts.append(TokenWindows(tokens, seq_len))
    return folders, parts


def build_prepared(cfg, runtime, run_dir: str, log):
    from . import Data

    d, seq_len, model_vocab = cfg.data, cfg.train.seq_len, cfg.model.vocab_size
    if not d.sources:
        raise DataError("data.sources: data=prepared needs at least one {path: <folder>, weight: w}")
    folders, parts = _open(d.sources, "data.sources", ("train",), seq_len)
    if d.val_sources:  # whole folders (every split) as validation
        val_folders, val_parts = _open(d.val_sources, "data.val_sources", ("train", "val"), seq_len)
        val_weights = [s.weight for s in d.val_sources]
    else:
        val_folders, val_parts = _open(d.sources, "data.sources", ("val",), seq_len)
        val_weights = [s.weight for s in d.sources]
    first = folders[0]
    for f in folders[1:] + val_folders:
        if f.tokenizer_sha != first.tokenizer_sha:
            raise DataError(f"{f.field}: {f.path} was tokenized with a different tokenizer than {first.path} "
                            f"(sha256 {f.tokenizer_sha[:12]} vs {first.tokenizer_sha[:12]}); prepare both with one")
    if first.vocab_size > model_vocab:
        raise DataError(f"model.vocab_size={model_vocab} is smaller than the tokenizer's {first.vocab_size} tokens "
                        f"({first.tokenizer_path}); set model.vocab_size>={first.vocab_size}")
    train = BlendedWindows(parts, [s.weight for s in d.sources], [f.path for f in folders])
    val = BlendedWindows(val_parts, val_weights, [f.path for f in val_folders])
    shares = ", ".join(f"{os.path.basename(f.path)} {c / PERIOD:.3f}" for f, c in zip(folders, train.counts))
    if run_dir:  # the tokenizer goes beside the run, where HF export looks for it
        saved = os.path.join(run_dir, "tokenizer.json")
        if runtime.rank == 0 and not os.path.exists(saved):
            os.makedirs(run_dir, exist_ok=True)
            shutil.copyfile(first.tokenizer_path, f"{saved}.tmp")
            os.replace(f"{saved}.tmp", saved)
        runtime.barrier()
        with open(saved, "rb") as f:  # a resumed run must see the ids it was trained on
            if hashlib.sha256(f.read()).hexdigest() != first.tokenizer_sha:
                raise DataError(f"data.sources: {first.path} was tokenized with a different tokenizer than the one "
                                f"this run started with ({saved}); prepare it with that tokenizer or start a new run")
    log(f"sparsetron: data=prepared, {len(folders)} source(s) ({shares}), {len(train)} samples per blend epoch")
    return Data(train, val, first.vocab_size, first.tokenizer_path)
