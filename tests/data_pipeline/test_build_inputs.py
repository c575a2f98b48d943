"""Bad and unusual input: long documents, non-UTF-8 lines, paragraphs, LM1B's layout, vocab mismatch."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from common.config_file import ConfigError
from data_pipeline.build import build, ensure_shards
from data_pipeline.config import DataConfig
from data_pipeline.encode import limit_documents
from data_pipeline.shards import ShardReader, ShardWriter
from data_pipeline.sources import DataSourceError, iter_documents
from data_pipeline.tokenizer import TokenizerError, check_model_vocab, make_tokenizer


def _sp(source, sp_model, out, **kw):
    return DataConfig(source=str(source), tokenizer=f"sentencepiece:{sp_model}", vocab_size=1000,
                      shard_dir=str(out), val_fraction=0.2, **kw)


def test_limit_documents_split_and_truncate():
    flat = np.arange(12, dtype=np.uint16)
    lengths = np.array([2, 7, 0, 3])
    f, lens, n = limit_documents(flat, lengths, 3, "split")
    assert n == 1 and lens.tolist() == [2, 3, 3, 1, 0, 3] and np.array_equal(f, flat)
    f, lens, n = limit_documents(flat, lengths, 3, "truncate")
    assert n == 1 and lens.tolist() == [2, 3, 0, 3] and f.tolist() == [0, 1, 2, 3, 4, 9, 10, 11]
    assert limit_documents(flat, lengths, 0, "split")[2] == 0


@pytest.mark.parametrize("policy", ["split", "truncate"])
def test_long_documents_are_split_or_truncated_and_counted(tmp_path, sp_model, policy):
    lines = [f"short line {i}" for i in range(40)] + ["the " * 300 + "end"]
    (tmp_path / "c.txt").write_text("\n".join(lines) + "\n")
    cfg = _sp(tmp_path / "c.txt", sp_model, tmp_path / policy, max_doc_tokens=50, long_docs=policy)
    info = ensure_shards(cfg, progress=False, workers=1)
    readers = [ShardReader(d) for d in (info.train_dir, info.val_dir)]
    docs = [d for r in readers for d in r.iter_documents()]
    assert max(len(d) for d in docs) == 50
    assert sum(s["long_docs"] for r in readers for s in r.index["shards"]) == 1
    full = len(info.tokenizer.encode(lines[-1]))
    n_docs = sum(r.num_docs for r in readers)
    assert n_docs == len(lines) + (-(-full // 50) - 1 if policy == "split" else 0)
    assert sum(r.num_tokens for r in readers) == sum(len(info.tokenizer.encode(t)) for t in lines) - (
        0 if policy == "split" else full - 50)
    with pytest.raises(ConfigError, match="long_docs"):
        build(_sp(tmp_path / "c.txt", sp_model, tmp_path / "x", long_docs="drop"), progress=False)


def test_non_utf8_lines_error_or_skip_with_a_count(tmp_path, sp_model, capsys):
    from data_pipeline.build import main

    (tmp_path / "c.txt").write_bytes(b"".join(b"good line %d\n" % i for i in range(30)) + b"caf\xe9 au lait\nlast\n")
    common = ["--no-progress", "--workers", "1", "--set", f"data.source={tmp_path / 'c.txt'}",
              "--set", f"data.tokenizer=sentencepiece:{sp_model}", "--set", "data.vocab_size=1000",
              "--set", "data.val_fraction=0.2"]
    assert main([*common, "--set", f"data.shard_dir={tmp_path / 'e'}"]) == 2
    assert "c.txt: not valid UTF-8 at byte offset 383 (line 31)" in capsys.readouterr().err
    assert main([*common, "--set", f"data.shard_dir={tmp_path / 's'}", "--set", "data.decode_errors=skip"]) == 0
    out = capsys.readouterr().out
    assert "skipped 1 non-UTF-8 documents" in out and "byte offset 383" in out
    assert sum(ShardReader(tmp_path / "s" / s).num_docs for s in ("train", "val")) == 31


def test_paragraph_documents(tmp_path):
    (tmp_path / "w.txt").write_text("= Title =\nfirst para line one\nline two\n\n\n second doc\n\nthird\r\nx\n")
    docs = list(iter_documents(DataConfig(source=str(tmp_path / "w.txt"), txt_documents="paragraph",
                                          val_fraction=0.0), "train"))
    assert sorted(d.text for d in docs) == sorted(["= Title =\nfirst para line one\nline two", " second doc",
                                                   "third\nx"])
    assert sorted(d.id for d in docs) == ["w.txt:1", "w.txt:6", "w.txt:8"]  # the first line of each


def test_python_source_files_are_a_code_corpus(tmp_path):
    """`.py` files are read as text; txt_documents=file keeps each file whole (code's unit, blank
    lines and indentation included), and `{stdlib}` names this interpreter's standard library."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "a.py").write_text("import os\n\n\ndef f(x):\n    return x + 1\n")
    (pkg / "sub" / "b.py").write_text("class B:\n    pass\n")
    (pkg / "notes.md").write_text("not read")
    (pkg / "empty.py").write_text("\n\n")
    docs = list(iter_documents(DataConfig(source=str(pkg), txt_documents="file", val_fraction=0.0), "train"))
    assert {d.id: d.text for d in docs} == {"a.py:1": "import os\n\n\ndef f(x):\n    return x + 1",
                                           "sub/b.py:1": "class B:\n    pass"}
    paragraphs = list(iter_documents(DataConfig(source=str(pkg / "a.py"), txt_documents="paragraph",
                                                val_fraction=0.0), "train"))
    assert [d.text for d in paragraphs] == ["import os", "def f(x):\n    return x + 1"]
    std = list(iter_documents(DataConfig(source="{stdlib}/json", txt_documents="file", val_fraction=0.0), "train"))
    assert "encoder.py:1" in {d.id for d in std} and any("def dumps(" in d.text for d in std)


def test_lm1b_loader_reads_a_local_copy_in_lm1b_layout(tmp_path, sp_model):
    repo = tmp_path / "lm1b" / "plain_text"  # the hub repo's parquet layout: one sentence per row, "text"
    repo.mkdir(parents=True)
    train = [f"Sentence number {i} of the billion word benchmark ." for i in range(60)]
    pq.write_table(pa.table({"text": train[:40]}), repo / "train-00000-of-00002.parquet")
    pq.write_table(pa.table({"text": train[40:]}), repo / "train-00001-of-00002.parquet")
    pq.write_table(pa.table({"text": ["A test sentence .", "", "Another one ."]}), repo / "test-00000-of-00001.parquet")
    cfg = DataConfig(source="hf:lm1b", hf_local_dir=str(tmp_path / "lm1b"), tokenizer=f"sentencepiece:{sp_model}",
                     vocab_size=1000, shard_dir=str(tmp_path / "out"))
    docs = list(iter_documents(cfg, "train"))
    assert [d.text for d in docs] == train and docs[0].id == "hf:lm1b/train:0"
    info = ensure_shards(cfg, progress=False, workers=1)
    val = [info.tokenizer.decode(d) for d in ShardReader(info.val_dir).iter_documents()]
    assert val == ["A test sentence .", "Another one ."]  # the empty row is dropped
    with pytest.raises(DataSourceError, match="no column 'sentence'"):
        list(iter_documents(DataConfig(source="hf:lm1b", hf_local_dir=str(tmp_path / "lm1b"),
                                       text_field="sentence"), "train"))


def test_tokenizer_model_types_and_vocab_mismatch(corpora, sp_model, tmp_path):
    from data_pipeline.document import Document

    lines = (corpora / "tinyshakespeare" / "input.txt").read_text().splitlines()[:3000]
    models = {}
    for kind in ("unigram", "bpe"):
        cfg = DataConfig(tokenizer="sentencepiece", vocab_size=500, tokenizer_model_type=kind)
        models[kind] = make_tokenizer(cfg, (Document(str(i), t) for i, t in enumerate(lines)))
        assert models[kind].sp.get_piece_size() == 500 and models[kind].decode(models[kind].encode(lines[0])) == lines[0]
    assert models["unigram"].fingerprint != models["bpe"].fingerprint
    again = make_tokenizer(DataConfig(tokenizer="sentencepiece", vocab_size=500, tokenizer_model_type="bpe"),
                           (Document(str(i), t) for i, t in enumerate(lines)))
    assert again.fingerprint == models["bpe"].fingerprint  # deterministic training: parts agree
    with pytest.raises(TokenizerError, match="tokenizer_model_type"):
        make_tokenizer(DataConfig(tokenizer="sentencepiece", tokenizer_model_type="word"), iter([]))
    with pytest.raises(TokenizerError, match="has 1000 pieces but data.vocab_size=8192"):
        make_tokenizer(DataConfig(tokenizer=f"sentencepiece:{sp_model}"))
    with pytest.raises(TokenizerError, match="model.vocab_size=0"):
        check_model_vocab(models["bpe"], 512)
    check_model_vocab(models["bpe"], 0)
    check_model_vocab(models["bpe"], 500)


def test_empty_source_and_changed_settings(tmp_path, sp_model):
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(DataSourceError, match="no documents"):
        ensure_shards(_sp(tmp_path / "empty.txt", sp_model, tmp_path / "e"), progress=False)
    (tmp_path / "c.txt").write_text("".join(f"line {i}\n" for i in range(50)))
    ensure_shards(_sp(tmp_path / "c.txt", sp_model, tmp_path / "c"), progress=False, workers=1)
    plan = json.loads((tmp_path / "c" / "build.json").read_text())
    assert plan["docs_per_shard"]["train"] >= 1 and plan["fields"]["long_docs"] == "split"
    from data_pipeline.shards import ShardFormatError
    with pytest.raises(ShardFormatError, match="max_doc_tokens: built 0, config 5"):
        ensure_shards(_sp(tmp_path / "c.txt", sp_model, tmp_path / "c", max_doc_tokens=5), progress=False)


def test_uint8_density_round_trip(tmp_path):
    docs = [np.arange(n) for n in (5, 0, 9)]
    with ShardWriter(tmp_path, "fp", 100, density_dtype="uint8") as w:
        for d in docs:
            w.add_document(d, density=np.linspace(0, 1, len(d)))
    reader = ShardReader(tmp_path)
    assert reader.index["density_dtype"] == "uint8" and reader.shard(0).header["columns"]["density"]["dtype"] == "|u1"
    data = reader.load_shard(0, with_density=True)
    assert data.density.dtype == np.float16
    np.testing.assert_allclose(data.density[:5], np.linspace(0, 1, 5), atol=1 / 255)


def test_shard_directory_depends_on_the_built_tasks_settings_only():
    import dataclasses

    from data_pipeline.build import default_shard_dir
    from data_pipeline.config import DataConfig, TaskConfig

    def shard_dir(source: str, **task) -> str:
        base = TaskConfig()
        for name, settings in task.items():
            base = dataclasses.replace(base, **{name: dataclasses.replace(getattr(base, name), **settings)})
        return str(default_shard_dir(DataConfig(source=source, task=base)))

    sudoku = shard_dir("task:sudoku")
    assert shard_dir("task:sudoku", linreg={"dim": 5}, pathfinding={"nodes": 20}) == sudoku  # other tasks: no change
    assert shard_dir("task:sudoku", sudoku={"givens": 30}) != sudoku  # its own settings: another build
    assert shard_dir("task:linreg", linreg={"dim": 5}) != shard_dir("task:linreg")
