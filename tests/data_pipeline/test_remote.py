"""Remote storage (issue 19, item 9): builds written to and sources read from s3:// URLs, and a loader
that streams remote shards through a bounded local cache. Against a real S3-compatible server (moto's
server mode) on 127.0.0.1, reached through a TCP proxy in this file that can drop a connection."""

import os
import socket
import threading
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")

REPO = Path(__file__).resolve().parents[2]
BUCKET = "dlm-test"
TINY = ["data.task.num_train=192", "data.task.num_val=16", "data.shard_size_mb=0.004"]
TINY_TRAIN = [*TINY, "train.steps=2", "train.eval_every=2", "train.batch_size=8", "train.eval_batches=1",
              "model.n_layers=1", "model.d_model=32", "model.n_heads=2", "train.log_every=1", "train.device=cpu",
              "tracking.enabled=false"]


class DroppingProxy:
    """A TCP proxy to the S3 server. `drop_after(n)`: the next connection that carries more than n
    bytes back to the client is closed mid-transfer (once), as a flaky network would."""

    def __init__(self, upstream: int):
        self.upstream = upstream
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.drop_at: int | None = None
        self.drops = 0
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def drop_after(self, n: int, times: int = 1) -> None:
        self.drop_at, self.times = n, times

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            up = socket.create_connection(("127.0.0.1", self.upstream))
            threading.Thread(target=self._pipe, args=(client, up, False), daemon=True).start()
            threading.Thread(target=self._pipe, args=(up, client, True), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, downstream: bool) -> None:
        sent = 0
        try:
            while data := src.recv(65536):
                if downstream and self.drop_at is not None:
                    with self.lock:
                        if self.drop_at is not None and sent + len(data) > self.drop_at:
                            dst.sendall(data[:self.drop_at - sent])
                            self.drops, self.times = self.drops + 1, self.times - 1
                            if not self.times:
                                self.drop_at = None
                            raise ConnectionResetError("dropped by the test proxy")
                dst.sendall(data)
                sent += len(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()


@pytest.fixture(scope="module")
def s3():
    """One moto S3 server per module, behind the proxy; AWS_* variables point s3fs at it."""
    import fsspec

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    proxy = DroppingProxy(port)
    env = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{proxy.port}"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    fs.mkdir(BUCKET)
    yield fs, proxy, env
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    proxy.sock.close()
    server.stop()


def _cfg(shard_dir, cache: Path, **kw):
    from data_pipeline.config import load_data_config

    sets = [*TINY, f"data.shard_dir={shard_dir}", f"data.cache_dir={cache}"] + [f"data.{k}={v}" for k, v in kw.items()]
    return load_data_config(REPO / "configs" / "quickstart.yaml", sets)


def _remote_build(s3, tmp_path: Path, name: str, **kw):
    from data_pipeline.build import build

    url = f"s3://{BUCKET}/{name}"
    build(_cfg(url, tmp_path / "build-cache", **kw), workers=1, progress=False)
    return url


def _batches(cfg, n: int = 6):
    """The first n train batches of cfg's build, and the loader and DatasetInfo that gave them."""
    from data_pipeline.build import ensure_shards
    from data_pipeline.stream import make_train_loader

    info = ensure_shards(cfg, progress=False)
    loader = make_train_loader(cfg, info, batch_size=8)
    it = iter(loader)
    out = [{k: v.clone() for k, v in next(it).items()} for _ in range(n)]
    return out, loader, info


@pytest.mark.slow  # two launches of the trainer (~15 s each on 2 cores)
def test_build_to_s3_then_train_two_steps_streaming_equals_a_local_build(s3, tmp_path):
    import subprocess
    import sys

    import torch

    fs, _, env = s3
    url = _remote_build(s3, tmp_path, "sudoku")
    keys = set(fs.find(f"{BUCKET}/sudoku"))
    assert f"{BUCKET}/sudoku/train/index.json" in keys and f"{BUCKET}/sudoku/tokenizer.json" in keys
    assert sum(k.endswith(".dlm") for k in keys) >= 8

    local = tmp_path / "local-shards"
    run_env = {**os.environ, **env, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    ckpts = {}
    for name, shard_dir in (("local", local), ("remote", url)):
        cwd = tmp_path / f"run-{name}"
        cwd.mkdir(exist_ok=True)
        proc = subprocess.run([sys.executable, "-m", "pretrain.launch", "--config",
                               str(REPO / "configs" / "quickstart.yaml"), "--set", *TINY_TRAIN,
                               f"data.shard_dir={shard_dir}", f"data.cache_dir={tmp_path / 'train-cache'}"],
                              cwd=cwd, env=run_env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        (ckpt,) = [p for p in (cwd / "runs").rglob("step_*") if p.is_dir() and p.name.endswith("2")]
        ckpts[name] = ckpt
    # the streamed run read its shards through the training cache (nothing was built there)
    assert list((tmp_path / "train-cache").rglob("shard-*.dlm"))
    # same batches -> the same two optimizer steps, bit for bit (CPU, one thread)
    weights = {}
    for name, ckpt in ckpts.items():
        (f,) = [p for p in ckpt.rglob("*.pt") if "model" in p.name] or sorted(ckpt.rglob("*.pt"))[:1]
        weights[name] = torch.load(f, map_location="cpu", weights_only=False)
    flat = {n: {k: v for k, v in _tensors(w)} for n, w in weights.items()}
    assert flat["local"].keys() == flat["remote"].keys() and flat["local"]
    for k, v in flat["local"].items():
        assert torch.equal(v, flat["remote"][k]), k


def _tensors(obj, prefix=""):
    import torch

    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _tensors(v, f"{prefix}.{k}")


def test_streamed_batches_equal_local_ones_and_the_cache_stays_bounded(s3, tmp_path):
    fs, _, _ = s3
    url = _remote_build(s3, tmp_path, "bounded")
    local, _, _ = _batches(_cfg(tmp_path / "local", tmp_path / "c0"))
    sizes = [i["size"] for i in fs.find(f"{BUCKET}/bounded/train", detail=True).values() if i["name"].endswith(".dlm")]
    limit = 3 * max(sizes)
    cache = tmp_path / "small-cache"
    cfg = _cfg(url, cache, cache_limit_gb=limit / (1 << 30))
    streamed, loader, info = _batches(cfg, n=60)  # several epochs: every shard is read many times
    for a, b in zip(local, streamed[:6], strict=True):
        for k in a:
            assert np.array_equal(a[k].numpy(), b[k].numpy()), k
    cached = list(cache.rglob("shard-*.dlm"))
    assert 0 < sum(p.stat().st_size for p in cached) <= limit
    stats = loader.dataset.sources[0].reader.remote.stats
    assert stats["evicted"] > 0 and stats["downloads"] >= len(sizes)  # every shard came through, the old ones left


def test_loader_workers_stream_through_the_cache(s3, tmp_path):
    url = _remote_build(s3, tmp_path, "workers")
    local, _, _ = _batches(_cfg(tmp_path / "local", tmp_path / "c0"))
    streamed, loader, _ = _batches(_cfg(url, tmp_path / "cache", num_workers=2))
    loader.close()
    for a, b in zip(local, streamed, strict=True):
        assert all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)
    assert list((tmp_path / "cache").rglob("shard-*.dlm"))  # the workers downloaded into the shared cache


def test_resume_does_not_download_what_is_cached(s3, tmp_path):
    from data_pipeline.build import ensure_shards
    from data_pipeline.stream import make_train_loader

    url = _remote_build(s3, tmp_path, "resume")
    cache = tmp_path / "cache"
    cfg = _cfg(url, cache)
    first, loader, _ = _batches(cfg, n=4)
    state = loader.state_dict()
    assert loader.dataset.sources[0].reader.remote.stats["downloads"] > 0
    on_disk = {p: p.stat().st_mtime_ns for p in cache.rglob("shard-*.dlm")}
    rest, _, _ = _batches(cfg, n=8)  # what an uninterrupted run takes after those 4

    info = ensure_shards(cfg, progress=False)  # a restarted run on the same node: same cache directory
    resumed = make_train_loader(cfg, info, batch_size=8)
    resumed.load_state_dict(state)
    it = iter(resumed)
    for want in rest[4:]:
        got = next(it)
        assert all(np.array_equal(want[k].numpy(), got[k].numpy()) for k in want)
    stats = resumed.dataset.sources[0].reader.remote.stats
    assert stats["downloads"] == 0, stats
    assert all(p.stat().st_mtime_ns >= t for p, t in on_disk.items())  # the same files, used again


def test_a_dropped_connection_mid_download_is_retried(s3, tmp_path):
    fs, proxy, _ = s3
    url = _remote_build(s3, tmp_path, "flaky")
    local, _, _ = _batches(_cfg(tmp_path / "local", tmp_path / "c0"))
    cfg = _cfg(url, tmp_path / "cache")
    from data_pipeline.build import ensure_shards

    ensure_shards(cfg, progress=False)  # the mirror (indexes, tokenizer) first: the drop hits a shard
    proxy.drop_after(600)  # past the response headers: inside a shard's bytes
    before = proxy.drops
    streamed, loader, _ = _batches(cfg)
    assert proxy.drops == before + 1
    for a, b in zip(local, streamed, strict=True):
        assert all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)


def test_a_corrupt_remote_shard_is_fetched_again_then_named(s3, tmp_path):
    from data_pipeline.build import ensure_shards
    from data_pipeline.shards import CorruptShardError, ShardReader

    fs, _, _ = s3
    url = _remote_build(s3, tmp_path, "corrupt")
    key = f"{BUCKET}/corrupt/train/shard-00001.dlm"
    data = bytearray(fs.cat_file(key))
    data[len(data) // 2] ^= 0x40
    fs.pipe_file(key, bytes(data))
    info = ensure_shards(_cfg(url, tmp_path / "cache"), progress=False)
    reader = ShardReader(info.train_dir)
    reader.shard(0)
    with pytest.raises(CorruptShardError, match=r"s3://dlm-test/corrupt/train/shard-00001.dlm.*twice"):
        reader.shard(1)
    assert reader.remote.stats["downloads"] == 3  # shard 0 once, shard 1 twice
    assert not (info.train_dir / "shard-00001.dlm").exists()  # never entered the cache


def test_a_source_read_from_s3_builds_the_same_shards_as_the_local_file(s3, tmp_path):
    from data_pipeline.build import build

    fs, _, _ = s3
    text = "\n".join(f"line {i} of a small corpus with words {i * 7 % 13}" for i in range(400)) + "\n"
    src = tmp_path / "corpus.txt"
    src.write_text(text)
    fs.pipe_file(f"{BUCKET}/src/corpus.txt", text.encode())
    common = dict(tokenizer="sentencepiece", vocab_size=60, val_fraction=0.05)
    outs = {}
    for name, source in (("local", str(src)), ("remote", f"s3://{BUCKET}/src/corpus.txt")):
        cfg = _cfg(tmp_path / f"out-{name}", tmp_path / "cache", source=source, **common)
        build(cfg, workers=1, progress=False)
        outs[name] = tmp_path / f"out-{name}"
    for split in ("train", "val"):
        a = sorted((outs["local"] / split).glob("shard-*.dlm"))
        b = sorted((outs["remote"] / split).glob("shard-*.dlm"))
        assert a and [p.read_bytes() for p in a] == [p.read_bytes() for p in b]
    # a second build reuses the copy (same size and mtime): the source fingerprint is unchanged
    copy = next((tmp_path / "cache" / "sources").rglob("corpus.txt"))
    t = copy.stat().st_mtime_ns
    build(_cfg(tmp_path / "out-remote", tmp_path / "cache", source=f"s3://{BUCKET}/src/corpus.txt", **common),
          workers=1, progress=False)
    assert copy.stat().st_mtime_ns == t
