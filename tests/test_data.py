import json
import os

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from sparsetron.configs.schema import DataConfig
from sparsetron.parallel.runtime import Runtime
from sparsetron.train.data import DataError, ResumableSampler, build_data
from sparsetron.train.data.corpus import list_documents, split


def _cfg(tmp_path, **data):
    return OmegaConf.create({
        "data": {**OmegaConf.to_container(OmegaConf.structured(DataConfig)), "cache_dir": str(tmp_path / "cache"),
                 **data},
        "train": {"seq_len": 32},
        "model": {"vocab_size": 300},
    })


def test_sampler_splits_are_the_same_samples():
    one = ResumableSampler(1000, 16, 4, 0, 1, seed=3)  # 1 rank, 4 accumulation steps
    two = [ResumableSampler(1000, 16, 4, r, 2, seed=3) for r in range(2)]  # 2 ranks, 2 steps each
    for step in range(70):  # crosses an epoch boundary (62 steps per epoch)
        single = sorted(sum(one.indices(step), []))
        split_ = sorted(sum(two[0].indices(step), []) + sum(two[1].indices(step), []))
        assert single == split_ and len(set(single)) == 16


def test_sampler_epochs_differ_and_cover():
    s = ResumableSampler(64, 16, 16, 0, 1, seed=0)
    e0 = sorted(sum((s.indices(i)[0] for i in range(4)), []))
    assert e0 == list(range(64))
    assert s.indices(0) != s.indices(4)


def test_sampler_resumes_at_the_right_sample():
    a = ResumableSampler(500, 8, 2, 1, 2, seed=7)
    seen = [a.next_step() for _ in range(10)]
    b = ResumableSampler(500, 8, 2, 1, 2, seed=7)
    b.load_state_dict(ResumableSampler(500, 8, 2, 1, 2, seed=7).state_dict() | {"consumed_samples": 5 * 8})
    assert [b.next_step() for _ in range(5)] == seen[5:]
    with pytest.raises(ValueError, match="seed"):
        b.load_state_dict({"consumed_samples": 0, "seed": 8, "num_samples": 500})


def test_stdlib_corpus_split_is_deterministic(tmp_path):
    cfg = _cfg(tmp_path, max_corpus_bytes=300_000)
    docs = list_documents(cfg.data)
    train, val = split(docs, 0.05)
    assert docs == list_documents(cfg.data) and train and val and not set(train) & set(val)


def test_text_and_jsonl_user_data(tmp_path):
    (tmp_path / "a.txt").write_text("the quick brown fox jumps over the lazy dog. " * 200)
    with open(tmp_path / "b.jsonl", "w") as f:
        for i in range(60):
            f.write(json.dumps({"text": f"document number {i} says hello world " * 5}) + "\n")
    cfg = _cfg(tmp_path, source="text", paths=[str(tmp_path / "*.txt"), str(tmp_path / "*.jsonl")], val_fraction=0.2)
    data = build_data(cfg, Runtime(), str(tmp_path / "run"))
    assert (tmp_path / "run" / "tokenizer.json").exists()  # saved beside the run
    assert len(data.train) > 0 and len(data.val) > 0 and data.vocab_size <= 300
    x, y = data.train.batch([0, 1])
    assert x.shape == (2, 32) and torch.equal(x[:, 1:], y[:, :-1])


def test_jsonl_missing_field_names_the_file(tmp_path):
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps({"body": "x" * 50}) for _ in range(40)))
    cfg = _cfg(tmp_path, source="text", paths=[str(tmp_path / "c.jsonl")], val_fraction=0.3)
    with pytest.raises(DataError, match=r"c.jsonl:\d+: .*data.jsonl_field"):
        build_data(cfg, Runtime(), str(tmp_path / "run"))


def test_memmap_shards(tmp_path):
    rng = np.random.default_rng(0)
    rng.integers(0, 300, 5000, dtype=np.uint16).tofile(tmp_path / "train_0.bin")
    rng.integers(0, 300, 3000, dtype=np.uint16).tofile(tmp_path / "train_1.bin")
    rng.integers(0, 300, 1000, dtype=np.uint16).tofile(tmp_path / "val.bin")
    cfg = _cfg(tmp_path, source="memmap", paths=[str(tmp_path / "train_*.bin")], val_paths=[str(tmp_path / "val.bin")])
    data = build_data(cfg, Runtime(), str(tmp_path / "run"))
    assert len(data.train) == (8000 - 1) // 32 and len(data.val) == (1000 - 1) // 32
    flat = np.concatenate([np.fromfile(tmp_path / f"train_{i}.bin", dtype=np.uint16) for i in (0, 1)])
    x, y = data.train.batch([156, 0])  # window 156 spans the boundary of the two shards (token 5000)
    assert np.array_equal(x[0].numpy(), flat[156 * 32 : 157 * 32]) and np.array_equal(y[1].numpy(), flat[1:33])
    # no val_paths: the tail is held out, lazily
    cfg = _cfg(tmp_path, source="memmap", paths=[str(tmp_path / "train_*.bin")], val_fraction=0.25)
    held = build_data(cfg, Runtime(), str(tmp_path / "run_tail"))
    assert len(held.train) == (6000 - 1) // 32 and len(held.val) == (2000 - 1) // 32
    assert np.array_equal(held.val.batch([0])[0][0].numpy(), flat[6000:6032])
    # a uint32 shard read as uint16 shows token ids beyond the vocabulary: caught, with the field named
    rng.integers(70000, 80000, 4000, dtype=np.uint32).tofile(tmp_path / "big.bin")
    cfg = _cfg(tmp_path, source="memmap", paths=[str(tmp_path / "big.bin")], memmap_dtype="uint32")
    with pytest.raises(DataError, match="model.vocab_size"):
        build_data(cfg, Runtime(), str(tmp_path / "run2"))


def test_tokenizer_smaller_than_model_vocab_required(tmp_path):
    cfg = _cfg(tmp_path, max_corpus_bytes=200_000)
    build_data(cfg, Runtime(), str(tmp_path / "run"))
    cfg.model.vocab_size = 100
    with pytest.raises(DataError, match="model.vocab_size=100"):
        build_data(cfg, Runtime(), str(tmp_path / "run"))


# --- no silent caps or skips ---------------------------------------------------------------------

def test_text_files_are_not_capped_and_bad_files_are_named(tmp_path):
    big = "the quick brown fox jumps over the lazy dog. " * 2000  # 90 kB, past the cap below
    (tmp_path / "a.txt").write_text(big)
    (tmp_path / "b.txt").write_text(big[::-1])
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "binary.txt").write_bytes(b"ok\xff\xfe\x00garbage")
    (tmp_path / "none.jsonl").write_text("\n\n")
    lines = []
    cfg = _cfg(tmp_path, source="text", paths=[str(tmp_path / "*")], max_corpus_bytes=1000)
    docs = list_documents(cfg.data, lines.append)
    assert sorted(d.name.rsplit("/", 1)[-1] for d in docs) == ["a.txt", "b.txt"]  # not capped
    binary, empty = sorted(lines)  # one line per reason
    assert "2 empty file(s)" in empty and "empty.txt" in empty and "none.jsonl" in empty
    assert "1 not UTF-8 file(s)" in binary and "binary.txt" in binary


def test_all_inputs_unusable_names_them(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "binary.txt").write_bytes(b"\xff\xfe\xfd")
    cfg = _cfg(tmp_path, source="text", paths=[str(tmp_path / "*.txt")])
    with pytest.raises(DataError, match=r"no usable documents.*binary.txt: not UTF-8.*empty.txt: empty"):
        build_data(cfg, Runtime(), str(tmp_path / "run"))


def test_zero_samples_names_the_inputs(tmp_path):
    (tmp_path / "a.txt").write_text("hi")
    (tmp_path / "b.txt").write_text("ho")
    cfg = _cfg(tmp_path, source="text", paths=[str(tmp_path / "*.txt")], val_fraction=1e-4)  # one file held out
    with pytest.raises(DataError, match=r"data.paths: the training split has \d+ tokens.*a.txt \(2 bytes\)"):
        build_data(cfg, Runtime(), str(tmp_path / "run"))


def test_big_text_corpus_recommends_prepare(tmp_path, monkeypatch, capsys):
    import sparsetron.train.data as data_mod

    (tmp_path / "a.txt").write_text("some words here and there. " * 400)
    (tmp_path / "b.txt").write_text("other words over here. " * 400)
    monkeypatch.setattr(data_mod, "BIG_TEXT_BYTES", 10_000)
    build_data(_cfg(tmp_path, source="text", paths=[str(tmp_path / "*.txt")]), Runtime(), str(tmp_path / "run"))
    out = [line for line in capsys.readouterr().out.splitlines() if "sparsetron-prepare" in line]
    assert len(out) == 1 and "data=text reads" in out[0]


def test_memmap_ids_checked_everywhere_and_cached(tmp_path, monkeypatch):
    from sparsetron.train.data import tokens

    monkeypatch.setattr(tokens, "CHECK_CHUNK", 1000)  # several chunks per shard
    rng = np.random.default_rng(1)
    train = rng.integers(0, 300, 5000, dtype=np.uint16)
    train.tofile(tmp_path / "train.bin")
    val = rng.integers(0, 300, 4000, dtype=np.uint16)
    val[3777] = 300  # past the first chunk, in the validation shard only
    val.tofile(tmp_path / "val.bin")
    cfg = _cfg(tmp_path, source="memmap", paths=[str(tmp_path / "train.bin")], val_paths=[str(tmp_path / "val.bin")])
    with pytest.raises(DataError, match=r"data.val_paths: .*val.bin: token id 300 at position 3777 >= model.vocab_size=300"):
        build_data(cfg, Runtime(), str(tmp_path / "run"))
    train[4999] = 999  # the very last token of train
    train.tofile(tmp_path / "train.bin")
    with pytest.raises(DataError, match=r"data.paths: .*train.bin: token id 999 at position 4999"):
        build_data(cfg, Runtime(), str(tmp_path / "run"))
    # fixed files: scanned once, then the cached verdict is used (no scan) until a file changes
    train[4999], val[3777] = 1, 2
    train.tofile(tmp_path / "train.bin")
    val.tofile(tmp_path / "val.bin")
    scans = []
    real = tokens._max_id
    monkeypatch.setattr(tokens, "_max_id", lambda p, dt: scans.append(p) or real(p, dt))
    build_data(cfg, Runtime(), str(tmp_path / "run"))
    assert len(scans) == 2
    build_data(cfg, Runtime(), str(tmp_path / "run"))
    assert len(scans) == 2
    val[0] = 299
    val.tofile(tmp_path / "val.bin")
    os.utime(tmp_path / "val.bin", ns=(1, 10**18))  # a new mtime even on a coarse-clock filesystem
    build_data(cfg, Runtime(), str(tmp_path / "run"))
    assert len(scans) == 3 and scans[-1].endswith("val.bin")


def test_pycode_corpus_is_the_whole_environment(tmp_path):
    import numpy

    from sparsetron.train.data import prepare
    from sparsetron.train.data.corpus import is_validation

    cfg = _cfg(tmp_path, source="pycode", max_corpus_bytes=0)
    docs = list_documents(cfg.data)
    names = {d.name for d in docs}
    assert "site-packages/numpy/__init__.py" in names and "stdlib/json/__init__.py" in names
    assert os.path.realpath(numpy.__file__) in {os.path.realpath(d.path) for d in docs}
    assert len({os.path.realpath(d.path) for d in docs}) == len(docs)  # each file once
    capped = list_documents(_cfg(tmp_path, source="pycode", max_corpus_bytes=300_000).data)
    assert 0 < sum(os.path.getsize(d.path) for d in capped) <= 300_000
    # sparsetron-prepare @pycode names the documents the same way, so --val-fraction holds out the same ones
    files, pnames = prepare.find_inputs(["@pycode"])
    assert [pnames[p] for p in files] == [d.name for d in docs]
    assert all(prepare.is_validation(d.name, 0.05) == is_validation(d, 0.05) for d in docs[:2000])


def test_memmap_bad_size_is_named_before_scanning(tmp_path):
    (tmp_path / "odd.bin").write_bytes(b"\x01\x00\x02")
    cfg = _cfg(tmp_path, source="memmap", paths=[str(tmp_path / "odd.bin")])
    with pytest.raises(DataError, match=r"odd.bin: size 3 is not a positive multiple of uint16"):
        build_data(cfg, Runtime(), str(tmp_path / "run"))
