"""Streaming loader: batches for one data-parallel rank, with exact and elastic resume.

One global sample order, the same for every world size and worker count, is the whole design:
- Each split has an epoch order (data_pipeline.packing: seeded shard order, document order and a
  bounded window shuffle, then `pad` or `wrap` packing). A split's samples form an endless
  source-local sequence k = epoch * samples_per_epoch + position.
- Several splits (a mixture) interleave by a seeded schedule: blocks of MIX_BLOCK global samples,
  each holding a fixed count per source proportional to its weight, in a seeded order. Global
  sample g is then the k-th sample of source i, where k counts i's slots before g. One source: k = g.
- Global sample g goes to data-parallel rank g % dp_size. A rank's j-th sample after the resume
  point G0 is g = G0 + j * dp_size + dp_rank; its batch b holds j in [b*B, (b+1)*B).
- Dataloader workers split a rank's stream by whole chunks of `chunk_batches()` batches (worker
  c % num_workers builds chunk c into a shared-memory slot and sends the slot's number, see
  _SlotRing), and torch's DataLoader returns workers' items round-robin, so the rank sees the same
  batches in the same order with 0, 1 or N workers; each worker prefetches `prefetch_factor`
  chunks. A chunk's rows are computed in one call to the packing layer and widened to the
  trainer's dtypes in one conversion (the cost per call is fixed, so one call per batch would
  dominate); its batches are views of that chunk's fresh tensors.
Ranks and workers never coordinate: each computes its own rows from index.json and the shards it
needs (consumers decode the shards their windows touch, so every rank decodes the shards of the
whole epoch but materializes only its own rows; zstd decoding is cheap next to a training step).

Resume state (`TrainLoader.state_dict()`): plain ints/strings/lists, independent of world size:
the dataset fingerprints, seed, packing, seq_len, window, wrap_doc_shuffle, mixture weights and
`consumed`, the number of global samples the run has consumed (start + batches * batch_size *
dp_size; every rank of a step has taken the same number of batches, so every rank reports the same
state).
Guarantees on `load_state_dict`:
- same dp_size and batch size: the next batches equal those of an uninterrupted run, bit for bit,
  with any number of workers (the state counts batches the trainer took, not batches prefetched);
- another dp_size (or batch size): global samples [0, consumed) count as seen and every later
  sample goes to exactly one new rank, so within each epoch no sample is seen twice or skipped;
- another dataset (fingerprint), seed, packing, seq_len, window, wrap_doc_shuffle or mixture: an
  error, since the position would mean different samples.
An infinite stream runs on across epochs (a batch may straddle an epoch boundary), so ranks never
get uneven batch counts; the validation stream is one finite, unshuffled pass whose ranks may
differ by one batch.
"""

from __future__ import annotations

import copy
import itertools
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_pipeline import remote
from data_pipeline.config import DataConfig
from data_pipeline.packing import CACHE_BYTES, PACKINGS, Rows, SplitSamples
from data_pipeline.shards import INDEX_FILE, CorruptShardError, ShardFormatError, ShardReader, repair_hint
from data_pipeline.tasks import get_task

if TYPE_CHECKING:
    from data_pipeline.build import DatasetInfo

log = logging.getLogger(__name__)

__all__ = ["PACKINGS", "ShardStream", "TrainLoader", "ValLoader", "make_train_loader", "make_val_loader"]

STATE_VERSION = 2
MIX_BLOCK = 1024  # global samples per mixture block: weights are exact to 1/MIX_BLOCK per block
CHUNK_TOKENS = 1 << 20  # tokens of rows computed per call to the packing layer (see chunk_batches)
CHUNK_MAX_BATCHES = 128

Batch = dict[str, torch.Tensor]


class Mixture:
    """Global sample g -> (source, source-local k); the same schedule for every rank and worker."""

    def __init__(self, weights: Sequence[float], seed: int):
        w = np.asarray(weights, dtype=np.float64)
        if w.ndim != 1 or not len(w) or not np.all(np.isfinite(w)) or np.any(w <= 0):
            raise ValueError(f"mixture weights must be positive numbers, got {list(weights)}")
        self.n, self.seed = len(w), seed
        share = w / w.sum() * MIX_BLOCK
        counts = np.maximum(np.floor(share).astype(np.int64), 1)
        while counts.sum() < MIX_BLOCK:  # largest remainder
            counts[np.argmax(share - counts)] += 1
        while counts.sum() > MIX_BLOCK:
            counts[np.argmax(np.where(counts > 1, counts - share, -np.inf))] -= 1
        self.counts = counts
        self._blocks: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def _block(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        """(source of each slot, its occurrence number among that source's slots) in block b."""
        if b not in self._blocks:
            labels = np.random.default_rng([self.seed, 3, b]).permutation(np.repeat(np.arange(self.n), self.counts))
            occ = np.empty(MIX_BLOCK, dtype=np.int64)
            for i in range(self.n):
                occ[labels == i] = np.arange(self.counts[i])
            self._blocks = {k: v for k, v in self._blocks.items() if k >= b - 1}
            self._blocks[b] = (labels, occ)
        return self._blocks[b]

    def assign(self, g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.n == 1:
            return np.zeros(len(g), dtype=np.int64), g
        src, k = np.empty_like(g), np.empty_like(g)
        blocks, pos = g // MIX_BLOCK, g % MIX_BLOCK
        for b in np.unique(blocks):
            sel = blocks == b
            labels, occ = self._block(int(b))
            src[sel] = labels[pos[sel]]
            k[sel] = b * self.counts[src[sel]] + occ[pos[sel]]
        return src, k

    def consumed_per_source(self, consumed: int) -> list[int]:
        """How many samples of each source global samples [0, consumed) hold."""
        b, r = divmod(int(consumed), MIX_BLOCK)
        labels = self._block(b)[0][:r] if self.n > 1 else np.zeros(r, dtype=np.int64)
        return [int(b * self.counts[i] + np.count_nonzero(labels == i)) for i in range(self.n)]


class ShardStream(IterableDataset):
    """Batches `{"input_ids": Long[B, L], "loss_mask": Bool[B, L], ("density": Float[B, L])}` of one rank.

    `split_dirs`: one split directory or several (a mixture, with `weights`). `start` is the global
    sample position to begin at (what resume sets). Works as is (num_workers=0) or inside a
    torch DataLoader with `batch_size=None` and any number of workers. `cache_bytes`: decoded
    shards kept across epochs per source and process (data_pipeline.packing.CACHE_BYTES).
    """

    def __init__(self, split_dirs: str | Path | Sequence[str | Path], seq_len: int, packing: str = "pad",
                 pad_id: int = 0, bos_id: int = 1, eos_id: int = 2, *, batch_size: int, seed: int = 0,
                 shuffle: bool = True, infinite: bool = True, dp_rank: int = 0, dp_size: int = 1,
                 shuffle_buffer: int = 1024, weights: Sequence[float] | None = None,
                 tokenizer_fingerprint: str | None = None, skip_corrupt_shards: bool = False, start: int = 0,
                 cache_bytes: int = CACHE_BYTES, wrap_doc_shuffle: bool = False):
        dirs = [split_dirs] if isinstance(split_dirs, (str, Path)) else list(split_dirs)
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} is outside [0, dp_size={dp_size})")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not infinite and len(dirs) > 1:
            raise ValueError("a finite (validation) stream reads one split, not a mixture")
        self.sources = [SplitSamples(d, seq_len, packing, pad_id, bos_id, eos_id, seed=seed, shuffle=shuffle,
                                     window=shuffle_buffer, tokenizer_fingerprint=tokenizer_fingerprint,
                                     skip_corrupt=skip_corrupt_shards, cache_bytes=cache_bytes,
                                     wrap_doc_shuffle=wrap_doc_shuffle) for d in dirs]
        self.weights = [float(w) for w in (weights if weights is not None else [1.0] * len(dirs))]
        if len(self.weights) != len(dirs):
            raise ValueError(f"{len(dirs)} split directories but {len(self.weights)} weights")
        self.mixture = Mixture(self.weights, seed)
        self.seq_len, self.packing, self.pad_id = seq_len, packing, pad_id
        self.seed, self.shuffle, self.infinite = seed, shuffle, infinite
        self.wrap_doc_shuffle = bool(wrap_doc_shuffle)
        self.shuffle_buffer = self.sources[0].window
        self.batch_size, self.dp_rank, self.dp_size = batch_size, dp_rank, dp_size
        self.start = int(start)
        self.ring: _SlotRing | None = None  # set on the copy DataLoader workers run (see _loader)
        self.prompt_separator_id: int | None = None  # set by make_*_loader for data.train_on = response
        dens = [s.has_density for s in self.sources]
        self.has_density = all(dens)
        if any(dens) and not all(dens):
            log.warning("only some mixture sources have a density column: batches carry no density")

    @property
    def skipped_rows(self) -> int:
        """Rows of corrupt shards emitted fully masked in this process (skip_corrupt_shards)."""
        return sum(s.skipped_rows for s in self.sources)

    def global_indices(self, b: int) -> np.ndarray:
        """Global sample numbers of this rank's batch b after `start` (cut at the end when finite)."""
        j = b * self.batch_size + np.arange(self.batch_size, dtype=np.int64)
        g = self.start + j * self.dp_size + self.dp_rank
        return g if self.infinite else g[g < self.sources[0].samples_per_epoch]

    def numpy_batch(self, g: np.ndarray, out: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """Compact rows of global samples g (ids uint16/int32, density float16): what workers send.
        `out`: arrays with at least len(g) rows to write into (a worker's shared-memory slot)."""
        src, k = self.mixture.assign(g)
        into = None if out is None else Rows(out["input_ids"], out["loss_mask"], out.get("density"))
        if len(self.sources) == 1:
            rows = self.sources[0].rows(k, into)
        else:
            rows = Rows.allocate(len(g), self.seq_len, self.id_dtype, self.has_density, into)
            for i, source in enumerate(self.sources):
                sel = np.flatnonzero(src == i)
                if len(sel):
                    part = source.rows(k[sel])
                    rows.ids[sel], rows.mask[sel] = part.ids, part.mask
                    if rows.density is not None:
                        rows.density[sel] = part.density
        batch = {"input_ids": rows.ids, "loss_mask": rows.mask}
        if self.has_density:
            batch["density"] = rows.density
        return batch

    def batch(self, g: np.ndarray) -> Batch:
        return widen(self.numpy_batch(g))

    def chunk_batches(self) -> int:
        """Batches computed together in one call to the packing layer (whose cost per call is fixed):
        about CHUNK_TOKENS tokens, at least one batch and at most CHUNK_MAX_BATCHES (small batches
        amortise the call by then; more would only delay the first batch). A chunk may span several
        shuffle windows: the decoded shards it needs are those of CHUNK_TOKENS tokens of the order."""
        return max(1, min(CHUNK_MAX_BATCHES, CHUNK_TOKENS // (self.batch_size * self.seq_len)))

    def numpy_chunk(self, batches: Sequence[int], out: dict[str, np.ndarray] | None = None
                    ) -> tuple[dict[str, np.ndarray], list[int]]:
        """Rows of several of this rank's batches at once, and each batch's row count (a finite
        stream's last batches are short or empty). Equal to numpy_batch of each batch, stacked."""
        j = np.asarray(batches, dtype=np.int64)[:, None] * self.batch_size + np.arange(self.batch_size)
        g = (self.start + j * self.dp_size + self.dp_rank).ravel()
        if self.infinite:
            return self.numpy_batch(g, out), [self.batch_size] * len(batches)
        keep = g < self.sources[0].samples_per_epoch  # a prefix: g grows along the chunk
        return self.numpy_batch(g[keep], out), np.count_nonzero(keep.reshape(j.shape), axis=1).tolist()

    @property
    def id_dtype(self) -> np.dtype:
        return np.result_type(*(s.id_dtype for s in self.sources))

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        w, n = (info.id, info.num_workers) if info is not None else (0, 1)
        per = self.chunk_batches()
        if self.ring is not None:
            # a worker owns whole chunks (chunk c = batches [c*per, (c+1)*per), worker c % n), writes
            # each into its next shared-memory slot and sends the slot's number; _loader widens the
            # slots, in order, into batches
            for i, c in enumerate(itertools.count(w, n)):
                slot = i % self.ring.slots
                self.ring.free[w].acquire()  # the training process has widened this slot's last chunk
                rows, sizes = self.numpy_chunk(range(c * per, (c + 1) * per), self.ring.numpy(w, slot))
                if sizes[0]:
                    yield w, slot, sizes, bool(rows["loss_mask"].all())
                else:
                    self.ring.free[w].release()
                if not sizes[-1]:
                    return
        else:
            # items are batches (what torch's round-robin over workers expects of a plain
            # DataLoader): worker w owns batches b % n == w and computes `per` of them at a time
            for b in itertools.count(w, n * per):
                rows, sizes = self.numpy_chunk(range(b, b + n * per, n))
                yield from _split(widen(rows), sizes)
                if not sizes[-1]:
                    return

    def position(self, consumed: int) -> list[dict]:
        """Per source: (epoch, sample in epoch) reached after `consumed` global samples (for logs/state)."""
        return [{"epoch": k // s.samples_per_epoch, "sample_in_epoch": k % s.samples_per_epoch}
                for k, s in zip(self.mixture.consumed_per_source(consumed), self.sources, strict=True)]

    def layout(self) -> dict:
        """What a saved position means: it may only be loaded into a stream with the same layout."""
        return {"seed": self.seed, "packing": self.packing, "seq_len": self.seq_len,
                "shuffle_buffer": self.shuffle_buffer, "weights": list(self.weights),
                "fingerprints": [s.fingerprint for s in self.sources],
                "wrap_doc_shuffle": self.wrap_doc_shuffle if self.packing == "wrap" else None}


def widen(rows: dict[str, np.ndarray], all_true: bool = False) -> Batch:
    """Compact rows in the trainer's dtypes (input_ids int64, loss_mask bool, density float32), in
    fresh tensors: one conversion per chunk, not per batch. `all_true`: the loss mask is known to be
    all True (every wrap row) and is not copied."""
    ids = rows["input_ids"]
    # numpy's astype, not torch's .to(): numpy reuses freed large blocks, while each torch CPU tensor
    # of a few MB is freshly mapped and page-faulted (measured ~4x slower per chunk)
    out = {"input_ids": torch.from_numpy(ids.astype(np.int64)),
           "loss_mask": torch.ones(ids.shape, dtype=torch.bool) if all_true else torch.from_numpy(rows["loss_mask"].copy())}
    if "density" in rows:
        out["density"] = torch.from_numpy(rows["density"].astype(np.float32))
    return out


def _split(chunk: Batch, sizes: Sequence[int]) -> Iterator[Batch]:
    """The non-empty batches of a widened chunk, in order: views of its rows (each chunk's tensors
    are fresh, so a batch shares memory only with the other batches of its chunk, never with a
    buffer that is written again)."""
    sizes = [size for size in sizes if size]  # empty batches come last (a finite stream's end)
    keys = list(chunk)
    for parts in zip(*(chunk[k].split(sizes) for k in keys), strict=True):
        yield dict(zip(keys, parts, strict=True))


class _SlotRing:
    """Shared-memory chunk buffers between dataloader workers and the training process.

    Worker w writes its i-th chunk's compact rows into slot i % slots of its own buffers and sends
    only (w, slot, sizes, all_true); the training process widens the slot into fresh tensors and
    frees it (a semaphore per worker counts free slots, so a slot is never overwritten before it
    was read). Pickling each chunk through the worker's pipe cost ~2 ns/token, more than computing
    it; the buffers are reused, so they are mapped and paged in once per loader, not per chunk.
    Created by the training process before the workers start; they inherit it.
    """

    def __init__(self, workers: int, slots: int, rows: int, seq_len: int, id_dtype: np.dtype, density: bool):
        shape = (workers, slots, rows, seq_len)
        self.slots = slots
        self.ids = torch.empty(shape, dtype=torch.from_numpy(np.empty(0, id_dtype)).dtype).share_memory_()
        self.mask = torch.empty(shape, dtype=torch.bool).share_memory_()
        self.density = torch.empty(shape, dtype=torch.float16).share_memory_() if density else None
        ctx = torch.multiprocessing.get_context()
        self.free = [ctx.Semaphore(slots) for _ in range(workers)]

    def numpy(self, w: int, slot: int) -> dict[str, np.ndarray]:
        out = {"input_ids": self.ids[w, slot].numpy(), "loss_mask": self.mask[w, slot].numpy()}
        if self.density is not None:
            out["density"] = self.density[w, slot].numpy()
        return out

    def take(self, w: int, slot: int, n: int, all_true: bool) -> Batch:
        """Slot (w, slot)'s first n rows, widened into fresh tensors; the slot is free again."""
        rows = {k: v[:n] for k, v in self.numpy(w, slot).items()}
        try:
            return widen(rows, all_true)
        finally:
            self.free[w].release()


def prompt_mask_of(input_ids: torch.Tensor, separator_id: int) -> torch.Tensor:
    """Bool[B, L]: the prompt of each `[BOS] prompt answer [EOS] PAD...` row, i.e. every position up to
    and including the first `separator_id` (BOS included). A row without the separator (a corrupt
    shard's padding row) is all prompt: nothing in it is trained on."""
    is_sep = input_ids == separator_id
    first = torch.where(is_sep.any(dim=1), is_sep.to(torch.uint8).argmax(dim=1),
                        torch.full_like(input_ids[:, 0], input_ids.shape[1] - 1))
    return torch.arange(input_ids.shape[1])[None, :] <= first[:, None]


def with_prompt_mask(batches: Iterator[Batch], separator_id: int | None) -> Iterator[Batch]:
    """Add `prompt_mask` to every batch (data.train_on = response); derived in the training process
    from the separator token, so the shards, the workers' shared-memory slots and the resume state
    are the same whatever is trained on."""
    if separator_id is None:
        return batches
    return ({**b, "prompt_mask": prompt_mask_of(b["input_ids"], separator_id)} for b in batches)


def _loader(dataset: ShardStream, num_workers: int, prefetch_factor: int) -> Iterator[Batch]:
    """Batches in the rank's order (with `prompt_mask` when dataset.prompt_separator_id is set). Workers compute chunks (several batches each: torch's per-item
    cost is ~0.1-0.3 ms) into shared-memory slots (_SlotRing) and send slot numbers; the training
    process widens each chunk once and splits it into batches. `prefetch_factor` counts chunks."""
    if num_workers == 0:
        return with_prompt_mask(iter(dataset), dataset.prompt_separator_id)
    wire = copy.copy(dataset)
    wire.ring = _SlotRing(num_workers, prefetch_factor + 1, dataset.chunk_batches() * dataset.batch_size,
                          dataset.seq_len, dataset.id_dtype, dataset.has_density)
    loader = DataLoader(wire, batch_size=None, num_workers=num_workers, prefetch_factor=prefetch_factor,
                        collate_fn=_as_is, persistent_workers=False)
    ring = wire.ring
    return with_prompt_mask((batch for w, slot, sizes, all_true in loader
                             for batch in _split(ring.take(w, slot, sum(sizes), all_true), sizes)),
                            dataset.prompt_separator_id)


def _as_is(batch):
    return batch


class TrainLoader:
    """Endless batches of one rank with world-size independent resume state (see the module doc)."""

    def __init__(self, dataset: ShardStream, num_workers: int = 0, prefetch_factor: int = 4):
        self.dataset, self.num_workers, self.prefetch_factor = dataset, num_workers, prefetch_factor
        self.batch_size = dataset.batch_size
        self._batches = 0  # batches handed to the trainer since dataset.start
        self._it: Iterator[Batch] | None = None

    @property
    def consumed(self) -> int:
        """Global samples consumed by the run (all ranks) when every rank has taken as many batches."""
        return self.dataset.start + self._batches * self.batch_size * self.dataset.dp_size

    def __iter__(self) -> TrainLoader:
        return self

    def __next__(self) -> Batch:
        if self._it is None:
            self._it = _loader(self.dataset, self.num_workers, self.prefetch_factor)
        batch = next(self._it)
        self._batches += 1
        return batch

    def close(self) -> None:
        """Stop the workers (a new iteration restarts them at the current position)."""
        self.dataset.start, self._batches = self.consumed, 0
        self._it = None  # a DataLoader iterator shuts its workers down when collected

    def state_dict(self) -> dict:
        consumed = self.consumed
        return {"version": STATE_VERSION, "consumed": consumed, **self.dataset.layout(),
                "dp_size": self.dataset.dp_size, "batch_size": self.batch_size,  # informational
                "position": self.dataset.position(consumed)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"data loader state version {state.get('version')!r} is not {STATE_VERSION} "
                             "(a checkpoint from an older loader): its position cannot be mapped onto this order")
        layout = self.dataset.layout()
        state = {**_legacy_layout(state), **state}
        diff = {k: (state.get(k), v) for k, v in layout.items() if state.get(k) != v}
        if diff:
            details = ", ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in diff.items())
            raise ValueError(f"cannot resume the data loader: {details}. The saved position counts samples of "
                             "another order; resume with the same data, seed, packing, seq_len, shuffle_buffer, "
                             "wrap_doc_shuffle and mixture (dp size, batch size and num_workers may change)")
        if state.get("dp_size") != self.dataset.dp_size or state.get("batch_size") != self.batch_size:
            log.info("elastic data resume at global sample %d: dp_size %s -> %d, batch size %s -> %d",
                     state["consumed"], state.get("dp_size"), self.dataset.dp_size, state.get("batch_size"),
                     self.batch_size)
        self._it = None
        self.dataset.start, self._batches = int(state["consumed"]), 0


def _legacy_layout(state: dict) -> dict:
    """Layout keys that states saved before they existed imply: `wrap` rows always shuffled their
    documents each epoch until data.wrap_doc_shuffle (default off) existed."""
    return {"wrap_doc_shuffle": True if state.get("packing") == "wrap" else None}


class ValLoader:
    """A finite, unshuffled pass over the val split; every `iter()` starts at the beginning.

    Ranks may get one batch more or fewer than each other (samples are dealt round-robin):
    sum losses and counts across ranks rather than stepping collectives per batch.
    """

    def __init__(self, dataset: ShardStream, num_workers: int = 0, prefetch_factor: int = 4):
        self.dataset, self.num_workers, self.prefetch_factor = dataset, num_workers, prefetch_factor

    def __iter__(self) -> Iterator[Batch]:
        return _loader(self.dataset, self.num_workers, self.prefetch_factor)


def trains_on_response(data_cfg: DataConfig) -> bool:
    """data.train_on resolved: `auto` is response for task:NAME sources, all otherwise."""
    train_on = getattr(data_cfg, "train_on", "all")
    return train_on == "response" or (train_on == "auto" and data_cfg.source.startswith("task:"))


def prompt_separator_id(data_cfg: DataConfig, info: DatasetInfo) -> int | None:
    """The token id that ends a prompt when training on responses (None: train on every token)."""
    if not trains_on_response(data_cfg):
        return None
    if data_cfg.packing != "pad":
        raise ValueError(f"data.train_on=response needs data.packing=pad (one document per row), not "
                         f"{data_cfg.packing!r}; set data.train_on=all to train on every token")
    text = getattr(data_cfg, "prompt_separator", "")
    if not text:
        if not data_cfg.source.startswith("task:"):
            raise ValueError("data.train_on=response: set data.prompt_separator (the token ending each prompt)")
        text = get_task(data_cfg.source.removeprefix("task:")).separator
    ids = info.tokenizer.encode(text)
    if len(ids) != 1:
        raise ValueError(f"data.prompt_separator {text!r} encodes to {len(ids)} tokens {ids}; it must be one token")
    return int(ids[0])


def _tokenizer_fingerprint(info: DatasetInfo) -> str | None:
    return getattr(getattr(info, "tokenizer", None), "fingerprint", None)


def _train_split(shard_dir: str | Path) -> Path:
    """A mixture entry names a built shard directory (its train/ split) or a split directory."""
    if remote.is_remote(shard_dir):  # a remote build: its local mirror (shards fetched on demand)
        if not remote.is_complete_remote(shard_dir):
            raise ShardFormatError(f"data.mixture entry {shard_dir}: not a complete build (no train/index.json, "
                                   "val/index.json and tokenizer.json there); build it with `python -m data_pipeline.build`")
        shard_dir = remote.mirror_build(shard_dir)
    p = remote.local_path(shard_dir)
    for d in (p / "train", p):
        if (d / INDEX_FILE).is_file():
            return d
    raise ShardFormatError(f"data.mixture entry {shard_dir}: neither {p / 'train' / INDEX_FILE} nor "
                           f"{p / INDEX_FILE} exists; build it with `python -m data_pipeline.build`")


def check_shards_before_training(data_cfg: DataConfig, info: DatasetInfo) -> None:
    """Before the first step: every shard of the train and val splits (and of data.mixture) exists with
    the size its index.json records (a stat per shard), or, with data.verify_shards, decodes and
    matches its sha256 (reads everything once). A bad shard otherwise stops the run only when the
    loader reaches it, or never in a short run. CorruptShardError names every bad one and the
    command that rebuilds them; with data.skip_corrupt_shards the run is told to survive them, so
    they are logged and training goes on (their rows count in train/skipped_rows)."""
    dirs = [Path(info.train_dir), Path(info.val_dir)]
    dirs += [_train_split(e.shard_dir) for e in getattr(data_cfg, "mixture", None) or []]
    full = bool(getattr(data_cfg, "verify_shards", False))
    bad = []
    for d in dirs:
        reader = ShardReader(d)
        if full:
            bad += [f"{d / f}: {why.split(' is corrupt: ')[-1].split('. Rebuild')[0]}" for f, why in reader.problems()]
            continue
        remote_sizes = reader.remote.remote_sizes() if reader.remote is not None else None
        for entry in reader.shards:
            path = d / entry["file"]
            if remote_sizes is not None:  # a remote split: its objects, not the cache (fetched on demand)
                path = f"{reader.remote.url}/{entry['file']}"
                size = remote_sizes.get(entry["file"])
            else:
                size = path.stat().st_size if path.is_file() else None
            if size != entry["bytes"]:
                bad.append(f"{path}: " + ("missing" if size is None else f"{size} bytes, index.json says {entry['bytes']}"))
    if not bad:
        return
    builds = sorted({str(Path(b.split(": ")[0]).parent.parent) for b in bad})
    msg = (f"{len(bad)} bad shard(s) before training: " + "; ".join(bad[:10]) + (" ..." if len(bad) > 10 else "")
           + ". Rebuild them with " + " and ".join(f"`{repair_hint(Path(b))}`" for b in builds))
    if getattr(data_cfg, "skip_corrupt_shards", False):
        log.warning("%s; data.skip_corrupt_shards is on: their rows will be fully masked padding", msg)
        return
    raise CorruptShardError(msg + " (or set data.skip_corrupt_shards=true to train around them)")


def skipped_rows(batches: Sequence[Batch]) -> int:
    """Rows of corrupt shards in these batches: data.skip_corrupt_shards emits them with an all-False
    loss_mask, which no intact row has (pad rows keep BOS/EOS, wrap rows are all True). Counted where
    the trainer receives the batches, so loader workers (each with its own skipped_rows) are included."""
    return int(sum((~b["loss_mask"].any(dim=1)).sum() for b in batches))


def make_train_loader(data_cfg: DataConfig, info: DatasetInfo, batch_size: int, dp_rank: int = 0,
                      dp_size: int = 1, seed: int = 0) -> TrainLoader:
    """Shuffled, endless, resumable batches of the train split (plus data.mixture) for one DP rank.

    dp_rank/dp_size are the data-parallel coordinates from the parallel topology, not the global
    rank: tensor- and pipeline-parallel peers pass the same values and so get the same batches.
    """
    dirs: list[Path] = [Path(info.train_dir)]
    weights = [float(getattr(data_cfg, "main_weight", 1.0))]
    for entry in getattr(data_cfg, "mixture", None) or []:
        dirs.append(_train_split(entry.shard_dir))
        weights.append(float(entry.weight))
    ds = ShardStream(dirs, data_cfg.seq_len, data_cfg.packing, info.pad_id, info.bos_id, info.eos_id,
                     batch_size=batch_size, seed=seed, shuffle=True, infinite=True, dp_rank=dp_rank,
                     dp_size=dp_size, shuffle_buffer=data_cfg.shuffle_buffer, weights=weights,
                     tokenizer_fingerprint=_tokenizer_fingerprint(info),
                     skip_corrupt_shards=getattr(data_cfg, "skip_corrupt_shards", False),
                     wrap_doc_shuffle=getattr(data_cfg, "wrap_doc_shuffle", False))
    ds.prompt_separator_id = prompt_separator_id(data_cfg, info)
    return TrainLoader(ds, num_workers=data_cfg.num_workers, prefetch_factor=getattr(data_cfg, "prefetch_factor", 4))


def make_val_loader(data_cfg: DataConfig, info: DatasetInfo, batch_size: int, dp_rank: int = 0,
                    dp_size: int = 1, num_workers: int = 0) -> ValLoader:
    """Deterministic, unshuffled, finite batches of the val split (last partial batch kept).

    num_workers defaults to 0: evaluation reads a few batches at a time, and starting worker
    processes for each evaluation would cost more than it saves.
    """
    ds = ShardStream(info.val_dir, data_cfg.seq_len, data_cfg.packing, info.pad_id, info.bos_id, info.eos_id,
                     batch_size=batch_size, seed=0, shuffle=False, infinite=False, dp_rank=dp_rank,
                     dp_size=dp_size, shuffle_buffer=1, tokenizer_fingerprint=_tokenizer_fingerprint(info),
                     skip_corrupt_shards=getattr(data_cfg, "skip_corrupt_shards", False))
    ds.prompt_separator_id = prompt_separator_id(data_cfg, info)
    return ValLoader(ds, num_workers=num_workers)
