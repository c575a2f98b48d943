"""The first pass of the unigram/tfidf annotators: token counts and document frequencies of the
train split, tokenized in the build's worker processes, stored as `density_stats.npz` in the
dataset directory (before build.json, so every part of a parallel build finds them). A build step
(it runs encode's workers), so it sits beside encode.py, outside the density package that encode uses."""

from __future__ import annotations

import logging
from collections import deque
from pathlib import Path

import numpy as np

from data_pipeline import encode
from data_pipeline.density.annotators import STATS_FILE, chunk_counts, save_stats
from data_pipeline.encode import make_executor
from data_pipeline.sources import iter_text_runs

log = logging.getLogger(__name__)

CHUNK_DOCS = 2000


def count_chunk(texts, max_doc_tokens: int = 0, long_docs: str = "split", tokenizer=None):
    """(counts [V], doc_freq [V], number of stored documents) of a chunk of train documents."""
    tok = tokenizer if tokenizer is not None else encode._worker_tokenizer
    flat, lengths, _ = encode.encode_chunk(texts, max_doc_tokens, long_docs, tokenizer=tok)
    counts, df = chunk_counts(flat, lengths, tok.vocab_size)
    return counts, df, len(lengths)


def collect_stats(cfg, tokenizer, shard_dir: Path, workers: int = 1) -> Path:
    """Count the train split (deterministic: integer sums) and write `shard_dir/density_stats.npz`."""
    path = Path(shard_dir) / STATS_FILE
    V = tokenizer.vocab_size
    counts, df, n_docs = np.zeros(V, np.int64), np.zeros(V, np.int64), 0
    pending: deque = deque()

    def take(fut) -> None:
        nonlocal counts, df, n_docs
        c, d, n = fut.result()
        counts += c
        df += d
        n_docs += n

    buf: list[str] = []
    with make_executor(workers, tokenizer, shard_dir, pin=cfg.build_pin_workers) as pool:
        def flush() -> None:
            pending.append(pool.submit(count_chunk, list(buf), cfg.max_doc_tokens, cfg.long_docs))
            buf.clear()
            while len(pending) > 3 * max(1, workers):
                take(pending.popleft())

        for split, texts in iter_text_runs(cfg):
            if split != "train":
                continue
            buf.extend(texts)
            if len(buf) >= CHUNK_DOCS:
                flush()
        if buf:
            flush()
        while pending:
            take(pending.popleft())
    save_stats(path, counts, df, n_docs)
    log.info("density first pass: %d train documents, %d tokens -> %s", n_docs, int(counts.sum()), path)
    return path
