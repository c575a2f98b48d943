"""Where documents come from: task generators, Hugging Face datasets, local text/jsonl/parquet.

`iter_documents(cfg, split)` yields `Document`s with stable ids for split "train" or "val":
- `task:NAME`: the seeded generator (`cfg.task.num_train` / `num_val` documents).
- `hf:NAME[/CONFIG]` (also `hf:ORG/NAME/CONFIG`, e.g. `hf:lm1b`): `datasets.load_dataset` with
  `cfg.train_split` / `cfg.val_split`, text in `cfg.text_field`, streamed when the dataset allows
  (`cfg.hf_streaming`); `cfg.hf_local_dir` reads a local copy of the hub repo through the same call
  (offline clusters, tests). Build time only: training never reads the hub.
- a local `.txt` or `.py` (one document per line, blank-line separated paragraphs, or the whole file:
  `cfg.txt_documents`; `file` is the natural unit of source code),
  `.jsonl` (field `cfg.text_field`, or `cfg.text_template` over several fields), `.parquet` (the same columns), or a directory of such files (recursively, sorted). The val
  split is the documents whose id hashes under `cfg.val_fraction`, so it is stable when files grow.
  Several local files or directories are one source when joined by commas (`a/valid.txt,b/input.txt`):
  read in the order given, so a corpus spread over folders needs no copy or symlink farm.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

from data_pipeline.config import DataConfig
from data_pipeline.corpora import fetch_hint
from data_pipeline.document import Document
from data_pipeline.remote import is_remote, local_copy, local_path
from data_pipeline.tasks import get_task

__all__ = ["DataSourceError", "DataSourceUnavailable", "Document", "SourceStats", "iter_documents", "is_val_id"]

log = logging.getLogger(__name__)

SPLITS = ("train", "val")
LOCAL_SUFFIXES = (".txt", ".py", ".jsonl", ".parquet")  # .py: source code, read as text (a code corpus)
TXT_MODES = ("line", "paragraph", "file")
DECODE_MODES = ("error", "skip")
READ_BLOCK = 1 << 20  # bytes of a text file decoded at once
HUB_CONNECT_TIMEOUT_S = 3.0


class DataSourceError(ValueError):
    """The source exists but its content cannot be used (bad encoding, missing field, empty)."""


class DataSourceUnavailable(RuntimeError):
    """The source could not be reached or loaded (typically a hub dataset on an offline machine)."""


@dataclass
class SourceStats:
    """What a pass over a source dropped (reported by the build; never silent)."""

    undecodable: int = 0  # documents dropped because a line was not UTF-8 (data.decode_errors=skip)
    examples: list[str] = field(default_factory=list)  # the first few "file: byte offset" of them

    def add_undecodable(self, where: str) -> None:
        self.undecodable += 1
        if len(self.examples) < 5:
            self.examples.append(where)
        if self.undecodable <= 5:
            log.warning("skipped %s", where)


def iter_documents(cfg: DataConfig, split: str, stats: SourceStats | None = None) -> Iterator[Document]:
    """The split's documents in a fixed order; `stats` (optional) counts what was skipped."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    source = cfg.source
    if source.startswith("task:"):
        yield from _iter_task(cfg, split)
    elif source.startswith("hf:"):
        yield from _iter_hf(cfg, split)
    else:
        yield from _iter_local(cfg, split, stats)


def iter_all_documents(cfg: DataConfig, stats: SourceStats | None = None) -> Iterator[tuple[str, Document]]:
    """(split, document) for both splits, each split in its `iter_documents` order.

    Local sources are read once for both splits (their split is a hash of the document id), which
    halves the reading a build does; the others are separate sources per split anyway.
    """
    if cfg.source.startswith(("task:", "hf:")):
        for split in SPLITS:
            for doc in iter_documents(cfg, split, stats):
                yield split, doc
        return
    yield from _iter_local(cfg, None, stats)


# ----------------------------------------------------------------------------------------------
# Tasks
# ----------------------------------------------------------------------------------------------


def _iter_task(cfg: DataConfig, split: str) -> Iterator[Document]:
    task = get_task(cfg.source.removeprefix("task:"))
    n = cfg.task.num_train if split == "train" else cfg.task.num_val
    if n <= 0:
        raise DataSourceError(f"{cfg.source}: data.task.num_{split} must be positive, got {n}")
    yield from task.documents(split, n, cfg.task.seed, cfg.task)


# ----------------------------------------------------------------------------------------------
# Hugging Face datasets
# ----------------------------------------------------------------------------------------------


def parse_hf_source(source: str) -> tuple[str, str | None]:
    """`hf:NAME` -> (NAME, None); `hf:NAME/CONFIG` -> (NAME, CONFIG); `hf:ORG/NAME/CONFIG`."""
    parts = source.removeprefix("hf:").split("/")
    if not all(parts) or len(parts) > 3:
        raise ValueError(f"{source!r}: expected hf:NAME, hf:NAME/CONFIG or hf:ORG/NAME/CONFIG")
    if len(parts) == 1:
        return parts[0], None
    if len(parts) == 2:
        return parts[0], parts[1]
    return f"{parts[0]}/{parts[1]}", parts[2]


def hub_reachable(timeout: float = HUB_CONNECT_TIMEOUT_S) -> bool:
    """One TCP connect to the hub endpoint: offline machines answer in milliseconds to seconds,
    where `datasets` itself retries for ~25 s before giving up."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false"):
        return False  # the user said so
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # a proxy decides; let `datasets` try
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "huggingface.co", port), timeout=timeout):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def _hf_offline(enabled: bool) -> Iterator[None]:
    """Switch `datasets`/`huggingface_hub` to offline mode (cache only) for the block."""
    if not enabled:
        yield
        return
    import datasets.config
    import huggingface_hub.constants

    targets = [(datasets.config, "HF_HUB_OFFLINE"), (datasets.config, "HF_DATASETS_OFFLINE"),
               (huggingface_hub.constants, "HF_HUB_OFFLINE")]
    saved = [(mod, attr, getattr(mod, attr)) for mod, attr in targets if hasattr(mod, attr)]
    for mod, attr, _ in saved:
        setattr(mod, attr, True)
    try:
        yield
    finally:
        for mod, attr, value in saved:
            setattr(mod, attr, value)


def _unavailable(name: str, config: str | None, split: str, err: BaseException) -> DataSourceUnavailable:
    full = name + (f"/{config}" if config else "")
    return DataSourceUnavailable(
        f"Hugging Face dataset {full!r} (split {split!r}) could not be fetched or loaded (offline?): "
        f"{type(err).__name__}: {err}\n"
        "Point the config at local data instead, e.g. `--set data.source=/path/to/train.txt` "
        "(one document per line; also .jsonl/.parquet or a directory of them), "
        "or build the shards on a machine with hub access and copy them (data.shard_dir)."
    )


def _load_hf(cfg: DataConfig, name: str, config: str | None, hf_split: str):
    """`datasets.load_dataset` of the hub dataset (e.g. `lm1b`) or of its local copy, streaming if it can."""
    import datasets

    path = str(Path(cfg.hf_local_dir).expanduser()) if cfg.hf_local_dir else name
    if cfg.hf_streaming:
        try:
            return datasets.load_dataset(path, config, split=hf_split, streaming=True)
        except (NotImplementedError, TypeError) as e:  # a dataset whose builder cannot stream
            log.info("%s cannot stream (%s); loading it whole", path, e)
    return datasets.load_dataset(path, config, split=hf_split)


def _iter_hf(cfg: DataConfig, split: str) -> Iterator[Document]:
    name, config = parse_hf_source(cfg.source)
    hf_split = cfg.train_split if split == "train" else cfg.val_split
    offline = bool(cfg.hf_local_dir)
    if not offline and not os.environ.get("HF_HUB_OFFLINE") and not os.environ.get("HF_DATASETS_OFFLINE"):
        t0 = time.monotonic()
        offline = not hub_reachable()
        if offline:
            log.warning("Hugging Face hub unreachable (%.2f s); trying the local cache only", time.monotonic() - t0)
    if cfg.hf_local_dir and not Path(cfg.hf_local_dir).expanduser().is_dir():
        raise DataSourceError(f"data.hf_local_dir={cfg.hf_local_dir!r} is not a directory")
    try:
        with _hf_offline(offline):
            ds = _load_hf(cfg, name, config, hf_split)
    except ImportError as e:
        raise DataSourceUnavailable(f"{cfg.source}: the `datasets` package is needed ({e})") from None
    except Exception as e:  # the hub raises many types (ConnectionError, FileNotFoundError, ...)
        raise _unavailable(name, config, hf_split, e) from e
    columns = ds.column_names if ds.column_names is not None else list(ds.features or {})
    wanted = template_fields(cfg.text_template) if cfg.text_template else [cfg.text_field]
    missing = [c for c in wanted if c not in columns]
    if missing:
        raise DataSourceError(
            f"{cfg.source} split {hf_split!r} has no column {', '.join(map(repr, missing))} "
            f"(columns: {columns}); set {'data.text_template' if cfg.text_template else 'data.text_field'}"
        )
    # ids name the dataset, not where it was read from: a local copy yields the same ids (and splits)
    prefix = f"hf:{name}" + (f"/{config}" if config else "") + f"/{hf_split}"
    n = 0
    texts = _column_iter(ds, cfg.text_field) if not cfg.text_template else \
        (row_text(r, cfg, cfg.source) for r in _row_iter(ds, wanted))
    for i, text in enumerate(texts):
        if text:
            n += 1
            yield Document(id=f"{prefix}:{i}", text=text)
    if n == 0:
        raise DataSourceError(f"{cfg.source} split {hf_split!r} holds no non-empty documents")


def _column_iter(ds, field: str) -> Iterator[str]:
    for batch in ds.iter(batch_size=10_000):
        yield from batch[field]


def _row_iter(ds, fields: list[str]) -> Iterator[dict]:
    for batch in ds.iter(batch_size=10_000):
        yield from (dict(zip(fields, values, strict=True)) for values in zip(*(batch[f] for f in fields), strict=True))


# ----------------------------------------------------------------------------------------------
# Local files
# ----------------------------------------------------------------------------------------------


def _file_key(rel: str) -> int:
    return int.from_bytes(hashlib.sha256(rel.encode("utf-8")).digest()[:8], "little")


def val_mask(rel: str, first: int, n: int, val_fraction: float) -> np.ndarray:
    """Held-out membership of items first..first+n-1 (line or row numbers) of local file `rel`.

    A splitmix64 hash of (sha256 of the file's path, item number) as a number in [0, 1): stable when
    files grow or are read in other blocks, and computed for a block of lines at once (a sha256 per
    document cost more than tokenizing a short sentence).
    """
    x = np.arange(first, first + n, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(_file_key(rel))
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return (x >> np.uint64(11)).astype(np.float64) * 2.0**-53 < val_fraction


def is_val_id(doc_id: str, val_fraction: float) -> bool:
    """Whether the local document `FILE:N` is held out (the per-document form of `val_mask`)."""
    rel, _, key = doc_id.rpartition(":")
    return bool(val_mask(rel, int(key), 1, val_fraction)[0])


def local_roots(source: str) -> list[Path]:
    """The paths of a local source: one file or directory, or several joined by commas."""
    # a URL (s3://, gs://) is read from its copy in the cache (data_pipeline.remote); file:// is local
    return [local_copy(p) if is_remote(p) else local_path(p) for p in (x.strip() for x in source.split(",")) if p]


def local_files(source: str) -> list[tuple[Path, str]]:
    """(file, name) of every file of a local source, in order. The name (the file's name, or its
    path under a given directory) keys the file's documents and their train/val split."""
    roots = local_roots(source)
    if not roots:
        raise DataSourceError(f"data source {source!r} names no file or directory")
    out: list[tuple[Path, str]] = []
    for root in roots:
        if not root.exists():
            raise DataSourceError(f"data source {str(root)!r} is neither task:NAME, hf:NAME nor an existing file or "
                                  f"directory{fetch_hint(root)}")
        if root.is_file():
            if root.suffix not in LOCAL_SUFFIXES:
                raise DataSourceError(f"{root}: unsupported file type; expected one of {LOCAL_SUFFIXES}")
            out.append((root, root.name))
            continue
        files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in LOCAL_SUFFIXES)
        if not files:
            raise DataSourceError(f"{root}: no {'/'.join(LOCAL_SUFFIXES)} files in this directory")
        out += [(p, p.relative_to(root).as_posix()) for p in files]
    names = [name for _, name in out]
    if len(set(names)) < len(names):
        # two files with one name would share document ids and their held-out lines
        dup = sorted({n for n in names if names.count(n) > 1})
        raise DataSourceError(f"data source {source!r}: several files are named {dup}; list their directories instead")
    return out


FULL_HASH_MAX = 256 << 20  # files up to this size are hashed whole (~0.5 s per 256 MiB); larger ones sampled
SAMPLE_BLOCKS, SAMPLE_BYTES = 64, 1 << 20


def file_fingerprint(path: Path, full_hash_max: int = FULL_HASH_MAX) -> dict:
    """Size, mtime and a content hash of one source file: sha256 of the whole file up to
    `full_hash_max` bytes, else of its size and SAMPLE_BLOCKS blocks at evenly spaced offsets (the
    first and the last included): an append, a truncation or an edit in a sampled block changes it,
    at a bounded cost for huge inputs."""
    st = path.stat()
    h = hashlib.sha256()
    with path.open("rb") as f:
        if st.st_size <= full_hash_max:
            for block in iter(lambda: f.read(READ_BLOCK), b""):
                h.update(block)
            kind = "full"
        else:
            h.update(str(st.st_size).encode())
            last = st.st_size - SAMPLE_BYTES
            for i in range(SAMPLE_BLOCKS):
                f.seek(last * i // (SAMPLE_BLOCKS - 1))
                h.update(f.read(SAMPLE_BYTES))
            kind = f"sampled {SAMPLE_BLOCKS}x{SAMPLE_BYTES}"
    return {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns, "hash": kind, "sha256": h.hexdigest()}


def source_fingerprint(cfg: DataConfig) -> dict[str, dict] | None:
    """Per file of a local source, its `file_fingerprint` (None for task/HF sources, whose content is
    fixed by their settings and the dataset's name)."""
    if cfg.source.startswith(("task:", "hf:")):
        return None
    return {name: file_fingerprint(path) for path, name in local_files(cfg.source)}


def source_changes(recorded: dict[str, dict], cfg: DataConfig) -> list[str]:
    """How the local source differs from the fingerprint recorded when it was built ([] = the same).
    A file with its recorded size and mtime is taken as unchanged (as make and rsync do); otherwise
    its content hash decides, so a touched but identical file is still the same source."""
    now = {name: path for path, name in local_files(cfg.source)}
    changes = [f"{name}: new file" for name in now if name not in recorded]
    changes += [f"{name}: removed" for name in recorded if name not in now]
    for name, rec in recorded.items():
        if name not in now:
            continue
        st = now[name].stat()
        if (st.st_size, st.st_mtime_ns) == (rec["bytes"], rec["mtime_ns"]):
            continue
        if st.st_size != rec["bytes"]:
            changes.append(f"{name}: {rec['bytes']} bytes when built, {st.st_size} now")
        elif file_fingerprint(now[name])["sha256"] != rec["sha256"]:
            changes.append(f"{name}: same size, other content (sha256 differs; modified since the build)")
    return changes


def _iter_local(cfg: DataConfig, split: str | None, stats: SourceStats | None) -> Iterator:
    """Documents of `split`, or (split, document) pairs of both splits when `split` is None."""
    for run_split, docs in _local_runs(cfg, stats, need=(split,) if split else SPLITS):
        if split is None:
            yield from ((run_split, d) for d in docs)
        elif run_split == split:
            yield from docs


# Provenance: a document's source as one integer, (index of its file in `source_names`) << KEY_BITS
# | (its line number, row index or generated index there), stored per document in the shards.
KEY_BITS = 40


def source_names(cfg: DataConfig) -> list[str]:
    """What the file index of a provenance key refers to: the local files in order, or the source."""
    if cfg.source.startswith(("task:", "hf:")):
        return [cfg.source]
    return [name for _, name in local_files(cfg.source)]


def _doc_key(doc_id: str) -> int:
    """The number at the end of a task/HF document id (`task:sudoku/train/17`, `hf:lm1b/train:17`)."""
    tail = doc_id.replace("/", ":").rpartition(":")[2]
    return int(tail) if tail.isdigit() else 0


def iter_text_runs(cfg: DataConfig, stats: SourceStats | None = None, with_keys: bool = False) -> Iterator[tuple]:
    """(split, texts) runs covering both splits in `iter_documents` order: the build's fast path;
    with_keys: (split, texts, provenance keys as uint64, see KEY_BITS).

    Local files come a block of lines at a time (no per-document objects or hashing); other
    sources are grouped from their documents.
    """
    if cfg.source.startswith(("task:", "hf:")):
        for split in SPLITS:
            docs = iter_documents(cfg, split, stats)
            while run := list(itertools.islice(docs, 1024)):
                texts = [d.text for d in run]
                if with_keys:
                    yield split, texts, np.fromiter((_doc_key(d.id) for d in run), dtype=np.uint64, count=len(run))
                else:
                    yield split, texts
        return
    yield from _local_runs(cfg, stats, texts_only=True, with_keys=with_keys)


def _local_runs(cfg: DataConfig, stats: SourceStats | None, texts_only: bool = False,
                need: tuple[str, ...] = SPLITS, with_keys: bool = False) -> Iterator[tuple]:
    """(split, documents or texts) runs of a local source, in file order; the `need` splits must not be empty."""
    if cfg.txt_documents not in TXT_MODES:
        raise DataSourceError(f"data.txt_documents={cfg.txt_documents!r}: expected one of {TXT_MODES}")
    if cfg.decode_errors not in DECODE_MODES:
        raise DataSourceError(f"data.decode_errors={cfg.decode_errors!r}: expected one of {DECODE_MODES}")
    files = local_files(cfg.source)
    stats = stats if stats is not None else SourceStats()
    counts = {"train": 0, "val": 0}
    for file_index, (path, rel) in enumerate(files):
        for keys, texts in _read_blocks(path, cfg, stats):
            first = int(keys[0])
            is_val = val_mask(rel, first, int(keys[-1]) - first + 1, cfg.val_fraction)[keys - first]
            n_val = int(np.count_nonzero(is_val))
            counts["val"] += n_val
            counts["train"] += len(keys) - n_val
            for want, flag in (("train", False), ("val", True)):
                n_want = n_val if flag else len(keys) - n_val
                if not n_want:
                    continue
                # itertools.compress selects in C: per-document Python loops here were a tenth of a build
                picked = (is_val if flag else ~is_val).tolist()
                if texts_only:
                    run = texts if n_want == len(keys) else list(itertools.compress(texts, picked))
                    if with_keys:
                        sel = keys if n_want == len(keys) else keys[is_val if flag else ~is_val]
                        yield want, run, sel.astype(np.uint64) | np.uint64(file_index << KEY_BITS)
                    else:
                        yield want, run
                else:
                    yield want, [Document(id=f"{rel}:{k}", text=t) for k, t in
                                 zip(itertools.compress(keys.tolist(), picked), itertools.compress(texts, picked), strict=True)]
    seen = sum(counts.values())
    if seen == 0:
        raise DataSourceError(f"{cfg.source}: the source holds no documents (all files empty or blank"
                              + (f"; {stats.undecodable} not UTF-8, skipped)" if stats.undecodable else ")"))
    for s in need:
        if counts[s] == 0:
            raise DataSourceError(
                f"{cfg.source}: the {s} split is empty ({seen} documents, data.val_fraction="
                f"{cfg.val_fraction}); add documents or change data.val_fraction"
            )


def _read_blocks(path: Path, cfg: DataConfig, stats: SourceStats) -> Iterator[tuple[np.ndarray, list[str]]]:
    """(keys as int64, texts) of the non-empty documents of one file, a block at a time."""
    if path.suffix == ".txt" and cfg.txt_documents == "line":
        for first, lines in _line_blocks(path, cfg.decode_errors == "skip", stats):
            try:  # whole-block C calls (map, fromiter, compress): no per-line Python loop
                blank = np.fromiter(map(str.isspace, lines), dtype=bool, count=len(lines))
            except TypeError:  # a None: an undecodable line being skipped
                keep = [ln is not None and bool(ln) and not ln.isspace() for ln in lines]
            else:
                blank |= np.fromiter(map(len, lines), dtype=np.int64, count=len(lines)) == 0
                keep = (~blank).tolist()
            keys = np.flatnonzero(keep) + first
            if len(keys):
                yield keys, lines if len(keys) == len(lines) else list(itertools.compress(lines, keep))
        return
    keys, texts = [], []
    for key, text in _read_file(path, cfg, stats):
        keys.append(key)
        texts.append(text)
        if len(keys) >= 4096:
            yield np.asarray(keys, dtype=np.int64), texts
            keys, texts = [], []
    if keys:
        yield np.asarray(keys, dtype=np.int64), texts


def _read_file(path: Path, cfg: DataConfig, stats: SourceStats) -> Iterator[tuple[int, str]]:
    """(first line or row number, text) of each non-empty document of one file."""
    if path.suffix == ".parquet":
        yield from _read_parquet(path, cfg)
        return
    lines = _decoded_lines(path, cfg.decode_errors == "skip", stats)
    if path.suffix == ".jsonl":
        for line_no, line in lines:
            if line is not None and line.strip():
                text = _json_text(path, line_no, line, cfg)
                if text:
                    yield line_no, text
    elif cfg.txt_documents == "line":
        for line_no, line in lines:
            if line is not None and line.strip():
                yield line_no, line
    elif cfg.txt_documents == "file":
        yield from _whole_file(lines)
    else:
        yield from _paragraphs(lines)


def _line_blocks(path: Path, skip: bool, stats: SourceStats) -> Iterator[tuple[int, list[str | None]]]:
    """(number of the first line, lines without newlines) per block; None marks an undecodable line.

    Reads blocks of whole lines and decodes/splits each in one C call (a per-line Python loop was
    the build's bottleneck on sentence corpora); a block that fails to decode is redone line by line
    to name the exact byte offset, or to skip just the bad lines.
    """
    offset, line_no, rest = 0, 1, b""
    with path.open("rb") as f:
        while True:
            block = f.read(READ_BLOCK)
            data = rest + block
            if not data:
                return
            cut = data.rfind(b"\n") + 1 if block else len(data)
            if cut == 0:  # no newline yet: a very long line, keep reading
                rest = data
                continue
            data, rest = data[:cut], data[cut:]
            try:
                lines: list[str | None] = data.decode("utf-8").split("\n")
            except UnicodeDecodeError:
                lines = _decode_lines_one_by_one(path, data, offset, line_no, skip, stats)
            else:
                if lines[-1] == "":
                    lines.pop()
                if b"\r" in data:
                    lines = [ln.rstrip("\r") for ln in lines]
            yield line_no, lines
            line_no += len(lines)
            offset += len(data)


def _decode_lines_one_by_one(path: Path, data: bytes, offset: int, line_no: int, skip: bool,
                             stats: SourceStats) -> list[str | None]:
    raws = data.split(b"\n")
    if raws[-1] == b"":
        raws.pop()
    out: list[str | None] = []
    for raw in raws:
        try:
            out.append(raw.decode("utf-8").rstrip("\r"))
        except UnicodeDecodeError as e:
            where = f"{path}: not valid UTF-8 at byte offset {offset + e.start} (line {line_no + len(out)})"
            if not skip:
                raise DataSourceError(
                    f"{where}; convert the file to UTF-8 (e.g. `iconv -f latin1 -t utf-8`) "
                    "or set data.decode_errors=skip to drop such documents"
                ) from None
            stats.add_undecodable(where)
            out.append(None)
        offset += len(raw) + 1
    return out


def _decoded_lines(path: Path, skip: bool, stats: SourceStats) -> Iterator[tuple[int, str | None]]:
    """(line number, text without the newline); None for an undecodable line when skipping."""
    for first, lines in _line_blocks(path, skip, stats):
        yield from enumerate(lines, start=first)


def _paragraphs(lines: Iterator[tuple[int, str | None]]) -> Iterator[tuple[int, str]]:
    """Blank-line separated documents (inner newlines kept); one with an undecodable line is dropped."""
    start, buf, bad = 0, [], False
    for line_no, line in lines:
        if line is not None and not line.strip():
            if buf and not bad:
                yield start, "\n".join(buf)
            start, buf, bad = 0, [], False
            continue
        if not buf and not bad:
            start = line_no
        if line is None:
            bad = True
        else:
            buf.append(line)
    if buf and not bad:
        yield start, "\n".join(buf)


def _whole_file(lines: Iterator[tuple[int, str | None]]) -> Iterator[tuple[int, str]]:
    """The file as one document (key 1); dropped when it holds an undecodable line or only blanks."""
    buf = []
    for _, line in lines:
        if line is None:
            return
        buf.append(line)
    text = "\n".join(buf)
    if text.strip():
        yield 1, text


def template_fields(template: str) -> list[str]:
    """The field names a data.text_template refers to ("{question}\n{answer}" -> [question, answer])."""
    import string

    return list(dict.fromkeys(name.split(".")[0].split("[")[0]
                              for _, name, _, _ in string.Formatter().parse(template) if name))


def row_text(row: dict, cfg: DataConfig, where: str) -> str:
    """A row's document: data.text_template filled with its fields, else its data.text_field."""
    if not cfg.text_template:
        text = row[cfg.text_field]
        if not isinstance(text, str) and text is not None:
            raise DataSourceError(f"{where}: field {cfg.text_field!r} is {type(text).__name__}, not text")
        return text or ""
    missing = [f for f in template_fields(cfg.text_template) if f not in row]
    if missing:
        raise DataSourceError(f"{where}: data.text_template {cfg.text_template!r} names {missing}, which the row "
                              f"does not have (it has {list(row)}); fix the template's field names")
    return cfg.text_template.format_map(row)


def _json_text(path: Path, line_no: int, line: str, cfg: DataConfig) -> str:
    text_field = cfg.text_field
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataSourceError(f"{path}:{line_no}: not valid JSON: {e}") from None
    if isinstance(row, dict) and cfg.text_template:
        return row_text(row, cfg, f"{path}:{line_no}")
    if not isinstance(row, dict) or text_field not in row:
        keys = list(row) if isinstance(row, dict) else type(row).__name__
        raise DataSourceError(f"{path}:{line_no}: no field {text_field!r} (has {keys}); set data.text_field")
    text = row[text_field]
    if not isinstance(text, str):
        raise DataSourceError(f"{path}:{line_no}: field {text_field!r} is {type(text).__name__}, not text")
    return text


def _read_parquet(path: Path, cfg: DataConfig) -> Iterator[tuple[int, str]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataSourceError(f"{path}: reading parquet needs pyarrow (`pip install pyarrow`)") from None
    pf = pq.ParquetFile(path)
    wanted = template_fields(cfg.text_template) if cfg.text_template else [cfg.text_field]
    missing = [c for c in wanted if c not in pf.schema_arrow.names]
    if missing:
        key = "data.text_template" if cfg.text_template else "data.text_field"
        raise DataSourceError(f"{path}: no column {', '.join(map(repr, missing))} (has {pf.schema_arrow.names}); "
                              f"set {key}")
    row = 0
    for batch in pf.iter_batches(columns=wanted, batch_size=8192):
        texts = batch.column(0).to_pylist() if not cfg.text_template else \
            [row_text(r, cfg, f"{path}") for r in batch.to_pylist()]
        for text in texts:
            if text:
                yield row, text
            row += 1
