"""The merge step: once every part of a split is built, write its index.json (once, last).

Why a separate step: parts of a Slurm array finish in any order and on any node; each records its
shards in `part-i-of-K.json`. The merge unions those records (whatever K they were built with: the
shard files do not depend on K), checks that every shard 0..n-1 is there with the recorded size,
and writes `index.json` atomically, which is what marks the split complete for readers.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from common.fsutil import remove_stale_temps
from data_pipeline.shards import ShardFormatError, make_index, shard_name, write_index

log = logging.getLogger(__name__)


class IncompleteBuildError(ShardFormatError):
    """Some parts (shards) of a split are not built yet; the message names them."""


def _the_one_on_disk(split_dir: Path, a: dict, b: dict) -> dict:
    """Two part records disagree about a shard (an older build's record, and the run that rebuilt it,
    e.g. `--repair` with another K or another version): the record the file on disk matches wins."""
    import hashlib

    path = split_dir / a["file"]
    data = path.read_bytes() if path.is_file() else b""
    sha = hashlib.sha256(data).hexdigest()
    matching = [e for e in (a, b) if (e["bytes"], e["sha256"]) == (len(data), sha)]
    if len(matching) != 1:
        raise ShardFormatError(f"{path}: two parts recorded different contents and the file matches "
                               f"{'neither' if not matching else 'both'}; delete the build and start again")
    return matching[0]


def merge_split(split_dir: Path, tokenizer_fingerprint: str, vocab_size: int) -> dict:
    """Write `split_dir/index.json` from its part records; IncompleteBuildError names what is missing."""
    records = []
    for path in sorted(split_dir.glob("part-*-of-*.json")):
        try:
            records.append(json.loads(path.read_text()))
        except ValueError as e:
            raise ShardFormatError(f"{path}: unreadable part record ({e}); rerun that part") from None
    if not records:
        raise IncompleteBuildError(f"{split_dir}: no finished part; run `python -m data_pipeline.build "
                                   "--part i/K` for every i first (or a build without --part)")
    n_shards = {r["n_shards"] for r in records}
    if len(n_shards) != 1:
        raise ShardFormatError(f"{split_dir}: the part records disagree on the number of shards ({sorted(n_shards)}): "
                               "the source changed between parts; delete the build and start again")
    n = n_shards.pop()
    by_unit: dict[int, dict] = {}
    for r in records:
        for entry in r["shards"]:
            unit = int(entry["file"].removeprefix("shard-").split(".")[0])
            if by_unit.setdefault(unit, entry) != entry:
                by_unit[unit] = _the_one_on_disk(split_dir, by_unit[unit], entry)
    missing = [u for u in range(n) if u not in by_unit]
    if missing:
        parts = sorted({(u % r["parts"], r["parts"]) for u in missing for r in records[:1]})
        names = ", ".join(shard_name(u) for u in missing[:10]) + (" ..." if len(missing) > 10 else "")
        raise IncompleteBuildError(
            f"{split_dir}: {len(missing)} of {n} shards are not built yet ({names}); "
            f"unfinished parts: {', '.join(f'{i}/{k}' for i, k in parts)}"
        )
    for u in range(n):
        path = split_dir / shard_name(u)
        if not path.is_file() or path.stat().st_size != by_unit[u]["bytes"]:
            raise ShardFormatError(f"{path}: missing or not the size its part recorded; rerun that part")
    stale = remove_stale_temps(split_dir)  # every writer is done: leftovers of killed runs can go
    if stale:
        log.info("%s: removed %d temp files left by interrupted runs", split_dir, stale)
    density_dtypes = {r.get("density_dtype") for r in records}  # None: no density column
    if len(density_dtypes) != 1:
        raise ShardFormatError(f"{split_dir}: the part records disagree on the density column ({density_dtypes}); "
                               "delete the build and start again")
    index = make_index([by_unit[u] for u in range(n)], tokenizer_fingerprint, vocab_size, density_dtypes.pop())
    write_index(split_dir, index)
    return index
