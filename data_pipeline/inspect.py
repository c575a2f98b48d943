"""`python -m data_pipeline.inspect DIR [--verify | --show N]`: what a shard build holds, whether it is intact,
and any one document with its tokens, density scores and source (file and line, or dataset and row).

DIR is a build directory (with train/ and val/) or one split directory (with index.json). The
summary reads the index and the tokens (docs, tokens, shards, bytes, compression ratio, the most
frequent tokens decoded with the build's tokenizer, the density histogram when there is one).
`--verify` checksums and decodes every shard against index.json and names each missing or corrupt
one; on a build directory also every split its build.json names (a lost index.json is a problem,
not a skipped split) and the tokenizer and density-statistics files against their recorded sha256;
it exits 1 if anything is wrong; it is the check to run after copying shards between clusters.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from data_pipeline.build import BUILD_FILE, verify_build
from data_pipeline.shards import INDEX_FILE, ShardFormatError, ShardReader
from data_pipeline.sources import KEY_BITS
from data_pipeline.tokenizer import TOKENIZER_FILE, Tokenizer, TokenizerError, load_tokenizer

log = logging.getLogger(__name__)


def split_dirs(directory: Path) -> list[Path]:
    if (directory / INDEX_FILE).is_file():
        return [directory]
    found = sorted(p.parent for p in directory.glob(f"*/{INDEX_FILE}"))
    if not found:
        raise ShardFormatError(f"{directory}: no {INDEX_FILE} here or in a subdirectory; not a (complete) shard build")
    return found


def find_tokenizer(split_dir: Path) -> Tokenizer | None:
    for d in (split_dir, split_dir.parent):
        if (d / TOKENIZER_FILE).is_file():
            try:
                return load_tokenizer(d)
            except TokenizerError as e:
                log.warning("cannot load the tokenizer: %s", e)
    return None


def describe_split(split_dir: Path, top_k: int = 20, progress: bool = True) -> str:
    reader = ShardReader(split_dir)
    idx = reader.index
    stored = sum(s["bytes"] for s in idx["shards"])
    raw = sum(s.get("raw_bytes", 0) for s in idx["shards"])
    lines = [f"{split_dir}: {idx['total_docs']:,} docs, {idx['total_tokens']:,} tokens, {len(idx['shards'])} shards, "
             f"{stored:,} bytes on disk, compression {raw / stored if stored else 0:.2f}x "
             f"({idx['token_dtype']}, vocab {idx['vocab_size']}, format {idx['format_version']})"]
    long_docs = sum(s.get("long_docs", 0) for s in idx["shards"])
    if long_docs:
        lines.append(f"  documents over data.max_doc_tokens (split or truncated): {long_docs:,}")
    counts = np.zeros(reader.vocab_size, dtype=np.int64)
    doc_lens = []
    dens_hist = np.zeros(10, dtype=np.int64)
    for k in tqdm(range(reader.num_shards), desc=f"reading {split_dir.name}", disable=not progress):
        data = reader.load_shard(k, with_density=idx.get("has_density", False))
        counts += np.bincount(data.tokens, minlength=reader.vocab_size)
        doc_lens.append(np.diff(data.doc_offsets.astype(np.int64)))
        if data.density is not None:
            dens_hist += np.histogram(data.density.astype(np.float32), bins=10, range=(0.0, 1.0))[0]
    lens = np.concatenate(doc_lens) if doc_lens else np.zeros(0)
    if len(lens):
        lines.append(f"  tokens per doc: mean {lens.mean():.1f}, median {np.median(lens):.0f}, max {lens.max()}")
    tok = find_tokenizer(split_dir)
    total = max(1, int(counts.sum()))
    lines.append(f"  top {top_k} tokens" + ("" if tok else " (no tokenizer found: ids only)") + ":")
    for i in np.argsort(-counts, kind="stable")[:top_k]:
        if counts[i] == 0:
            break
        sp = getattr(tok, "sp", None)  # sentencepiece: show the piece ("▁the"), not its decoded text
        piece = repr(sp.id_to_piece(int(i)) if sp is not None else tok.decode([int(i)])) if tok else ""
        lines.append(f"    {int(i):>7} {piece:<20} {counts[i]:>12,} {100 * counts[i] / total:6.2f}%")
    if idx.get("has_density"):
        lines.append("  density histogram (10 bins over [0, 1]): " + " ".join(f"{c:,}" for c in dens_hist))
    return "\n".join(lines)


def verify_split(split_dir: Path) -> list[str]:
    """One line per problem: unreadable index, or each missing/corrupt shard by name."""
    try:
        reader = ShardReader(split_dir)
    except ShardFormatError as e:
        return [str(e)]
    return [f"{split_dir / file}: {why}" for file, why in reader.problems()]


def document_provenance(build_dir: Path, split: str, n: int) -> dict:
    """Document `n` of a split of a build: its text, tokens, density scores (or None) and where it came
    from (the shards' `source` column, with the file list of build.json): `file` and `line` (1-based;
    a parquet row is 0-based) for local sources, and `source`, a sentence saying it."""
    import json

    build_dir = Path(build_dir)
    reader = ShardReader(build_dir / split)
    if not 0 <= n < reader.num_docs:
        raise IndexError(f"{split} has {reader.num_docs} documents; document {n} does not exist")
    k = int(np.searchsorted(reader._first_doc, n, side="right")) - 1
    j = n - int(reader._first_doc[k])
    sf = reader.shard(k)
    lo, hi = (int(x) for x in sf.read("doc_offsets", j, j + 2))
    tokens = sf.read("tokens", lo, hi)
    density = None
    if "density" in sf.columns:
        raw = sf.read("density", lo, hi)
        density = raw.astype(np.float32) / (255.0 if raw.dtype == np.uint8 else 1.0)  # uint8: quantised
    tok = find_tokenizer(build_dir / split)
    out = {"split": split, "n": n, "shard": reader.shards[k]["file"], "index_in_shard": j, "tokens": tokens,
           "density": density, "text": tok.decode(tokens.tolist()) if tok else None, "file": None, "line": None,
           "source": "unknown (built before provenance was recorded)"}
    if "source" not in sf.columns:
        return out
    key = int(sf.read("source", j, j + 1)[0])
    index, where = key >> KEY_BITS, key & ((1 << KEY_BITS) - 1)
    plan_path = build_dir / BUILD_FILE
    plan = json.loads(plan_path.read_text()) if plan_path.is_file() else {}
    names = plan.get("source_files") or []
    fields = plan.get("fields", {})
    source = fields.get("source", "")
    if source.startswith("task:"):
        out["source"] = f"{source} {split} document {where}"
    elif source.startswith("hf:"):
        hf_split = fields.get("train_split" if split == "train" else "val_split")
        out["source"] = f"{source} split {hf_split} row {where}"
    else:
        name = names[index] if index < len(names) else f"file #{index}"
        out["file"], out["line"] = name, where
        out["source"] = f"{name} {'row' if name.endswith('.parquet') else 'line'} {where}"
    return out


def show_document(build_dir: Path, split: str, n: int) -> str:
    p = document_provenance(build_dir, split, n)
    lines = [f"{split} document {n} ({p['shard']}, document {p['index_in_shard']} of it): {len(p['tokens'])} tokens",
             f"  source:  {p['source']}",
             f"  text:    {p['text']!r}" if p["text"] is not None else "  text:    (no tokenizer found)",
             f"  tokens:  {p['tokens'].tolist()}"]
    if p["density"] is not None:
        lines.append("  density: [" + ", ".join(f"{x:.3f}" for x in p["density"]) + "]")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_pipeline.inspect", description=__doc__.split("\n\n")[0])
    parser.add_argument("dir", type=Path, help="a build directory (train/ val/) or a split directory (index.json)")
    parser.add_argument("--verify", action="store_true",
                        help="checksum and decode every shard against index.json; exit 1 naming each bad one")
    parser.add_argument("--show", type=int, metavar="N",
                        help="print document N of the split (--split) with its tokens, density scores and source "
                             "(file and line, or dataset and row)")
    parser.add_argument("--split", default="train", help="with --show: train (default) or val")
    parser.add_argument("--top-k", type=int, default=20, help="most frequent tokens to show (default 20)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    is_build = (args.dir / BUILD_FILE).is_file()
    if args.show is not None:
        build_dir = args.dir if not (args.dir / INDEX_FILE).is_file() else args.dir.parent
        split = args.split if not (args.dir / INDEX_FILE).is_file() else args.dir.name
        try:
            print(show_document(build_dir, split, args.show))
        except (ShardFormatError, IndexError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        return 0
    try:
        dirs = split_dirs(args.dir)
    except ShardFormatError as e:
        if not (args.verify and is_build):
            print(f"error: {e}", file=sys.stderr)
            return 2
        dirs = []
    if args.verify:
        # a build directory: every split its build.json names, and the tokenizer/statistics files
        problems = verify_build(args.dir) if is_build else []
        problems += [p for d in dirs for p in verify_split(d)]
        for p in problems:
            print(f"BAD {p}")
        if problems:
            print(f"verify: {len(problems)} problem(s) in {args.dir}")
            return 1
        print(f"verify: ok, every shard of {', '.join(d.name for d in dirs)} matches its index"
              + (f"; the prepared files match {BUILD_FILE}" if is_build else ""))
        return 0
    try:
        for d in dirs:
            print(describe_split(d, args.top_k, progress=not args.no_progress))
    except ShardFormatError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
