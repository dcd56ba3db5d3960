"""sparsetron-prepare: exact tokens, document index, manifest, re-runs, interruption and bad inputs."""

import gzip
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from sparsetron.train.data import DataError
from sparsetron.train.data import prepare as prep
from sparsetron.train.data.tokenizer import EOS, save_atomic, train_bpe

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho".split()


def _texts(n, seed):
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, rng.integers(3, 60))) + f" #{i}" for i in range(n)]


@pytest.fixture(scope="module")
def tokenizer_json(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    save_atomic(train_bpe(_texts(300, 0), 400), str(path))
    return str(path)


def _corpus(root, n=400):
    """a.jsonl, b.jsonl.gz, c.txt, d.txt: (path, documents) in the tool's input order."""
    root.mkdir(exist_ok=True)
    a, b = _texts(n, 1), _texts(n // 2, 2)
    (root / "a.jsonl").write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(a)))
    with gzip.open(root / "b.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps({"text": t}) + "\n" for t in b))
    (root / "c.txt").write_text("one whole file is one document")
    (root / "d.txt").write_text("and so is this one")
    return [(str(root / "a.jsonl"), a), (str(root / "b.jsonl.gz"), b),
            (str(root / "c.txt"), ["one whole file is one document"]), (str(root / "d.txt"), ["and so is this one"])]


def _args(inputs, out, tokenizer, **kw):
    argv = [*inputs, "--out", str(out), "--tokenizer", tokenizer, "--chunk-bytes", "3000", "--workers", "2"]
    for k, v in kw.items():
        argv += [f"--{k.replace('_', '-')}", str(v)]
    return prep.parse_args(argv)


def _read_split(out, manifest, split):
    tokens = [np.fromfile(out / s["tokens"], dtype=manifest["dtype"]) for s in manifest["splits"][split]["shards"]]
    docs = [np.load(out / s["docs"]) for s in manifest["splits"][split]["shards"]]
    return tokens, docs


def test_tokens_index_and_manifest_are_exact(tmp_path, tokenizer_json):
    a, b, c, d = _corpus(tmp_path / "in")
    files = [d, a, c, b]  # text files between jsonl files: documents keep the input order
    out = tmp_path / "out"
    manifest = prep.prepare(_args([p for p, _ in files], out, tokenizer_json, val_fraction=0.1,
                                  shard_tokens=5000), log=lambda _m: None)
    tok = Tokenizer.from_file(tokenizer_json)
    eos = tok.token_to_id(EOS)
    expected = {"train": [], "val": []}
    for path, docs in files:
        for i, text in enumerate(docs):
            name = path if path.endswith(".txt") else f"{path}:{i}"
            split = "val" if prep.is_validation(name, 0.1) else "train"
            expected[split].append(tok.encode(text, add_special_tokens=False).ids + [eos])
    assert manifest["dtype"] == "uint16" and manifest["tokenizer"]["eos_id"] == eos
    assert [s["path"] for s in manifest["sources"]] == [p for p, _ in files]
    assert all(s["size"] == os.path.getsize(s["path"]) for s in manifest["sources"])
    for split in ("train", "val"):
        tokens, docs = _read_split(out, manifest, split)
        assert len(tokens) > (1 if split == "train" else 0)  # several shards for train
        got = [t[a:b].tolist() for t, d in zip(tokens, docs) for a, b in zip(d[:-1], d[1:])]
        assert got == expected[split] and len(expected[split]) > 0
        assert manifest["splits"][split]["num_docs"] == len(got)
        assert manifest["splits"][split]["num_tokens"] == sum(map(len, got))
    assert not list(out.glob("*.tmp"))


def test_rerun_on_unchanged_inputs_does_nothing(tmp_path, tokenizer_json):
    _corpus(tmp_path / "in")
    out = tmp_path / "out"
    prep.prepare(_args([str(tmp_path / "in" / "*")], out, tokenizer_json), log=lambda _m: None)
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    lines = []
    prep.prepare(_args([str(tmp_path / "in" / "*")], out, tokenizer_json), log=lines.append)
    assert len(lines) == 1 and "up to date" in lines[0]
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps
    (tmp_path / "in" / "c.txt").write_text("changed text, a new document")  # a changed input: rebuilt
    lines.clear()
    m = prep.prepare(_args([str(tmp_path / "in" / "*")], out, tokenizer_json), log=lines.append)
    assert "up to date" not in lines[-1] and m["sources"][2]["size"] == len("changed text, a new document")


def test_bpe_trained_on_a_sample_and_reused(tmp_path):
    _corpus(tmp_path / "in")
    out = tmp_path / "out"
    m = prep.prepare(_args([str(tmp_path / "in" / "*.jsonl")], out, "bpe", vocab_size=350, bpe_sample_bytes=20000),
                     log=lambda _m: None)
    assert (out / "tokenizer.json").exists() and m["tokenizer"]["vocab_size"] <= 350
    lines = []
    prep.prepare(_args([str(tmp_path / "in" / "*.jsonl")], out, "bpe", vocab_size=350, bpe_sample_bytes=20000),
                 log=lines.append)
    assert "up to date" in lines[0]


def test_uint32_when_the_vocabulary_is_large(tmp_path):
    vocab = {f"w{i}": i for i in range(70000)} | {EOS: 70000, "[UNK]": 70001}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(tmp_path / "tok.json"))
    (tmp_path / "a.txt").write_text("w1 w69999 w65536 w7")
    m = prep.prepare(_args([str(tmp_path / "a.txt")], tmp_path / "out", str(tmp_path / "tok.json"), val_fraction=0),
                     log=lambda _m: None)
    assert m["dtype"] == "uint32"
    tokens, _ = _read_split(tmp_path / "out", m, "train")
    assert tokens[0].tolist() == [1, 69999, 65536, 7, 70000]


def test_ids_are_checked_while_writing(tmp_path):
    w = prep.ShardWriter(str(tmp_path), "train", np.uint16, 300, 1000)
    w.add(np.array([1, 299], dtype=np.uint16), np.array([2]), "a.jsonl")
    with pytest.raises(DataError, match=r"b.jsonl: token id 300 >= the tokenizer's vocabulary size 300"):
        w.add(np.array([5, 300], dtype=np.uint16), np.array([2]), "b.jsonl")


def test_bad_inputs_one_line_each(tmp_path, tokenizer_json, capsys):
    (tmp_path / "good.txt").write_text("alpha beta gamma")
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfeabc")
    lines = []
    m = prep.prepare(_args([str(tmp_path / "*.txt")], tmp_path / "out", tokenizer_json, val_fraction=0),
                     log=lines.append)
    assert m["splits"]["train"]["num_docs"] == 1
    assert sorted(lines[:2]) == [f"sparsetron: inputs: skipped 1 empty file(s): {tmp_path / 'empty.txt'}",
                                 f"sparsetron: inputs: skipped 1 not UTF-8 file(s): {tmp_path / 'bin.txt'}"]

    (tmp_path / "x.jsonl").write_text('{"text": "alpha"}\n')
    lines.clear()
    prep.prepare(_args([str(tmp_path / "empty.txt"), str(tmp_path / "x.jsonl")], tmp_path / "o1", tokenizer_json),
                 log=lines.append)
    assert lines[0] == f"sparsetron: inputs: skipped 1 empty file(s): {tmp_path / 'empty.txt'}"

    def fails(argv, pattern):
        assert prep.main([*argv, "--workers", "1"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("sparsetron-prepare: error: "), err
        assert __import__("re").search(pattern, err), err

    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"text": "fine"}\n{"text": oops}\n')
    fails([str(tmp_path / "bad.jsonl"), "--out", str(tmp_path / "o2"), "--tokenizer", tokenizer_json],
          r"bad.jsonl:3: expected a JSON object")
    (tmp_path / "num.jsonl").write_text('{"text": 5}\n')
    fails([str(tmp_path / "num.jsonl"), "--out", str(tmp_path / "o3"), "--tokenizer", tokenizer_json],
          r"num.jsonl:1: field 'text' is int, not a string")
    fails([str(tmp_path / "good.txt"), "--out", str(tmp_path / "o4"), "--tokenizer", str(tmp_path / "nope.json")],
          r"--tokenizer: .*nope.json' is not a file")
    fails([str(tmp_path / "e*.txt"), str(tmp_path / "bin.txt"), "--out", str(tmp_path / "o5"),
           "--tokenizer", tokenizer_json], r"no documents with text .*empty.txt: empty; .*bin.txt: not UTF-8")
    fails([str(tmp_path / "missing*.jsonl"), "--out", str(tmp_path / "o6"), "--tokenizer", tokenizer_json],
          r"no file matches")


def test_interrupted_run_leaves_nothing_training_reads(tmp_path, tokenizer_json):
    from sparsetron.train.data.blend import PreparedFolder

    _corpus(tmp_path / "in")
    out = tmp_path / "out"
    prep.prepare(_args([str(tmp_path / "in" / "*")], out, tokenizer_json, shard_tokens=2000), log=lambda _m: None)
    assert PreparedFolder(str(out), "data.sources[0].path").manifest
    # the input changes, and the re-run dies half-way (a bad line near the end of the last jsonl)
    with open(tmp_path / "in" / "a.jsonl", "a") as f:
        f.write("not json\n")
    with pytest.raises(DataError, match="a.jsonl:401"):
        prep.prepare(_args([str(tmp_path / "in" / "*")], out, tokenizer_json, shard_tokens=2000), log=lambda _m: None)
    with pytest.raises(DataError, match="no readable manifest.json"):
        PreparedFolder(str(out), "data.sources[0].path")
    # fixed: the next run starts over cleanly
    (tmp_path / "in" / "a.jsonl").write_text((tmp_path / "in" / "a.jsonl").read_text().replace("not json\n", ""))
    m = prep.prepare(_args([str(tmp_path / "in" / "*")], out, tokenizer_json, shard_tokens=2000), log=lambda _m: None)
    listed = {s[k] for sp in m["splits"].values() for s in sp["shards"] for k in ("tokens", "docs")}
    assert {p.name for p in out.iterdir()} == listed | {"manifest.json", "tokenizer.json"}


def test_parquet_and_datasets_folder(tmp_path, tokenizer_json):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    texts = _texts(50, 3)
    pq.write_table(pa.table({"content": texts, "n": list(range(50))}), tmp_path / "a.parquet", row_group_size=7)
    ds = tmp_path / "saved"
    ds.mkdir()
    with pa.OSFile(str(ds / "data-00000-of-00001.arrow"), "wb") as sink:  # the layout save_to_disk writes
        with pa.ipc.new_stream(sink, pa.schema([("content", pa.string())])) as writer:
            writer.write_table(pa.table({"content": texts[:20]}), max_chunksize=6)
    (ds / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
    m = prep.prepare(_args([str(tmp_path / "a.parquet"), str(ds)], tmp_path / "out", tokenizer_json,
                           field="content", val_fraction=0), log=lambda _m: None)
    tok = Tokenizer.from_file(tokenizer_json)
    eos = tok.token_to_id(EOS)
    want = [i for t in texts + texts[:20] for i in tok.encode(t, add_special_tokens=False).ids + [eos]]
    tokens, docs = _read_split(tmp_path / "out", m, "train")
    assert np.concatenate(tokens).tolist() == want and m["splits"]["train"]["num_docs"] == 70
    (tmp_path / "dd").mkdir()  # a DatasetDict folder: one sub-folder per split
    (tmp_path / "dd" / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    with pytest.raises(DataError, match=r"holds several splits \(train, test\); pass one split's folder"):
        prep.find_inputs([str(tmp_path / "dd")])
    with pytest.raises(DataError, match=r"no column --field='text' \(columns: content, n\)"):
        prep.prepare(_args([str(tmp_path / "a.parquet")], tmp_path / "o2", tokenizer_json), log=lambda _m: None)


def test_parquet_without_pyarrow_is_refused(tmp_path, tokenizer_json, monkeypatch):
    (tmp_path / "a.parquet").write_bytes(b"PAR1")
    for name in ("pyarrow", "pyarrow.ipc", "pyarrow.parquet"):
        monkeypatch.setitem(sys.modules, name, None)  # import fails as if not installed
    with pytest.raises(DataError, match=r"parquet and `datasets` folders need pyarrow .*convert them to .jsonl"):
        prep.prepare(_args([str(tmp_path / "a.parquet")], tmp_path / "out", tokenizer_json), log=lambda _m: None)
    assert not (tmp_path / "out").exists()  # refused before any work


def test_module_entry_point(tmp_path, tokenizer_json):
    (tmp_path / "a.txt").write_text("alpha beta")
    (tmp_path / "b.txt").write_text("gamma delta")
    run = subprocess.run([sys.executable, "-m", "sparsetron.train.data.prepare", str(tmp_path / "*.txt"), "--out",
                          str(tmp_path / "out"), "--tokenizer", tokenizer_json, "--workers", "1"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "2 files" in run.stdout and (tmp_path / "out" / "manifest.json").exists()
    assert "sparsetron-prepare" not in run.stderr  # no progress bar when not on a terminal


def test_output_is_the_same_for_any_worker_count(tmp_path, tokenizer_json):
    _corpus(tmp_path / "in")
    digests = []
    for workers in (1, 3):
        out = tmp_path / f"out{workers}"
        argv = [str(tmp_path / "in" / "*"), "--out", str(out), "--tokenizer", tokenizer_json, "--chunk-bytes", "2000",
                "--workers", str(workers), "--shard-tokens", "3000"]
        m = prep.prepare(prep.parse_args(argv), log=lambda _m: None)
        digests.append([(p.name, p.read_bytes()) for p in sorted(out.glob("*-*"))] + [m["splits"]])
    assert digests[0] == digests[1]
