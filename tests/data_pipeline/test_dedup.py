"""Deduplication and quality filters at build time (issue 19 item 7): exact (normalised) and near
(MinHash LSH) duplicates removed, no validation document that also occurs in train, counted."""

import random
import re

import pytest

from data_pipeline.build import build, main
from data_pipeline.config import DataConfig
from data_pipeline.shards import ShardReader
from data_pipeline.sources import iter_documents
from data_pipeline.tokenizer import load_tokenizer


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def _corpus(path, rng: random.Random) -> list[str]:
    words = [f"w{i}" for i in range(400)]
    base = [" ".join(rng.choice(words) for _ in range(40)) for _ in range(300)]
    lines = list(base)
    lines += [b.upper() for b in base[:30]]  # exact duplicates once normalised (case)
    lines += ["  " + b.replace(" ", "   ") for b in base[30:50]]  # ... and whitespace
    near = []
    for b in base[50:80]:  # one word changed out of 40: Jaccard of word 3-grams ~0.86
        ws = b.split()
        ws[20] = "changed"
        near.append(" ".join(ws))
    lines += near
    lines += ["x" * 3, "\x01\x02\x03\x04 ab"]  # too short, mostly non-printable
    rng.shuffle(lines)
    path.write_text("\n".join(lines) + "\n")
    return lines


def test_exact_near_and_cross_split_duplicates_are_removed_and_counted(tmp_path, capsys):
    src = tmp_path / "dups.txt"
    _corpus(src, random.Random(0))
    cfg = DataConfig(source=str(src), tokenizer="sentencepiece", vocab_size=450, val_fraction=0.2,
                     shard_dir=str(tmp_path / "ds"))
    raw = {s: [d.text for d in iter_documents(cfg, s)] for s in ("train", "val")}
    n_raw = sum(map(len, raw.values()))
    args = ["--no-progress", "--workers", "1", "--set", f"data.source={src}", "data.tokenizer=sentencepiece",
            "data.vocab_size=450", "data.val_fraction=0.2", f"data.shard_dir={tmp_path / 'ds'}",
            "data.filter.exact_dedup=true", "data.filter.near_dedup_threshold=0.7", "data.filter.min_chars=5",
            "data.filter.max_nonprintable=0.2"]
    assert main(args) == 0
    out = capsys.readouterr().out
    counts = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", out.split("filtered:")[1].splitlines()[0])}
    tok = load_tokenizer(tmp_path / "ds")
    kept = {s: [_norm(tok.decode(d.tolist())) for d in ShardReader(tmp_path / "ds" / s).iter_documents()]
            for s in ("train", "val")}
    assert len(set(kept["train"])) == len(kept["train"])  # no exact duplicate left in train
    assert not set(kept["val"]) & set(kept["train"])  # no validation document occurs in train
    # 50 exact and 30 near copies: a copy whose original sits in the other split counts as val_in_train
    # (in val) or removes the val original (in train); only near pairs both in val may both stay
    assert counts["exact"] >= 30 and counts["near"] >= 15 and counts["val_in_train"] >= 1
    assert counts["exact"] + counts["near"] + counts["val_in_train"] >= 75
    assert counts["too_short"] == 1 and counts["nonprintable"] == 1
    assert sum(map(len, kept.values())) == n_raw - sum(counts.values())
    # near duplicates: no kept train line is within one word of another
    sigs = {}
    for t in kept["train"]:
        ws = t.split()
        if len(ws) == 40:
            key = " ".join(ws[:20] + ws[21:])
            assert key not in sigs, t
            sigs[key] = t


def test_filters_are_off_by_default_and_checked(tmp_path):
    from common.config_file import ConfigError
    from data_pipeline.build import check_config

    src = tmp_path / "dups.txt"
    lines = _corpus(src, random.Random(1))
    cfg = DataConfig(source=str(src), tokenizer="sentencepiece", vocab_size=450, val_fraction=0.2,
                     shard_dir=str(tmp_path / "ds"))
    build(cfg, workers=1, progress=False)
    total = sum(ShardReader(tmp_path / "ds" / s).num_docs for s in ("train", "val"))
    assert total == len(lines)
    bad = DataConfig()
    bad.filter.near_dedup_threshold = 1.5
    with pytest.raises(ConfigError, match="near_dedup_threshold"):
        check_config(bad)


def test_parts_drop_the_same_documents_as_a_single_build(tmp_path, monkeypatch):
    import data_pipeline.build as build_mod

    src = tmp_path / "dups.txt"
    _corpus(src, random.Random(2))
    args = ["--no-progress", "--workers", "1", "--set", f"data.source={src}", "data.tokenizer=sentencepiece",
            "data.vocab_size=450", "data.val_fraction=0.2", "data.shard_size_mb=0.004",
            "data.filter.exact_dedup=true", "data.filter.near_dedup_threshold=0.7"]
    assert main([*args, f"data.shard_dir={tmp_path / 'one'}"]) == 0
    parts = [*args, f"data.shard_dir={tmp_path / 'parts'}"]
    assert main([*parts, "--prepare"]) == 0
    monkeypatch.setattr(build_mod, "find_removed", lambda *a: (_ for _ in ()).throw(AssertionError("again")))
    for i in (1, 0):
        assert main([*parts, "--part", f"{i}/2"]) == 0
    assert main([*parts, "--merge"]) == 0
    files = lambda d: {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*"))  # noqa: E731
                       if p.is_file() and "/part-" not in p.as_posix()}
    assert files(tmp_path / "parts") == files(tmp_path / "one")
    assert ShardReader(tmp_path / "one" / "train").num_shards >= 3
