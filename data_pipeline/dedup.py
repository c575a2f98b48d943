"""Build-time document filters (data.filter): quality bounds, exact and near-duplicate removal, and
no validation document that also occurs in train.

Why a pass of its own, in the preparation step: whether a document is a duplicate depends on the
whole source (a validation document's train copy may come later in the files), and every `--part`
must drop the same documents or the shard ranges would disagree. `find_removed` reads the source
once and returns the provenance keys (sources.KEY_BITS) of the documents to drop per split; the
build saves them (`filter.npz`, checksummed in build.json) and the shard pass skips them.

Rules, in order, each document counted under the first that removes it:
- too_short / too_long: fewer than min_chars / more than max_chars characters;
- nonprintable: share of characters that are neither printable nor whitespace above max_nonprintable;
- exact: equal, after lower-casing and collapsing whitespace, to an earlier kept document of its split;
- near: (train) estimated Jaccard similarity of word shingles >= near_dedup_threshold to an earlier
  kept train document (MinHash LSH, datasketch; seeded, so the same documents go every time). It keeps
  num_perm x 8 bytes per kept train document in memory (1 KiB at 128: 10 GiB for 10M documents);
  exact dedup keeps 16 bytes per document;
- val_in_train: a val document equal to (exact) or, with near dedup on, near a kept train document.
The shard-size plan and the density statistics (unigram/tfidf counts) are computed on the unfiltered
source: a few percent of duplicates barely moves either.
"""

from __future__ import annotations

import hashlib
from collections import Counter

import numpy as np

from common.fsutil import atomic_write_bytes
from data_pipeline.config import DataConfig, FilterConfig
from data_pipeline.sources import iter_text_runs

FILTER_FILE = "filter.npz"
RULES = ("too_short", "too_long", "nonprintable", "exact", "near", "val_in_train")


def is_active(f: FilterConfig) -> bool:
    return (f.exact_dedup or f.near_dedup_threshold > 0 or f.min_chars > 0 or f.max_chars > 0
            or f.max_nonprintable < 1.0)


def filter_problems(f: FilterConfig) -> list[str]:
    out = []
    if not 0.0 <= f.near_dedup_threshold <= 1.0:
        out.append(f"data.filter.near_dedup_threshold={f.near_dedup_threshold}: must be in [0, 1] (0 = off)")
    if not 0.0 <= f.max_nonprintable <= 1.0:
        out.append(f"data.filter.max_nonprintable={f.max_nonprintable}: must be in [0, 1] (1 = off)")
    for key in ("num_perm", "shingle_words"):
        if getattr(f, key) < 1:
            out.append(f"data.filter.{key}={getattr(f, key)}: must be >= 1")
    for key in ("min_chars", "max_chars"):
        if getattr(f, key) < 0:
            out.append(f"data.filter.{key}={getattr(f, key)}: must be >= 0 (0 = no bound)")
    return out


def normalise(text: str) -> str:
    return " ".join(text.lower().split())


def _quality(text: str, f: FilterConfig) -> str | None:
    if f.min_chars and len(text) < f.min_chars:
        return "too_short"
    if f.max_chars and len(text) > f.max_chars:
        return "too_long"
    if f.max_nonprintable < 1.0 and text:
        bad = sum(1 for c in text if not (c.isprintable() or c.isspace()))
        if bad / len(text) > f.max_nonprintable:
            return "nonprintable"
    return None


_SEED_MINHASH: dict[int, object] = {}  # num_perm -> a MinHash whose permutations every document reuses


def _minhash(text: str, f: FilterConfig):
    from datasketch import MinHash

    words = normalise(text).split()
    n = f.shingle_words
    shingles = {" ".join(words[i:i + n]).encode() for i in range(max(1, len(words) - n + 1))}
    seed = _SEED_MINHASH.get(f.num_perm)
    if seed is None:
        seed = _SEED_MINHASH[f.num_perm] = MinHash(num_perm=f.num_perm, seed=1)
    # the shared permutations: drawing them per document was ~3/4 of the cost
    m = MinHash(num_perm=f.num_perm, seed=1, permutations=seed.permutations, scheme=seed.scheme)
    m.update_batch(list(shingles))
    return m


def find_removed(cfg: DataConfig) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """(split -> sorted provenance keys of the documents to drop, count per rule)."""
    f = cfg.filter
    counts: Counter = Counter({r: 0 for r in RULES})
    removed: dict[str, list[int]] = {"train": [], "val": []}
    seen: dict[str, set[bytes]] = {"train": set(), "val": set()}
    lsh = None
    if f.near_dedup_threshold > 0:
        from datasketch import MinHashLSH

        # bands tuned for recall (a missed pair stays in the data); candidates are then confirmed by
        # their estimated Jaccard similarity, so the extra false candidates cost a comparison, not a document
        lsh = MinHashLSH(threshold=f.near_dedup_threshold, num_perm=f.num_perm, weights=(0.1, 0.9))
    kept_sigs: list[np.ndarray] = []  # MinHash values of the kept train documents (num_perm x 8 bytes each)

    def near(mh) -> bool:
        return any(float(np.mean(kept_sigs[int(c)] == mh.hashvalues)) >= f.near_dedup_threshold
                   for c in lsh.query(mh))

    val_pending: list[tuple[int, bytes, object]] = []  # decided once every train document is known
    for split, texts, keys in iter_text_runs(cfg, with_keys=True):
        for text, key in zip(texts, keys.tolist(), strict=True):
            rule = _quality(text, f)
            digest = hashlib.blake2b(normalise(text).encode(), digest_size=16).digest()
            if rule is None and f.exact_dedup:
                if digest in seen[split]:
                    rule = "exact"
                seen[split].add(digest)
            mh = None
            if rule is None and lsh is not None:
                mh = _minhash(text, f)
                if split == "train":
                    if near(mh):
                        rule = "near"
                    else:
                        lsh.insert(str(len(kept_sigs)), mh)
                        kept_sigs.append(mh.hashvalues.copy())
            if rule is not None:
                counts[rule] += 1
                removed[split].append(key)
            elif split == "val":
                val_pending.append((key, digest, mh))
    for key, digest, mh in val_pending:
        if (f.exact_dedup and digest in seen["train"]) or (mh is not None and near(mh)):
            counts["val_in_train"] += 1
            removed["val"].append(key)
    return {s: np.unique(np.asarray(v, dtype=np.uint64)) for s, v in removed.items()}, dict(counts)


def save_removed(path, removed: dict[str, np.ndarray]) -> None:
    import io

    buf = io.BytesIO()
    np.savez(buf, **removed)
    atomic_write_bytes(path, buf.getvalue())


def load_removed(path) -> dict[str, np.ndarray]:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}
