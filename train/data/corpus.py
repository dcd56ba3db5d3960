"""Raw documents for training: the default offline corpus (this Python's standard library sources)
or the user's text/jsonl files. Documents split into train/validation by a hash of their name, so
the split is the same on every rank and every run."""

import glob
import json
import os
import sysconfig
import zlib
from dataclasses import dataclass
from typing import Callable, Iterator, List, Tuple


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


def _pycode_files(max_bytes: int) -> List[Tuple[str, str]]:
    """Every .py file of this Python environment: the stdlib, then site-packages (purelib, platlib),
    each file once (by real path), named 'stdlib/...' / 'site-packages/...' for a stable hash split."""
    paths = sysconfig.get_paths()
    files, seen = [(f"stdlib/{rel}", p) for rel, p in _stdlib_files(0)], set()
    seen.update(os.path.realpath(p) for _, p in files)
    for root in dict.fromkeys((paths["purelib"], paths["platlib"])):
        for path in sorted(glob.glob(os.path.join(root, "**", "*.py"), recursive=True)):
            real = os.path.realpath(path)
            if real in seen or not os.path.isfile(path):
                continue
            seen.add(real)
            files.append((f"site-packages/{os.path.relpath(path, root)}", path))
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


def _check_file(path: str) -> str:
    """'' if the file is usable text, else why not ('empty', 'not UTF-8 (byte N)', 'unreadable (...)')."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as err:
        return f"unreadable ({err.strerror})"
    if not raw.strip():
        return "empty"
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as err:
        return f"not UTF-8 (byte {err.start})"
    return ""


def report_skipped(field: str, skipped: List[Tuple[str, str]], log: Callable[[str], None]) -> None:
    """One line per reason, naming every skipped file once."""
    by_reason: dict = {}
    for path, reason in skipped:
        by_reason.setdefault(reason.split(" (")[0], []).append(path)
    for reason, paths in by_reason.items():
        log(f"sparsetron: {field}: skipped {len(paths)} {reason} file(s): {', '.join(paths)}")


def list_documents(cfg, log: Callable[[str], None] = print) -> List[Document]:
    """Every document of the corpus, in a fixed order. data.max_corpus_bytes caps the built-in stdlib
    corpus only: the user's own files are read whole, and each one skipped (empty, not UTF-8,
    unreadable, a jsonl with no records) is named through `log`."""
    if cfg.source in ("stdlib", "pycode"):  # the built-in corpora: the only ones data.max_corpus_bytes caps
        files = (_stdlib_files if cfg.source == "stdlib" else _pycode_files)(cfg.max_corpus_bytes)
        if not files:
            raise DataError(f"data.source={cfg.source}: this Python has no .py sources; use data=text")
        return [Document(name, path) for name, path in files]
    docs, skipped = [], []
    for name, path in _user_files(list(cfg.paths)):
        reason = _check_file(path)
        if not reason and path.endswith(".jsonl"):
            with open(path, encoding="utf-8") as f:
                lines = [Document(f"{name}:{i}", path, i) for i, line in enumerate(f) if line.strip()]
            reason = "" if lines else "empty"
            docs += lines
        elif not reason:
            docs.append(Document(name, path))
        if reason:
            skipped.append((path, reason))
    report_skipped("data.paths", skipped, log)
    if not docs:
        raise DataError(f"data.paths: no usable documents in {list(cfg.paths)}: "
                        + "; ".join(f"{p}: {r}" for p, r in skipped))
    return docs


def is_validation(doc: Document, val_fraction: float) -> bool:
    return zlib.crc32(doc.name.encode()) % 10_000 < val_fraction * 10_000


def split(docs: List[Document], val_fraction: float) -> Tuple[List[Document], List[Document]]:
    val = [d for d in docs if is_validation(d, val_fraction)]
    if not val and len(docs) > 1:  # a small corpus: hold out the one document with the smallest hash
        val = [min(docs, key=lambda d: zlib.crc32(d.name.encode()))]
    held = set(val)
    train = [d for d in docs if d not in held]
    if len(docs) < 2:
        raise DataError(f"data.paths: only one document ({docs[0].name if docs else 'none'}); at least two are "
                        f"needed to hold one out for validation")
    if not train or not val:
        raise DataError(f"data.val_fraction={val_fraction} leaves an empty split of {len(docs)} documents")
    return train, val


def read_texts(docs: List[Document], jsonl_field: str) -> Iterator[str]:
    """Document texts in order; jsonl files are read once each, not once per line."""
    current_path, lines = None, []
    for doc in docs:
        if doc.line < 0:
            # user files were checked as UTF-8 by list_documents; a few stdlib test files are not
            with open(doc.path, encoding="utf-8", errors="replace") as f:
                yield f.read()
            continue
        if doc.path != current_path:
            with open(doc.path, encoding="utf-8") as f:
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
