"""sparsetron-prepare throughput against `tokenizers`' own encode_batch on the same text, in one run.

    python benchmarks/prepare.py                 # 1 GB synthetic jsonl, 2 workers
    python benchmarks/prepare.py --size 200M

The corpus is synthetic but code-and-prose-like (pieces of this Python's standard library sources,
reshuffled), written as jsonl under a temporary folder and deleted afterwards (never committed). A
byte-level BPE is trained on a sample first (not timed). Then, in the same run:
  * the tool: sparsetron-prepare with --workers W on the whole file (wall time, input read to manifest);
  * the anchor: W processes that each call Tokenizer.encode_batch (single-threaded, as the tool's
    workers do) on their share of the same documents, already in memory, in ~1 MB batches.
ratio_vs_tokenizers = the tool's tokens per CPU-second (main process + workers) / the anchor's tokens
per CPU-second: per core, what the tool adds over the tokenizer. CPU time because the cores may be
shared with other jobs; wall-clock MB/s and tokens/s per worker, and wall-clock ratios against W and
1 anchor processes, are recorded too. Writes benchmarks/results/prepare.json."""

import argparse
import glob
import itertools
import json
import multiprocessing
import os
import platform
import random
import shutil
import sys
import sysconfig
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))  # `import sparsetron` from a checkout


def _size(text: str) -> int:
    units = {"k": 10**3, "m": 10**6, "g": 10**9}
    t = text.strip().lower().rstrip("b")
    return int(float(t[:-1]) * units[t[-1]]) if t[-1] in units else int(t)


def make_corpus(path: str, size: int, seed: int = 0) -> int:
    """jsonl of ~size bytes; documents are 0.5-8 kB pieces of stdlib sources. Returns the document count."""
    root = sysconfig.get_paths()["stdlib"]
    pool = []
    for p in sorted(glob.glob(os.path.join(root, "**", "*.py"), recursive=True))[:3000]:
        try:
            with open(p, encoding="utf-8") as f:
                pool.append(f.read())
        except (UnicodeDecodeError, OSError):
            continue
    pool = [t for t in pool if len(t) > 600]
    rng = random.Random(seed)
    written = n = 0
    with open(path, "w") as f:
        while written < size:
            src = rng.choice(pool)
            a = rng.randrange(0, len(src) - 500)
            line = json.dumps({"text": src[a : a + rng.randint(500, 8000)], "id": n}) + "\n"
            f.write(line)
            written += len(line)
            n += 1
    return n


def _anchor_worker(tok_json, path, lo, hi, batch_bytes, barrier, results):
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # single-threaded, as the tool's workers
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(tok_json)
    with open(path, "rb") as f:
        lines = list(itertools.islice(f, lo, hi))
    texts = [json.loads(line)["text"] for line in lines]
    batches, cur, size = [], [], 0
    for t in texts:
        cur.append(t)
        size += len(t)
        if size >= batch_bytes:
            batches.append(cur)
            cur, size = [], 0
    batches.append(cur)
    barrier.wait()  # all anchor processes encode at the same time, as the tool's workers do
    start, cpu = time.perf_counter(), time.process_time()
    tokens = 0
    for b in batches:
        tokens += sum(len(e.ids) for e in tok.encode_batch(b, add_special_tokens=False))
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    results.put({"tokens": tokens, "text_bytes": sum(len(t.encode()) for t in texts), "seconds": seconds,
                 "cpu_seconds": cpu})


def anchor(tok_json: str, path: str, n_docs: int, processes: int, batch_bytes: int) -> dict:
    """`processes` single-threaded encode_batch loops, started together, over the first n_docs documents."""
    ctx = multiprocessing.get_context("fork")
    barrier, results = ctx.Barrier(processes), ctx.Queue()
    share = n_docs // processes
    procs = [ctx.Process(target=_anchor_worker, args=(tok_json, path, i * share, (i + 1) * share, batch_bytes,
                                                       barrier, results)) for i in range(processes)]
    for p in procs:
        p.start()
    parts = [results.get() for _ in procs]
    for p in procs:
        p.join()
    per_proc_tok_s = [p["tokens"] / p["seconds"] for p in parts]
    per_proc_mb_s = [p["text_bytes"] / 1e6 / p["seconds"] for p in parts]
    return {"processes": processes, "documents": share * processes, "tokens": sum(p["tokens"] for p in parts),
            "text_bytes": sum(p["text_bytes"] for p in parts), "seconds": [round(p["seconds"], 3) for p in parts],
            "cpu_seconds": [round(p["cpu_seconds"], 3) for p in parts],
            "tokens_per_s_per_process": float(np.mean(per_proc_tok_s)),
            "tokens_per_cpu_s": sum(p["tokens"] for p in parts) / sum(p["cpu_seconds"] for p in parts),
            "text_mb_per_s_per_process": float(np.mean(per_proc_mb_s))}


def _children_cpu() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _commit() -> str:
    git = os.path.join(os.path.dirname(HERE), ".git")
    try:
        with open(os.path.join(git, "HEAD")) as f:
            head = f.read().strip()
        if not head.startswith("ref: "):
            return head
        ref = head[5:]
        if os.path.exists(os.path.join(git, ref)):
            with open(os.path.join(git, ref)) as f:
                return f.read().strip()
        with open(os.path.join(git, "packed-refs")) as f:
            return next(line.split()[0] for line in f if line.strip().endswith(ref))
    except (OSError, StopIteration):
        return "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=_size, default=_size("1G"), help="synthetic jsonl size")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--vocab-size", type=int, default=32000)
    ap.add_argument("--anchor-bytes", type=_size, default=_size("60M"), help="text the anchor encodes")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "prepare.json"))
    args = ap.parse_args()

    import tokenizers

    from sparsetron.train.data import prepare as prep
    from sparsetron.train.data.tokenizer import train_bpe

    tmp = tempfile.mkdtemp(prefix="sparsetron-prepare-bench-")
    try:
        corpus = os.path.join(tmp, "corpus.jsonl")
        t0 = time.perf_counter()
        n_docs = make_corpus(corpus, args.size)
        size = os.path.getsize(corpus)
        print(f"corpus: {size / 1e6:.0f} MB, {n_docs} documents ({time.perf_counter() - t0:.0f}s to write)")
        t0 = time.perf_counter()
        with open(corpus) as f:
            sample = [json.loads(next(f))["text"] for _ in range(min(n_docs, 4000))]
        tok = train_bpe(sample, args.vocab_size)
        tok_path = os.path.join(tmp, "tokenizer.json")
        tok.save(tok_path)
        print(f"tokenizer: byte-level BPE, {tok.get_vocab_size()} tokens ({time.perf_counter() - t0:.0f}s to train)")

        anchor_docs = int(n_docs * min(1.0, args.anchor_bytes / size))
        tok_json = tok.to_str()
        before = anchor(tok_json, corpus, anchor_docs, args.workers, 1_000_000)  # the anchor runs before and
        out = os.path.join(tmp, "prepared")  # after the tool: a shared machine's load drifts
        argv = [corpus, "--out", out, "--tokenizer", tok_path, "--workers", str(args.workers), "--val-fraction", "0.01"]
        start, cpu, children = time.perf_counter(), time.process_time(), _children_cpu()
        manifest = prep.prepare(prep.parse_args(argv))
        tool_s = time.perf_counter() - start
        # CPU seconds of the main process and its (reaped) worker processes: the cost on a shared machine
        tool_cpu = time.process_time() - cpu + _children_cpu() - children
        tool_tokens = sum(s["num_tokens"] - s["num_docs"] for s in manifest["splits"].values())  # without EOS
        with open(corpus, "rb") as f:
            text_bytes = sum(len(json.loads(line)["text"].encode()) for line in f)
        start = time.perf_counter()
        rerun = prep.prepare(prep.parse_args(argv))
        rerun_s = time.perf_counter() - start
        assert rerun is not None

        after = anchor(tok_json, corpus, anchor_docs, args.workers, 1_000_000)
        parallel = {"tokens_per_s_per_process": (before["tokens_per_s_per_process"] + after["tokens_per_s_per_process"]) / 2,
                    "tokens_per_cpu_s": (before["tokens_per_cpu_s"] + after["tokens_per_cpu_s"]) / 2,
                    "text_mb_per_s_per_process": (before["text_mb_per_s_per_process"] + after["text_mb_per_s_per_process"]) / 2,
                    "before_tool": before, "after_tool": after}
        single = anchor(tok_json, corpus, anchor_docs // args.workers, 1, 1_000_000)
        per_worker_tok_s = tool_tokens / tool_s / args.workers
        result = {
            "benchmark": "sparsetron-prepare vs tokenizers.encode_batch",
            "device": "cpu", "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "python": platform.python_version(), "tokenizers": tokenizers.__version__, "numpy": np.__version__,
            "commit": _commit(), "workers": args.workers,
            "corpus": {"jsonl_bytes": size, "text_bytes": text_bytes, "documents": n_docs, "kind": "stdlib pieces"},
            "tokenizer": {"kind": "byte-level BPE", "vocab_size": tok.get_vocab_size()},
            "tool": {"seconds": round(tool_s, 2), "tokens": tool_tokens, "dtype": manifest["dtype"],
                     "jsonl_mb_per_s": size / 1e6 / tool_s, "jsonl_mb_per_s_per_worker": size / 1e6 / tool_s / args.workers,
                     "text_mb_per_s_per_worker": text_bytes / 1e6 / tool_s / args.workers,
                     "tokens_per_s": tool_tokens / tool_s, "tokens_per_s_per_worker": per_worker_tok_s,
                     "cpu_seconds": round(tool_cpu, 2), "tokens_per_cpu_s": tool_tokens / tool_cpu,
                     "rerun_unchanged_seconds": round(rerun_s, 3)},
            "anchor_parallel": parallel, "anchor_single": single,
            "ratio_vs_tokenizers": (tool_tokens / tool_cpu) / parallel["tokens_per_cpu_s"],
            "ratio_wall_vs_tokenizers_parallel": per_worker_tok_s / parallel["tokens_per_s_per_process"],
            "ratio_wall_vs_tokenizers_single_process": per_worker_tok_s / single["tokens_per_s_per_process"],
            "note": "ratio_vs_tokenizers = tokens per CPU-second of the whole tool (main process + workers: reading, "
                    "JSON, encode_batch, id checks, writing) over tokens per CPU-second of bare encode_batch on "
                    "in-memory text (same tokenizer, same documents, ~1 MB batches): per core, what the tool adds. "
                    "CPU time, because this machine's 2 cores are shared with other jobs and wall-clock rates "
                    "swing with their load; the wall-clock ratios (per worker vs per process, with W and with 1 "
                    "anchor processes) are recorded beside it.",
        }
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        print(f"\n{'':28s}{'tokens/s/proc':>14s}{'text MB/s/proc':>16s}")
        print(f"{'sparsetron-prepare':28s}{per_worker_tok_s:14,.0f}{result['tool']['text_mb_per_s_per_worker']:16.2f}")
        print(f"{'encode_batch x' + str(args.workers):28s}{parallel['tokens_per_s_per_process']:14,.0f}"
              f"{parallel['text_mb_per_s_per_process']:16.2f}")
        print(f"{'encode_batch x1':28s}{single['tokens_per_s_per_process']:14,.0f}{single['text_mb_per_s_per_process']:16.2f}")
        print(f"tokens per CPU-second: tool {tool_tokens / tool_cpu:,.0f}, encode_batch {parallel['tokens_per_cpu_s']:,.0f}")
        print(f"ratio_vs_tokenizers = {result['ratio_vs_tokenizers']:.3f} (CPU time); wall-clock per worker vs "
              f"{args.workers} / 1 anchor processes: {result['ratio_wall_vs_tokenizers_parallel']:.3f} / "
              f"{result['ratio_wall_vs_tokenizers_single_process']:.3f}; unchanged re-run {rerun_s:.2f}s -> {args.out}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
