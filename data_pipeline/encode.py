"""Tokenizing a chunk of documents into flat token ids + lengths, in the build's worker processes.

Why flat arrays: a worker hands back one numpy buffer and one length vector per chunk instead of
a list of Python lists, so the parent process unpickles a few MB of bytes, not millions of ints,
and stays free to read the source while the workers tokenize (and write the shards: units.write_unit).
The texts travel the other way as one string where they can (`pack_texts`), for the same reason.
The long-document policy is applied here too, so it runs in parallel.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_all_start_methods, get_context
from pathlib import Path

import numpy as np

from data_pipeline.density import annotate, build_annotator
from data_pipeline.shards import token_dtype
from data_pipeline.tokenizer import Tokenizer, load_tokenizer

LONG_DOC_POLICIES = ("split", "truncate")
ENCODE_SLICE = 256  # documents handed to the tokenizer per call (see encode_chunk)

_worker_tokenizer: Tokenizer | None = None  # set once per worker process by `_init_worker`
_worker_density: dict | None = None  # the build's data.density settings (as a dict), set by `_init_worker`
_worker_annotator = None  # built on first use in each worker (the model annotator loads a checkpoint)


def encode_chunk(texts: Sequence[str], max_doc_tokens: int = 0, long_docs: str = "split",
                 tokenizer: Tokenizer | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    """(flat token ids, per-document lengths, number of documents over the limit) of `texts`."""
    tok = tokenizer if tokenizer is not None else _worker_tokenizer
    if tok is None:
        raise RuntimeError("encode_chunk needs a tokenizer (none given, and this is not a build worker)")
    flats, all_lengths = [], []
    # A slice of documents at a time: a tokenizer may return Python ints (~32 bytes per token), and a
    # whole chunk's worth (~5 MB) left the cache and, freed at once, went back to the OS, so a worker
    # page-faulted it in again for every chunk (~10% more CPU, mostly in the workers).
    for start in range(0, len(texts), ENCODE_SLICE):
        flat, lengths = tok.encode_flat(texts[start:start + ENCODE_SLICE])
        flats.append(flat)
        all_lengths.append(lengths)
    if len(flats) == 1:
        flat, lengths = flats[0], all_lengths[0]
    else:
        flat = np.concatenate(flats) if flats else np.zeros(0, token_dtype(tok.vocab_size))
        lengths = np.concatenate(all_lengths) if all_lengths else np.zeros(0, np.int64)
    return limit_documents(flat, lengths, max_doc_tokens, long_docs)


def pack_texts(texts: list[str]) -> list[str] | str:
    """A chunk as sent to a worker process: one newline-joined string when no text holds a newline
    (pickled as one block instead of one object per document, about half the transfer's CPU on
    sentence corpora), else the list itself. `unpack_texts` inverts it."""
    joined = "\n".join(texts)
    return joined if joined.count("\n") == len(texts) - 1 else texts


def unpack_texts(texts: Sequence[str] | str) -> Sequence[str]:
    return texts.split("\n") if isinstance(texts, str) else texts


def encode_annotate_chunk(texts: Sequence[str] | str, max_doc_tokens: int = 0, long_docs: str = "split",
                          tokenizer: Tokenizer | None = None, annotator=None, density: dict | None = None
                          ) -> tuple[np.ndarray, np.ndarray, int, np.ndarray | None, np.ndarray | None]:
    """`encode_chunk` plus the per-token density of the configured annotator (None without one) and
    the number of stored pieces of each document (None when every document is one piece; for
    provenance): the build's worker task (`texts` may come packed by `pack_texts`). The density is
    computed on the stored pieces (after data.max_doc_tokens), so each is normalised on its own."""
    flat, lengths, _ = encode_chunk(unpack_texts(texts), 0, long_docs, tokenizer=tokenizer)
    pieces = None
    if max_doc_tokens > 0 and long_docs == "split" and len(lengths) and int(lengths.max()) > max_doc_tokens:
        pieces = np.maximum(1, -(-lengths // max_doc_tokens))
    flat, lengths, n_long = limit_documents(flat, lengths, max_doc_tokens, long_docs)
    dens = density if density is not None else _worker_density
    if annotator is None and dens is not None:
        annotator = _get_worker_annotator(tokenizer)
    if annotator is None:
        return flat, lengths, n_long, None, pieces
    prompt_id = None
    if dens.get("prompt_separator"):  # trained on responses: density over each document's response only
        tok = tokenizer if tokenizer is not None else _worker_tokenizer
        ids = tok.encode(dens["prompt_separator"])
        if len(ids) != 1:
            raise ValueError(f"data.prompt_separator {dens['prompt_separator']!r} encodes to {len(ids)} tokens "
                             f"{ids}; it must be one token")
        prompt_id = int(ids[0])
    d = annotate(annotator, flat, lengths, dens["view"], dens["hub_fraction"], prompt_id=prompt_id)
    return flat, lengths, n_long, d, pieces


def _get_worker_annotator(tokenizer: Tokenizer | None):
    global _worker_annotator
    if _worker_annotator is None and _worker_density is not None:
        from types import SimpleNamespace

        tok = tokenizer if tokenizer is not None else _worker_tokenizer
        _worker_annotator = build_annotator(SimpleNamespace(**_worker_density), tok, _worker_dir)
    return _worker_annotator


_worker_dir: str | None = None


def limit_documents(flat: np.ndarray, lengths: np.ndarray, max_tokens: int,
                    policy: str) -> tuple[np.ndarray, np.ndarray, int]:
    """Split documents longer than `max_tokens` into consecutive pieces, or truncate them."""
    if policy not in LONG_DOC_POLICIES:
        raise ValueError(f"data.long_docs={policy!r}: expected one of {LONG_DOC_POLICIES}")
    if max_tokens <= 0 or not len(lengths) or int(lengths.max()) <= max_tokens:
        return flat, lengths, 0
    n_long = int((lengths > max_tokens).sum())
    if policy == "truncate":
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        pos = np.arange(len(flat)) - np.repeat(starts, lengths)
        return flat[pos < max_tokens], np.minimum(lengths, max_tokens), n_long
    pieces = np.maximum(1, -(-lengths // max_tokens))  # an empty document stays one empty piece
    doc_len = np.repeat(lengths, pieces)
    first = np.repeat(np.cumsum(pieces) - pieces, pieces)
    k = np.arange(int(pieces.sum())) - first  # piece number inside its document
    return flat, np.minimum(max_tokens, doc_len - k * max_tokens), n_long


def _init_worker(tokenizer_dir: str, density: dict | None = None, pin_counter=None) -> None:
    global _worker_tokenizer, _worker_density, _worker_dir, _worker_annotator
    if pin_counter is not None:
        _pin_to_own_cpu(pin_counter)
    _worker_tokenizer = load_tokenizer(tokenizer_dir)
    _worker_density, _worker_dir, _worker_annotator = density, tokenizer_dir, None


class InlineExecutor:
    """The 1-worker case: tokenize in this process (no pickling, no second process competing).

    Tasks run when their result is asked for, not when submitted, so the build can read many
    chunks and then tokenize them back to back (units.INLINE_BATCH): alternating reading and
    tokenizing chunk by chunk made tokenizing ~25% slower (bench_build).
    """

    def __init__(self, tokenizer: Tokenizer, annotator=None, density: dict | None = None):
        self.tokenizer, self.annotator, self.density = tokenizer, annotator, density

    def submit(self, fn, *args) -> _Deferred:
        # what a worker process holds as globals, handed to the task functions that take it
        params = inspect.signature(fn).parameters
        held = {"tokenizer": self.tokenizer, "annotator": self.annotator, "density": self.density}
        return _Deferred(fn, args, {k: v for k, v in held.items() if k in params})

    def __enter__(self) -> InlineExecutor:
        return self

    def __exit__(self, *_) -> None:
        pass


class _Deferred:
    """A task of InlineExecutor: runs once, on the first `result()`."""

    def __init__(self, fn, args: tuple, kwargs: dict):
        self._call: tuple | None = (fn, args, kwargs)
        self._value = None

    def result(self):
        if self._call is not None:
            fn, args, kwargs = self._call
            self._call = None  # drops the arguments (a chunk's texts) once used
            self._value = fn(*args, **kwargs)
        return self._value


def default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))  # the cores this process may use (Slurm/cgroup aware)
    except AttributeError:
        return os.cpu_count() or 1


def _pin_to_own_cpu(counter) -> None:
    """Bind this worker to the next CPU of the ones it may use (the k-th worker to the k-th CPU)."""
    with counter.get_lock():
        k = counter.value
        counter.value += 1
    cpus = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cpus[k % len(cpus)]})


def pins_workers(workers: int, pin: bool) -> bool:
    """Whether a pool of `workers` gets one CPU each: asked for, and no more workers than CPUs (with more,
    two would share a CPU while another idles) on a system that can pin (Linux)."""
    return pin and workers > 1 and hasattr(os, "sched_setaffinity") and workers <= default_workers()


def make_executor(workers: int, tokenizer: Tokenizer, tokenizer_dir: Path, density: dict | None = None,
                  pin: bool = False):
    """`workers` tokenizing processes (each loads the saved tokenizer once, and builds the density
    annotator of `density` (data.density as a dict; None = no annotation) on first use), or
    in-process for 1. `pin` (data.build_pin_workers): each worker is bound to its own CPU; see
    `pins_workers` for when that applies.

    Why pin: on the 2-core CI-class VM, Linux often left two busy unpinned tokenizing processes
    time-sharing one core while the other idled (seconds at a time; bare sentencepiece in two forked
    processes ran 1.05-1.9x of one process unpinned, 1.8-1.9x pinned), and a migrated worker
    refills its caches. Pinned, the 2-worker build ran ~7% faster (bench_build)."""
    if workers <= 1:
        annotator = None
        if density is not None:
            from types import SimpleNamespace

            annotator = build_annotator(SimpleNamespace(**density), tokenizer, tokenizer_dir)
        return InlineExecutor(tokenizer, annotator, density)
    # fork where it exists: workers start in milliseconds instead of re-importing numpy/sentencepiece
    ctx = get_context("fork") if "fork" in get_all_start_methods() else get_context()
    counter = ctx.Value("i", 0) if pins_workers(workers, pin) else None
    return ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker,
                               initargs=(str(tokenizer_dir), density, counter))
