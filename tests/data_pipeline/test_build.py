import json

import numpy as np
import pytest

from common.config_file import ConfigError
from data_pipeline.build import ensure_shards, main
from data_pipeline.config import DataConfig, load_data_config
from data_pipeline.shards import ShardFormatError, ShardReader


def _sudoku_cfg(shard_dir, n=40):
    cfg = DataConfig(source="task:sudoku", shard_dir=str(shard_dir))
    cfg.task.num_train, cfg.task.num_val = n, 8
    return cfg


def test_ensure_shards_builds_once_then_reuses(tmp_path):
    cfg = _sudoku_cfg(tmp_path / "ds")
    info = ensure_shards(cfg, progress=False)
    assert not info.reused and info.vocab_size == 16 and info.mask_id == 3
    index_path = info.train_dir / "index.json"
    stamp = index_path.stat().st_mtime_ns
    train = ShardReader(info.train_dir)
    assert train.num_docs == 40 and train.num_tokens == 40 * 163  # no BOS/EOS stored
    text = info.tokenizer.decode(train.document(0))
    assert len(text) == 163 and text[81] == "="
    again = ensure_shards(cfg, progress=False)
    assert again.reused and index_path.stat().st_mtime_ns == stamp
    assert again.tokenizer.fingerprint == info.tokenizer.fingerprint
    assert not list(tmp_path.glob(".*building*"))  # no temp directory left behind
    # Same settings elsewhere: byte-identical shards (deterministic build).
    other = ensure_shards(_sudoku_cfg(tmp_path / "ds2"), progress=False)
    assert ShardReader(other.train_dir).index["shards"] == train.index["shards"]
    # The explicit shard_dir now holds a build made with other settings: refused, not reused.
    with pytest.raises(ShardFormatError, match="num_train"):
        ensure_shards(_sudoku_cfg(tmp_path / "ds", n=41), progress=False)


def test_tokenizer_index_mismatch_is_refused(tmp_path):
    cfg = _sudoku_cfg(tmp_path / "ds")
    info = ensure_shards(cfg, progress=False)
    index = json.loads((info.val_dir / "index.json").read_text())
    index["tokenizer_fingerprint"] = "0" * 16
    (info.val_dir / "index.json").write_text(json.dumps(index))
    with pytest.raises(ShardFormatError, match="tokenizer"):
        ensure_shards(cfg, progress=False)


def test_build_local_txt_with_sentencepiece(tmp_path):
    words = "the a of to and in is it you that he was for on are with as I his they be at".split()
    rng = np.random.default_rng(0)
    lines = [" ".join(rng.choice(words, size=int(rng.integers(3, 15)))) for _ in range(600)]
    (tmp_path / "corpus.txt").write_text("\n".join(lines) + "\n")
    cfg = DataConfig(source=str(tmp_path / "corpus.txt"), tokenizer="sentencepiece", vocab_size=120,
                     val_fraction=0.1, shard_dir=str(tmp_path / "sp"), shard_size_mb=0.002)
    info = ensure_shards(cfg, progress=False)
    train, val = ShardReader(info.train_dir), ShardReader(info.val_dir)
    assert train.num_shards > 1 and train.num_docs + val.num_docs == len(lines) and val.num_docs > 20
    decoded = [info.tokenizer.decode(d) for split in (train, val) for d in split.iter_documents()]
    assert sorted(decoded) == sorted(lines)  # every line, exactly once, decodes back to itself


def test_build_local_jsonl_via_cli_with_inherit(tmp_path, capsys):
    rows = [{"text": f"row {i} " + "abc" * (i % 5)} for i in range(300)]
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "base.yaml").write_text("data:\n  seq_len: 99\n  vocab_size: 64\n  tokenizer: task\nmodel:\n  x: 1\n")
    (tmp_path / "run.yaml").write_text(f"inherit: base.yaml\ndata:\n  source: {tmp_path / 'data.jsonl'}\n"
                                       "  tokenizer: sentencepiece\n")
    cfg = load_data_config(tmp_path / "run.yaml", [f"data.shard_dir={tmp_path / 'out'}", "data.val_fraction=0.1"])
    assert (cfg.seq_len, cfg.vocab_size, cfg.tokenizer, cfg.val_fraction) == (99, 64, "sentencepiece", 0.1)
    code = main(["--config", str(tmp_path / "run.yaml"), "--no-progress",
                 "--set", f"data.shard_dir={tmp_path / 'out'}", "--set", "data.val_fraction=0.1"])
    out = capsys.readouterr().out
    assert code == 0 and "train docs=" in out and "compression=" in out
    total = sum(ShardReader(tmp_path / "out" / s).num_docs for s in ("train", "val"))
    assert total == len(rows)
    with pytest.raises(ConfigError, match="data.KEY=VALUE"):
        load_data_config(None, ["train.lr=1"])
    with pytest.raises(ConfigError, match="--set"):
        load_data_config(None, ["data.no_such_key=1"])


def test_unreachable_source_is_reported_before_tokenizer_problems(tmp_path):
    from data_pipeline.sources import DataSourceUnavailable

    cfg = DataConfig(source="hf:dlm-pretrain-tests/no-such-dataset-3f9a", tokenizer="hf:no-such-tokenizer",
                     shard_dir=str(tmp_path / "hf"))
    with pytest.raises(DataSourceUnavailable, match="--set data.source="):
        ensure_shards(cfg, progress=False)
    assert not (tmp_path / "hf").exists() and not list(tmp_path.glob(".*"))


def _qa_jsonl(path):
    rows = [{"question": f"what is {i} plus {i}?", "answer": str(2 * i), "id": i} for i in range(60)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def test_jsonl_text_template_joins_fields_and_set_takes_several_values(tmp_path, capsys):
    from data_pipeline.sources import iter_documents

    rows = _qa_jsonl(tmp_path / "qa.jsonl")
    recipe = tmp_path / "run.yaml"
    recipe.write_text('data:\n  text_template: "Q: {question}\\nA: {answer} (#{id})"\n  val_fraction: 0.2\n')
    cfg = load_data_config(recipe, [f"data.source={tmp_path / 'qa.jsonl'}"])
    texts = {d.text for s in ("train", "val") for d in iter_documents(cfg, s)}
    assert texts == {f"Q: {r['question']}\nA: {r['answer']} (#{r['id']})" for r in rows}
    # one --set with several values, as pretrain.launch takes them, and the repeated form
    common = ["--config", str(recipe), "--no-progress", "--set", f"data.source={tmp_path / 'qa.jsonl'}",
              "data.tokenizer=sentencepiece", "data.vocab_size=60"]
    assert main([*common, f"data.shard_dir={tmp_path / 'a'}"]) == 0
    assert main([*common[:-2], "--set", "data.tokenizer=sentencepiece", "--set", "data.vocab_size=60",
                 "--set", f"data.shard_dir={tmp_path / 'b'}"]) == 0
    info_a = ensure_shards(load_data_config(recipe, [f"data.source={tmp_path / 'qa.jsonl'}",
                                                     "data.tokenizer=sentencepiece", "data.vocab_size=60",
                                                     f"data.shard_dir={tmp_path / 'a'}"]), progress=False)
    first = info_a.tokenizer.decode(ShardReader(info_a.train_dir).document(0))
    assert "plus" in first and "A:" in first  # both fields, joined by the template
    assert ((tmp_path / "a" / "train" / "index.json").read_bytes() == (tmp_path / "b" / "train" / "index.json").read_bytes())


def test_text_template_errors_name_the_missing_field(tmp_path):
    from data_pipeline.sources import DataSourceError, iter_documents

    _qa_jsonl(tmp_path / "qa.jsonl")
    cfg = DataConfig(source=str(tmp_path / "qa.jsonl"), text_template="{question}\n{answr}", val_fraction=0.2)
    with pytest.raises(DataSourceError, match="answr.*question"):
        list(iter_documents(cfg, "train"))
    with pytest.raises(ConfigError, match="text_template"):
        from data_pipeline.build import check_config
        check_config(DataConfig(text_template="no fields at all"))


def test_help_documents_text_field_and_text_template(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "data.text_field" in out and "data.text_template" in out and "{question}" in out
