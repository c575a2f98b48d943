"""One split, one part: read the source in order, tokenize in parallel, write the part's shards.

Why fixed document ranges: shard u holds source documents [u * D, (u + 1) * D) of the split,
with D (`docs_per_shard`) fixed in the build plan. A shard's bytes then depend only on those
documents, the tokenizer and the settings, never on the worker count, chunking or timing, so
- any number of workers gives byte-identical shards (the parent assembles each from its chunks in
  document order; its writer thread compresses, checksums and writes it),
- each shard is an independent unit written atomically: a rerun after a kill keeps the finished
  ones (checking their header against the source) and builds the rest,
- `--part i/K` builds the shards u with u % K == i; every part reads the whole source (reading is
  cheap next to tokenizing) and records what it built in `part-i-of-K.json` for the merge.
The parent reads documents, cuts them into ~2 MB chunks that never cross a shard boundary, and
keeps a bounded number of tasks in flight, consumed in submission order. Tokenizing (and density
annotation) runs in the worker processes; compressing, hashing and writing in one writer thread of
the parent, beside its reading (see _shard_writer). Work left on the parent's main thread is serial
and caps the speed-up of more workers.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from common.fsutil import atomic_write_bytes
from data_pipeline.config import DataConfig
from data_pipeline.encode import (
    InlineExecutor,
    encode_annotate_chunk,
    encode_chunk,
    make_executor,
    pack_texts,
)
from data_pipeline.shards import (
    INDEX_FILE,
    CorruptShardError,
    ShardFormatError,
    check_shard,
    shard_columns,
    shard_name,
    token_dtype,
    write_shard,
)
from data_pipeline.sources import SourceStats, iter_text_runs
from data_pipeline.tokenizer import Tokenizer

log = logging.getLogger(__name__)

CHUNK_CHARS = 2 << 20  # text per task handed to a worker (~0.3 s of tokenizing; 512 KB read ~6% slower on 2 workers)
INFLIGHT_PER_WORKER = 3  # chunks queued per worker: keeps them busy, bounds memory
# 1 worker: text read before it is tokenized back to back (~32 MB, ~50 MB of memory). Measured on
# bench_build (2-core VM): batches of 32 MB made the 1-worker build ~20% faster than batches of 8 MB
# and ~25% faster than alternating chunk by chunk (perf showed ~9x fewer CPU migrations; tokenizing
# is what slowed down, not reading).
INLINE_BATCH = max(1, (32 << 20) // CHUNK_CHARS)
PLAN_SAMPLE_DOCS = 2000  # documents tokenized to size the shards


def part_file(part: int, n_parts: int) -> str:
    return f"part-{part:05d}-of-{n_parts:05d}.json"


def docs_per_shard(cfg: DataConfig, tokenizer: Tokenizer) -> dict[str, int]:
    """Per split, D such that D documents take ~`shard_size_mb` uncompressed, from the source's first
    documents (a deterministic sample, read in one short pass; a split too rare in it, like a 1%
    val split, borrows the other's estimate)."""
    sample: dict[str, list[str]] = {"train": [], "val": []}
    seen = 0
    for split, texts in iter_text_runs(cfg):
        sample[split].extend(texts[:PLAN_SAMPLE_DOCS - len(sample[split])])
        seen += len(texts)
        if all(len(v) >= PLAN_SAMPLE_DOCS for v in sample.values()) or seen >= 20 * PLAN_SAMPLE_DOCS:
            break
    itemsize = token_dtype(tokenizer.vocab_size).itemsize
    if cfg.density.annotator != "none":  # the density column: 1 (uint8) or 2 (float16) bytes a token
        itemsize += 1 if cfg.density.dtype == "uint8" else 2
    per_doc = {}
    for split, texts in sample.items():
        if len(texts) >= 50:
            _, lengths, _ = encode_chunk(texts, cfg.max_doc_tokens, cfg.long_docs, tokenizer=tokenizer)
            per_doc[split] = float(lengths.mean()) * itemsize + 16  # + its offset and source
    fallback = next(iter(per_doc.values()), 64.0)
    return {s: max(1, int(cfg.shard_size_mb * 2**20 / per_doc.get(s, fallback))) for s in sample}


@dataclass
class PartResult:
    split: str
    n_units: int = 0  # shards of the whole split (all parts)
    source_docs: int = 0
    written: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    damaged: list[str] = field(default_factory=list)  # found on disk, failed their check, rewritten (with why)
    tokens_written: int = 0
    seconds: float = 0.0
    stats: SourceStats = field(default_factory=SourceStats)


class _SplitBuild:
    """One split's side of a pass: cuts its documents into per-shard chunks, writes finished shards."""

    def __init__(self, split: str, out_dir: Path, docs_per_unit: int, part: int, n_parts: int,
                 vocab_size: int, stats: SourceStats, bar, density_dtype: str | None = None):
        out_dir.mkdir(parents=True, exist_ok=True)
        self.split, self.out_dir, self.D, self.part, self.n_parts = split, out_dir, docs_per_unit, part, n_parts
        self.dtype = token_dtype(vocab_size)
        self.density_dtype = density_dtype  # None: no density column
        self.result = PartResult(split, stats=stats)
        self.bar = bar
        self.entries: dict[int, dict] = {}
        self.records = recorded_entries(out_dir)  # what earlier runs recorded of each shard: kept ones must match
        self.checked: dict | None = None  # the entry of the existing shard of the current unit, checked
        self.n = 0  # documents of the split seen
        self.unit, self.mine, self.existing, self.unit_docs = -1, False, False, 0
        self.texts: list[str] = []
        self.keys: dict[int, list[np.ndarray]] = {}  # provenance keys of each unit being built, in document order
        self.chars = 0
        self.encoded: list[tuple[np.ndarray, np.ndarray, int]] = []  # chunks of the shard being assembled

    # -- the reading side (parent process, in document order) --------------------------------------

    def add(self, texts: list[str], submit, keys: np.ndarray) -> None:
        """The split's next documents (a run of texts and their provenance keys), cut at shard boundaries."""
        i = 0
        while i < len(texts):
            u = self.n // self.D
            if u != self.unit:
                self.end_unit(submit)
                self.unit, self.texts, self.chars, self.unit_docs = u, [], 0, 0
                self.mine = u % self.n_parts == self.part
                self.existing = self.mine and self._keep(u)
            take = min(len(texts) - i, (u + 1) * self.D - self.n)
            batch = texts[i:i + take] if take < len(texts) else texts
            batch_keys = keys[i:i + take]
            i += take
            self.n += take
            self.unit_docs += take
            if not self.mine or self.existing:
                continue
            self.texts.extend(batch)
            self.keys.setdefault(u, []).append(batch_keys)
            self.chars += sum(map(len, batch))
            if self.chars >= CHUNK_CHARS:
                submit(self, u, self.texts, False)
                self.texts, self.chars = [], 0

    def end_unit(self, submit) -> None:
        """The current document range is complete: keep the finished shard, or queue its last chunk."""
        if self.unit < 0 or not self.mine:
            return
        if self.existing:
            self.entries[self.unit] = _check_source_docs(self.out_dir / shard_name(self.unit), self.checked,
                                                         self.unit_docs)
            self.result.reused.append(shard_name(self.unit))
        else:
            submit(self, self.unit, self.texts, True, self.unit_docs)

    def _keep(self, unit: int) -> bool:
        """Whether shard `unit` exists from an earlier run and passes its check (then it is kept);
        a damaged one is reported and rebuilt."""
        path = self.out_dir / shard_name(unit)
        if not path.is_file():
            return False
        try:
            self.checked = check_shard(path, self.records.get(unit))
        except CorruptShardError as e:
            log.warning("%s; rebuilding it", e)
            self.result.damaged.append(f"{path.name} ({str(e).split(' is corrupt: ')[-1].split('. Rebuild')[0]})")
            return False
        return True

    def finish(self, submit) -> None:
        self.end_unit(submit)
        self.unit = -1
        self.result.source_docs = self.n
        self.result.n_units = math.ceil(self.n / self.D)

    # -- the writing side (results in submission order) --------------------------------------------

    def receive(self, unit: int, encoded, last: bool, source_docs: int, submit_write) -> None:
        """A chunk's tokens, in document order; the shard's last one hands the shard to a writer."""
        if encoded is not None:
            self.encoded.append(encoded)
            self.bar.update(len(encoded[0]))
        if not last:
            return
        chunks, self.encoded = self.encoded, []
        keys = self.keys.pop(unit, [])
        keys = np.concatenate(keys) if keys else np.zeros(0, np.uint64)
        submit_write(self, unit, write_unit,
                     self.out_dir / shard_name(unit), chunks, self.dtype, self.density_dtype, source_docs, keys)

    def written(self, unit: int, entry: dict) -> None:
        self.entries[unit] = entry
        self.result.written.append(entry["file"])
        self.result.tokens_written += entry["n_tokens"]

    def write_record(self, seconds: float) -> None:
        self.result.seconds = seconds
        record = {"part": self.part, "parts": self.n_parts, "split": self.split, "docs_per_shard": self.D,
                  "n_shards": self.result.n_units, "source_docs": self.result.source_docs,
                  "undecodable_docs": self.result.stats.undecodable, "density_dtype": self.density_dtype,
                  "shards": [self.entries[u] for u in sorted(self.entries)]}
        atomic_write_bytes(self.out_dir / part_file(self.part, self.n_parts), json.dumps(record, indent=1).encode())


def build_parts(cfg: DataConfig, shard_dir: Path, tokenizer: Tokenizer, docs_per_unit: dict[str, int],
                part: int = 0, n_parts: int = 1, workers: int = 1, progress: bool = True,
                density: dict | None = None, removed: dict[str, np.ndarray] | None = None) -> list[PartResult]:
    """Write the shards of both splits that belong to `part` in one pass over the source, then each
    split's part record; returns what was written and what was kept from an earlier run.
    `density` (data.density as a dict, None = off): the workers annotate each chunk after tokenizing
    it and the shards get a density column of dtype density["dtype"]. `removed` (data.filter): per split,
    the provenance keys of the documents to skip (dedup.find_removed)."""
    t0 = time.monotonic()
    stats = SourceStats()
    pending: deque = deque()
    max_inflight = max(2, INFLIGHT_PER_WORKER * workers)
    drain_to = max_inflight  # a pool: keep its queue full
    if workers <= 1:  # in process: read INLINE_BATCH chunks, then tokenize them all (see InlineExecutor)
        max_inflight, drain_to = INLINE_BATCH, 0
    desc = "tokens" if n_parts == 1 else f"part {part}/{n_parts} tokens"
    density_dtype = density["dtype"] if density is not None else None
    with make_executor(workers, tokenizer, shard_dir, density, pin=cfg.build_pin_workers) as pool, \
            _shard_writer(pool) as writer, \
            tqdm(desc=desc, unit="tok", unit_scale=True, disable=not progress) as bar:
        splits = {s: _SplitBuild(s, shard_dir / s, docs_per_unit[s], part, n_parts, tokenizer.vocab_size, stats, bar,
                                 density_dtype) for s in docs_per_unit}

        # `pending` holds (future, what to do with its result) in submission order: chunks to tokenize,
        # and shards to write. Consuming it in order keeps the shard assembly deterministic; the writes
        # run beside the parent's reading (see _shard_writer).
        def drain(limit: int, to: int | None = None) -> None:
            if len(pending) <= limit:
                return
            while len(pending) > (limit if to is None else to):
                fut, then = pending.popleft()
                then(None if fut is None else fut.result())

        def submit_write(sb: _SplitBuild, unit: int, fn, *args) -> None:
            pending.append((writer.submit(fn, *args), lambda entry: sb.written(unit, entry)))

        def submit(sb: _SplitBuild, unit: int, texts: list[str], last: bool, source_docs: int = 0) -> None:
            fut = None
            if texts:  # packed only when they cross to another process
                payload = texts if isinstance(pool, InlineExecutor) else pack_texts(texts)
                fut = pool.submit(encode_annotate_chunk, payload, cfg.max_doc_tokens, cfg.long_docs)
            pending.append((fut, lambda enc: sb.receive(unit, enc, last, source_docs, submit_write)))
            drain(max_inflight, drain_to)
            bar.set_postfix(shards=sum(len(b.result.written) for b in splits.values()), refresh=False)

        for split, texts, keys in iter_text_runs(cfg, stats, with_keys=True):
            if removed is not None and len(removed[split]):
                keep = ~np.isin(keys, removed[split])
                if not keep.all():
                    texts, keys = list(itertools.compress(texts, keep.tolist())), keys[keep]
            splits[split].add(texts, submit, keys)
        for sb in splits.values():
            sb.finish(submit)
        drain(0)
    for sb in splits.values():
        sb.write_record(time.monotonic() - t0)
    return [sb.result for sb in splits.values()]


def _shard_writer(pool):
    """Where shards are assembled, compressed, hashed and written: with worker processes, one thread of
    this process, which already holds the shard's token ids (numpy, zstd, hashlib and file writes
    release the GIL, so it runs beside the reading); sending them to a worker cost a second trip
    through a pipe. In process (1 worker): the executor itself."""
    if isinstance(pool, InlineExecutor):
        return contextlib.nullcontext(pool)
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-writer")


def write_unit(path: Path, chunks: list[tuple], dtype: np.dtype, density_dtype: str | None,
               source_docs: int, keys: np.ndarray | None = None) -> dict:
    """Assemble, compress, checksum and atomically write one shard from its encoded chunks; returns its
    index entry (a task of _shard_writer). `keys`: each source document's provenance key
    (sources.KEY_BITS), repeated for the pieces a long document was split into: the `source` column."""
    flats = [c[0] for c in chunks]
    flat = np.concatenate(flats) if flats else np.zeros(0, dtype)
    lengths = np.concatenate([c[1] for c in chunks]) if flats else np.zeros(0, np.int64)
    density = None
    if density_dtype is not None:
        density = np.concatenate([c[3] for c in chunks]) if flats else np.zeros(0, np.float32)
    source = None
    if keys is not None:
        pieces = [c[4] if c[4] is not None else np.ones(len(c[1]), np.int64) for c in chunks]
        source = np.repeat(keys, np.concatenate(pieces)) if pieces else keys
    columns = shard_columns(flat, lengths, dtype, density, density_dtype or "float16", source)
    return write_shard(path, columns, stats={"source_docs": source_docs, "long_docs": sum(c[2] for c in chunks)})


def recorded_entries(split_dir: Path) -> dict[int, dict]:
    """Shard number -> its entry (size, sha256) as recorded by an earlier run: the split's part records
    and its index.json. A shard kept from an earlier run must match it (a flipped byte is not
    re-checksummed into a new record)."""
    out: dict[int, dict] = {}
    for path in [*sorted(split_dir.glob("part-*-of-*.json")), split_dir / INDEX_FILE]:
        try:
            entries = json.loads(path.read_text())["shards"]
        except (OSError, ValueError, KeyError, TypeError):
            continue  # absent or unreadable: the merge names an unreadable part record
        for entry in entries:
            out.setdefault(int(entry["file"].removeprefix("shard-").split(".")[0]), entry)
    return out


def _check_source_docs(path: Path, entry: dict, source_docs: int) -> dict:
    """The entry of a kept shard; it must cover the same source documents."""
    if entry.get("source_docs") != source_docs:
        raise ShardFormatError(
            f"{path} was built from {entry.get('source_docs')} source documents, but that range of the source "
            f"now holds {source_docs}: the source changed since the interrupted build. Delete {path.parent.parent} "
            "and build again"
        )
    return entry
