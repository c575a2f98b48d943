"""Provenance (issue 19 item 8): every stored document maps back to its source file and line (or
dataset and row), and `inspect DIR --show N` prints it with its tokens and density scores."""

import json
from pathlib import Path

import numpy as np

from data_pipeline.build import build
from data_pipeline.config import DataConfig
from data_pipeline.inspect import document_provenance
from data_pipeline.inspect import main as inspect_main
from data_pipeline.shards import ShardReader
from data_pipeline.tokenizer import load_tokenizer


def _lines(path: Path) -> list[str]:
    return path.read_text().split("\n")


def test_every_document_maps_back_to_its_file_and_line(corpus_dir, sp_model, tmp_path):
    out = tmp_path / "ds"
    cfg = DataConfig(source=str(corpus_dir), tokenizer=f"sentencepiece:{sp_model}", vocab_size=1000,
                     shard_dir=str(out), val_fraction=0.05, shard_size_mb=0.02, max_doc_tokens=24, long_docs="split")
    build(cfg, workers=2, progress=False)
    tok = load_tokenizer(out)
    files = {p.name: _lines(p) for p in corpus_dir.iterdir()}
    for split in ("train", "val"):
        reader = ShardReader(out / split)
        n = reader.num_docs
        assert reader.shard(reader.num_shards - 1).header["columns"].get("source")
        for i in np.linspace(0, n - 1, 40 if split == "train" else n, dtype=int):
            p = document_provenance(out, split, int(i))
            assert p["file"] in files and p["line"] >= 1
            line = files[p["file"]][p["line"] - 1]
            want = tok.encode_batch([line])[0]
            if len(want) <= 24:
                assert np.array_equal(p["tokens"], want), (split, i, p)
            else:  # a piece of a split document: it is a run of that line's tokens
                start = next(k for k in range(0, len(want), 24) if np.array_equal(want[k:k + 24][:len(p["tokens"])], p["tokens"]))
                assert start % 24 == 0


def test_show_prints_text_tokens_density_and_source(tmp_path, capsys):
    rows = [{"question": f"q{i}?", "answer": f"a{i}"} for i in range(50)]
    src = tmp_path / "qa.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = DataConfig(source=str(src), tokenizer="sentencepiece", vocab_size=60, text_template="{question} {answer}",
                     shard_dir=str(tmp_path / "ds"), val_fraction=0.2)
    cfg.density.annotator = "unigram"
    build(cfg, workers=1, progress=False)
    for n in (0, 7):
        p = document_provenance(tmp_path / "ds", "train", n)
        assert p["text"] == "{question} {answer}".format(**rows[p["line"] - 1])
    assert inspect_main([str(tmp_path / "ds"), "--show", "3"]) == 0
    out = capsys.readouterr().out
    p = document_provenance(tmp_path / "ds", "train", 3)
    assert f"qa.jsonl line {p['line']}" in out and p["text"] in out and "density" in out and "tokens" in out
    assert inspect_main([str(tmp_path / "ds"), "--show", "0", "--split", "val"]) == 0
    assert "qa.jsonl line" in capsys.readouterr().out


def test_task_documents_name_their_generated_index(tmp_path, capsys):
    cfg = DataConfig(source="task:sudoku", shard_dir=str(tmp_path / "ds"))
    cfg.task.num_train, cfg.task.num_val = 30, 6
    build(cfg, workers=1, progress=False)
    p = document_provenance(tmp_path / "ds", "val", 4)
    assert p["source"] == "task:sudoku val document 4"
