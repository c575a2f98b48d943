"""No damaged or stale shard is ever accepted (issue 19): rebuilds check kept shards, verify covers
every split and the tokenizer, a changed source is noticed, and the trainer checks before step 1."""

import json
from pathlib import Path

import pytest

from data_pipeline.build import build, main
from data_pipeline.config import DataConfig
from data_pipeline.inspect import main as inspect_main
from data_pipeline.shards import CorruptShardError, ShardReader


def _cfg(source, sp_model, out, **kw) -> DataConfig:
    kw = {"val_fraction": 0.05, "shard_size_mb": 0.02, **kw}
    return DataConfig(source=str(source), tokenizer=f"sentencepiece:{sp_model}", vocab_size=1000,
                      shard_dir=str(out), **kw)


def _args(source, sp_model, out) -> list[str]:
    return ["--no-progress", "--workers", "1", "--set", f"data.source={source}",
            f"data.tokenizer=sentencepiece:{sp_model}", "data.vocab_size=1000", "data.val_fraction=0.05",
            "data.shard_size_mb=0.02", f"data.shard_dir={out}"]


def _files(d: Path) -> dict[str, bytes]:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.fixture
def ptb(corpora, tmp_path) -> Path:
    """A private copy of a real corpus (the source tests append to it)."""
    src = tmp_path / "src" / "ptb.txt"
    src.parent.mkdir()
    src.write_bytes((corpora / "ptb" / "ptb.valid.txt").read_bytes())
    return src


def _flip(path: Path, where: float = 0.5) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * where)] ^= 0x40
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_rebuild_after_index_loss_rewrites_a_damaged_shard(ptb, sp_model, tmp_path, damage, capsys):
    out = tmp_path / "ds"
    build(_cfg(ptb, sp_model, out), workers=1, progress=False)
    ref = _files(out)
    victim = out / "train" / "shard-00001.dlm"
    if damage == "flip":
        _flip(victim)
    else:
        victim.write_bytes(victim.read_bytes()[:-100])
    (out / "train" / "index.json").unlink()
    assert main(_args(ptb, sp_model, out)) == 0
    printed = capsys.readouterr()
    assert "shard-00001.dlm" in printed.err + printed.out  # the damaged shard is named
    assert _files(out) == ref  # rewritten, byte-identical to the clean build
    assert inspect_main([str(out), "--verify"]) == 0


def test_shard_without_a_record_is_decoded_before_being_kept(ptb, sp_model, tmp_path):
    """A shard of a killed run (no part record yet): its zstd frames carry a content checksum."""
    out = tmp_path / "ds"
    build(_cfg(ptb, sp_model, out), workers=1, progress=False)
    ref = _files(out)
    for split in ("train", "val"):
        for p in (out / split).glob("part-*.json"):
            p.unlink()
        (out / split / "index.json").unlink()
    victim = out / "train" / "shard-00002.dlm"
    _flip(victim, 0.9)  # in the compressed payload, not the header
    build(_cfg(ptb, sp_model, out), workers=1, progress=False)
    assert _files(out) == ref


def test_repair_rebuilds_exactly_the_bad_shards_of_a_complete_build(ptb, sp_model, tmp_path, capsys):
    out = tmp_path / "ds"
    build(_cfg(ptb, sp_model, out), workers=1, progress=False)
    ref = _files(out)
    _flip(out / "train" / "shard-00003.dlm")
    (out / "val" / "shard-00000.dlm").unlink()
    reader = ShardReader(out / "train")
    with pytest.raises(CorruptShardError) as err:
        list(reader.iter_documents())
    hint = str(err.value)
    assert "--repair" in hint and str(out) in hint
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "train").glob("shard-*.dlm")}
    assert main([*_args(ptb, sp_model, out), "--repair"]) == 0
    text = capsys.readouterr().out
    assert "shard-00003.dlm" in text and "shard-00000.dlm" in text
    assert _files(out) == ref
    changed = [n for n, t in stamps.items() if (out / "train" / n).stat().st_mtime_ns != t]
    assert changed == ["shard-00003.dlm"]  # exactly the bad one was rewritten
    assert main([*_args(ptb, sp_model, out), "--repair"]) == 0
    assert "nothing to repair" in capsys.readouterr().out


def test_zstd_frames_carry_their_content_checksum(ptb, sp_model, tmp_path):
    import zstandard

    out = tmp_path / "ds"
    build(_cfg(ptb, sp_model, out), workers=1, progress=False)
    sf = ShardReader(out / "train").shard(0)
    offset, clen, _ = sf.header["columns"]["tokens"]["frames"][0]
    params = zstandard.get_frame_parameters(bytes(sf._payload[offset:offset + clen]))
    assert params.has_checksum


def test_verify_names_a_missing_split_index_and_a_swapped_tokenizer(ptb, sp_model, tmp_path, capsys):
    out = tmp_path / "ds"
    build(_cfg(ptb, sp_model, out), workers=1, progress=False)
    assert inspect_main([str(out), "--verify"]) == 0
    capsys.readouterr()
    (out / "val" / "index.json").unlink()
    assert inspect_main([str(out), "--verify"]) == 1
    text = capsys.readouterr().out
    assert "val" in text and "index.json" in text and "--repair" in text
    assert main([*_args(ptb, sp_model, out), "--repair"]) == 0  # the hint's command restores it
    assert inspect_main([str(out), "--verify"]) == 0
    capsys.readouterr()
    _flip(out / "tokenizer.model", 0.3)  # another tokenizer model in its place
    assert inspect_main([str(out), "--verify"]) == 1
    text = capsys.readouterr().out
    assert "tokenizer.model" in text and "sha256" in text


def test_verify_covers_the_density_statistics(tmp_path, capsys):
    cfg = DataConfig(source="task:sudoku", shard_dir=str(tmp_path / "ds"))
    cfg.task.num_train, cfg.task.num_val = 40, 8
    cfg.density.annotator = "unigram"
    build(cfg, workers=1, progress=False)
    plan = json.loads((tmp_path / "ds" / "build.json").read_text())
    assert {"tokenizer.json", "density_stats.npz"} <= set(plan["files"])
    assert inspect_main([str(tmp_path / "ds"), "--verify"]) == 0
    capsys.readouterr()
    _flip(tmp_path / "ds" / "density_stats.npz", 0.5)
    assert inspect_main([str(tmp_path / "ds"), "--verify"]) == 1
    assert "density_stats.npz" in capsys.readouterr().out


# -- the trainer checks the shards before its first step (item 4) -------------------------------

REPO = Path(__file__).resolve().parents[2]
TINY_TRAIN = ["data.task.num_train=192", "data.task.num_val=16", "data.shard_size_mb=0.004", "train.steps=6",
              "train.eval_every=6", "train.batch_size=8", "train.eval_batches=1", "model.n_layers=1",
              "model.d_model=32", "model.n_heads=2", "train.log_every=1", "train.device=cpu"]


def _sudoku_build(out: Path) -> Path:
    from data_pipeline.config import load_data_config

    cfg = load_data_config(REPO / "configs" / "quickstart.yaml",
                           [k for k in TINY_TRAIN if k.startswith("data.")] + [f"data.shard_dir={out}"])
    build(cfg, workers=1, progress=False)
    assert len(list((out / "train").glob("shard-*.dlm"))) >= 4
    return out


def test_preflight_checks_every_shard_size_and_verifies_in_full_when_asked(tmp_path):
    from data_pipeline.build import ensure_shards
    from data_pipeline.config import load_data_config
    from data_pipeline.stream import check_shards_before_training

    out = _sudoku_build(tmp_path / "ds")
    cfg = load_data_config(REPO / "configs" / "quickstart.yaml",
                           [k for k in TINY_TRAIN if k.startswith("data.")] + [f"data.shard_dir={out}"])
    info = ensure_shards(cfg, progress=False)
    check_shards_before_training(cfg, info)  # intact: no error
    _flip(out / "train" / "shard-00002.dlm", 0.7)  # same size: only a full verify sees it
    check_shards_before_training(cfg, info)
    cfg.verify_shards = True
    with pytest.raises(CorruptShardError, match="shard-00002.dlm"):
        check_shards_before_training(cfg, info)
    cfg.verify_shards = False
    (out / "val" / "shard-00000.dlm").unlink()
    (out / "train" / "shard-00003.dlm").write_bytes(b"short")
    with pytest.raises(CorruptShardError) as err:
        check_shards_before_training(cfg, info)
    assert "shard-00003.dlm" in str(err.value) and "val/shard-00000.dlm" in str(err.value)
    assert "--repair" in str(err.value)
    cfg.skip_corrupt_shards = True  # the run is told to survive bad shards: it warns and goes on
    check_shards_before_training(cfg, info)


def _launch(cwd: Path, *extra: str):
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "pretrain.launch", "--config", str(REPO / "configs" / "quickstart.yaml"),
                           "--set", *TINY_TRAIN, *extra], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def test_training_refuses_a_damaged_split_before_step_one(tmp_path):
    out = _sudoku_build(tmp_path / "ds")
    victim = out / "train" / "shard-00003.dlm"
    victim.write_bytes(victim.read_bytes()[:-7])
    proc = _launch(tmp_path, f"data.shard_dir={out}", "tracking.enabled=false")
    assert proc.returncode != 0
    assert "shard-00003.dlm" in proc.stderr and "--repair" in proc.stderr
    assert not list((tmp_path / "runs").rglob("step_*"))  # no step was taken


def test_skipped_rows_of_corrupt_shards_are_logged_to_mlflow_with_loader_workers(tmp_path):
    from mlflow.tracking import MlflowClient

    out = _sudoku_build(tmp_path / "ds")
    for k in range(len(list((out / "train").glob("shard-*.dlm")))):
        if k % 2 == 0:
            _flip(out / "train" / f"shard-{k:05d}.dlm", 0.6)
    proc = _launch(tmp_path, f"data.shard_dir={out}", "data.skip_corrupt_shards=true", "data.num_workers=1",
                   f"tracking.uri=sqlite:///{tmp_path / 'mlruns.db'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlruns.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("quickstart").experiment_id])
    history = client.get_metric_history(run.info.run_id, "train/skipped_rows")
    assert len(history) == 6 and history[-1].value > 0
    assert [h.value for h in history] == sorted(h.value for h in history)  # a running total


# -- a changed source is noticed (item 3) --------------------------------------------------------


def test_a_changed_source_is_refused_with_the_reason(ptb, sp_model, tmp_path, capsys):
    import os

    from data_pipeline.build import ensure_shards
    from data_pipeline.shards import ShardFormatError

    out = tmp_path / "ds"
    cfg = _cfg(ptb, sp_model, out)
    build(cfg, workers=1, progress=False)
    plan = json.loads((out / "build.json").read_text())
    (rec,) = plan["sources"].values()
    assert rec["bytes"] == ptb.stat().st_size and len(rec["sha256"]) == 64
    st = ptb.stat()
    os.utime(ptb, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched, same bytes: still the source
    assert ensure_shards(cfg, progress=False).reused
    with ptb.open("a") as f:
        f.write("a new line appended to the source\nand another\n")
    with pytest.raises(ShardFormatError, match=r"ptb\.txt.*changed") as err:
        ensure_shards(cfg, progress=False)
    assert "bytes" in str(err.value) and str(out) in str(err.value)
    assert main(_args(ptb, sp_model, out)) == 2
    assert "changed" in capsys.readouterr().err
    # an interrupted build (no index yet) is not resumed on the changed source either
    (out / "train" / "index.json").unlink()
    with pytest.raises(ShardFormatError, match="changed"):
        build(cfg, workers=1, progress=False)


def test_same_size_edit_is_noticed_and_large_files_are_sampled(tmp_path):
    from data_pipeline.sources import file_fingerprint

    small = tmp_path / "a.txt"
    small.write_text("hello world\n" * 100)
    before = file_fingerprint(small)
    small.write_text("hello wOrld\n" + "hello world\n" * 99)  # same size
    after = file_fingerprint(small)
    assert before["bytes"] == after["bytes"] and before["sha256"] != after["sha256"]
    big = tmp_path / "big.txt"
    big.write_bytes(b"x" * (3 << 20))
    fp = file_fingerprint(big, full_hash_max=1 << 20)
    assert fp["hash"].startswith("sampled")
    data = bytearray(big.read_bytes())
    data[0] = ord("y")  # the first block is always sampled
    big.write_bytes(bytes(data))
    assert file_fingerprint(big, full_hash_max=1 << 20)["sha256"] != fp["sha256"]


def test_shards_copied_without_their_source_are_still_used(ptb, sp_model, tmp_path, caplog):
    from data_pipeline.build import ensure_shards

    out = tmp_path / "ds"
    cfg = _cfg(ptb, sp_model, out)
    build(cfg, workers=1, progress=False)
    ptb.rename(tmp_path / "elsewhere.txt")  # trained on another machine, where the source is not
    assert ensure_shards(cfg, progress=False).reused
    assert "cannot compare" in caplog.text


def test_repair_after_a_k_part_build_whose_record_is_stale(ptb, sp_model, tmp_path, capsys):
    """A shard rebuilt by --repair (one part) while a K-part record still lists an older version of
    it (built by another version of the tool): the merge takes the record the file matches."""
    out = tmp_path / "ds"
    for i in (0, 1):
        assert main([*_args(ptb, sp_model, out), "--part", f"{i}/2"]) == 0
    assert main([*_args(ptb, sp_model, out), "--merge"]) == 0
    record = out / "train" / "part-00001-of-00002.json"
    data = json.loads(record.read_text())
    data["shards"][0]["sha256"] = "0" * 64  # as if an older build wrote other bytes for that shard
    record.write_text(json.dumps(data))
    (out / "train" / data["shards"][0]["file"]).unlink()
    capsys.readouterr()
    assert main([*_args(ptb, sp_model, out), "--repair"]) == 0
    assert inspect_main([str(out), "--verify"]) == 0
