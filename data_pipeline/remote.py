"""Remote storage through fsspec URLs (`s3://`, `gs://`, ...; `file://` is a local path).

Three uses, all through one bounded local cache directory (`data.cache_dir`, `data.cache_limit_gb`):
- sources: a remote `data.source` file or directory is copied into `CACHE/sources/` (once; a copy
  with the remote size and mtime is reused, and it gets the remote mtime, so the build's source
  fingerprint stays that of the remote object) and read like a local one;
- builds: a remote `data.shard_dir` is built in a local staging directory (`CACHE/builds/NAME-HASH`)
  and uploaded, every split's `index.json` last, so a remote split with an index is complete, as
  a local one is;
- training: the loader reads a remote build through a local mirror of it (the same directory):
  build.json, the tokenizer and the indexes are copied eagerly, shards on demand. Each split
  directory of a mirror holds `remote.json` (its URL and the cache bound); `ShardReader` then asks
  `ShardCache` for a shard before opening it. This is the MosaicML streaming model: shards are
  downloaded a few ahead of the reader (in the epoch order, on a background thread), the least
  recently used ones are evicted once the cache directory holds more than the bound (never the
  shard being read nor the ones fetched ahead), and a restarted run finds what is cached on disk
  and does not download it again.
A download is checked against its index entry (size and sha256) before it enters the cache; a
mismatch is fetched once more, then a CorruptShardError names the URL. A dropped connection or
another transient error is retried (`RETRIES` times, with backoff) before the run stops.
Credentials and endpoints come from the usual places of each filesystem (for S3: AWS_* environment
variables, ~/.aws, or AWS_ENDPOINT_URL for an S3-compatible server).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sysconfig
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from common.fsutil import TMP_MARK, atomic_write_bytes
from data_pipeline.shard_errors import CorruptShardError

log = logging.getLogger(__name__)

REMOTE_FILE = "remote.json"  # in a mirror's split directory: where its shards come from
DEFAULT_CACHE = Path("data/cache")
RETRIES = 5  # attempts per download on transient (network) errors
BACKOFF_S = 0.2  # first retry delay; doubled each time
AHEAD = 2  # shards downloaded ahead of the reader
READ_BLOCK = 8 << 20
SHARD_SUFFIX = ".dlm"

_cache_root = DEFAULT_CACHE  # set from data.cache_dir by configure(); sources.local_roots reads it
_limit_bytes = 0


def configure(cfg) -> None:
    """Take data.cache_dir / data.cache_limit_gb for this process (the entry points call it)."""
    global _cache_root, _limit_bytes
    _cache_root = Path(cfg.cache_dir).expanduser() if getattr(cfg, "cache_dir", "") else DEFAULT_CACHE
    _limit_bytes = int(float(getattr(cfg, "cache_limit_gb", 0.0)) * (1 << 30))


def is_remote(path) -> bool:
    """True for a URL of a non-local fsspec filesystem (`file://` and plain paths are local)."""
    s = str(path)
    return "://" in s and not s.startswith("file://")


STDLIB_MARK = "{stdlib}"


def local_path(path) -> Path:
    """A plain path or a file:// URL as a Path. `{stdlib}` stands for the running interpreter's
    standard library (`sysconfig`'s stdlib path): a code corpus every machine with Python has
    offline (configs/density/code_base.yaml)."""
    s = str(path)
    if STDLIB_MARK in s:
        s = s.replace(STDLIB_MARK, sysconfig.get_paths()["stdlib"])
    return Path(s.removeprefix("file://")).expanduser()


def url_to_fs(url: str):
    """(filesystem, path inside it); a fresh instance per process (async clients do not survive fork)."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(url, skip_instance_cache=True)
    except ImportError as e:
        raise RuntimeError(f"{url}: reading this URL needs an fsspec backend that is not installed ({e}); "
                           "e.g. `pip install s3fs` for s3://, `pip install gcsfs` for gs://") from None


def _digest(url: str) -> str:
    return hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:12]


def mirror_dir(url: str) -> Path:
    """The local directory that stages (build) and caches (training) the build at `url`."""
    name = url.rstrip("/").rsplit("/", 1)[-1] or "build"
    return _cache_root / "builds" / f"{name}-{_digest(url)}"


def _retry(what: str, fn, attempts: int = RETRIES):
    """fn() with retries on transient errors (dropped connections, timeouts, throttling)."""
    for i in range(attempts):
        try:
            return fn()
        except FileNotFoundError:
            raise
        except Exception as e:  # noqa: BLE001 - fsspec backends raise many kinds; the last one is re-raised
            if i == attempts - 1:
                raise OSError(f"{what}: failed {attempts} times, last: {type(e).__name__}: {e}") from e
            log.warning("%s failed (%s: %s); retrying (%d/%d)", what, type(e).__name__, e, i + 1, attempts - 1)
            time.sleep(BACKOFF_S * 2**i)


def _mtime(info: dict) -> float | None:
    for key in ("mtime", "LastModified", "last_modified", "updated", "created"):
        v = info.get(key)
        if v is None:
            continue
        if hasattr(v, "timestamp"):
            return float(v.timestamp())
        try:
            return float(v)
        except (TypeError, ValueError):
            continue
    return None


def _download(fs, rpath: str, dest: Path, size: int | None = None, sha256: str | None = None) -> str | None:
    """Copy rpath to dest atomically; returns None, or what is wrong with the bytes (size/sha256)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}{TMP_MARK}{os.getpid()}-{threading.get_ident()}")
    h = hashlib.sha256()
    n = 0
    try:
        with fs.open(rpath, "rb", block_size=READ_BLOCK) as src, open(tmp, "wb") as out:
            for block in iter(lambda: src.read(READ_BLOCK), b""):
                h.update(block)
                out.write(block)
                n += len(block)
        if size is not None and n != size:
            return f"{n} bytes, index.json says {size}"
        if sha256 is not None and h.hexdigest() != sha256:
            return f"sha256 {h.hexdigest()} does not match index.json ({sha256})"
        os.replace(tmp, dest)
        return None
    finally:
        tmp.unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------
# Sources
# ----------------------------------------------------------------------------------------------

_copied: dict[str, Path] = {}


def local_copy(url: str) -> Path:
    """A remote source file or directory, copied under CACHE/sources/ (reused when size and mtime match)."""
    if url in _copied:
        return _copied[url]
    fs, root = url_to_fs(url)
    info = _retry(f"listing {url}", lambda: fs.info(root))
    name = root.rstrip("/").rsplit("/", 1)[-1]
    base = _cache_root / "sources" / _digest(url)
    if info.get("type") == "directory":
        files = _retry(f"listing {url}", lambda: fs.find(root, detail=True))
        items = [(p, base / name / p[len(root.rstrip("/")) + 1:], i) for p, i in sorted(files.items())]
        target = base / name
    else:
        items = [(root, base / name, info)]
        target = base / name
    for rpath, dest, meta in items:
        mtime = _mtime(meta)
        if dest.is_file() and dest.stat().st_size == meta.get("size") and (mtime is None or dest.stat().st_mtime == mtime):
            continue
        log.info("copying source %s to %s", rpath, dest)
        _retry(f"downloading {rpath}", lambda r=rpath, d=dest, m=meta: _check_none(_download(fs, r, d, m.get("size")), r))
        if mtime is not None:
            os.utime(dest, (mtime, mtime))
    _copied[url] = target
    return target


def _check_none(problem: str | None, what: str) -> None:
    if problem:
        raise OSError(f"{what}: {problem}")


# ----------------------------------------------------------------------------------------------
# Builds: upload a staged build, mirror a remote one
# ----------------------------------------------------------------------------------------------

SPLIT_INDEX = ("train/index.json", "val/index.json")


def is_complete_remote(url: str) -> bool:
    fs, root = url_to_fs(url)
    return all(_retry(f"checking {url}", lambda p=p: fs.exists(f"{root}/{p}"))
               for p in (*SPLIT_INDEX, "tokenizer.json"))


def upload_build(staging: Path, url: str) -> int:
    """Copy a finished local build to `url`: the shards and other files first, every index.json last
    (a remote split with an index is complete). Returns the number of files uploaded."""
    fs, root = url_to_fs(url)
    files = sorted(p for p in staging.rglob("*") if p.is_file() and TMP_MARK not in p.name and p.name != REMOTE_FILE)
    files.sort(key=lambda p: p.name == "index.json")  # stable: indexes last
    for p in files:
        rel = p.relative_to(staging).as_posix()
        dest = f"{root.rstrip('/')}/{rel}"
        try:
            fs.makedirs(dest.rsplit("/", 1)[0], exist_ok=True)
        except Exception:  # noqa: BLE001 - object stores have no directories (some refuse the call)
            pass
        _retry(f"uploading {p} to {dest}", lambda p=p, d=dest: fs.put_file(str(p), d))
    log.info("uploaded %d files of %s to %s", len(files), staging, url)
    return len(files)


def mirror_build(url: str) -> Path:
    """The local mirror of a complete remote build: everything but the shards copied now (small),
    each split marked with `remote.json` so its shards are fetched on demand through the cache."""
    fs, root = url_to_fs(url)
    root = root.rstrip("/")
    local = mirror_dir(url)
    files = _retry(f"listing {url}", lambda: fs.find(root, detail=True))
    for rpath, meta in sorted(files.items()):
        rel = rpath[len(root) + 1:]
        if rel.endswith(SHARD_SUFFIX):
            continue
        dest = local / rel
        if rel.endswith("index.json") or not (dest.is_file() and dest.stat().st_size == meta.get("size")):
            _retry(f"downloading {rpath}", lambda r=rpath, d=dest, m=meta: _check_none(
                _download(fs, r, d, m.get("size")), r))
    for split in ("train", "val"):
        marker = {"url": f"{url.rstrip('/')}/{split}", "cache_root": str(_cache_root.resolve()),
                  "limit_bytes": _limit_bytes}
        atomic_write_bytes(local / split / REMOTE_FILE, json.dumps(marker, indent=1).encode())
    return local


def remote_origin(split_dir: Path) -> dict | None:
    """The remote.json marker of a mirrored split directory, or None for a local split."""
    p = Path(split_dir) / REMOTE_FILE
    return json.loads(p.read_text()) if p.is_file() else None


# ----------------------------------------------------------------------------------------------
# The shard cache the loader reads through
# ----------------------------------------------------------------------------------------------


class ShardCache:
    """Shards of one remote split, fetched into its mirror directory on demand and a few ahead,
    evicted least-recently-used beyond the bound (counted over the whole cache directory, which
    every process and rank on the node shares)."""

    def __init__(self, split_dir: Path, origin: dict):
        self.dir = Path(split_dir)
        self.url = origin["url"].rstrip("/")
        self.cache_root = Path(origin.get("cache_root") or self.dir.parent)
        self.limit = int(origin.get("limit_bytes") or 0)
        self.stats = {"downloads": 0, "bytes": 0, "retries": 0, "refetched": 0, "evicted": 0}
        self._reset()

    def _reset(self) -> None:
        self._pid = os.getpid()
        self._fs = None
        self._pool: ThreadPoolExecutor | None = None
        self._inflight: dict[str, Future] = {}
        self._protect: set[str] = set()
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:  # dataloader workers: no live clients, threads or locks
        return {k: v for k, v in self.__dict__.items()
                if k in ("dir", "url", "cache_root", "limit", "stats")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._reset()

    def _filesystem(self):
        if self._fs is None or self._pid != os.getpid():
            if self._pid != os.getpid():
                self._reset()
            self._fs, self._root = url_to_fs(self.url)
        return self._fs

    def local(self, entry: dict) -> Path:
        return self.dir / entry["file"]

    def ensure(self, entry: dict, refetch: bool = False) -> Path:
        """The local path of a shard, downloaded (and checked) first unless already cached."""
        if self._pid != os.getpid():  # a forked dataloader worker: the parent's threads and locks are not ours
            self._reset()
        path = self.local(entry)
        name = entry["file"]
        with self._lock:
            self._protect = {name} | {n for n, f in self._inflight.items() if not f.done()}
            fut = self._inflight.pop(name, None)
        if fut is not None:
            try:
                fut.result()
            except Exception as e:  # noqa: BLE001 - the prefetch failed: fetch here, with its own retries
                log.warning("prefetch of %s failed (%s); fetching it again", name, e)
        if refetch:
            path.unlink(missing_ok=True)
            self.stats["refetched"] += 1
        if path.is_file() and path.stat().st_size == entry["bytes"]:
            os.utime(path)  # most recently used
        else:
            self._fetch(entry)
        self._evict()
        return path

    def _fetch(self, entry: dict) -> None:
        fs = self._filesystem()
        rpath = f"{self._root.rstrip('/')}/{entry['file']}"
        url = f"{self.url}/{entry['file']}"
        problem = None
        for attempt in range(2):  # a corrupt download is fetched once more, then named
            for i in range(RETRIES):
                try:
                    problem = _download(fs, rpath, self.local(entry), entry["bytes"], entry["sha256"])
                    break
                except FileNotFoundError:
                    raise CorruptShardError(f"shard {url} is missing from remote storage (index.json lists it); "
                                            "rebuild and upload the split") from None
                except Exception as e:  # noqa: BLE001 - transient: dropped connection, timeout, throttling
                    if i == RETRIES - 1:
                        raise OSError(f"downloading shard {url} failed {RETRIES} times, last: "
                                      f"{type(e).__name__}: {e}") from e
                    self.stats["retries"] += 1
                    log.warning("downloading %s failed (%s: %s); retrying (%d/%d)", url, type(e).__name__, e,
                                i + 1, RETRIES - 1)
                    time.sleep(BACKOFF_S * 2**i)
            self.stats["downloads"] += 1
            if problem is None:
                self.stats["bytes"] += entry["bytes"]
                return
            log.warning("downloaded shard %s is corrupt (%s)%s", url, problem, "; fetching it again" if not attempt else "")
        raise CorruptShardError(f"shard {url} is corrupt in remote storage: {problem}, twice. Rebuild the split "
                                "and upload it again (python -m data_pipeline.build with data.shard_dir set to it)")

    def prefetch(self, entries: list[dict], reading: int = 0) -> None:
        """Download these shards in the background (in order), as far as the bound leaves room next
        to the `reading` bytes of the shard being read."""
        if self._pid != os.getpid():
            self._reset()
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-prefetch")
        room = self.limit - reading if self.limit else None
        names = {e["file"] for e in entries}
        with self._lock:  # a fetched-ahead shard the order no longer wants is no longer protected
            self._inflight = {n: f for n, f in self._inflight.items() if n in names or not f.done()}
        for e in entries:
            if room is not None:
                room -= e["bytes"]
                if room < 0:  # beyond the bound: it would only evict what is about to be read
                    break
            name = e["file"]
            with self._lock:
                if name not in self._inflight and not self.local(e).is_file():
                    self._inflight[name] = self._pool.submit(self._fetch_ahead, e)

    def _fetch_ahead(self, entry: dict) -> None:
        self._fetch(entry)
        self._evict()

    def _evict(self) -> None:
        if not self.limit:
            return
        if self._pid != os.getpid():
            self._reset()
        with self._lock:
            keep = set(self._protect) | set(self._inflight)
        files = []
        for p in self.cache_root.rglob(f"*{SHARD_SUFFIX}"):
            try:
                st = p.stat()
            except FileNotFoundError:
                continue
            files.append((st.st_mtime, st.st_size, p))
        total = sum(s for _, s, _ in files)
        for _, size, p in sorted(files):
            if total <= self.limit:
                break
            if p.parent == self.dir and p.name in keep:
                continue
            p.unlink(missing_ok=True)
            total -= size
            self.stats["evicted"] += 1

    def remote_sizes(self) -> dict[str, int]:
        """File name -> size of the split's remote shards (one listing: the trainer's pre-check)."""
        fs = self._filesystem()
        listing = _retry(f"listing {self.url}", lambda: fs.ls(self._root, detail=True))
        return {i["name"].rstrip("/").rsplit("/", 1)[-1]: int(i.get("size") or 0) for i in listing}
