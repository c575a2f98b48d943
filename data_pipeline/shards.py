"""The shard format: tokenized documents in zstd-framed columns, with a checksummed JSON index.

See FORMAT.md for the byte layout. Why this shape: each column is cut into independent zstd frames
(~2 MiB uncompressed) listed in the shard header, so a reader can decode a slice of a shard without
inflating all of it (MosaicML streaming / litdata inflate whole shards to disk first); every shard's
sha256 is in `index.json` and checked when the shard is opened, so a torn copy or a flipped bit is an
error naming the file instead of silently wrong training data. Documents never span shards.

Writing is crash-safe: every file goes to a temp file, is fsynced and renamed into place, and
`index.json` is written last, so a directory with an index is a complete split.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import struct
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zstandard

from common.fsutil import atomic_write_bytes
from data_pipeline.remote import ShardCache, remote_origin
from data_pipeline.shard_errors import CorruptShardError, ShardFormatError

log = logging.getLogger(__name__)

MAGIC = b"DLMSHRD\x00"
FORMAT_VERSION = 1
INDEX_FILE = "index.json"
FRAME_BYTES = 2 << 20  # uncompressed bytes per zstd frame
ZSTD_LEVEL = 3
DEFAULT_SHARD_BYTES = 64 << 20
DENSITY_DTYPES = ("float16", "uint8")


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 while every id fits (vocab <= 65536), else uint32: half the bytes for most vocabularies."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def shard_name(k: int) -> str:
    return f"shard-{k:05d}.dlm"


# ----------------------------------------------------------------------------------------------
# Encoding one shard
# ----------------------------------------------------------------------------------------------


def encode_shard(columns: dict[str, np.ndarray], n_docs: int, frame_bytes: int = FRAME_BYTES,
                 level: int = ZSTD_LEVEL, stats: dict | None = None) -> bytes:
    """MAGIC, u32 LE header length, JSON header, then the zstd frames of each column in order.

    Deterministic: the same columns give the same bytes (single-threaded zstd at a fixed level), which
    is what makes a parallel or resumed build byte-identical to a serial one.
    """
    # write_checksum: each frame ends with a checksum of its content, so a damaged shard without an
    # index entry to compare with (a killed build's) still fails to decode instead of giving wrong tokens
    cctx = zstandard.ZstdCompressor(level=level, write_checksum=True)
    payload: list[bytes] = []
    offset = 0
    header_cols = {}
    for name, arr in columns.items():
        arr = np.ascontiguousarray(arr)
        if arr.dtype.byteorder == ">":
            arr = arr.astype(arr.dtype.newbyteorder("<"))
        per_frame = max(1, frame_bytes // arr.itemsize)
        frames = []
        for start in range(0, len(arr), per_frame):
            chunk = cctx.compress(arr[start:start + per_frame].tobytes())
            n_items = min(per_frame, len(arr) - start)
            frames.append([offset, len(chunk), n_items])
            payload.append(chunk)
            offset += len(chunk)
        header_cols[name] = {"dtype": arr.dtype.str, "shape": list(arr.shape), "frames": frames}
    n_tokens = len(columns["tokens"])
    head = {"format_version": FORMAT_VERSION, "n_docs": n_docs, "n_tokens": n_tokens, "columns": header_cols}
    if stats:
        head["stats"] = stats
    header = json.dumps(head, separators=(",", ":")).encode()
    return b"".join([MAGIC, struct.pack("<I", len(header)), header, *payload])


def quantize_density(density: np.ndarray, dtype: str) -> np.ndarray:
    """float16 as is, or uint8 = round(255 * clip(d, 0, 1)): half the bytes, 1/510 resolution."""
    if dtype not in DENSITY_DTYPES:
        raise ValueError(f"density dtype must be one of {DENSITY_DTYPES}, got {dtype!r}")
    d = np.asarray(density, dtype=np.float32)
    if dtype == "uint8":
        return np.rint(np.clip(d, 0.0, 1.0) * 255.0).astype(np.uint8)
    return d.astype(np.float16)


def shard_columns(tokens: np.ndarray, lengths: np.ndarray, token_dt: np.dtype,
                  density: np.ndarray | None = None, density_dtype: str = "float16",
                  source: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The columns of a shard from flat token ids and per-document lengths."""
    offsets = np.zeros(len(lengths) + 1, dtype=np.uint64)
    np.cumsum(np.asarray(lengths, dtype=np.uint64), out=offsets[1:])
    if int(offsets[-1]) != len(tokens):
        raise ValueError(f"document lengths sum to {int(offsets[-1])}, but there are {len(tokens)} tokens")
    columns = {"tokens": np.asarray(tokens).astype(token_dt, copy=False), "doc_offsets": offsets}
    if density is not None:
        if len(density) != len(tokens):
            raise ValueError(f"density has {len(density)} values for {len(tokens)} tokens: they must align")
        columns["density"] = quantize_density(density, density_dtype)
    if source is not None:  # per document: where it came from (sources.KEY_BITS)
        if len(source) != len(lengths):
            raise ValueError(f"source has {len(source)} values for {len(lengths)} documents: they must align")
        columns["source"] = np.asarray(source, dtype=np.uint64)
    return columns


def parse_header(data: bytes | memoryview, path: Path | str) -> tuple[dict, int]:
    """(header, payload start) of a shard's bytes; CorruptShardError naming `path` if unreadable."""
    path = Path(path)
    if bytes(data[:len(MAGIC)]) != MAGIC:
        raise _corrupt(path, "not a dlm shard (bad magic bytes)")
    if len(data) < len(MAGIC) + 4:
        raise _corrupt(path, "truncated header")
    (hlen,) = struct.unpack_from("<I", data, len(MAGIC))
    start = len(MAGIC) + 4
    try:
        header = json.loads(bytes(data[start:start + hlen]))
        missing = [k for k in ("n_docs", "n_tokens", "columns") if k not in header]
        if missing:
            raise KeyError(f"no {missing}")
    except (ValueError, KeyError, TypeError) as e:
        raise _corrupt(path, f"unreadable header ({type(e).__name__}: {e})") from None
    if header.get("format_version", 0) > FORMAT_VERSION:
        raise ShardFormatError(f"{path}: format_version {header['format_version']} is newer than this "
                               f"reader ({FORMAT_VERSION}); upgrade dlm-pretrain or rebuild the shards")
    return header, start + hlen


def shard_entry(name: str, data: bytes, header: dict | None = None) -> dict:
    """The index.json entry of a shard, from its bytes alone (so a resumed build re-derives it)."""
    if header is None:
        header, _ = parse_header(data, name)
    raw = sum(np.dtype(c["dtype"]).itemsize * int(c["shape"][0]) for c in header["columns"].values())
    entry = {"file": name, "n_tokens": int(header["n_tokens"]), "n_docs": int(header["n_docs"]),
             "bytes": len(data), "raw_bytes": int(raw), "sha256": hashlib.sha256(data).hexdigest()}
    entry.update(header.get("stats", {}))
    return entry


def write_shard(path: str | Path, columns: dict[str, np.ndarray], stats: dict | None = None,
                frame_bytes: int = FRAME_BYTES) -> dict:
    """Encode and atomically write one shard; returns its index entry."""
    path = Path(path)
    n_docs = len(columns["doc_offsets"]) - 1
    data = encode_shard(columns, n_docs=n_docs, frame_bytes=frame_bytes, stats=stats)
    atomic_write_bytes(path, data)
    return shard_entry(path.name, data)


def read_entry(path: str | Path) -> dict:
    """The index entry of a shard file already on disk (a finished unit of an interrupted build)."""
    path = Path(path)
    return shard_entry(path.name, path.read_bytes())


def make_index(entries: list[dict], tokenizer_fingerprint: str, vocab_size: int,
               density_dtype: str | None = None) -> dict:
    """index.json content; `density_dtype` None means the split has no density column."""
    index = {
        "format_version": FORMAT_VERSION,
        "tokenizer_fingerprint": tokenizer_fingerprint,
        "vocab_size": vocab_size,
        "token_dtype": token_dtype(vocab_size).name,
        "has_density": density_dtype is not None,
        "total_tokens": sum(s["n_tokens"] for s in entries),
        "total_docs": sum(s["n_docs"] for s in entries),
        "shards": entries,
    }
    if density_dtype is not None:
        index["density_dtype"] = density_dtype
    return index


def write_index(directory: str | Path, index: dict) -> None:
    """Written last and atomically: a split directory with an index.json is complete."""
    atomic_write_bytes(Path(directory) / INDEX_FILE, json.dumps(index, indent=1).encode())


# ----------------------------------------------------------------------------------------------
# Writer
# ----------------------------------------------------------------------------------------------


class ShardWriter:
    """Append documents (token ids, optional per-token density); `close()` writes `index.json`."""

    def __init__(self, directory: str | Path, tokenizer_fingerprint: str, vocab_size: int,
                 shard_size_bytes: int = DEFAULT_SHARD_BYTES, frame_bytes: int = FRAME_BYTES,
                 density_dtype: str = "float16"):
        self.dir = Path(directory)
        if (self.dir / INDEX_FILE).exists():
            raise FileExistsError(f"{self.dir} already holds a complete split ({INDEX_FILE}); delete it first")
        self.dir.mkdir(parents=True, exist_ok=True)
        self.fingerprint = tokenizer_fingerprint
        self.vocab_size = vocab_size
        self.dtype = token_dtype(vocab_size)
        self.shard_size_bytes = max(1, int(shard_size_bytes))
        self.frame_bytes = frame_bytes
        if density_dtype not in DENSITY_DTYPES:
            raise ValueError(f"density_dtype must be one of {DENSITY_DTYPES}, got {density_dtype!r}")
        self.density_dtype = density_dtype
        self.has_density: bool | None = None  # decided by the first document
        self.shards: list[dict] = []
        self._reset()
        self._closed = False

    def _reset(self) -> None:
        self._tokens: list[np.ndarray] = []
        self._density: list[np.ndarray] = []
        self._pending = 0

    def add_document(self, token_ids, density=None) -> None:
        ids = np.asarray(token_ids)
        if ids.ndim != 1 or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
            raise ValueError(f"token_ids must be a 1-D sequence of ints, got shape {ids.shape} {ids.dtype}")
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise ValueError(f"token id out of range [0, {self.vocab_size}): min {ids.min()}, max {ids.max()}")
        if self.has_density is None:
            self.has_density = density is not None
        if (density is not None) != self.has_density:
            raise ValueError("density must be given for every document of a split or for none")
        self._tokens.append(ids.astype(self.dtype, copy=False))
        self._pending += ids.size * self.dtype.itemsize + 8
        if density is not None:
            dens = np.asarray(density, dtype=np.float32)
            if dens.shape != ids.shape:
                raise ValueError(f"density has shape {dens.shape}, tokens {ids.shape}: they must align")
            self._density.append(dens)
            self._pending += ids.size * np.dtype(self.density_dtype).itemsize
        if self._pending >= self.shard_size_bytes:
            self._flush()

    def _flush(self) -> None:
        if not self._tokens:
            return
        lengths = np.fromiter((len(t) for t in self._tokens), dtype=np.int64, count=len(self._tokens))
        density = np.concatenate(self._density) if self.has_density else None
        columns = shard_columns(np.concatenate(self._tokens), lengths, self.dtype, density, self.density_dtype)
        self.shards.append(write_shard(self.dir / shard_name(len(self.shards)), columns,
                                       frame_bytes=self.frame_bytes))
        self._reset()

    def close(self) -> dict:
        """Flush the last shard and write `index.json` (last, so its presence means complete)."""
        if self._closed:
            raise RuntimeError("ShardWriter already closed")
        self._flush()
        index = make_index(self.shards, self.fingerprint, self.vocab_size,
                           self.density_dtype if self.has_density else None)
        write_index(self.dir, index)
        self._closed = True
        return index

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is None:
            self.close()


# ----------------------------------------------------------------------------------------------
# Reader
# ----------------------------------------------------------------------------------------------


def repair_hint(build_dir: Path) -> str:
    """The command that rebuilds exactly the bad shards of a build directory (complete or not)."""
    return (f"python -m data_pipeline.build --config RUN.yaml --set data.shard_dir={build_dir} --repair "
            "(RUN.yaml: the config it was built with)")


def _corrupt(path: Path, why: str) -> CorruptShardError:
    return CorruptShardError(
        f"shard {path} is corrupt: {why}. Rebuild exactly the bad shards with `{repair_hint(path.parent.parent)}`; "
        f"`python -m data_pipeline.inspect {path.parent.parent} --verify` lists every bad one"
    )


def check_shard(path: Path, record: dict | None = None) -> dict:
    """The index entry of a shard file on disk, after checking it: against `record` (its entry in a
    part record or index.json: size and sha256) when there is one, else by decoding every frame
    (zstd content checksums) and checking the header's counts. CorruptShardError if it fails."""
    data = path.read_bytes()
    if record is not None:
        if len(data) != record["bytes"]:
            raise _corrupt(path, f"{len(data)} bytes, its record says {record['bytes']}")
        sha = hashlib.sha256(data).hexdigest()
        if sha != record["sha256"]:
            raise _corrupt(path, f"sha256 {sha} does not match its record ({record['sha256']})")
        return shard_entry(path.name, data)
    entry = shard_entry(path.name, data)
    sf = ShardFile.__new__(ShardFile)
    sf._init_from(path, data)
    try:
        offsets = sf.read("doc_offsets")
        n_tokens = len(sf.read("tokens"))
        for name in sf.columns:
            sf.read(name)
    except (KeyError, ValueError, TypeError, IndexError) as e:
        if isinstance(e, CorruptShardError):
            raise
        raise _corrupt(path, f"unreadable columns ({type(e).__name__}: {e})") from None
    if len(offsets) != sf.n_docs + 1 or n_tokens != sf.n_tokens or (len(offsets) and int(offsets[-1]) != n_tokens):
        raise _corrupt(path, f"header says {sf.n_docs} docs / {sf.n_tokens} tokens, the columns hold "
                             f"{len(offsets) - 1} / {n_tokens}")
    return entry


class ShardFile:
    """One shard, checked against its index entry when opened; columns decode frame by frame."""

    def __init__(self, path: Path, sha256: str | None = None, size: int | None = None):
        data = path.read_bytes()
        if size is not None and len(data) != size:
            raise _corrupt(path, f"{len(data)} bytes, index.json says {size}")
        if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
            raise _corrupt(path, f"sha256 {hashlib.sha256(data).hexdigest()} does not match index.json ({sha256})")
        self._init_from(path, data)

    def _init_from(self, path: Path, data: bytes) -> None:
        self.path = path
        self.header, start = parse_header(data, path)
        self._payload = memoryview(data)[start:]
        self._dctx = zstandard.ZstdDecompressor()
        self.n_docs: int = self.header["n_docs"]
        self.n_tokens: int = self.header["n_tokens"]

    @property
    def columns(self) -> list[str]:
        return list(self.header["columns"])

    def read(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Items [start, stop) of a column, decompressing only the frames that overlap them."""
        col = self.header["columns"].get(name)
        if col is None:
            raise KeyError(f"{self.path}: no column {name!r} (has {self.columns})")
        dtype = np.dtype(col["dtype"])
        n = col["shape"][0]
        stop = n if stop is None else min(stop, n)
        parts, pos = [], 0
        for offset, clen, n_items in col["frames"]:
            lo, hi = pos, pos + n_items
            pos = hi
            if hi <= start or lo >= stop:
                continue
            try:
                raw = self._dctx.decompress(self._payload[offset:offset + clen], max_output_size=n_items * dtype.itemsize)
            except zstandard.ZstdError as e:
                raise _corrupt(self.path, f"column {name!r} frame at {offset} does not decompress ({e})") from None
            arr = np.frombuffer(raw, dtype=dtype)
            parts.append(arr[max(start, lo) - lo:min(stop, hi) - lo])
        if not parts:
            return np.zeros(0, dtype=dtype)
        return parts[0] if len(parts) == 1 else np.concatenate(parts)


@dataclass
class ShardData:
    """A shard's columns decoded in full (what the streaming loader walks through)."""

    tokens: np.ndarray
    doc_offsets: np.ndarray
    density: np.ndarray | None

    @property
    def n_docs(self) -> int:
        return len(self.doc_offsets) - 1

    def document(self, j: int) -> np.ndarray:
        return self.tokens[int(self.doc_offsets[j]):int(self.doc_offsets[j + 1])]


class ShardReader:
    """A split directory: the index is read eagerly, shards lazily (and verified when opened)."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        path = self.dir / INDEX_FILE
        if not path.is_file():
            raise ShardFormatError(f"no {INDEX_FILE} in {self.dir}: not a complete split; build it with "
                                   "`python -m data_pipeline.build --config FILE`")
        try:
            self.index = json.loads(path.read_text())
        except ValueError as e:
            raise ShardFormatError(f"{path}: unreadable ({e}); rebuild the split") from None
        version = self.index.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise ShardFormatError(
                f"{path}: format_version {version} is newer than this dlm-pretrain reads ({FORMAT_VERSION}); "
                "upgrade dlm-pretrain or rebuild the shards with this version"
            )
        self.shards: list[dict] = self.index["shards"]
        counts = [s["n_docs"] for s in self.shards]
        self._first_doc = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
        self._cache: dict[int, ShardFile] = {}  # the most recently opened shard
        self._verified: set[int] = set()  # shards whose checksum this reader has already checked
        # a mirror of a remote split (data_pipeline.remote): shards come through the bounded local cache
        origin = remote_origin(self.dir)
        self.remote: ShardCache | None = ShardCache(self.dir, origin) if origin else None

    def __getstate__(self) -> dict:
        # Dataloader workers get a copy of the reader: send the index, not the cached shard bytes.
        return {**self.__dict__, "_cache": {}}

    @property
    def num_docs(self) -> int:
        return int(self.index["total_docs"])

    @property
    def num_tokens(self) -> int:
        return int(self.index["total_tokens"])

    @property
    def num_shards(self) -> int:
        return len(self.shards)

    @property
    def vocab_size(self) -> int:
        return int(self.index["vocab_size"])

    @property
    def tokenizer_fingerprint(self) -> str:
        return self.index["tokenizer_fingerprint"]

    @property
    def fingerprint(self) -> str:
        """Identity of the split's content (the shard checksums), for loader resume checks."""
        return hashlib.sha256("".join(s["sha256"] for s in self.shards).encode()).hexdigest()[:16]

    def __len__(self) -> int:
        return self.num_docs

    def shard(self, k: int) -> ShardFile:
        if k not in self._cache and self.remote is not None:
            self._cache = {k: self._remote_shard(k)}
            self._verified.add(k)
        if k not in self._cache:
            entry = self.shards[k]
            path = self.dir / entry["file"]
            if not path.is_file():
                raise _corrupt(path, "the file is missing")
            # checksummed on this reader's first open; a loader reopens every shard each epoch, and
            # hashing it again was most of the cost of a re-read (size is still checked every time)
            sha = None if k in self._verified else entry["sha256"]
            self._cache = {k: ShardFile(path, sha, entry["bytes"])}
            self._verified.add(k)
        return self._cache[k]

    def _remote_shard(self, k: int) -> ShardFile:
        """Shard k of a remote split, through the cache: a cached copy that fails its checksum (or was
        evicted by another process meanwhile) is downloaded again; a download is checked as it arrives."""
        entry = self.shards[k]
        for attempt in range(3):
            path = self.remote.ensure(entry, refetch=attempt > 0)
            try:
                return ShardFile(path, None if k in self._verified else entry["sha256"], entry["bytes"])
            except FileNotFoundError:
                continue
            except CorruptShardError as e:
                log.warning("cached shard %s is damaged (%s); downloading it again", path, e)
        raise CorruptShardError(f"shard {self.remote.url}/{entry['file']}: its cached copy at {path} stays unreadable")

    def prefetch(self, ks) -> None:
        """Remote splits: download shards `ks` (the next in the reading order) in the background."""
        if self.remote is not None and len(ks):
            reading = max((self.shards[k]["bytes"] for k in self._cache), default=0)
            self.remote.prefetch([self.shards[int(k)] for k in ks], reading)

    def load_shard(self, k: int, with_density: bool = False) -> ShardData:
        sf = self.shard(k)
        density = sf.read("density") if with_density and "density" in sf.columns else None
        if density is not None and density.dtype == np.uint8:  # quantised: back to [0, 1]
            density = (density.astype(np.float32) / 255.0).astype(np.float16)
        return ShardData(sf.read("tokens"), sf.read("doc_offsets"), density)

    def iter_documents(self) -> Iterator[np.ndarray]:
        """Every document's token ids, in order, one shard in memory at a time."""
        for k in range(self.num_shards):
            data = self.load_shard(k)
            for j in range(data.n_docs):
                yield data.document(j)

    def document(self, i: int) -> np.ndarray:
        if not 0 <= i < self.num_docs:
            raise IndexError(f"document {i} out of range (split has {self.num_docs})")
        k = int(np.searchsorted(self._first_doc, i, side="right")) - 1
        sf = self.shard(k)
        j = i - int(self._first_doc[k])
        lo, hi = (int(x) for x in sf.read("doc_offsets", j, j + 2))
        return sf.read("tokens", lo, hi)

    def verify(self) -> None:
        """Open (and so checksum) every shard; raises CorruptShardError on the first bad one."""
        self._verified.clear()  # a full check, whatever this reader has opened before
        for k in range(self.num_shards):
            self._cache.pop(k, None)
            self.shard(k)

    def problems(self) -> list[tuple[str, str]]:
        """(file, what is wrong) for every missing or corrupt shard, not just the first."""
        self._verified.clear()
        out = []
        for k, entry in enumerate(self.shards):
            self._cache.pop(k, None)
            try:
                sf = self.shard(k)
                if (sf.n_docs, sf.n_tokens) != (entry["n_docs"], entry["n_tokens"]):
                    out.append((entry["file"], f"holds {sf.n_docs} docs / {sf.n_tokens} tokens, index.json says "
                                               f"{entry['n_docs']} / {entry['n_tokens']}"))
                for name in sf.columns:  # every frame must decompress
                    sf.read(name)
            except ShardFormatError as e:
                out.append((entry["file"], str(e)))
            finally:
                self._cache.pop(k, None)
        return out


def open_split(directory: str | Path) -> ShardReader:
    return ShardReader(directory)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_pipeline.shards",
                                     description="Check shard directories against their index.json.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("verify", help="checksum every shard of one or more split directories")
    p.add_argument("dirs", nargs="+", help="split directories (holding index.json), e.g. data/shards/X/train")
    args = parser.parse_args(argv)
    bad = 0
    for d in args.dirs:
        try:
            reader = ShardReader(d)
        except ShardFormatError as e:
            bad += 1
            print(f"BAD {d}: {e}")
            continue
        problems = reader.problems()
        for file, why in problems:
            print(f"BAD {Path(d) / file}: {why}")
        bad += bool(problems)
        if not problems:
            print(f"ok  {d}: {reader.num_shards} shards, {reader.num_docs} docs, {reader.num_tokens} tokens")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
