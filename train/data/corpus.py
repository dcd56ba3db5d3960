"""Raw documents for training: the default offline corpus (this Python's standard library sources)
or the user's text/jsonl files. Documents split into train/validation by a hash of their name, so
the split is the same on every rank and every run."""

import glob
import json
import os
import sysconfig
import zlib
from dataclasses import dataclass
from typing import Iterator, List, Tuple


class DataError(ValueError):
    """Bad data input: names the file or field and what is expected."""


@dataclass(frozen=True)
class Document:
    name: str  # stable id (relative path, or path:line for jsonl)
    path: str
    line: int = -1  # jsonl line number, -1 for a whole file


def _stdlib_files(max_bytes: int) -> List[Tuple[str, str]]:
    root = sysconfig.get_paths()["stdlib"]
    files = []
    for path in sorted(glob.glob(os.path.join(root, "**", "*.py"), recursive=True)):
        rel = os.path.relpath(path, root)
        if rel.startswith(("site-packages", "dist-packages")) or "/site-packages/" in rel:
            continue
        files.append((rel, path))
    return _cap(files, max_bytes)


def _cap(files: List[Tuple[str, str]], max_bytes: int) -> List[Tuple[str, str]]:
    if max_bytes <= 0:
        return files
    out, total = [], 0
    for rel, path in files:
        size = os.path.getsize(path)
        if total + size > max_bytes:
            continue  # skip big files rather than stop: the cap keeps variety
        out.append((rel, path))
        total += size
    return out


def _user_files(patterns: List[str]) -> List[Tuple[str, str]]:
    files = []
    for pattern in patterns:
        matches = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
        if not matches:
            raise DataError(f"data.paths: no file matches {pattern!r}")
        files += [(os.path.abspath(p), os.path.abspath(p)) for p in matches if os.path.isfile(p)]
    return files


def list_documents(cfg) -> List[Document]:
    """Every document of the corpus, in a fixed order."""
    if cfg.source == "stdlib":
        files = _stdlib_files(cfg.max_corpus_bytes)
        if not files:
            raise DataError("data.source=stdlib: this Python has no standard-library sources; use data=text")
    else:
        files = _cap(_user_files(list(cfg.paths)), cfg.max_corpus_bytes)
    docs = []
    for name, path in files:
        if path.endswith(".jsonl"):
            with open(path, encoding="utf-8", errors="replace") as f:
                docs += [Document(f"{name}:{i}", path, i) for i, line in enumerate(f) if line.strip()]
        else:
            docs.append(Document(name, path))
    return docs


def is_validation(doc: Document, val_fraction: float) -> bool:
    return zlib.crc32(doc.name.encode()) % 10_000 < val_fraction * 10_000


def split(docs: List[Document], val_fraction: float) -> Tuple[List[Document], List[Document]]:
    val = [d for d in docs if is_validation(d, val_fraction)]
    if not val and len(docs) > 1:  # a small corpus: hold out the one document with the smallest hash
        val = [min(docs, key=lambda d: zlib.crc32(d.name.encode()))]
    held = set(val)
    train = [d for d in docs if d not in held]
    if not train or not val:
        raise DataError(f"data.val_fraction={val_fraction} leaves an empty split of {len(docs)} documents")
    return train, val


def read_texts(docs: List[Document], jsonl_field: str) -> Iterator[str]:
    """Document texts in order; jsonl files are read once each, not once per line."""
    current_path, lines = None, []
    for doc in docs:
        if doc.line < 0:
            with open(doc.path, encoding="utf-8", errors="replace") as f:
                yield f.read()
            continue
        if doc.path != current_path:
            with open(doc.path, encoding="utf-8", errors="replace") as f:
                lines, current_path = f.readlines(), doc.path
        try:
            record = json.loads(lines[doc.line])
            yield record[jsonl_field]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise DataError(f"{doc.path}:{doc.line + 1}: expected a JSON object with field "
                            f"data.jsonl_field={jsonl_field!r} ({err})") from None


def fingerprint(docs: List[Document]) -> str:
    """Identifies the corpus content cheaply (names, sizes, mtimes) for cache keys."""
    h = zlib.crc32(b"")
    for d in docs:
        st = os.stat(d.path)
        h = zlib.crc32(f"{d.name}|{st.st_size}|{int(st.st_mtime)}".encode(), h)
    return f"{h:08x}-{len(docs)}"
