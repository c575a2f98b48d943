"""The parallel build: round trip, determinism across worker counts, resume after SIGKILL, parts."""

import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from data_pipeline.build import build, ensure_shards, main
from data_pipeline.config import DataConfig
from data_pipeline.encode import default_workers, make_executor, pins_workers
from data_pipeline.inspect import main as inspect_main
from data_pipeline.merge import IncompleteBuildError
from data_pipeline.shards import CorruptShardError, ShardReader
from data_pipeline.sources import iter_documents
from data_pipeline.tokenizer import make_tokenizer

REPO = Path(__file__).resolve().parents[2]


def _cfg(source, sp_model, out, **kw) -> DataConfig:
    kw = {"val_fraction": 0.05, "shard_size_mb": 0.02, **kw}
    return DataConfig(source=str(source), tokenizer=f"sentencepiece:{sp_model}", vocab_size=1000,
                      shard_dir=str(out), **kw)


def _files(d: Path) -> dict[str, bytes]:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_round_trip_and_identical_for_any_worker_count(corpus_dir, sp_model, tmp_path, capsys):
    cfg2 = _cfg(corpus_dir, sp_model, tmp_path / "w2")
    info = ensure_shards(cfg2, progress=False, workers=2)
    for split, d in (("train", info.train_dir), ("val", info.val_dir)):
        reader = ShardReader(d)
        assert reader.num_shards > 3  # several units, so workers really split the work
        texts = [doc.text for doc in iter_documents(cfg2, split)]
        want = info.tokenizer.encode_batch(texts)
        got = list(reader.iter_documents())
        assert len(got) == len(want) == reader.num_docs
        assert all(np.array_equal(g, w) for g, w in zip(got, want, strict=True))  # same tokens, same order
        assert info.tokenizer.decode(got[0]) == texts[0]
    build(_cfg(corpus_dir, sp_model, tmp_path / "w1"), workers=1, progress=False)
    assert _files(tmp_path / "w1") == _files(tmp_path / "w2")  # byte-identical, index included
    assert inspect_main([str(tmp_path / "w2"), "--no-progress", "--top-k", "3"]) == 0
    out = capsys.readouterr().out
    assert "compression" in out and "top 3 tokens" in out and "'▁the'" in out
    assert inspect_main([str(tmp_path / "w2"), "--verify"]) == 0


def test_sigkill_mid_build_then_rerun_is_byte_identical(corpus_dir, sp_model, tmp_path):
    ref = _cfg(corpus_dir, sp_model, tmp_path / "ref", shard_size_mb=0.005)
    build(ref, workers=1, progress=False)
    n_ref = len(list((tmp_path / "ref" / "train").glob("shard-*")))
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "data_pipeline.build", "--no-progress", "--workers", "2",
           "--set", f"data.source={corpus_dir}", "--set", f"data.tokenizer=sentencepiece:{sp_model}",
           "--set", "data.vocab_size=1000", "--set", "data.val_fraction=0.05",
           "--set", "data.shard_size_mb=0.005", "--set", f"data.shard_dir={out}"]
    proc = subprocess.Popen(cmd, cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while len(list((out / "train").glob("shard-*.dlm"))) < 5 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    os.killpg(proc.pid, signal.SIGKILL)  # the build and its workers, mid-way
    proc.wait()
    done = len(list((out / "train").glob("shard-*.dlm")))
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    assert 5 <= done < n_ref and not (out / "train" / "index.json").exists()
    rerun = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "kept from an earlier run" in rerun.stdout
    kept = int(rerun.stdout.split(" shards written")[1].split("), ")[1].split(" kept")[0])
    assert kept >= done - 1  # the finished shards were reused, not rebuilt
    assert _files(out) == _files(tmp_path / "ref")


def test_parts_then_merge_equals_a_single_build(corpus_dir, sp_model, tmp_path, capsys):
    args = ["--no-progress", "--set", f"data.source={corpus_dir}", "--set", f"data.tokenizer=sentencepiece:{sp_model}",
            "--set", "data.vocab_size=1000", "--set", "data.val_fraction=0.05", "--set", "data.shard_size_mb=0.02"]
    parts = [*args, "--set", f"data.shard_dir={tmp_path / 'parts'}"]
    assert main([*parts, "--part", "0/3", "--workers", "1"]) == 0
    assert main([*parts, "--part", "2/3", "--workers", "2"]) == 0
    assert "--merge" in capsys.readouterr().out
    assert main([*parts, "--merge"]) == 2
    err = capsys.readouterr().err
    assert "not built yet" in err and "shard-00001.dlm" in err and "1/3" in err
    with pytest.raises(IncompleteBuildError):
        from data_pipeline.build import merge
        merge(tmp_path / "parts")
    assert main([*parts, "--part", "1/3"]) == 0
    assert main([*parts, "--merge"]) == 0
    assert main([*args, "--set", f"data.shard_dir={tmp_path / 'one'}"]) == 0
    strip = lambda files: {k: v for k, v in files.items() if "/part-" not in k}  # noqa: E731
    assert strip(_files(tmp_path / "parts")) == strip(_files(tmp_path / "one"))
    with pytest.raises(SystemExit):
        main([*parts, "--part", "3/3"])


def test_flipped_byte_fails_verify_and_reader_with_the_shard_name(corpus_dir, sp_model, tmp_path, capsys):
    info = ensure_shards(_cfg(corpus_dir, sp_model, tmp_path / "ds"), progress=False, workers=1)
    victim = info.train_dir / "shard-00002.dlm"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x40
    victim.write_bytes(bytes(data))
    (info.train_dir / "shard-00004.dlm").unlink()
    assert inspect_main([str(info.shard_dir), "--verify"]) == 1
    out = capsys.readouterr().out
    assert "shard-00002.dlm" in out and "sha256" in out and "shard-00004.dlm" in out and "missing" in out
    assert "shard-00003.dlm" not in out
    reader = ShardReader(info.train_dir)
    reader.document(0)
    with pytest.raises(CorruptShardError, match="shard-00002.dlm"):
        list(reader.iter_documents())


def test_pack_texts_round_trip():
    from data_pipeline.encode import pack_texts, unpack_texts

    lines = ["a sentence", "", "ünïcödé ▁ text", "  spaces  ", "\r"]
    packed = pack_texts(lines)
    assert isinstance(packed, str) and unpack_texts(packed) == lines  # one block for the pipe
    for texts in (["two\nlines", "one"], ["trailing\n"], ["\n"]):
        assert pack_texts(texts) is texts and unpack_texts(texts) == texts  # a newline inside: the list
    assert unpack_texts(pack_texts([""])) == [""]


def test_paragraph_documents_with_newlines_identical_for_any_worker_count(corpora, sp_model, tmp_path):
    # multi-line documents cannot cross to the workers newline-joined: the list path must give the same bytes
    src = tmp_path / "plays.txt"
    src.symlink_to((corpora / "tinyshakespeare" / "input.txt").resolve())
    for w in (1, 2):
        build(_cfg(src, sp_model, tmp_path / f"w{w}", txt_documents="paragraph"), workers=w, progress=False)
    assert _files(tmp_path / "w1") == _files(tmp_path / "w2")
    assert len(list((tmp_path / "w2" / "train").glob("shard-*.dlm"))) > 3
    doc = next(ShardReader(tmp_path / "w2" / "train").iter_documents())
    assert len(doc) > 0


def test_pool_builds_write_shards_on_a_writer_thread_beside_the_reading(corpus_dir, sp_model, tmp_path, monkeypatch):
    # with worker processes, the parent already holds each shard's token ids (they come back for the
    # in-order assembly): one writer thread compresses, checksums and writes them while the main
    # thread keeps reading (zstd, hashlib and file writes release the GIL); shipping them to a worker
    # was a second trip through a pipe (bench_build: ~8% less CPU with the thread)
    import threading

    import data_pipeline.units as units

    log = []
    real = units.write_shard

    def recording_write_shard(path, *args, **kwargs):
        log.append((os.getpid(), threading.current_thread().name))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(units, "write_shard", recording_write_shard)
    report = build(_cfg(corpus_dir, sp_model, tmp_path / "ds"), workers=2, progress=False)
    assert len(log) == sum(len(r.written) for r in report.parts) > 3
    assert {pid for pid, _ in log} == {os.getpid()}
    assert all(name.startswith("shard-writer") for _, name in log), log


_BOTH_RUNNING = None  # a fork-inherited Barrier(2): set by the test before the pool forks its workers


def _worker_cpus(_) -> tuple[int, tuple[int, ...]]:
    # Both tasks wait here until the other one runs too, so they are necessarily on two different
    # workers: the test checks the pinning, not how the scheduler happens to spread tasks.
    _BOTH_RUNNING.wait(timeout=60)
    return os.getpid(), tuple(sorted(os.sched_getaffinity(0)))


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or "fork" not in mp.get_all_start_methods(),
                    reason="CPU affinity is Linux-only (and the barrier is inherited through fork)")
def test_pool_workers_are_pinned_to_distinct_cpus_when_asked(sp_model, tmp_path):
    # unpinned, Linux was seen leaving two busy workers on one core of two (bench_build): with
    # data.build_pin_workers each worker gets its own CPU of the ones this process may use
    global _BOTH_RUNNING
    allowed = tuple(sorted(os.sched_getaffinity(0)))
    n_cpus = default_workers()
    assert not pins_workers(n_cpus + 1, True)  # more workers than CPUs: two would share one
    assert not pins_workers(2, False) and not pins_workers(1, True)
    if n_cpus < 2:
        pytest.skip("one CPU: nothing to pin to")
    tokenizer = make_tokenizer(DataConfig(tokenizer=f"sentencepiece:{sp_model}", vocab_size=1000))
    tokenizer.save(tmp_path / "tok")
    for pin in (True, False):
        _BOTH_RUNNING = mp.get_context("fork").Barrier(2)
        with make_executor(2, tokenizer, tmp_path / "tok", pin=pin) as pool:
            seen = dict(pool.map(_worker_cpus, range(2)))
        assert len(seen) == 2  # two workers (the barrier guarantees it; a hang would time out above)
        if pin:
            assert sorted(seen.values()) == [(allowed[0],), (allowed[1],)]  # one CPU each, distinct
        else:
            assert all(cpus == allowed for cpus in seen.values())
    assert tuple(sorted(os.sched_getaffinity(0))) == allowed  # the parent itself is never pinned


def test_prepare_once_then_parts_reuse_its_tokenizer_and_stats(corpora, tmp_path, monkeypatch, capsys):
    """--prepare trains the tokenizer and counts the density statistics once; --part i/K reuse them
    (here they could not train their own) and the result equals a single build."""
    import data_pipeline.build as build_mod
    import data_pipeline.density_stats as stats_mod

    source = corpora / "ptb" / "ptb.valid.txt"
    args = ["--no-progress", "--workers", "1", "--set", f"data.source={source}", "data.tokenizer=sentencepiece",
            "data.vocab_size=400", "data.val_fraction=0.05", "data.shard_size_mb=0.02",
            "data.density.annotator=unigram"]
    assert main([*args, f"data.shard_dir={tmp_path / 'one'}"]) == 0
    parts = [*args, f"data.shard_dir={tmp_path / 'parts'}"]
    assert main([*parts, "--prepare"]) == 0
    assert "prepared" in capsys.readouterr().out
    assert not list((tmp_path / "parts").glob("*/shard-*"))  # preparation writes no shard

    def refuse(*_a, **_k):
        raise AssertionError("a part trained its own tokenizer or statistics")

    monkeypatch.setattr(build_mod, "make_tokenizer", refuse)
    monkeypatch.setattr(stats_mod, "collect_stats", refuse)
    assert main([*parts, "--part", "1/2"]) == 0
    assert main([*parts, "--part", "0/2"]) == 0
    assert main([*parts, "--merge"]) == 0
    strip = lambda files: {k: v for k, v in files.items() if "/part-" not in k}  # noqa: E731
    assert strip(_files(tmp_path / "parts")) == strip(_files(tmp_path / "one"))
