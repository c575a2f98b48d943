import json
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_pipeline.config import DataConfig
from data_pipeline.sources import DataSourceError, DataSourceUnavailable, iter_documents, parse_hf_source


def _both(cfg):
    return list(iter_documents(cfg, "train")), list(iter_documents(cfg, "val"))


def test_txt_lines_split_by_stable_hash(tmp_path):
    lines = [f"document number {i}" for i in range(400)]
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(lines[:200]) + "\n\n   \n" + "\r\n".join(lines[200:]) + "\n")
    cfg = DataConfig(source=str(path), val_fraction=0.2)
    train, val = _both(cfg)
    assert sorted(d.text for d in train + val) == sorted(lines)  # blank lines skipped, \r stripped
    assert not {d.id for d in train} & {d.id for d in val}
    assert 40 < len(val) < 120
    assert [d.id for d in iter_documents(cfg, "val")] == [d.id for d in val]  # stable
    assert train[0].id == "corpus.txt:1"


def test_jsonl_parquet_and_directories(tmp_path):
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"body": f"json {i}", "x": 1}) for i in range(50)))
    pq.write_table(pa.table({"body": [f"parquet {i}" for i in range(50)]}), tmp_path / "a.parquet")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.txt").write_text("text 0\ntext 1\n")
    (tmp_path / "ignored.csv").write_text("not,read\n")
    train, val = _both(DataConfig(source=str(tmp_path), text_field="body", val_fraction=0.1))
    texts = [d.text for d in sorted(train + val, key=lambda d: d.id)]
    assert len(texts) == 102
    files = [d.id.split(":")[0] for d in train]
    assert files == sorted(files) and files[0] == "a.parquet" and files[-1] == "sub/c.txt"
    (tmp_path / "b.jsonl").write_text('{"text": "no body"}\n')
    with pytest.raises(DataSourceError, match=r"b\.jsonl:1: no field 'body'"):
        _both(DataConfig(source=str(tmp_path / "b.jsonl"), text_field="body"))


def test_several_local_paths_joined_by_commas(tmp_path):
    """A corpus spread over folders (../shared/corpora/{wikitext-2,ptb,...}) is one source."""
    for name, n in (("wiki/valid.txt", 60), ("ptb/ptb.valid.txt", 40)):
        (tmp_path / name).parent.mkdir()
        (tmp_path / name).write_text("".join(f"{name} line {i}\n" for i in range(n)))
    (tmp_path / "more").mkdir()
    (tmp_path / "more" / "x.jsonl").write_text(json.dumps({"text": "from a directory"}) + "\n")
    source = f"{tmp_path / 'wiki/valid.txt'}, {tmp_path / 'ptb/ptb.valid.txt'},{tmp_path / 'more'}"
    train, val = _both(DataConfig(source=source, val_fraction=0.2))
    docs = train + val
    assert len(docs) == 101 and not {d.id for d in train} & {d.id for d in val}
    # each file keeps its own ids (and so the same held-out lines as when read alone)
    assert train[0].id.startswith("valid.txt:") and "x.jsonl:1" in {d.id for d in docs}
    alone = {d.id for d in iter_documents(DataConfig(source=str(tmp_path / "ptb/ptb.valid.txt"), val_fraction=0.2), "val")}
    assert alone == {d.id for d in val if d.id.startswith("ptb.valid.txt:")}
    (tmp_path / "ptb" / "valid.txt").write_text("same name\n")
    with pytest.raises(DataSourceError, match="several files are named"):
        _both(DataConfig(source=f"{tmp_path / 'wiki/valid.txt'},{tmp_path / 'ptb/valid.txt'}"))
    with pytest.raises(DataSourceError, match="neither task:NAME"):
        _both(DataConfig(source=f"{tmp_path / 'wiki/valid.txt'},{tmp_path / 'absent.txt'}"))


def test_non_utf8_names_file_and_offset(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes(b"good line\ncaf\xe9\n")
    with pytest.raises(DataSourceError, match=r"latin1\.txt: not valid UTF-8 at byte offset 13"):
        list(iter_documents(DataConfig(source=str(path)), "train"))


def test_empty_and_missing_sources(tmp_path):
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(DataSourceError, match="no documents"):
        list(iter_documents(DataConfig(source=str(tmp_path / "empty.txt")), "train"))
    (tmp_path / "one.txt").write_text("only one\n")
    with pytest.raises(DataSourceError, match="val split is empty"):
        list(iter_documents(DataConfig(source=str(tmp_path / "one.txt"), val_fraction=0.0), "val"))
    with pytest.raises(DataSourceError, match="neither task:NAME"):
        list(iter_documents(DataConfig(source=str(tmp_path / "absent.txt")), "train"))


def test_hf_source_offline_fails_fast_with_hint():
    assert parse_hf_source("hf:lm1b") == ("lm1b", None)
    assert parse_hf_source("hf:wikitext/wikitext-2-raw-v1") == ("wikitext", "wikitext-2-raw-v1")
    assert parse_hf_source("hf:org/name/cfg") == ("org/name", "cfg")
    # A name that exists nowhere: fails both offline (this machine) and online, never downloads.
    cfg = DataConfig(source="hf:dlm-pretrain-tests/no-such-dataset-3f9a", tokenizer="sentencepiece")
    t0 = time.monotonic()
    with pytest.raises(DataSourceUnavailable) as err:
        next(iter_documents(cfg, "train"))
    assert time.monotonic() - t0 < 30
    msg = str(err.value)
    assert "dlm-pretrain-tests/no-such-dataset-3f9a" in msg and "--set data.source=" in msg


def test_task_source_sizes():
    cfg = DataConfig(source="task:sudoku")
    cfg.task.num_train, cfg.task.num_val = 3, 2
    train, val = _both(cfg)
    assert len(train) == 3 and len(val) == 2 and train[0].id.startswith("task:sudoku/train/")
