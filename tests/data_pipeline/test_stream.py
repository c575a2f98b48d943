import itertools
import json
import logging
import subprocess
import sys
import textwrap
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from data_pipeline.config import DataConfig, MixtureSource
from data_pipeline.shards import CorruptShardError, ShardFormatError, ShardReader, ShardWriter
from data_pipeline.stream import MIX_BLOCK, ShardStream, TrainLoader, make_train_loader, make_val_loader

PAD, BOS, EOS = 0, 1, 2
L = 16
N_DOCS = 90


def _density(doc):
    return ((doc % 7) / 8).astype(np.float16)


def _write(path, n_docs, first=10, fingerprint="fp", density=True, shard_bytes=300):
    """Distinct documents (first token = first + index) of 1..30 tokens over many small shards."""
    rng = np.random.default_rng(first)
    docs = [np.concatenate([[first + i], rng.integers(4, 100, size=int(rng.integers(0, 30)))]) for i in range(n_docs)]
    with ShardWriter(path, fingerprint, 2000, shard_size_bytes=shard_bytes) as w:
        for d in docs:
            w.add_document(d, density=_density(d) if density else None)
    return docs


@pytest.fixture
def split(tmp_path):
    return tmp_path / "train", _write(tmp_path / "train", N_DOCS)


def _stream(path, **kw):
    args = dict(seq_len=L, packing="pad", pad_id=PAD, bos_id=BOS, eos_id=EOS, batch_size=4, seed=3,
                shuffle=True, infinite=False, shuffle_buffer=8)
    args.update(kw)
    return ShardStream(path, **args)


def _rows(batches):
    return [tuple(r) for b in batches for r in b["input_ids"].tolist()]


def _take(loader, n):
    return [next(loader) for _ in range(n)]


def _info(path):
    return SimpleNamespace(train_dir=path, val_dir=path, pad_id=PAD, bos_id=BOS, eos_id=EOS,
                           tokenizer=SimpleNamespace(fingerprint="fp"))


def test_pad_rows_masks_and_density(split):
    path, docs = split
    batches = list(_stream(path, shuffle=False))
    ids = torch.cat([b["input_ids"] for b in batches])
    mask = torch.cat([b["loss_mask"] for b in batches])
    dens = torch.cat([b["density"] for b in batches])
    assert ids.dtype == torch.long and mask.dtype == torch.bool and dens.dtype == torch.float32
    assert ids.shape == mask.shape == dens.shape == (len(docs), L)
    for i, d in enumerate(docs):
        expected = [BOS, *d.tolist(), EOS][:L]
        n = len(expected)
        assert ids[i, :n].tolist() == expected and (ids[i, n:] == PAD).all()
        assert mask[i].sum().item() == n and mask[i, :n].all()
        body = min(len(d), L - 1)
        np.testing.assert_array_equal(dens[i, 1:1 + body].numpy(), _density(d)[:body].astype(np.float32))
        assert dens[i, 0] == 0 and (dens[i, 1 + body:] == 0).all()
    assert any(len(d) + 2 > L for d in docs) and any(len(d) + 2 < L for d in docs)


def test_wrap_rows_are_the_concatenated_stream_with_density(split):
    path, docs = split
    batches = list(_stream(path, packing="wrap", shuffle=False))
    stream = np.concatenate([[BOS, *d, EOS] for d in docs])
    dstream = np.concatenate([[0, *_density(d).astype(np.float32), 0] for d in docs])
    got = torch.cat([b["input_ids"] for b in batches]).numpy()
    assert got.shape == (len(stream) // L, L) and all(b["loss_mask"].all() for b in batches)
    np.testing.assert_array_equal(got.ravel(), stream[: got.size])
    np.testing.assert_array_equal(torch.cat([b["density"] for b in batches]).numpy().ravel(), dstream[: got.size])


@pytest.mark.parametrize("packing", ["pad", "wrap"])
@pytest.mark.parametrize("dp_size", [2, 3])
def test_ranks_and_workers_partition_one_epoch_in_the_global_order(split, packing, dp_size):
    path, docs = split
    reference = _rows(_stream(path, packing=packing))  # one rank, no workers: the global order
    if packing == "pad":
        assert sorted(reference) == sorted(_rows(_stream(path, shuffle=False)))  # every document once
        assert reference != _rows(_stream(path, shuffle=False))
    merged = [None] * len(reference)
    for r in range(dp_size):
        ds = _stream(path, packing=packing, dp_rank=r, dp_size=dp_size)
        loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)
        with_workers = list(loader)
        assert _rows(with_workers) == _rows(ds)  # same batches, same order, 0 or 2 workers
        assert [b["input_ids"].shape[0] for b in with_workers[:-1]] == [4] * (len(with_workers) - 1)
        merged[r::dp_size] = _rows(with_workers)  # global sample g belongs to rank g % dp_size
    assert merged == reference
    assert Counter(merged) == Counter(reference) and len(set(merged)) == len(merged)


def test_train_loader_crosses_epochs_each_sample_once_per_epoch(split):
    path, _ = split
    cfg = DataConfig(train_on="all", seq_len=L, packing="pad", shuffle_buffer=8, num_workers=2)
    n, dp, B = N_DOCS, 2, 4
    steps = (2 * n) // (B * dp) + 1
    per_rank = [_rows(_take(make_train_loader(cfg, _info(path), B, dp_rank=r, dp_size=dp, seed=5), steps))
                for r in range(dp)]
    merged = [None] * (steps * B * dp)
    for r in range(dp):
        merged[r::dp] = per_rank[r]
    epoch0, epoch1 = merged[:n], merged[n:2 * n]
    assert len(set(epoch0)) == n and set(epoch0) == set(epoch1) and epoch0 != epoch1
    single = make_train_loader(DataConfig(train_on="all", seq_len=L, packing="pad", shuffle_buffer=8), _info(path), B * dp, seed=5)
    assert _rows(_take(single, steps)) == merged  # dp=2 x 2 workers reads what one rank reads


def test_shuffle_is_seeded_and_bounded_in_memory(split, monkeypatch):
    path, _ = split
    from data_pipeline import stream as stream_module
    monkeypatch.setattr(stream_module, "CHUNK_TOKENS", 4 * L)  # a chunk of one batch (default: ~256K tokens)
    order = _rows(_stream(path))
    assert order == _rows(_stream(path))
    assert order != _rows(_stream(path, seed=4))
    assert order != _rows(_stream(path, shuffle_buffer=1))  # the window shuffle does something
    ds = _stream(path, packing="wrap", infinite=True, shuffle_buffer=4)
    source = ds.sources[0]
    assert len(source.reader.index["shards"]) >= 10
    it = iter(ds)
    held = []
    for _ in range(3 * source.samples_per_epoch // 4):
        next(it)
        held.append(len(source._shards))
    assert max(held) <= 4  # decoded shards: those overlapping the current chunk and window, not the split


def _assert_same(a, b):
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(x[k], y[k]), k


@pytest.mark.parametrize("packing", ["pad", "wrap"])
def test_exact_resume_in_process_with_workers(split, packing, tmp_path):
    path, _ = split
    cfg = DataConfig(train_on="all", seq_len=L, packing=packing, shuffle_buffer=8, num_workers=2)
    ref = make_train_loader(cfg, _info(path), batch_size=5, dp_rank=1, dp_size=2, seed=9)
    _take(ref, 7)
    state = ref.state_dict()
    torch.save(state, tmp_path / "s.pt")
    state = torch.load(tmp_path / "s.pt", weights_only=True)  # what a checkpoint holds: plain values only
    assert state["consumed"] == 7 * 5 * 2
    expected = _take(ref, 30)  # crosses into the next epoch
    resumed = make_train_loader(cfg, _info(path), batch_size=5, dp_rank=1, dp_size=2, seed=9)
    _take(resumed, 3)  # a loader that had moved on is rewound by the state
    resumed.load_state_dict(state)
    _assert_same(_take(resumed, 30), expected)
    for bad in (dict(seed=10), dict(cfg=DataConfig(train_on="all", seq_len=L, packing=packing, shuffle_buffer=9))):
        other = make_train_loader(bad.get("cfg", cfg), _info(path), 5, dp_rank=1, dp_size=2, seed=bad.get("seed", 9))
        with pytest.raises(ValueError, match="cannot resume"):
            other.load_state_dict(state)
    with pytest.raises(ValueError, match="version"):
        resumed.load_state_dict({**state, "version": 1})
    if packing == "wrap":  # rows cut after a per-epoch document shuffle are another order
        shuffled = make_train_loader(DataConfig(train_on="all", seq_len=L, packing=packing, shuffle_buffer=8, wrap_doc_shuffle=True),
                                     _info(path), 5, dp_rank=1, dp_size=2, seed=9)
        with pytest.raises(ValueError, match="wrap_doc_shuffle: saved False, now True"):
            shuffled.load_state_dict(state)
        # a state saved before the option existed was cut after the document shuffle
        legacy = {k: v for k, v in state.items() if k != "wrap_doc_shuffle"}
        shuffled.load_state_dict(legacy)
        with pytest.raises(ValueError, match="wrap_doc_shuffle: saved True, now False"):
            resumed.load_state_dict(legacy)


CHILD = textwrap.dedent("""
    import json, sys
    import numpy as np, torch
    from types import SimpleNamespace
    from data_pipeline.config import DataConfig
    from data_pipeline.stream import make_train_loader
    path, state_file, out, packing = sys.argv[1:5]
    info = SimpleNamespace(train_dir=path, pad_id=0, bos_id=1, eos_id=2, tokenizer=SimpleNamespace(fingerprint="fp"))
    state = torch.load(state_file, weights_only=True)
    cfg = DataConfig(train_on="all", seq_len=16, packing=packing, shuffle_buffer=8, num_workers=2)
    exact = make_train_loader(cfg, info, batch_size=4, dp_rank=1, dp_size=2, seed=11)
    exact.load_state_dict(state)
    ids = np.stack([next(exact)["input_ids"].numpy() for _ in range(100)])
    # elastic: 3 ranks (batch 3) continue from the same state to the end of the epoch
    n = json.loads(sys.argv[5])
    elastic = []
    for r in range(3):
        loader = make_train_loader(DataConfig(train_on="all", seq_len=16, packing=packing, shuffle_buffer=8), info, batch_size=3,
                                   dp_rank=r, dp_size=3, seed=11)
        loader.load_state_dict(state)
        mine = -(-(n - state["consumed"] - r) // 3)  # rank r's samples g = consumed + 3j + r < n
        rows = []
        while len(rows) < mine:
            rows.extend(next(loader)["input_ids"].tolist())
        elastic.append(rows[:mine])
    np.save(out + ".npy", ids)
    json.dump(elastic, open(out + ".json", "w"))
""")


@pytest.mark.parametrize("packing", ["pad", "wrap"])
def test_resume_in_a_fresh_process_exact_and_elastic_2_to_3_ranks(split, packing, tmp_path):
    path, _ = split
    stop = int(np.random.default_rng().integers(1, 8))  # a random step; reported on failure
    cfg = DataConfig(train_on="all", seq_len=L, packing=packing, shuffle_buffer=8)
    ranks = [make_train_loader(cfg, _info(path), batch_size=4, dp_rank=r, dp_size=2, seed=11) for r in range(2)]
    seen = [_rows(_take(loader, stop)) for loader in ranks]
    states = [loader.state_dict() for loader in ranks]
    assert states[0] == states[1]  # world-size independent: any rank's state resumes every rank
    torch.save(states[1], tmp_path / "state.pt")
    n = ranks[0].dataset.sources[0].samples_per_epoch
    assert stop * 8 < n
    res = subprocess.run([sys.executable, "-c", CHILD, str(path), str(tmp_path / "state.pt"), str(tmp_path / "out"),
                          packing, json.dumps(n)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    expected = np.stack([next(ranks[1])["input_ids"].numpy() for _ in range(100)])
    np.testing.assert_array_equal(np.load(tmp_path / "out.npy"), expected, err_msg=f"stopped at step {stop}")
    # elastic: what 2 ranks saw before the stop plus what 3 ranks see after it is the epoch, once each
    epoch = _rows(_stream(path, packing=packing, seed=11, batch_size=8))
    after = [tuple(r) for rows in json.loads((tmp_path / "out.json").read_text()) for r in rows]
    together = [r for rows in seen for r in rows] + after
    assert len(together) == n, f"stopped at step {stop}"
    assert Counter(together) == Counter(epoch), f"stopped at step {stop}"


def test_mixture_weights_partition_and_tokenizer_check(tmp_path):
    main = _write(tmp_path / "a" / "train", 80, first=10)
    extra = _write(tmp_path / "b" / "train", 40, first=1000, density=False)
    cfg = DataConfig(train_on="all", seq_len=L, packing="pad", shuffle_buffer=8, main_weight=3.0,
                     mixture=[MixtureSource(shard_dir=str(tmp_path / "b"), weight=1.0)])
    loader = make_train_loader(cfg, _info(tmp_path / "a" / "train"), batch_size=MIX_BLOCK // 4)
    batches = _take(loader, 4)
    rows = _rows(batches)
    assert "density" not in batches[0]  # only some sources have density: none emitted
    from_extra = [r for r in rows if r[1] >= 1000]
    assert len(from_extra) == MIX_BLOCK // 4  # weights 3:1, exact per block of MIX_BLOCK samples
    first = [r[1] for r in from_extra[:len(extra)]]
    assert sorted(first) == list(range(1000, 1000 + len(extra)))  # each extra doc once in its epoch
    assert sorted({r[1] for r in rows} - set(range(1000, 1040))) == list(range(10, 10 + len(main)))
    state = loader.state_dict()
    assert [p["epoch"] for p in state["position"]] == [768 // 80, 256 // 40]
    # a worker writes mixed rows into its shared-memory slot: the same batches as in process
    cfg_w = DataConfig(**{**cfg.__dict__, "num_workers": 1})
    _assert_same(_take(make_train_loader(cfg_w, _info(tmp_path / "a" / "train"), batch_size=MIX_BLOCK // 4), 4), batches)
    _write(tmp_path / "c" / "train", 5, fingerprint="other")
    bad = DataConfig(train_on="all", seq_len=L, mixture=[MixtureSource(shard_dir=str(tmp_path / "c"))])
    with pytest.raises(ShardFormatError, match="tokenizer"):
        make_train_loader(bad, _info(tmp_path / "a" / "train"), batch_size=4)


def test_val_loader_is_finite_unshuffled_reiterable_and_split_by_rank(split):
    path, docs = split
    cfg = DataConfig(train_on="all", seq_len=L, packing="pad")
    loader = make_val_loader(cfg, _info(path), batch_size=7)
    first, second = ([b["input_ids"] for b in loader] for _ in range(2))
    assert [b.shape[0] for b in first] == [7] * (N_DOCS // 7) + [N_DOCS % 7]  # last partial batch kept
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    assert torch.cat(first)[:, 1].tolist() == [int(d[0]) for d in docs]  # document order
    ranks = [torch.cat([b["input_ids"] for b in make_val_loader(cfg, _info(path), 7, dp_rank=r, dp_size=3)])
             for r in range(3)]
    assert [r[:, 1].tolist() for r in ranks] == [[int(d[0]) for d in docs[r::3]] for r in range(3)]


def _corrupt_one_shard(path):
    entry = ShardReader(path).index["shards"][3]
    f = path / entry["file"]
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))
    return entry["file"], entry["n_docs"]


def test_corrupt_shard_stops_with_its_name_or_is_skipped_and_counted(split, caplog):
    path, _ = split
    intact = list(_stream(path))
    name, n_docs = _corrupt_one_shard(path)
    with pytest.raises(CorruptShardError, match=name):
        list(_stream(path))
    loader = torch.utils.data.DataLoader(_stream(path), batch_size=None, num_workers=1)
    with pytest.raises(CorruptShardError, match=name):  # from a worker, still naming the file
        list(loader)
    ds = _stream(path, skip_corrupt_shards=True)
    with caplog.at_level(logging.WARNING, logger="data_pipeline.packing"):
        skipped = list(ds)
    assert ds.skipped_rows == n_docs and name in caplog.text
    dead = torch.cat([b["loss_mask"] for b in skipped]).sum(1) == 0
    assert dead.sum().item() == n_docs
    a, b = torch.cat([x["input_ids"] for x in intact]), torch.cat([x["input_ids"] for x in skipped])
    assert torch.equal(a[~dead], b[~dead])  # the order of the intact rows is unchanged


def test_tokenizer_mismatch_is_refused(split):
    path, _ = split
    info = _info(path)
    info.tokenizer = SimpleNamespace(fingerprint="another")
    with pytest.raises(ShardFormatError, match="tokenizer"):
        make_train_loader(DataConfig(train_on="all", seq_len=L), info, batch_size=4)
    with pytest.raises(ShardFormatError, match="tokenizer"):
        make_val_loader(DataConfig(train_on="all", seq_len=L), info, batch_size=4)
    assert isinstance(make_train_loader(DataConfig(train_on="all", seq_len=L), _info(path), batch_size=4), TrainLoader)


# -- the fast path (chunked batches, row copies, decoded-shard cache) equals the definition ----------


def _reference_epoch(docs_by_shard, packing, seed, epoch, window, shuffle=True, wrap_doc_shuffle=False):
    """Rows of one epoch straight from packing.py's definition, one sample at a time (slow, obvious)."""
    n = len(docs_by_shard)
    shard_order = np.random.default_rng([seed, epoch, 0]).permutation(n) if shuffle else range(n)
    samples = []
    if packing == "pad":
        for k in shard_order:
            docs = docs_by_shard[k]
            order = np.random.default_rng([seed, epoch, 1, k]).permutation(len(docs)) if shuffle else range(len(docs))
            for j in order:
                row = [BOS, *docs[j].tolist(), EOS][:L]
                samples.append(row + [PAD] * (L - len(row)))
    else:
        stream = []
        for k in shard_order:
            docs = docs_by_shard[k]
            order = (np.random.default_rng([seed, epoch, 1, k]).permutation(len(docs))
                     if shuffle and wrap_doc_shuffle else range(len(docs)))
            for j in order:
                stream += [BOS, *docs[j].tolist(), EOS]
        samples = [stream[i * L:(i + 1) * L] for i in range(len(stream) // L)]
    out = []
    for w in range(0, len(samples), window):
        size = min(window, len(samples) - w)
        perm = np.random.default_rng([seed, epoch, 2, w // window]).permutation(size) if window > 1 else range(size)
        out += [tuple(samples[w + i]) for i in perm]
    return out


@pytest.mark.parametrize("packing,doc_shuffle", [("pad", False), ("wrap", False), ("wrap", True)])
def test_sample_order_is_the_documented_definition(split, packing, doc_shuffle):
    path, _ = split
    reader = ShardReader(path)
    by_shard = [[reader.load_shard(k).document(j) for j in range(reader.shards[k]["n_docs"])]
                for k in range(reader.num_shards)]
    expected = [row for epoch in (0, 1)
                for row in _reference_epoch(by_shard, packing, 3, epoch, 8, wrap_doc_shuffle=doc_shuffle)]
    ds = _stream(path, packing=packing, infinite=True, batch_size=7, wrap_doc_shuffle=doc_shuffle)
    got = []
    for batch in ds:
        got += _rows([batch])
        if len(got) >= len(expected):
            break
    assert got[:len(expected)] == expected


@pytest.mark.parametrize("packing", ["pad", "wrap"])
@pytest.mark.parametrize("infinite", [True, False])
def test_chunked_batches_equal_batch_by_batch(split, packing, infinite):
    path, _ = split
    for dp_rank, dp_size in ((0, 1), (2, 3)):
        ds = _stream(path, packing=packing, infinite=infinite, dp_rank=dp_rank, dp_size=dp_size, batch_size=5,
                     shuffle_buffer=64)
        one = _stream(path, packing=packing, infinite=infinite, dp_rank=dp_rank, dp_size=dp_size, batch_size=5,
                      shuffle_buffer=64)
        assert ds.chunk_batches() > 1
        n = 60 if infinite else None
        chunked = list(itertools.islice(iter(ds), n))
        single = []
        for b in itertools.count():  # one numpy_batch call per batch: the per-sample definition of a batch
            g = one.global_indices(b)
            if not len(g) or (n is not None and b == n):
                break
            single.append(one.batch(g))
        _assert_same(chunked, single)
        rows, sizes = ds.numpy_chunk(range(3, 9))
        ref = [one.numpy_batch(one.global_indices(b)) for b in range(3, 9)]
        assert sizes == [len(r["input_ids"]) for r in ref]
        for key in rows:
            np.testing.assert_array_equal(rows[key], np.concatenate([r[key] for r in ref]))


def test_workers_send_chunks_that_split_into_the_same_batches(split):
    path, _ = split
    for packing in ("pad", "wrap"):
        cfg = DataConfig(train_on="all", seq_len=L, packing=packing, shuffle_buffer=64)
        plain = _take(make_train_loader(cfg, _info(path), batch_size=3, seed=2), 80)
        for workers in (1, 2):
            cfg_w = DataConfig(train_on="all", seq_len=L, packing=packing, shuffle_buffer=64, num_workers=workers, prefetch_factor=1)
            loader = make_train_loader(cfg_w, _info(path), batch_size=3, seed=2)
            assert loader.dataset.chunk_batches() > 1
            _assert_same(_take(loader, 80), plain)
        val = [b["input_ids"] for b in make_val_loader(cfg, _info(path), batch_size=4)]
        val_w = [b["input_ids"] for b in make_val_loader(cfg, _info(path), batch_size=4, num_workers=2)]
        assert len(val) == len(val_w) and all(torch.equal(a, b) for a, b in zip(val, val_w, strict=True))


@pytest.mark.parametrize("packing,doc_shuffle", [("pad", False), ("wrap", False), ("wrap", True)])
def test_decoded_cache_is_bounded_and_changes_nothing(split, packing, doc_shuffle, monkeypatch):
    path, _ = split
    def rows_of(ds):  # several calls walking forward over ~10 epochs
        return _rows([ds.batch(np.arange(i, i + 100)) for i in range(0, 900, 100)])

    reference = rows_of(_stream(path, packing=packing, wrap_doc_shuffle=doc_shuffle, cache_bytes=0, infinite=True))
    for cache in (0, 700, 10 << 20):
        ds = _stream(path, packing=packing, wrap_doc_shuffle=doc_shuffle, cache_bytes=cache, infinite=True)
        assert rows_of(ds) == reference
        source = ds.sources[0]
        assert sum(c.nbytes for c in source._decoded.values()) <= cache
    assert len(source._decoded) == source.reader.num_shards  # a small split is decoded once per run
    # the stream of an epoch is built in blocks (by index gather or by whole segments): any block size
    from data_pipeline import packing as packing_module
    for block, join_min, join_docs in ((5, 10**9, 1), (7, 0, 3), (64, 0, 1)):
        monkeypatch.setattr(packing_module, "STREAM_BLOCK", block)
        monkeypatch.setattr(packing_module, "JOIN_MIN_TOKENS", join_min)
        monkeypatch.setattr(packing_module, "JOIN_BLOCK_DOCS", join_docs)
        assert rows_of(_stream(path, packing=packing, wrap_doc_shuffle=doc_shuffle, infinite=True)) == reference
