"""data=prepared: weighted blend of sparsetron-prepare folders, deterministic over dp splits, resumable."""

import json
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from omegaconf import OmegaConf
from tokenizers import Tokenizer, models, pre_tokenizers

from sparsetron.configs.schema import DataConfig
from sparsetron.train.data import DataError, ResumableSampler, build_data
from sparsetron.train.data import prepare as prep
from sparsetron.train.data.blend import BlendedWindows, blend_pattern
from sparsetron.train.data.dataset import TokenWindows
from sparsetron.train.data.tokenizer import EOS

from .helpers import TINY, run_cli

SEQ = 16
A_WORDS, B_WORDS = [f"a{i}" for i in range(10)], [f"b{i}" for i in range(10)]


class _Runtime:  # what build_data needs from the parallel runtime
    def __init__(self, rank=0):
        self.rank, self.local_rank = rank, rank

    def barrier(self):
        pass


def _make_folder(root, name, words, n_docs, tok_path, seed, val_fraction="0.05"):
    rng = np.random.default_rng(seed)
    src = root / f"{name}.jsonl"
    src.write_text("".join(json.dumps({"text": " ".join(rng.choice(words, rng.integers(5, 40)))}) + "\n"
                           for _ in range(n_docs)))
    out = root / name
    prep.prepare(prep.parse_args([str(src), "--out", str(out), "--tokenizer", str(tok_path), "--workers", "1",
                                  "--val-fraction", val_fraction]), log=lambda _m: None)
    return str(out)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("prepared")
    vocab = {w: i for i, w in enumerate([EOS, "[UNK]", *A_WORDS, *B_WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(root / "tok.json"))
    a = _make_folder(root, "a", A_WORDS, 400, root / "tok.json", 1)  # small: drawn more than its size
    b = _make_folder(root, "b", B_WORDS, 3000, root / "tok.json", 2)  # large: drawn less than its size
    return a, b, root


def _cfg(sources, val_sources=(), vocab=64):
    return OmegaConf.create({
        "data": {**OmegaConf.to_container(OmegaConf.structured(DataConfig)), "source": "prepared",
                 "sources": [{"path": p, "weight": w} for p, w in sources],
                 "val_sources": [{"path": p, "weight": w} for p, w in val_sources]},
        "train": {"seq_len": SEQ}, "model": {"vocab_size": vocab},
    })


def _is_a(rows: torch.Tensor) -> torch.Tensor:
    """Per row: drawn from source a (its ids are 2..11; b's 12..21; EOS 0 in both)."""
    has_a, has_b = ((rows >= 2) & (rows < 12)).any(1), (rows >= 12).any(1)
    assert not (has_a & has_b).any()  # a window never mixes sources
    return has_a


def _sequence(data, dp_rank, dp_size, steps, micro=4, global_batch=32):
    sampler = ResumableSampler(len(data.train), global_batch, micro, dp_rank, dp_size, seed=5)
    return [[data.train.batch(idx)[0] for idx in sampler.next_step()] for _ in range(steps)]


def _global_order(per_rank):
    """Rank r's accumulation step a holds global slice a*dp + r: interleave back to the global order."""
    return torch.cat([per_rank[r][a] for a in range(len(per_rank[0])) for r in range(len(per_rank))])


def _gloo_worker(rank, world, init_file, cfg_yaml, steps, out_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    data = build_data(OmegaConf.create(cfg_yaml), _Runtime(rank), "")
    mine = [torch.stack(step) for step in _sequence(data, rank, world, steps)]  # [acc, micro, seq] per step
    gathered = [None] * world
    dist.all_gather_object(gathered, mine)
    if rank == 0:
        torch.save(gathered, out_file)
    dist.destroy_process_group()


def test_blend_shares_identical_over_dp_and_resume(folders, tmp_path):
    a, b, _ = folders
    cfg = _cfg([(a, 0.25), (b, 0.75)])
    data = build_data(cfg, _Runtime(), "")
    steps = 313  # 313 x 32 = 10016 samples, more than one blend epoch (crosses its boundary)
    assert len(data.train) < steps * 32
    one = [torch.cat(step) for step in _sequence(data, 0, 1, steps)]
    share_a = torch.cat([_is_a(rows) for rows in one]).float().mean().item()
    assert abs(share_a - 0.25) < 0.02 * 0.25 and len(torch.cat(one)) >= 10_000
    # dp=2 over gloo, each rank in its own process: the same samples in the same global order
    out = tmp_path / "dp2.pt"
    from sparsetron.tests import test_data_prepared as importable  # spawned children import the worker by name

    mp.spawn(importable._gloo_worker, args=(2, str(tmp_path / "store"), OmegaConf.to_container(cfg), steps, str(out)),
             nprocs=2, join=True)
    ranks = torch.load(out)
    for s in range(steps):
        two = _global_order([list(ranks[0][s]), list(ranks[1][s])])
        assert torch.equal(two, one[s]), f"step {s} differs between dp=1 and dp=2"
    # resume: a fresh sampler from the saved state continues the exact sequence
    first = ResumableSampler(len(data.train), 32, 4, 0, 1, seed=5)
    seq = [first.next_step() for _ in range(40)]
    state = ResumableSampler(len(data.train), 32, 4, 0, 1, seed=5)
    for _ in range(25):
        state.next_step()
    resumed = ResumableSampler(len(data.train), 32, 4, 0, 1, seed=5)
    resumed.load_state_dict(state.state_dict())
    assert [resumed.next_step() for _ in range(15)] == seq[25:]


def test_every_sample_of_a_down_weighted_source_is_reached(folders):
    a, b, _ = folders
    parts = [TokenWindows(np.arange(1000 * SEQ + 1), SEQ), TokenWindows(np.arange(50 * SEQ + 1), SEQ)]
    blend = BlendedWindows(parts, [0.1, 0.9], ["big", "small"], period=100)
    # the big source gets 10 % of an epoch of 1100 samples = 110 draws: later epochs walk on through it
    n = len(blend)
    drawn = {j for i in range(10 * n) for d, j in [blend.locate(i)] if d == 0}
    assert drawn == set(range(1000))
    first_epoch = {j for i in range(n) for d, j in [blend.locate(i)] if d == 0}
    assert len(first_epoch) == 110


def test_blend_pattern_prefixes_follow_the_weights():
    source, rank, counts = blend_pattern([0.2, 0.5, 0.3], period=1000)
    assert counts.tolist() == [200, 500, 300]
    for i in (1, 7, 100, 333, 999):
        got = np.bincount(source[: i + 1], minlength=3)
        assert np.all(np.abs(got - np.array([0.2, 0.5, 0.3]) * (i + 1)) <= 1)
    for d in range(3):  # occurrence numbers count up within each source
        assert rank[source == d].tolist() == list(range(counts[d]))


def test_validation_sources_and_errors(folders, tmp_path):
    a, b, root = folders
    data = build_data(_cfg([(a, 1.0)]), _Runtime(), "")  # no val_sources: each source's held-out split
    val_rows = data.val.batch(range(64))[0]
    assert _is_a(val_rows).all()
    data = build_data(_cfg([(a, 1.0)], val_sources=[(b, 1.0)]), _Runtime(), "")
    assert not _is_a(data.val.batch(range(64))[0]).any()
    assert data.tokenizer_path.endswith("tokenizer.json") and data.vocab_size == 22
    no_val = _make_folder(root, "noval", A_WORDS, 100, root / "tok.json", 3, val_fraction="0")
    with pytest.raises(DataError, match=r"data.sources\[0\]: .*noval has 0 tokens in split\(s\) val.*--val-fraction"):
        build_data(_cfg([(no_val, 1.0)]), _Runtime(), "")
    with pytest.raises(DataError, match="model.vocab_size=10 is smaller than the tokenizer's 22"):
        build_data(_cfg([(a, 1.0)], vocab=10), _Runtime(), "")
    run = tmp_path / "run"
    build_data(_cfg([(a, 1.0)]), _Runtime(), str(run))
    assert (run / "tokenizer.json").read_bytes() == open(os.path.join(a, "tokenizer.json"), "rb").read()
    (run / "tokenizer.json").write_text("{}")  # the run started with another tokenizer
    with pytest.raises(DataError, match=r"different tokenizer than the one this run started with"):
        build_data(_cfg([(a, 1.0)]), _Runtime(), str(run))
    os.makedirs(tmp_path / "empty")
    with pytest.raises(DataError, match=r"data.sources\[1\].path: .*empty has no readable manifest.json"):
        build_data(_cfg([(a, 1.0), (str(tmp_path / "empty"), 1.0)]), _Runtime(), "")
    with pytest.raises(DataError, match=r"below 1/10000"):
        build_data(_cfg([(a, 1.0), (b, 1e-6)]), _Runtime(), "")


def test_train_end_to_end_with_two_weighted_sources(folders, tmp_path):
    a, b, _ = folders
    common = [*TINY, "data=prepared", f"data.sources=[{{path:'{a}',weight:0.25}},{{path:'{b}',weight:0.75}}]",
              "train.seq_len=16", f"run_dir={tmp_path / 'run'}", "checkpoint.every=2"]
    run_cli([*common, "train.max_steps=2"])
    out = run_cli([*common, "train.max_steps=3", "resume=auto"])
    assert "data=prepared, 2 source(s)" in out.stdout and "resumed at step 2" in out.stdout
    assert (tmp_path / "run" / "tokenizer.json").read_text() == open(os.path.join(a, "tokenizer.json")).read()


def test_config_refuses_bad_sources(folders):
    from sparsetron.configs.schema.validate import ConfigError, validate
    from sparsetron.train.cli import compose

    a, _, _ = folders
    for overrides, message in (
        ([], r"data.sources: data=prepared needs at least one"),
        (["data.sources=[{path:/nonexistent/x,weight:0.5}]"], r"data.sources\[0\].path: '/nonexistent/x' is not a folder"),
        ([f"data.sources=[{{path:'{a}',weight:0}}]"], r"data.sources\[0\].weight: got 0.0, must be > 0"),
        ([f"data.sources=[{{path:'{a}'}}]", "data.val_sources=[{path:/nope}]"], r"data.val_sources\[0\].path"),
    ):
        with pytest.raises(ConfigError, match=message):
            validate(compose(["data=prepared", *overrides], run_dir="/tmp/unused"))
    validate(compose(["data=prepared", f"data.sources=[{{path:'{a}',weight:0.5}}]"], run_dir="/tmp/unused"))


def test_a_run_of_draws_spreads_over_the_whole_source():
    parts = [TokenWindows(np.arange(1000 * SEQ + 1), SEQ), TokenWindows(np.arange(50 * SEQ + 1), SEQ)]
    blend = BlendedWindows(parts, [0.1, 0.9], ["big", "small"], period=100)
    first = sorted(j for i in range(len(blend)) for d, j in [blend.locate(i)] if d == 0)  # 110 draws of 1000
    assert (np.histogram(first, bins=10, range=(0, 1000))[0] > 0).all()  # every tenth of the source is drawn
    assert max(np.diff(first)) < 50  # no large unvisited region (a contiguous block would leave 890)
