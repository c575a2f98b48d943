"""One split's epoch order and its packed rows: the half of the streaming loader that knows shards,
documents and packing (data_pipeline.stream adds ranks, workers, mixtures and resume state).

The epoch order is a pure function of (index.json, seed, epoch, packing, seq_len, window), never of
the number of ranks or workers, so any consumer can compute any sample without talking to others:
1. shards in a permutation seeded by (seed, epoch);
2. documents inside each shard in a permutation seeded by (seed, epoch, shard) (`pad`; `wrap` only
   with `wrap_doc_shuffle`, else in storage order);
3. the resulting samples (`pad`: one per document; `wrap`: the `[BOS] doc [EOS]` stream of the whole
   epoch cut into `seq_len` chunks, the tail shorter than `seq_len` dropped) are grouped in windows
   of `window` consecutive samples and each window is permuted, seeded by (seed, epoch, window).
`wrap` rows are MDLM's by default: each shard's documents stay in storage order, so a row holds
the same tokens every epoch (up to the rows that straddle a shard boundary, which move with the
shard order) and only the order of the rows is shuffled; no per-epoch work touches the tokens.
`wrap_doc_shuffle=True` shuffles the documents before cutting, so the rows themselves differ
between epochs, at the cost of one gather of every token per epoch (~2 ns/token here).
Step 3 is the bounded shuffle buffer: it mixes samples across shard boundaries and, in `wrap` mode,
separates the consecutive chunks of one document, while memory stays bounded by the shards that
overlap the current window (or the caller's request, if larger), decoded lazily and dropped once
passed, plus a fixed-size cache of decoded shards (`cache_bytes`), never by the dataset.
Sample counts come from index.json alone (`wrap`: a shard contributes n_tokens + 2 n_docs stream
tokens whatever its document order), so where a sample lives is known before any shard is read.

Packing, per row of `seq_len` tokens:
- `pad` (MDLM LM1B): `[BOS] doc [EOS] PAD...`; a document longer than seq_len - 2 keeps its first
  seq_len - 1 tokens and loses its EOS; loss_mask is False on padding only.
- `wrap` (BD3-LM): a window onto the concatenated stream; loss_mask is all True.
The optional per-token `density` column follows its tokens; BOS, EOS and PAD get density 0.

Speed (see FORMAT.md, "Reading speed"): rows are contiguous slices, so the hot path copies whole
rows out of per-shard arrays (a strided "sliding window" view indexed by row start) instead of
gathering token by token. A shard is decoded once into an epoch-independent layout (`wrap`: every
document already framed as `[BOS] doc [EOS]`; `pad`: the tokens followed by seq_len - 1 pads, so a
row's body is one slice even for the last document) and kept in a small LRU cache across epochs
(small datasets loop many epochs; a large one simply misses); `wrap` rows are then copied straight
out of it, and only `wrap_doc_shuffle` pays one vectorised gather per shard and epoch for its
document order. Callers should ask for many rows per call
(data_pipeline.stream asks for a chunk of batches): the per-call numpy overhead is fixed.

A shard that fails its checksum raises CorruptShardError naming the file. With `skip_corrupt=True`
its rows are emitted as padding with an all-False loss_mask instead (so the order, the batch shapes
and the resume position stay exactly those of the intact data), counted in `skipped_rows` and
logged once per shard and process.
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_pipeline.remote import AHEAD
from data_pipeline.shards import CorruptShardError, ShardData, ShardFormatError, ShardReader

log = logging.getLogger(__name__)

PACKINGS = ("pad", "wrap")
# Decoded shards kept across epochs per process (each dataloader worker has its own): a dataset
# that fits is decompressed once per run instead of once per epoch.
CACHE_BYTES = 128 << 20


@dataclass
class Rows:
    """Packed rows: ids [n, L] (id_dtype), loss_mask bool [n, L], density float16 [n, L] or None."""

    ids: np.ndarray
    mask: np.ndarray
    density: np.ndarray | None

    @staticmethod
    def allocate(n: int, seq_len: int, id_dtype: np.dtype, has_density: bool, out: Rows | None = None) -> Rows:
        """Room for n rows: fresh arrays, or the first n rows of `out` (a caller's buffer)."""
        if out is None:
            return Rows(np.empty((n, seq_len), dtype=id_dtype), np.empty((n, seq_len), dtype=bool),
                        np.empty((n, seq_len), dtype=np.float16) if has_density else None)
        return Rows(out.ids[:n], out.mask[:n], out.density[:n] if has_density else None)


@dataclass
class _Columns:
    """A shard decoded once, in storage order, laid out so that any row is one slice (any epoch).

    `ext`: wrap: `[BOS] doc [EOS]` of every document back to back; pad: the tokens, then seq_len - 1
    pad ids. Document j is ext[starts[j]:starts[j + 1]] (wrap: with its BOS and EOS). `density`
    is aligned with `ext` (0 on BOS/EOS/pad).
    """

    ext: np.ndarray
    density: np.ndarray | None
    starts: np.ndarray  # int64 [n_docs + 1]
    # pad: _windows(ext, seq_len - 1), a row body at each start; wrap: _windows(ext, seq_len), a row
    # at each start (the rows of an epoch whose documents stay in storage order)
    body_view: np.ndarray | None = None
    density_view: np.ndarray | None = None

    @property
    def nbytes(self) -> int:
        return self.ext.nbytes + self.starts.nbytes + (self.density.nbytes if self.density is not None else 0)


@dataclass
class _Shard:
    """A shard in one epoch's document order (cols None: corrupt and skipped)."""

    cols: _Columns | None
    doc_order: np.ndarray | None  # None: storage order
    stream: np.ndarray | None = None  # wrap: [BOS] doc [EOS] ... in doc_order
    stream_density: np.ndarray | None = None
    rows_view: np.ndarray | None = None  # wrap: [len(stream) - L + 1, L] window view (row at each start)
    density_view: np.ndarray | None = None


class SplitSamples:
    """Random access, by epoch-order position, to the packed samples of one split directory."""

    def __init__(self, split_dir: str | Path, seq_len: int, packing: str = "pad", pad_id: int = 0, bos_id: int = 1,
                 eos_id: int = 2, seed: int = 0, shuffle: bool = True, window: int = 1024,
                 tokenizer_fingerprint: str | None = None, skip_corrupt: bool = False,
                 cache_bytes: int = CACHE_BYTES, wrap_doc_shuffle: bool = False):
        if packing not in PACKINGS:
            raise ValueError(f"packing must be one of {PACKINGS}, got {packing!r}")
        if seq_len < 2:
            raise ValueError(f"seq_len must be at least 2 (room for BOS and EOS), got {seq_len}")
        self.reader = ShardReader(split_dir)
        index = self.reader.index
        if tokenizer_fingerprint is not None and index["tokenizer_fingerprint"] != tokenizer_fingerprint:
            raise ShardFormatError(
                f"{self.reader.dir} was built with tokenizer {index['tokenizer_fingerprint']}, but this run uses "
                f"{tokenizer_fingerprint}: token ids would mean different things; rebuild it with the run's tokenizer"
            )
        self.dir = self.reader.dir
        self.seq_len, self.packing = seq_len, packing
        self.pad_id, self.bos_id, self.eos_id = pad_id, bos_id, eos_id
        self.seed, self.shuffle = seed, shuffle
        self.wrap_doc_shuffle = bool(wrap_doc_shuffle)
        self.window = max(1, int(window)) if shuffle else 1
        self.skip_corrupt = skip_corrupt
        self.cache_bytes = int(cache_bytes)
        self.has_density = bool(index.get("has_density", False))
        # Rows stay compact (uint16 for vocabularies up to 65536) until the training process widens
        # them to int64: a quarter of the bytes to move from dataloader workers.
        top = max(int(index["vocab_size"]) - 1, pad_id, bos_id, eos_id)
        self.id_dtype = np.dtype(np.uint16) if top < 1 << 16 else np.dtype(np.int32)
        shards = index["shards"]
        self._n_docs = np.array([s["n_docs"] for s in shards], dtype=np.int64)
        n_tok = np.array([s["n_tokens"] for s in shards], dtype=np.int64)
        # Units of the per-shard bounds: documents (pad) or stream tokens (wrap).
        self._units = self._n_docs if packing == "pad" else n_tok + 2 * self._n_docs
        total = int(self._units.sum())
        self.samples_per_epoch = total if packing == "pad" else total // seq_len
        if self.samples_per_epoch == 0:
            raise ValueError(f"{self.dir}: no {packing} samples of length {seq_len} "
                             f"({index['total_docs']} documents, {index['total_tokens']} tokens)")
        self.fingerprint = hashlib.sha256("".join(s["sha256"] for s in shards).encode()).hexdigest()[:16]
        self.skipped_rows = 0
        self._reset_caches()

    def _reset_caches(self) -> None:
        self._plans: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._perms: dict[tuple[int, int], np.ndarray] = {}
        self._shards: dict[tuple[int, int], _Shard] = {}
        self._decoded: OrderedDict[int, _Columns] = OrderedDict()  # LRU, at most cache_bytes
        self._reported: set[int] = set()

    def __getstate__(self) -> dict:
        # Dataloader workers get a copy: send the index-derived plan, not decoded shards.
        state = dict(self.__dict__)
        for k in ("_plans", "_perms", "_shards", "_decoded", "_reported"):
            state.pop(k)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._reset_caches()

    # -- the epoch order ------------------------------------------------------------------------

    def _plan(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(shard at each position, cumulative unit bounds by position) of an epoch."""
        if epoch not in self._plans:
            n = len(self._units)
            order = np.random.default_rng([self.seed, epoch, 0]).permutation(n) if self.shuffle else np.arange(n)
            bounds = np.zeros(n + 1, dtype=np.int64)
            np.cumsum(self._units[order], out=bounds[1:])
            self._plans = {e: p for e, p in self._plans.items() if e >= epoch - 1}
            self._plans[epoch] = (order, bounds)
        return self._plans[epoch]

    def _unshuffle(self, epoch: int, q: np.ndarray) -> np.ndarray:
        """Shuffled position q in the epoch -> sample index in shard/document order (window permutation)."""
        if self.window <= 1:
            return q
        S = self.window
        lo, hi = int(q.min()) // S, int(q.max()) // S
        if lo == hi:  # one window
            return lo * S + self._perm(epoch, lo)[q - lo * S]
        # consecutive windows (only an epoch's last may be short): their permutations, offset to
        # epoch positions and concatenated, map q - lo * S in one gather
        perms = np.concatenate([wi * S + self._perm(epoch, wi) for wi in range(lo, hi + 1)])
        return perms[q - lo * S]

    def _perm(self, epoch: int, wi: int) -> np.ndarray:
        key = (epoch, wi)
        if key not in self._perms:
            S, N = self.window, self.samples_per_epoch
            self._perms[key] = np.random.default_rng([self.seed, epoch, 2, wi]).permutation(min(S, N - wi * S))
        return self._perms[key]

    # -- decoded shards -------------------------------------------------------------------------

    def _columns(self, k: int) -> _Columns:
        """Shard k decoded into its row-friendly layout, from the cache or the file."""
        cols = self._decoded.get(k)
        if cols is not None:
            self._decoded.move_to_end(k)
            return cols
        data = self.reader.load_shard(k, with_density=self.has_density)
        if data.n_docs != self._n_docs[k]:
            raise ShardFormatError(f"{self.dir}: shard {k} ({self.reader.index['shards'][k]['file']}) holds "
                                   f"{data.n_docs} documents, index.json says {self._n_docs[k]}; rebuild the split")
        cols = self._layout(data)
        if cols.nbytes <= self.cache_bytes:
            self._decoded[k] = cols
            used = sum(c.nbytes for c in self._decoded.values())
            while used > self.cache_bytes:
                used -= self._decoded.popitem(last=False)[1].nbytes
        return cols

    def _layout(self, data: ShardData) -> _Columns:
        tokens, n_docs = data.tokens, data.n_docs
        offsets = data.doc_offsets.astype(np.int64)
        dens = data.density
        n = len(tokens)
        if self.packing == "pad":
            # the tokens and seq_len - 1 pads: a row body of seq_len - 1 items is a slice for every document
            tail = self.seq_len - 1
            ext = np.empty(n + tail, dtype=self.id_dtype)
            ext[:n], ext[n:] = tokens, self.pad_id
            ext_d = None
            if dens is not None:
                ext_d = np.zeros(n + tail, dtype=np.float16)
                ext_d[:n] = dens
            return _Columns(ext, ext_d, offsets, _windows(ext, tail), _windows(ext_d, tail))
        # wrap: `[BOS] doc [EOS]` per document, so an epoch's stream is a gather of whole segments
        starts = offsets + 2 * np.arange(n_docs + 1, dtype=np.int64)
        body = np.ones(n + 2 * n_docs, dtype=bool)
        body[starts[:-1]] = False
        body[starts[1:] - 1] = False
        ext = np.empty(n + 2 * n_docs, dtype=self.id_dtype)
        ext[starts[:-1]] = self.bos_id
        ext[starts[1:] - 1] = self.eos_id
        ext[body] = tokens
        ext_d = None
        if dens is not None:
            ext_d = np.zeros(len(ext), dtype=np.float16)
            ext_d[body] = dens
        return _Columns(ext, ext_d, starts, _windows(ext, self.seq_len), _windows(ext_d, self.seq_len))

    def _shard(self, epoch: int, pos: int) -> _Shard:
        key = (epoch, pos)
        if key in self._shards:
            return self._shards[key]
        order, _ = self._plan(epoch)
        k = int(order[pos])
        if self.reader.remote is not None:  # download the next shards of the order while this one decodes
            self.reader.prefetch(order[pos + 1:pos + 1 + AHEAD])
        try:
            cols = self._columns(k)
        except CorruptShardError as e:
            if not self.skip_corrupt:
                raise
            if k not in self._reported:
                self._reported.add(k)
                log.warning("skipping corrupt shard %s (data.skip_corrupt_shards is on): %s",
                            self.reader.index["shards"][k]["file"], e)
            shard = _Shard(None, None)
        else:
            n_docs = len(cols.starts) - 1
            shuffled = self.shuffle and (self.packing == "pad" or self.wrap_doc_shuffle)
            doc_order = np.random.default_rng([self.seed, epoch, 1, k]).permutation(n_docs) if shuffled else None
            shard = _Shard(cols, doc_order)
            if self.packing == "wrap" and shuffled:
                shard.stream, shard.stream_density = _wrap_stream(cols, doc_order)
                shard.rows_view = _windows(shard.stream, self.seq_len)
                shard.density_view = _windows(shard.stream_density, self.seq_len)
            elif self.packing == "wrap":  # storage order: the decoded layout is the stream
                shard.stream, shard.stream_density = cols.ext, cols.density
                shard.rows_view, shard.density_view = cols.body_view, cols.density_view
        self._shards[key] = shard
        return shard

    def _evict_before(self, epoch: int, window: int) -> None:
        """Drop the window permutations and epoch shards before shuffle window `window` of `epoch`:
        a consumer's requests only move forward."""
        self._perms = {k: v for k, v in self._perms.items() if k >= (epoch, window)}
        if not self._shards:
            return
        unit = window * self.window * (1 if self.packing == "pad" else self.seq_len)  # documents or stream tokens
        bounds = self._plan(epoch)[1]
        self._shards = {(e, p): s for (e, p), s in self._shards.items() if e > epoch or (e == epoch and bounds[p + 1] > unit)}

    # -- rows ---------------------------------------------------------------------------------

    def rows(self, k: np.ndarray, out: Rows | None = None) -> Rows:
        """Rows for source-local sample numbers k (epoch * samples_per_epoch + shuffled position).
        `out`: arrays with at least len(k) rows to write into (their first len(k) rows are returned).

        Callers ask with non-decreasing k over time (each consumer walks forward), which is what
        lets shards before the current window be dropped. Ask for many rows at once: the cost of a
        call is a few dozen numpy operations plus the copying.
        """
        k = np.asarray(k, dtype=np.int64)
        n, L = len(k), self.seq_len
        room = Rows.allocate(n, L, self.id_dtype, self.has_density, out)
        ids, mask, dens = room.ids, room.mask, room.density
        if not n:
            return Rows(ids, mask, dens)
        N = self.samples_per_epoch
        epochs = k // N
        e_lo, e_hi = int(epochs.min()), int(epochs.max())
        for e in range(e_lo, e_hi + 1):
            # sel: the output rows of this epoch; a slice when it is all of them, so a single-shard
            # request writes straight into the output instead of through a fancy-index copy
            sel = np.flatnonzero(epochs == e) if e_lo != e_hi else slice(0, n)
            q = k[sel] - e * N
            if not len(q):
                continue
            first_window = int(q.min()) // self.window
            self._evict_before(e, first_window)
            s = self._unshuffle(e, q)
            if self.packing == "pad":
                self._pad_rows(e, s, sel, ids, mask, dens)
            else:
                self._wrap_rows(e, s, sel, ids, mask, dens)
        return Rows(ids, mask, dens)

    def _groups(self, bounds: np.ndarray, first: np.ndarray):
        """(shard position, indices into `first`) for each shard position present in `first`."""
        lo, hi = int(first.min()), int(first.max())
        if lo == hi:
            yield lo, None  # None: all of them
            return
        for p in range(lo, hi + 1):
            m = np.flatnonzero(first == p)
            if len(m):
                yield p, m

    def _pad_rows(self, epoch, s, sel, ids, mask, dens) -> None:
        _, bounds = self._plan(epoch)
        L = self.seq_len
        pos = np.searchsorted(bounds, s, side="right") - 1
        col = np.arange(L)
        for p, m in self._groups(bounds, pos):
            rows = sel if m is None else _index(sel, len(s))[m]
            shard = self._shard(epoch, p)
            if shard.cols is None:
                self.skipped_rows += len(s) if m is None else len(m)
                ids[rows], mask[rows] = self.pad_id, False
                if dens is not None:
                    dens[rows] = 0
                continue
            d = (s if m is None else s[m]) - bounds[p]
            if shard.doc_order is not None:
                d = shard.doc_order[d]
            starts = shard.cols.starts[d]
            lens = shard.cols.starts[d + 1] - starts
            past = col > lens[:, None]  # positions after the body (col 0 is BOS, col i body token i-1)
            direct = isinstance(rows, slice)  # write into the output itself, else into a block copied after
            block = ids[rows] if direct else np.empty((len(lens), L), dtype=self.id_dtype)
            block[:, 0] = self.bos_id
            block[:, 1:] = shard.cols.body_view[starts]  # first L-1 tokens on
            np.putmask(block, past, self.pad_id)
            has_eos = np.flatnonzero(lens + 2 <= L)
            block[has_eos, lens[has_eos] + 1] = self.eos_id
            mblock = mask[rows] if direct else np.empty((len(lens), L), dtype=bool)
            np.less(col, np.minimum(lens + 2, L)[:, None], out=mblock)
            if not direct:
                ids[rows], mask[rows] = block, mblock
            if dens is not None:
                if shard.cols.density is None:
                    dens[rows] = 0
                    continue
                dblock = dens[rows] if direct else np.empty((len(lens), L), dtype=np.float16)
                dblock[:, 0] = 0
                dblock[:, 1:] = shard.cols.density_view[starts]
                np.putmask(dblock, past, 0)
                if not direct:
                    dens[rows] = dblock

    def _wrap_rows(self, epoch, s, sel, ids, mask, dens) -> None:
        _, bounds = self._plan(epoch)
        L = self.seq_len
        t0 = s * L  # first position of each row in the epoch's token stream
        first = np.searchsorted(bounds, t0, side="right") - 1
        last = np.searchsorted(bounds, t0 + (L - 1), side="right") - 1
        inside = first == last
        whole = bool(inside.all())
        # rows inside one shard (nearly all): one row copy each out of the shard's stream
        for p, m in self._groups(bounds, first if whole else np.where(inside, first, -1)):
            if p < 0:
                continue
            if m is None:
                rows, start = sel, t0 - bounds[p]
            else:
                rows, start = _index(sel, len(s))[m], t0[m] - bounds[p]
            shard = self._shard(epoch, p)
            if shard.stream is None:
                self.skipped_rows += len(start)
                ids[rows], mask[rows] = self.pad_id, False
                if dens is not None:
                    dens[rows] = 0
                continue
            ids[rows] = shard.rows_view[start]
            mask[rows] = True
            if dens is not None:
                dens[rows] = shard.density_view[start] if shard.density_view is not None else 0
        if whole:
            return
        # rows that straddle shard boundaries (at most one per boundary), token by token
        sel, t0, first, last = _index(sel, len(s))[~inside], t0[~inside], first[~inside], last[~inside]
        ids[sel], mask[sel] = self.pad_id, False
        if dens is not None:
            dens[sel] = 0
        t = t0[:, None] + np.arange(L)
        for p in range(int(first.min()), int(last.max()) + 1):  # a row may span several small shards
            rows_local = np.flatnonzero((first <= p) & (last >= p))
            if not len(rows_local) or bounds[p + 1] == bounds[p]:
                continue
            shard = self._shard(epoch, p)
            tt = t[rows_local] - bounds[p]
            ok = (tt >= 0) & (tt < bounds[p + 1] - bounds[p])
            if shard.stream is None:
                self.skipped_rows += int((ok.any(axis=1)).sum())
                continue
            rows = sel[rows_local]
            src = np.where(ok, tt, 0)
            ids[rows] = np.where(ok, shard.stream[src], ids[rows])
            mask[rows] |= ok
            if dens is not None and shard.stream_density is not None:
                dens[rows] = np.where(ok, shard.stream_density[src], dens[rows])


def _index(sel: slice | np.ndarray, n: int) -> np.ndarray:
    """Row selection as an index array (rows() passes a slice when one epoch covers the request)."""
    return np.arange(n)[sel] if isinstance(sel, slice) else sel


def _wrap_stream(cols: _Columns, order: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """The shard's `[BOS] doc [EOS]` segments in the epoch's document order, concatenated.

    Two ways, both in blocks (bounded temporaries whatever the shard size), picked by the mean
    segment length: long segments are copied whole (bytes.join over memoryview slices: ~0.1 us
    per segment plus memcpy); short ones by one gather with an int64 index (position + the
    segment's source start - its destination start; numpy converts narrower index arrays to intp
    first, which costs more than it saves), whose cost is per token.
    """
    starts = cols.starts[:-1][order]
    seg = cols.starts[1:][order] - starts
    ends = np.cumsum(seg)
    total = int(ends[-1]) if len(ends) else 0
    stream = np.empty(total, dtype=cols.ext.dtype)
    dens = np.empty(total, dtype=np.float16) if cols.density is not None else None
    by_segment = len(seg) and total >= JOIN_MIN_TOKENS * len(seg)
    step = JOIN_BLOCK_DOCS if by_segment else None
    # document blocks: JOIN_BLOCK_DOCS documents, or cut after the document reaching each STREAM_BLOCK tokens
    cuts = (range(step, len(seg), step) if step else
            np.searchsorted(ends, np.arange(STREAM_BLOCK, total, STREAM_BLOCK), side="left") + 1)
    lo = 0
    for hi in [*cuts, len(seg)]:
        if hi <= lo:  # repeated cut: a document longer than a block
            continue
        a = int(ends[lo - 1]) if lo else 0
        b = int(ends[hi - 1])
        if by_segment:
            first, last = starts[lo:hi].tolist(), (starts[lo:hi] + seg[lo:hi]).tolist()
            _join_into(stream[a:b], cols.ext, first, last)
            if dens is not None:
                _join_into(dens[a:b], cols.density, first, last)
        else:
            src = np.repeat(starts[lo:hi] - (ends[lo:hi] - seg[lo:hi]) + a, seg[lo:hi])
            src += _iota(b - a)
            cols.ext.take(src, out=stream[a:b])
            if dens is not None:
                cols.density.take(src, out=dens[a:b])
        lo = hi
    return stream, dens


def _join_into(out: np.ndarray, a: np.ndarray, first: list[int], last: list[int]) -> None:
    """out = concatenation of a[first[i]:last[i]], copied as whole segments."""
    mv = memoryview(a)
    out[:] = np.frombuffer(b"".join([mv[i:j] for i, j in zip(first, last, strict=True)]), dtype=a.dtype)


STREAM_BLOCK = 65536  # tokens per index gather block
JOIN_MIN_TOKENS = 48  # mean segment length from which copying whole segments beats the gather
JOIN_BLOCK_DOCS = 512  # segments per bytes.join
def _windows(a: np.ndarray | None, n: int) -> np.ndarray | None:
    """Read-only [len(a) - n + 1, n] view whose row i is a[i:i + n]: indexing it by row starts
    copies whole rows (memcpy-like) instead of gathering token by token."""
    if a is None or len(a) < n:
        return None if a is None else np.empty((0, n), dtype=a.dtype)
    return np.lib.stride_tricks.as_strided(a, (len(a) - n + 1, n), (a.itemsize, a.itemsize), writeable=False)


_IOTA = np.arange(STREAM_BLOCK * 2, dtype=np.intp)


def _iota(n: int) -> np.ndarray:
    """arange(n) without allocating it each time (read-only, shared)."""
    global _IOTA
    if n > len(_IOTA):
        _IOTA = np.arange(n, dtype=np.intp)
    return _IOTA[:n]
