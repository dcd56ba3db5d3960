"""sparsetron-prepare: tokenize a corpus once, offline, into token shards that `data=prepared` reads.

    sparsetron-prepare '/data/web/*.jsonl.gz' --out /data/web_tok --tokenizer /models/llama/tokenizer.json
    sparsetron-prepare '/data/books/*.txt' --out /data/books_tok --tokenizer bpe --vocab-size 32000

Inputs: .txt/.md/.py/... (one document per file), .jsonl and .jsonl.gz (one document per line, field
--field), .parquet (column --field) and Hugging Face `datasets` folders written by `save_to_disk`
(their .arrow files). Parquet and arrow are read with pyarrow, an optional dependency: without it
those inputs are refused with one line (convert to jsonl, or `pip install pyarrow`). The `datasets`
package itself is not needed: a saved folder is plain Arrow stream files, so pyarrow reads it and
the tool does not pull in datasets' own dependency tree. `@stdlib` and `@pycode` name the built-in
corpora (data=stdlib, data=pycode: every .py file of this Python environment), split by the same hash.

Output folder: tokens-<split>-NNNNN.bin (flat uint16 when the vocabulary fits, else uint32; every
document followed by EOS), docs-<split>-NNNNN.npy (int64 offsets of document starts, plus the end),
tokenizer.json, and manifest.json written last. Every file is written under a temporary name and
renamed, and an old manifest is removed before anything changes, so an interrupted run leaves a folder
that training refuses (no manifest) rather than half a shard; the next run starts it over. A re-run on
unchanged inputs (paths, sizes, mtimes, tokenizer, options) does nothing.

The main process only reads bytes and writes arrays; N worker processes parse and call
`tokenizers`' encode_batch (single-threaded each, so N workers use N cores)."""

import argparse
import collections
import glob
import gzip
import hashlib
import itertools
import json
import multiprocessing
import os
import sys
import time
import zlib
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np

from .corpus import DataError, report_skipped
from .tokens import token_dtype

FORMAT = "sparsetron-prepared"
VERSION = 1
MANIFEST = "manifest.json"
TEXT_FIELD_FORMATS = (".jsonl", ".jsonl.gz", ".parquet", ".arrow")


# --- inputs ------------------------------------------------------------------------------------------

def _kind(path: str) -> str:
    for suffix in TEXT_FIELD_FORMATS:
        if path.endswith(suffix):
            return suffix.lstrip(".")
    return "text"


def _datasets_folder(folder: str) -> List[str]:
    """The .arrow files of a `save_to_disk` folder, in the order its state.json lists them."""
    state = os.path.join(folder, "state.json")
    if os.path.isfile(state):
        with open(state) as f:
            files = [os.path.join(folder, d["filename"]) for d in json.load(f).get("_data_files", [])]
        if files:
            return files
    files = sorted(glob.glob(os.path.join(folder, "*.arrow")))
    splits_file = os.path.join(folder, "dataset_dict.json")
    if not files and os.path.isfile(splits_file):  # a DatasetDict: one folder per split
        with open(splits_file) as f:
            splits = json.load(f).get("splits", [])
        raise DataError(f"inputs: {folder} holds several splits ({', '.join(splits)}); pass one split's folder, "
                        f"e.g. {os.path.join(folder, splits[0] if splits else 'train')}")
    if not files:
        raise DataError(f"inputs: {folder} is a folder without .arrow files (not a `datasets` save_to_disk "
                        f"folder); pass a glob of files instead, e.g. '{folder}/**/*.jsonl'")
    return files


BUILTIN = {"@stdlib": "stdlib", "@pycode": "pycode"}  # the built-in corpora of data=stdlib / data=pycode


def find_inputs(patterns: List[str]) -> Tuple[List[str], Dict[str, str]]:
    """(input files in a fixed order, document names of built-in corpus files). Each pattern's matches
    are sorted, folders expanded as datasets folders; @stdlib / @pycode are the built-in corpora, whose
    files keep data=stdlib/pycode's names so that --val-fraction holds out the same documents."""
    from .corpus import _pycode_files, _stdlib_files

    files, names = [], {}
    for pattern in patterns:
        if pattern in BUILTIN:
            listed = (_stdlib_files if pattern == "@stdlib" else _pycode_files)(0)
            files += [p for _, p in listed]
            names.update({p: n for n, p in listed})
            continue
        matches = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
        if not matches:
            raise DataError(f"inputs: no file matches {pattern!r}")
        for m in matches:
            files += _datasets_folder(m) if os.path.isdir(m) else [os.path.abspath(m)]
    if any(_kind(p) in ("parquet", "arrow") for p in files):
        _pyarrow()  # refuse before any work
    return files, names


def _pyarrow():
    try:
        import pyarrow  # noqa: F401
        import pyarrow.ipc  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise DataError("inputs: parquet and `datasets` folders need pyarrow (pip install pyarrow); "
                        "or convert them to .jsonl / .jsonl.gz, which need nothing extra") from None
    return pyarrow


def _blocks(f, chunk_bytes: int) -> Iterator[bytes]:
    """Whole lines, about chunk_bytes at a time."""
    rest = b""
    while True:
        block = f.read(chunk_bytes)
        if not block:
            break
        block = rest + block
        cut = block.rfind(b"\n") + 1
        if cut == 0:
            rest = block
            continue
        rest = block[cut:]
        yield block[:cut]
    if rest:
        yield rest


def tasks(files: List[str], field: str, chunk_bytes: int, names: Optional[Dict[str, str]] = None) -> Iterator[tuple]:
    """Work items (kind, name, first_index, payload, input_bytes) in input order; input_bytes is the
    share of the input files' size the item stands for (the progress bar's unit). jsonl blocks stay
    bytes: parsing happens in the workers, so the main process only reads."""
    texts: List[Tuple[str, str]] = []  # (document name, path) of text files, grouped
    pending = 0
    for path in files:
        kind = _kind(path)
        if kind == "text":
            texts.append(((names or {}).get(path, path), path))
            pending += os.path.getsize(path)
            if pending >= chunk_bytes:
                yield "text", "", 0, texts, pending
                texts, pending = [], 0
            continue
        if texts:  # keep the documents in input order
            yield "text", "", 0, texts, pending
            texts, pending = [], 0
        if kind in ("jsonl", "jsonl.gz"):
            line = 0
            with open(path, "rb") as raw:
                f = gzip.GzipFile(fileobj=raw) if kind == "jsonl.gz" else raw
                done = 0
                for block in _blocks(f, chunk_bytes):
                    yield "jsonl", path, line, block, raw.tell() - done  # compressed bytes for .gz
                    done = raw.tell()
                    line += block.count(b"\n") + (not block.endswith(b"\n"))
        else:  # parquet / arrow: column `field` in record batches
            pa = _pyarrow()
            row, size = 0, os.path.getsize(path)
            for batch, total_rows in _record_batches(pa, path, kind, field):
                column = batch.column(batch.schema.get_field_index(field)).to_pylist()
                yield "rows", path, row, column, max(1, size * len(column) // max(total_rows, 1))
                row += len(column)
    if texts:
        yield "text", "", 0, texts, pending


def _record_batches(pa, path: str, kind: str, field: str):
    """(record batch with column `field`, the file's row count)."""
    if kind == "parquet":
        pf = pa.parquet.ParquetFile(path)
        if field not in pf.schema_arrow.names:
            raise DataError(f"{path}: no column --field={field!r} (columns: {', '.join(pf.schema_arrow.names)})")
        for batch in pf.iter_batches(batch_size=4096, columns=[field]):
            yield batch, pf.metadata.num_rows
        return
    with pa.memory_map(path) as source:
        try:
            table = pa.ipc.open_stream(source).read_all()  # memory-mapped: no copy of the file
        except pa.ArrowInvalid:
            table = pa.ipc.open_file(source).read_all()
        if field not in table.schema.names:
            raise DataError(f"{path}: no column --field={field!r} (columns: {', '.join(table.schema.names)})")
        for batch in table.select([field]).to_batches(max_chunksize=4096):
            yield batch, table.num_rows


# --- workers -----------------------------------------------------------------------------------------

_TOK = None
_EOS = 0


def _init_worker(tokenizer_json: str, eos: int) -> None:
    global _TOK, _EOS
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per worker; N workers = N cores
    from tokenizers import Tokenizer

    _TOK = Tokenizer.from_str(tokenizer_json)
    _TOK.no_truncation()  # a tokenizer.json may carry truncation/padding meant for inference
    _TOK.no_padding()
    _EOS = eos


def documents(task, field: str) -> Tuple[List[str], List[str], List[Tuple[str, str]]]:
    """(names, texts, skipped) of one work item; a malformed jsonl line is a DataError naming it."""
    kind, path, first, payload, _ = task
    names, texts, skipped = [], [], []
    if kind == "jsonl":
        for i, line in enumerate(payload.split(b"\n")):
            if not line.strip():
                continue
            try:
                text = json.loads(line)[field]
            except (ValueError, KeyError, TypeError) as err:
                raise DataError(f"{path}:{first + i + 1}: expected a JSON object with a string field "
                                f"--field={field!r} ({type(err).__name__}: {str(err)[:80]})") from None
            if not isinstance(text, str):
                raise DataError(f"{path}:{first + i + 1}: field {field!r} is {type(text).__name__}, not a string")
            if not text:
                continue  # an empty document adds nothing (as in parquet/arrow rows)
            names.append(f"{path}:{first + i}")
            texts.append(text)
    elif kind == "rows":
        for i, text in enumerate(payload):
            if isinstance(text, str) and text:
                names.append(f"{path}:{first + i}")
                texts.append(text)
    else:
        for name, p in payload:
            try:
                with open(p, "rb") as f:
                    raw = f.read()
            except OSError as err:
                skipped.append((p, f"unreadable ({err.strerror})"))
                continue
            if not raw.strip():
                skipped.append((p, "empty"))
                continue
            try:
                texts.append(raw.decode("utf-8", errors="replace" if name != p else "strict"))
                names.append(name)
            except UnicodeDecodeError as err:
                skipped.append((p, f"not UTF-8 (byte {err.start})"))
    return names, texts, skipped


def is_validation(name: str, val_fraction: float) -> bool:
    return val_fraction > 0 and zlib.crc32(name.encode()) % 10_000 < val_fraction * 10_000


def _flatten(encodings, eos: int, dtype) -> Tuple[np.ndarray, np.ndarray]:
    """(tokens with EOS after each document, per-document lengths including the EOS)."""
    ids = [e.ids for e in encodings]  # each .ids builds a Python list: once per document
    lens = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    total = int(lens.sum())
    flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64, count=total)
    out = np.full(total + len(lens), eos, dtype=np.int64)
    out[np.arange(total) + np.repeat(np.arange(len(lens)), lens)] = flat
    return out.astype(dtype, copy=False) if np.iinfo(dtype).max >= out.max(initial=0) else out, lens + 1


def encode_task(args) -> dict:
    task, field, val_fraction, dtype = args
    names, texts, skipped = documents(task, field)
    encodings = _TOK.encode_batch(texts, add_special_tokens=False) if texts else []
    result = {"skipped": skipped, "bytes": task[4], "docs": len(names)}
    val = np.fromiter((is_validation(n, val_fraction) for n in names), dtype=bool, count=len(names))
    for split, keep in (("train", ~val), ("val", val)):
        chosen = [e for e, k in zip(encodings, keep) if k] if val.any() else (encodings if split == "train" else [])
        result[split] = _flatten(chosen, _EOS, np.dtype(dtype)) if chosen else None
    return result


# --- output ------------------------------------------------------------------------------------------

def _write_atomic(path: str, write) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class ShardWriter:
    """Appends documents of one split to shards of about shard_tokens tokens; a shard becomes visible
    (renamed from .tmp) only when complete, with its document index beside it."""

    def __init__(self, out: str, split: str, dtype, vocab_size: int, shard_tokens: int):
        self.out, self.split, self.dtype = out, split, np.dtype(dtype)
        self.vocab_size, self.shard_tokens = vocab_size, shard_tokens
        self.shards: List[dict] = []
        self.max_id = -1
        self._file = None
        self._lens: List[np.ndarray] = []
        self._tokens = 0

    def _name(self, prefix: str, ext: str) -> str:
        return f"{prefix}-{self.split}-{len(self.shards):05d}.{ext}"

    def add(self, tokens: np.ndarray, lens: np.ndarray, where: str) -> None:
        top = int(tokens.max(initial=0))
        if top >= self.vocab_size:  # every id is checked before it is written
            raise DataError(f"{where}: token id {top} >= the tokenizer's vocabulary size {self.vocab_size}")
        if tokens.dtype != self.dtype:
            tokens = tokens.astype(self.dtype)
        self.max_id = max(self.max_id, top)
        if self._file is None:
            self._file = open(os.path.join(self.out, self._name("tokens", "bin") + ".tmp"), "wb")
        self._file.write(tokens.tobytes())
        self._lens.append(lens)
        self._tokens += len(tokens)
        if self._tokens >= self.shard_tokens:
            self.close_shard()

    def close_shard(self) -> None:
        if self._file is None:
            return
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        tokens_name, docs_name = self._name("tokens", "bin"), self._name("docs", "npy")
        lens = np.concatenate(self._lens)
        offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
        _write_atomic(os.path.join(self.out, docs_name), lambda f: np.save(f, offsets))
        os.replace(os.path.join(self.out, tokens_name + ".tmp"), os.path.join(self.out, tokens_name))
        self.shards.append({"tokens": tokens_name, "docs": docs_name, "num_tokens": int(offsets[-1]),
                            "num_docs": len(lens)})
        self._file, self._lens, self._tokens = None, [], 0

    def summary(self) -> dict:
        self.close_shard()
        return {"shards": self.shards, "num_tokens": sum(s["num_tokens"] for s in self.shards),
                "num_docs": sum(s["num_docs"] for s in self.shards), "max_id": self.max_id}


def _source_stats(files: List[str]) -> List[dict]:
    out = []
    for p in files:
        st = os.stat(p)
        out.append({"path": p, "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    return out


def read_manifest(folder: str) -> Optional[dict]:
    try:
        with open(os.path.join(folder, MANIFEST)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _up_to_date(out: str, old: Optional[dict], sources: List[dict], options: dict) -> bool:
    if not old or old.get("version") != VERSION or old.get("sources") != sources or old.get("options") != options:
        return False
    tok = os.path.join(out, "tokenizer.json")
    if not os.path.isfile(tok) or _sha256(tok) != old["tokenizer"]["sha256"]:
        return False
    itemsize = np.dtype(old["dtype"]).itemsize
    for split in old["splits"].values():
        for s in split["shards"]:
            p = os.path.join(out, s["tokens"])
            if not os.path.isfile(p) or os.path.getsize(p) != s["num_tokens"] * itemsize:
                return False
            if not os.path.isfile(os.path.join(out, s["docs"])):
                return False
    return True


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _clear(out: str) -> None:
    """Remove a previous run's outputs (manifest first, so a half-cleared folder is never read)."""
    if os.path.exists(os.path.join(out, MANIFEST)):
        os.remove(os.path.join(out, MANIFEST))
    for pattern in ("tokens-*.bin", "docs-*.npy", "*.tmp"):
        for p in glob.glob(os.path.join(out, pattern)):
            os.remove(p)


# --- the tool ----------------------------------------------------------------------------------------

def _tokenizer(args, files: List[str], names: Dict[str, str]):
    """(Tokenizer, its tokenizer.json text): loaded, or a byte-level BPE trained on a sample."""
    from . import tokenizer as toklib

    if args.tokenizer != "bpe":
        tok = toklib.load(args.tokenizer)
    else:
        def sample() -> Iterator[str]:
            seen = 0
            for task in tasks(files, args.field, args.chunk_bytes, names):
                for text in documents(task, args.field)[1]:
                    yield text
                    seen += len(text)
                if seen >= args.bpe_sample_bytes:
                    return
        tok = toklib.train_bpe(sample(), args.vocab_size)
    toklib.eos_id(tok)  # refuse a tokenizer without an end-of-text token before any work
    return tok


def prepare(args, log=print) -> dict:
    """Run the tool; returns the manifest (the old one when the inputs are unchanged)."""
    from . import tokenizer as toklib

    out = os.path.abspath(os.path.expanduser(args.out))
    if args.tokenizer != "bpe" and not os.path.isfile(os.path.expanduser(args.tokenizer)):
        raise DataError(f"--tokenizer: {args.tokenizer!r} is not a file; give a tokenizer.json or 'bpe'")
    files, names = find_inputs(args.inputs)
    sources = _source_stats(files)
    tok_arg = args.tokenizer if args.tokenizer == "bpe" else os.path.abspath(os.path.expanduser(args.tokenizer))
    options = {"field": args.field, "val_fraction": args.val_fraction, "shard_tokens": args.shard_tokens,
               "tokenizer": tok_arg, "tokenizer_stat": _source_stats([tok_arg])[0] if tok_arg != "bpe" else None,
               "vocab_size": args.vocab_size if tok_arg == "bpe" else None,
               "bpe_sample_bytes": args.bpe_sample_bytes if tok_arg == "bpe" else None}
    old = read_manifest(out)
    if _up_to_date(out, old, sources, options):
        log(f"sparsetron-prepare: {out} is up to date ({len(files)} input files unchanged); nothing to do")
        return old
    os.makedirs(out, exist_ok=True)
    _clear(out)
    tok = _tokenizer(args, files, names)
    eos, vocab = toklib.eos_id(tok), tok.get_vocab_size()
    dtype = np.dtype(token_dtype(vocab))
    tok_json = tok.to_str()
    toklib.save_atomic(tok, os.path.join(out, "tokenizer.json"))
    writers = {s: ShardWriter(out, s, dtype, vocab, args.shard_tokens) for s in ("train", "val")}
    skipped: List[Tuple[str, str]] = []
    total_bytes = sum(s["size"] for s in sources)
    start = time.perf_counter()
    bar = _progress(total_bytes)
    docs_per_file = collections.Counter()
    work = tasks(files, args.field, args.chunk_bytes, names)
    for task, result in _run_pool(work, args, tok_json, eos, dtype.name):
        skipped += result["skipped"]
        docs_per_file[task[1]] += result["docs"]
        where = task[1] or "text files"
        for split in ("train", "val"):
            if result[split] is not None:
                writers[split].add(*result[split], where)
        bar.update(result["bytes"])
    bar.close()
    # a jsonl/parquet/arrow file that gave no document (text files are checked one by one in the workers)
    skipped += [(p, "empty") for p in files if _kind(p) != "text" and not docs_per_file[p]]
    splits = {s: w.summary() for s, w in writers.items()}
    report_skipped("inputs", skipped, log)
    if splits["train"]["num_docs"] == 0:
        _clear(out)
        raise DataError(f"inputs: no documents with text in {args.inputs}"
                        + (": " + "; ".join(f"{p}: {r}" for p, r in skipped) if skipped else ""))
    seconds = time.perf_counter() - start
    manifest = {
        "format": FORMAT, "version": VERSION, "dtype": dtype.name,
        "tokenizer": {"file": "tokenizer.json", "sha256": _sha256(os.path.join(out, "tokenizer.json")),
                      "vocab_size": vocab, "eos_id": eos},
        "options": options, "sources": sources, "splits": splits,
        "skipped": [list(s) for s in skipped],
        "stats": {"seconds": round(seconds, 3), "input_bytes": total_bytes, "workers": args.workers},
    }
    _write_atomic(os.path.join(out, MANIFEST), lambda f: f.write(json.dumps(manifest, indent=1).encode()))
    n_tok = splits["train"]["num_tokens"] + splits["val"]["num_tokens"]
    log(f"sparsetron-prepare: {len(files)} files, {total_bytes / 1e6:.1f} MB -> {n_tok:,} tokens "
        f"({splits['train']['num_docs']:,} train / {splits['val']['num_docs']:,} val documents, {dtype.name}) "
        f"in {seconds:.1f}s ({total_bytes / 1e6 / max(seconds, 1e-9):.1f} MB/s) -> {out}")
    return manifest


def _run_pool(work, args, tok_json: str, eos: int, dtype: str):
    """(task, result) in input order, at most 2 tasks in flight per worker (bounded memory)."""
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    ctx = multiprocessing.get_context(method)
    with ctx.Pool(args.workers, initializer=_init_worker, initargs=(tok_json, eos)) as pool:
        pending = collections.deque()
        for task in work:
            pending.append((task, pool.apply_async(encode_task, ((task, args.field, args.val_fraction, dtype),))))
            if len(pending) >= 2 * args.workers:
                t, r = pending.popleft()
                yield _strip(t), r.get()
        while pending:
            t, r = pending.popleft()
            yield _strip(t), r.get()


def _strip(task):
    return task[:3] + (None,) + task[4:]  # drop the payload early


def _progress(total: int):
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc="sparsetron-prepare", disable=not sys.stderr.isatty())


def _size(text: str) -> int:
    units = {"k": 10**3, "m": 10**6, "g": 10**9}
    text = text.strip().lower().rstrip("b")
    return int(float(text[:-1]) * units[text[-1]]) if text and text[-1] in units else int(text)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="sparsetron-prepare", description=__doc__.split("\n\n")[0])
    p.add_argument("inputs", nargs="+", help="files, globs, `datasets` save_to_disk folders, or the built-in "
                   "corpora @stdlib / @pycode (every .py file of this Python environment)")
    p.add_argument("--out", required=True, help="output folder (data.sources=[{path: OUT, weight: ...}])")
    p.add_argument("--tokenizer", required=True, help="a tokenizer.json, or 'bpe' to train a byte-level BPE")
    p.add_argument("--vocab-size", type=int, default=32000, help="BPE vocabulary (with --tokenizer bpe)")
    p.add_argument("--bpe-sample-bytes", type=_size, default=_size("100M"), help="text the BPE is trained on")
    p.add_argument("--field", default="text", help="jsonl field / parquet or arrow column with the text")
    p.add_argument("--val-fraction", type=float, default=0.01, help="share of documents held out (by hash)")
    p.add_argument("--workers", type=int, default=max(1, os.cpu_count() or 1), help="tokenizer processes")
    p.add_argument("--shard-tokens", type=int, default=1 << 28, help="tokens per shard (about)")
    p.add_argument("--chunk-bytes", type=_size, default=_size("1M"), help="text per work item")
    args = p.parse_args(argv)
    for name in ("vocab_size", "bpe_sample_bytes", "workers", "shard_tokens", "chunk_bytes"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')}: got {getattr(args, name)}, must be > 0")
    if not 0 <= args.val_fraction < 1:
        p.error(f"--val-fraction: got {args.val_fraction}, must be in [0, 1)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        prepare(args)
    except DataError as err:
        print(f"sparsetron-prepare: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sparsetron-prepare: interrupted; the folder has no manifest until a run completes", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
