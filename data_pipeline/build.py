"""Build (or reuse) the tokenized shards of a data config: `ensure_shards(cfg) -> DatasetInfo`.

A shard directory holds `train/` and `val/` splits (see FORMAT.md), the tokenizer that made them
(`tokenizer.json`, plus `tokenizer.model` for sentencepiece) and `build.json` (the settings that
determined the content, and the plan: documents per shard of each split). By default it lives at
`data/shards/<source>-<hash of those settings>`, so changing the source, tokenizer or task settings
builds a new directory instead of reusing a stale one; a directory built with other settings is refused.

Three steps, each safe to repeat and to run concurrently (every file is written atomically and
deterministically, so racing writers write the same bytes):
1. prepare: tokenizer (trained on the source, or loaded), density statistics and plan -> `build.json`
   (`--prepare` alone, once, before K `--part`s: `--slurm K` submits it as a job the parts depend on);
2. shards: `units.build_parts`, one pass over the source, tokenized in parallel worker processes,
   one part of K or all;
   a rerun keeps the shards already written;
3. merge: `merge.merge_split` writes each split's `index.json` once every shard exists.
Documents are stored without BOS/EOS: the streaming loader adds them.

A shard found on disk is kept only if it matches what an earlier run recorded of it (size and sha256 in
the part records / index.json), or, with no record (a killed run's), if every zstd frame decodes with
its content checksum; a damaged one is rebuilt. `--repair` does that for a complete build.

CLI: python -m data_pipeline.build --config FILE [--set data.key=value ...] [--workers N]
     [--prepare | --part i/K | --merge | --repair | --slurm K [--wait] [--dry-run]]
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import itertools
import json
import logging
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from common.config_file import ConfigError
from common.fsutil import TMP_MARK, atomic_write_bytes
from common.plugins import load_plugin
from data_pipeline import density_stats, remote
from data_pipeline.config import DataConfig, load_data_config
from data_pipeline.dedup import (
    FILTER_FILE,
    RULES,
    filter_problems,
    find_removed,
    is_active,
    load_removed,
    save_removed,
)
from data_pipeline.density.annotators import ANNOTATOR_VERSION, STATS_FILE, check_density_config, needs_stats
from data_pipeline.encode import LONG_DOC_POLICIES, default_workers
from data_pipeline.merge import IncompleteBuildError, merge_split
from data_pipeline.shards import INDEX_FILE, ShardFormatError, ShardReader, repair_hint
from data_pipeline.sources import (
    DECODE_MODES,
    TXT_MODES,
    DataSourceError,
    iter_documents,
    source_changes,
    source_fingerprint,
    source_names,
    template_fields,
)
from data_pipeline.stream import trains_on_response
from data_pipeline.tasks import get_task
from data_pipeline.tokenizer import TOKENIZER_FILE, Tokenizer, load_tokenizer, make_tokenizer
from data_pipeline.units import PartResult, build_parts, docs_per_shard

log = logging.getLogger(__name__)

DEFAULT_ROOT = Path("data/shards")
BUILD_FILE = "build.json"
SPLITS = ("train", "val")
PLAN_VERSION = 1
# `--slurm K` submits through the slurm package, the top layer: named, resolved only for --slurm
# (common/plugins.py), so data_pipeline never imports slurm
SLURM_BUILD = "slurm.data:main_slurm"
# Content settings added after the first version: they enter the default directory's hash only when
# changed, so existing default directories keep their names.
LATER_FIELDS = {"text_template": "", "filter": None, "txt_documents": "line", "tokenizer_model_type": "unigram", "max_doc_tokens": 0,
                "long_docs": "split", "density": None}
# What `prepare` writes before build.json exists (a concurrent part may be in the middle of it).
PREPARE_ENTRIES = {TOKENIZER_FILE, "tokenizer.model", "hf", BUILD_FILE, STATS_FILE, FILTER_FILE, *SPLITS}


@dataclass
class DatasetInfo:
    """What the trainer needs to know about a built dataset."""

    shard_dir: Path
    tokenizer: Tokenizer
    vocab_size: int
    pad_id: int
    bos_id: int
    eos_id: int
    mask_id: int
    train_dir: Path
    val_dir: Path
    reused: bool = False  # True when an existing build was found (nothing was written)


@dataclass
class BuildReport:
    """What one invocation did (the CLI prints it)."""

    shard_dir: Path
    parts: list[PartResult] = field(default_factory=list)
    merged: bool = False
    seconds: float = 0.0
    filtered: dict | None = None  # documents removed by data.filter, per rule


def build_fields(cfg: DataConfig) -> dict:
    """The settings that determine shard content (not seq_len/packing: the loader applies those)."""
    return {
        "source": cfg.source, "text_field": cfg.text_field, "train_split": cfg.train_split,
        "val_split": cfg.val_split, "val_fraction": cfg.val_fraction, "tokenizer": cfg.tokenizer,
        "vocab_size": cfg.vocab_size, "task": _task_content(cfg),
        **{k: getattr(cfg, k) for k in LATER_FIELDS if k not in ("density", "filter")},
        "density": _density_content(cfg),
        "filter": dataclasses.asdict(cfg.filter) if is_active(cfg.filter) else None,
    }


def _task_content(cfg: DataConfig) -> dict | None:
    """The generator settings of the task being built (another task's settings do not change it)."""
    if not cfg.source.startswith("task:"):
        return None
    name = cfg.source.removeprefix("task:")
    own = getattr(cfg.task, name, None)
    return {"num_train": cfg.task.num_train, "num_val": cfg.task.num_val, "seed": cfg.task.seed,
            name: dataclasses.asdict(own) if dataclasses.is_dataclass(own) else None}


def _density_content(cfg: DataConfig) -> dict | None:
    """The density settings that change the stored scores (not where or how fast they are computed)."""
    d = density_settings(cfg)
    if d is None:
        return None
    return {**{k: v for k, v in d.items() if k not in ("device", "batch_size")}, "version": ANNOTATOR_VERSION}


def density_settings(cfg: DataConfig) -> dict | None:
    """data.density as a dict when an annotator is on (it is part of the content), else None. Data that
    trains on responses adds `prompt_separator` (the text ending each prompt): the annotators then score
    and normalise each document's response only (density/annotators.py, `annotate`)."""
    if cfg.density.annotator == "none":
        return None
    d = dataclasses.asdict(cfg.density)
    sep = _prompt_separator_text(cfg)
    return d if sep is None else {**d, "prompt_separator": sep}


def _prompt_separator_text(cfg: DataConfig) -> str | None:
    """data.prompt_separator (or the task's separator) when the data trains on responses, else None."""
    if not trains_on_response(cfg):
        return None
    if cfg.prompt_separator:
        return cfg.prompt_separator
    if cfg.source.startswith("task:"):
        return get_task(cfg.source.removeprefix("task:")).separator
    return None  # the loader refuses train_on=response without a separator


def default_shard_dir(cfg: DataConfig) -> Path:
    fields = {k: v for k, v in build_fields(cfg).items() if k not in LATER_FIELDS or v != LATER_FIELDS[k]}
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:8]
    name = cfg.source if cfg.source.startswith(("task:", "hf:")) else "+".join(
        Path(part.strip()).name for part in cfg.source.split(","))  # several local paths: all their names
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._")[:40] or "data"
    return DEFAULT_ROOT / f"{name}-{digest}"


def resolve_shard_dir(cfg: DataConfig) -> Path:
    """The local build directory; for a remote data.shard_dir (s3://...), its staging/mirror
    directory in the cache (data_pipeline.remote), which `build` uploads and the loader reads through."""
    if remote.is_remote(cfg.shard_dir):
        remote.configure(cfg)
        return remote.mirror_dir(cfg.shard_dir)
    return remote.local_path(cfg.shard_dir) if cfg.shard_dir else default_shard_dir(cfg)


def is_complete(shard_dir: Path) -> bool:
    return all((shard_dir / p).is_file() for p in (f"train/{INDEX_FILE}", f"val/{INDEX_FILE}", TOKENIZER_FILE))


def check_config(cfg: DataConfig) -> None:
    """The build's enumerations and limits, checked before any work starts."""

    for key, allowed in (("txt_documents", TXT_MODES), ("decode_errors", DECODE_MODES),
                         ("long_docs", LONG_DOC_POLICIES)):
        if getattr(cfg, key) not in allowed:
            raise ConfigError(f"data.{key}={getattr(cfg, key)!r}: expected one of {', '.join(allowed)}")
    for key in ("max_doc_tokens", "build_workers"):
        if getattr(cfg, key) < 0:
            raise ConfigError(f"data.{key}={getattr(cfg, key)}: must be >= 0 (0 = {'no limit' if key[0] == 'm' else 'all cores'})")
    if cfg.shard_size_mb <= 0:
        raise ConfigError(f"data.shard_size_mb={cfg.shard_size_mb}: must be > 0")
    if cfg.cache_limit_gb < 0:
        raise ConfigError(f"data.cache_limit_gb={cfg.cache_limit_gb}: must be >= 0 (0 = no bound)")
    if cfg.text_template:
        try:
            names = template_fields(cfg.text_template)
        except ValueError as e:
            raise ConfigError(f"data.text_template={cfg.text_template!r}: not a format string ({e}); "
                              "write fields as {name} and a literal brace as {{ or }}") from None
        if not names:
            raise ConfigError(f"data.text_template={cfg.text_template!r} names no field; "
                              'write e.g. "{question}\\n{answer}"')
    problems = check_density_config(cfg.density) + filter_problems(cfg.filter)
    if problems:
        raise ConfigError("; ".join(problems))


# ----------------------------------------------------------------------------------------------
# The three steps
# ----------------------------------------------------------------------------------------------


def _check_fields(shard_dir: Path, built: dict, cfg: DataConfig) -> None:
    wanted = build_fields(cfg)
    diff = sorted(k for k in wanted if k in built or k in LATER_FIELDS
                  if built.get(k, LATER_FIELDS.get(k)) != wanted[k])
    if diff:
        details = "; ".join(f"{k}: built {built.get(k, LATER_FIELDS.get(k))!r}, config {wanted[k]!r}" for k in diff)
        raise ShardFormatError(f"{shard_dir} was built with other settings ({details}); "
                               "delete it or set data.shard_dir to another directory (or to '' for the default)")


def _check_source(shard_dir: Path, plan: dict, cfg: DataConfig) -> None:
    """The local source must be the one the build read (its recorded fingerprint): shards of an older
    version of a file are refused, with what changed, rather than reused or resumed."""
    recorded = plan.get("sources")
    if not recorded:  # a task/HF source, or a build made before fingerprints were recorded
        return
    try:
        changes = source_changes(recorded, cfg)
    except DataSourceError as e:  # shards copied to a machine without the source: they are what was built
        log.warning("cannot compare %s with the source it was built from (%s); using the shards as built", shard_dir, e)
        return
    if changes:
        raise ShardFormatError(
            f"the source of {shard_dir} changed since it was built ({'; '.join(changes[:5])}"
            f"{' ...' if len(changes) > 5 else ''}): its shards hold the old text. Delete {shard_dir} and build "
            "again (or set data.shard_dir to a new directory to keep both)")


def prepare(cfg: DataConfig, shard_dir: Path, workers: int = 1) -> tuple[Tokenizer, dict]:
    """The tokenizer and plan of the build at `shard_dir`: loaded when present, else made and saved."""
    plan_path = shard_dir / BUILD_FILE
    if plan_path.is_file():
        plan = json.loads(plan_path.read_text())
        _check_fields(shard_dir, plan.get("fields", {}), cfg)
        _check_source(shard_dir, plan, cfg)
        if "docs_per_shard" in plan:  # a plan of this version: resume it
            return load_tokenizer(shard_dir), plan
        raise ShardFormatError(f"{shard_dir} holds an incomplete build of an older version; delete it and rebuild")
    if shard_dir.exists():
        strangers = sorted(p.name for p in shard_dir.iterdir() if p.name not in PREPARE_ENTRIES and TMP_MARK not in p.name)
        if strangers:
            raise ShardFormatError(f"{shard_dir} exists but holds no build of this tool ({', '.join(strangers[:5])}); "
                                   "delete it or choose another data.shard_dir")
    # Open the source before the tokenizer: an unreachable source (offline hub) is the error to
    # report first, with its hint, and it fails in seconds.
    sources = source_fingerprint(cfg)  # what is read now; a later run refuses another version of it
    train_docs = iter_documents(cfg, "train")
    sample = itertools.chain([next(train_docs)], train_docs)
    if (shard_dir / TOKENIZER_FILE).is_file():  # a concurrent part saved it first: the same model
        tokenizer = load_tokenizer(shard_dir)
    else:
        tokenizer = make_tokenizer(cfg, sample if cfg.tokenizer == "sentencepiece" else None)
    shard_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(shard_dir)
    if needs_stats(cfg.density) and not (shard_dir / STATS_FILE).is_file():
        density_stats.collect_stats(cfg, tokenizer, shard_dir, workers or 1)  # the unigram/tfidf first pass
    filter_counts = None
    if is_active(cfg.filter):  # the documents to drop, decided over the whole source, once
        removed, filter_counts = find_removed(cfg)
        save_removed(shard_dir / FILTER_FILE, removed)
    plan = {"plan_version": PLAN_VERSION, "fields": build_fields(cfg), "tokenizer_fingerprint": tokenizer.fingerprint,
            "shard_size_mb": cfg.shard_size_mb, "files": prepared_files(shard_dir), "sources": sources,
            "source_files": source_names(cfg), "filter_counts": filter_counts,  # what the file index of the shards' `source` column refers to
            "docs_per_shard": docs_per_shard(cfg, tokenizer)}
    atomic_write_bytes(plan_path, json.dumps(plan, indent=2).encode())
    return tokenizer, plan


def prepared_files(shard_dir: Path) -> dict[str, dict]:
    """Size and sha256 of what `prepare` wrote besides build.json (the tokenizer's files, the density
    statistics), so `inspect --verify` notices a swapped or damaged one (the shards' checksums do not)."""
    out = {}
    for name in sorted(PREPARE_ENTRIES - {BUILD_FILE, *SPLITS}):
        top = shard_dir / name
        for path in sorted(top.rglob("*")) if top.is_dir() else [top]:
            if path.is_file() and TMP_MARK not in path.name:
                data = path.read_bytes()
                out[path.relative_to(shard_dir).as_posix()] = {"bytes": len(data),
                                                               "sha256": hashlib.sha256(data).hexdigest()}
    return out


def verify_build(shard_dir: Path) -> list[str]:
    """One line per problem of a build directory: a split without its index.json, a prepared file
    (tokenizer, density statistics) that is missing or not the bytes recorded in build.json.
    The shards themselves are checked by `ShardReader.problems`."""
    plan = json.loads((shard_dir / BUILD_FILE).read_text())
    problems = []
    for split in plan.get("docs_per_shard", dict.fromkeys(SPLITS)):
        if not (shard_dir / split / INDEX_FILE).is_file():
            problems.append(f"{shard_dir / split / INDEX_FILE}: missing (the {split} split is unfinished or its "
                            f"index was lost); rebuild it with `{repair_hint(shard_dir)}`")
    for name, rec in plan.get("files", {}).items():
        path = shard_dir / name
        if not path.is_file():
            problems.append(f"{path}: missing; build.json records it")
            continue
        data = path.read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        if (len(data), sha) != (rec["bytes"], rec["sha256"]):
            problems.append(f"{path}: {len(data)} bytes, sha256 {sha}; build.json records {rec['bytes']} bytes, "
                            f"sha256 {rec['sha256']}: not the file the shards were built with. Restore it "
                            f"(or delete {shard_dir} and build again)")
    return problems


def build(cfg: DataConfig, workers: int | None = None, part: int = 0, n_parts: int = 1,
          progress: bool = True) -> BuildReport:
    """Prepare, write the shards of `part` of `n_parts` (all when 1), and merge when that is all."""
    check_config(cfg)
    remote.configure(cfg)
    if not 0 <= part < n_parts:
        raise ValueError(f"--part {part}/{n_parts}: need 0 <= i < K")
    if remote.is_remote(cfg.shard_dir) and n_parts > 1:
        raise ValueError(f"data.shard_dir={cfg.shard_dir}: a remote build is staged and uploaded by one invocation; "
                         "build parts into a shared filesystem (--part/--slurm), then copy the directory there")
    workers = workers or cfg.build_workers or default_workers()
    shard_dir = resolve_shard_dir(cfg)
    t0 = time.monotonic()
    report = BuildReport(shard_dir)
    if n_parts > 1 and not (shard_dir / BUILD_FILE).is_file():
        log.warning("part %d/%d: %s is not prepared yet, so this part trains the tokenizer and counts the density "
                    "statistics itself; with parts running at once run `python -m data_pipeline.build ... --prepare` "
                    "first (--slurm does), so that it happens once", part, n_parts, shard_dir)
    tokenizer, plan = prepare(cfg, shard_dir, workers)
    log.info("building %s into %s (%d workers%s)", cfg.source, shard_dir, workers,
             f", part {part}/{n_parts}" if n_parts > 1 else "")
    removed = load_removed(shard_dir / FILTER_FILE) if is_active(cfg.filter) else None
    report.filtered = plan.get("filter_counts")
    report.parts = build_parts(cfg, shard_dir, tokenizer, plan["docs_per_shard"], part, n_parts, workers, progress,
                               density=density_settings(cfg), removed=removed)
    if n_parts == 1:
        merge(shard_dir)
        report.merged = True
        if remote.is_remote(cfg.shard_dir):  # indexes last: a remote split with an index is complete
            remote.upload_build(shard_dir, cfg.shard_dir)
            remote.mirror_build(cfg.shard_dir)
    report.seconds = time.monotonic() - t0
    return report


def prepare_build(cfg: DataConfig, workers: int | None = None) -> Path:
    """Step 1 alone (`--prepare`): the tokenizer, the density statistics and the plan, once, before
    the `--part i/K` builds, which then load them instead of each training its own."""
    check_config(cfg)
    shard_dir = resolve_shard_dir(cfg)
    prepare(cfg, shard_dir, workers or cfg.build_workers or default_workers())
    return shard_dir


def merge(shard_dir: Path) -> None:
    """Write every split's index.json once all parts are built (IncompleteBuildError otherwise)."""
    plan_path = shard_dir / BUILD_FILE
    if not plan_path.is_file():
        raise IncompleteBuildError(f"{shard_dir}: no {BUILD_FILE}; nothing was built there yet")
    tokenizer = load_tokenizer(shard_dir)
    for split in SPLITS:
        merge_split(shard_dir / split, tokenizer.fingerprint, tokenizer.vocab_size)


def find_damage(shard_dir: Path) -> list[str]:
    """One line per missing or corrupt shard of every split that has an index (what --repair rebuilds)."""
    problems = []
    for split in SPLITS:
        if (shard_dir / split / INDEX_FILE).is_file():
            problems += [f"{split}/{file}: {why}" for file, why in ShardReader(shard_dir / split).problems()]
    return problems


def repair(cfg: DataConfig, workers: int | None = None, progress: bool = True) -> tuple[list[str], BuildReport | None]:
    """Rebuild exactly the missing or damaged shards of a build (complete or not) and rewrite its indexes.

    Every shard on disk is checked against the size and sha256 its part record and index.json give it
    (units._SplitBuild._keep); the ones that fail, and the missing ones, are rebuilt from the source,
    byte-identical to a clean build. Returns (the problems found, the build's report; None when the
    build was complete and intact)."""
    shard_dir = resolve_shard_dir(cfg)
    if not (shard_dir / BUILD_FILE).is_file():
        raise IncompleteBuildError(f"{shard_dir}: no {BUILD_FILE}: nothing to repair there (build it first)")
    problems = find_damage(shard_dir)
    if not problems and is_complete(shard_dir):
        return [], None
    return problems, build(cfg, workers=workers, progress=progress)


def ensure_shards(cfg: DataConfig, progress: bool = True, workers: int | None = None) -> DatasetInfo:
    """Reuse the complete build at the config's shard dir, or build (or finish) it there first."""
    shard_dir = resolve_shard_dir(cfg)
    remote.configure(cfg)
    if remote.is_remote(cfg.shard_dir):
        if remote.is_complete_remote(cfg.shard_dir):  # stream it: indexes and tokenizer now, shards on demand
            return _open_build(remote.mirror_build(cfg.shard_dir), cfg, reused=True)
    elif is_complete(shard_dir):
        return _open_build(shard_dir, cfg, reused=True)
    report = build(cfg, workers=workers, progress=progress)
    log.info("built %s in %.1f s", shard_dir, report.seconds)
    return _open_build(shard_dir, cfg, reused=False)


def _open_build(shard_dir: Path, cfg: DataConfig, reused: bool) -> DatasetInfo:
    meta_path = shard_dir / BUILD_FILE
    if meta_path.is_file():
        plan = json.loads(meta_path.read_text())
        _check_fields(shard_dir, plan.get("fields", {}), cfg)
        if not any(remote.is_remote(p.strip()) for p in cfg.source.split(",")):  # not downloaded just to compare
            _check_source(shard_dir, plan, cfg)
    tokenizer = load_tokenizer(shard_dir)
    for split in SPLITS:
        reader = ShardReader(shard_dir / split)
        if reader.tokenizer_fingerprint != tokenizer.fingerprint:
            raise ShardFormatError(
                f"{shard_dir / split / INDEX_FILE} was written with tokenizer {reader.tokenizer_fingerprint}, but "
                f"{shard_dir / TOKENIZER_FILE} is {tokenizer.fingerprint}; delete {shard_dir} and rebuild"
            )
    if reused:
        log.info("reusing shards at %s", shard_dir)
    return DatasetInfo(
        shard_dir=shard_dir, tokenizer=tokenizer, vocab_size=tokenizer.vocab_size,
        pad_id=tokenizer.pad_id, bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id, mask_id=tokenizer.mask_id,
        train_dir=shard_dir / "train", val_dir=shard_dir / "val", reused=reused,
    )


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------


def summary(info: DatasetInfo) -> str:
    lines = [f"shards: {info.shard_dir} ({'reused' if info.reused else 'built'}); tokenizer {info.tokenizer}"]
    for split, d in (("train", info.train_dir), ("val", info.val_dir)):
        idx = ShardReader(d).index
        stored = sum(s["bytes"] for s in idx["shards"])
        raw = sum(s.get("raw_bytes", 0) for s in idx["shards"])
        ratio = f"{raw / stored:.2f}x" if stored else "n/a"
        long_docs = sum(s.get("long_docs", 0) for s in idx["shards"])
        lines.append(f"  {split:5s} docs={idx['total_docs']:,} tokens={idx['total_tokens']:,} "
                     f"shards={len(idx['shards'])} bytes={stored:,} compression={ratio} ({idx['token_dtype']})"
                     + (f" long_docs={long_docs:,}" if long_docs else ""))
    return "\n".join(lines)


def _report_lines(report: BuildReport) -> list[str]:
    lines = []
    if report.filtered is not None:
        lines.append("  filtered: " + " ".join(f"{k}={report.filtered.get(k, 0)}" for k in RULES)
                     + " (documents removed by data.filter)")
    for r in report.parts:
        rate = r.tokens_written / r.seconds if r.seconds else 0.0
        line = (f"  {r.split:5s} {len(r.written)} shards written ({r.tokens_written:,} tokens, {rate:,.0f} tok/s), "
                f"{len(r.reused)} kept from an earlier run; split has {r.n_units} shards, {r.source_docs:,} documents")
        if r.damaged:
            line += f"; rebuilt {len(r.damaged)} damaged shards: {', '.join(r.damaged)}"
        if r.stats.undecodable:
            line += f"; skipped {r.stats.undecodable} non-UTF-8 documents (first: {r.stats.examples[0]})"
        lines.append(line)
    return lines


SOURCE_HELP = """\
where the text comes from (data.* keys, in the recipe or after --set):
  data.source         task:NAME | hf:NAME[/CONFIG] | a .txt/.py/.jsonl/.parquet file or directory
                      (several joined by commas; {stdlib} = this Python's standard library)
  data.txt_documents  .txt/.py: line (one document per line) | paragraph (blank-line separated)
                      | file (the whole file)
  data.text_field     .jsonl/.parquet/HF rows: the field holding the text (default: text)
  data.text_template  .jsonl/.parquet/HF rows: a format string over several fields, used instead
                      of data.text_field, e.g. for question/answer rows:
                        --set 'data.text_template="{question}\\n{answer}"'
                      (in YAML: text_template: "{question}\\n{answer}")
"""


def parse_part(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"(\d+)/(\d+)", text.strip())
    if not m or not 0 <= int(m.group(1)) < int(m.group(2)):
        raise argparse.ArgumentTypeError(f"expected i/K with 0 <= i < K (e.g. 3/16), got {text!r}")
    return int(m.group(1)), int(m.group(2))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m data_pipeline.build",
        description="Tokenize a data source into train/val shards (reused if already built; an interrupted build "
                    "resumes where it stopped). Reads only the `data:` section of a run config; `inherit:` chains "
                    "are followed.",
        epilog=SOURCE_HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", help="run config YAML (the same file the trainer takes); "
                                         "omitted: the built-in DataConfig defaults (task:sudoku)")
    # one syntax with pretrain.launch: several KEY=VALUE after one --set (the repeated form works too)
    parser.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="data.KEY=VALUE",
                        help="override data settings, e.g. --set data.source=/path/train.txt data.vocab_size=8192 "
                             "(several after one --set, or --set repeated)")
    parser.add_argument("--workers", type=int, default=None,
                        help="tokenizing processes (default: data.build_workers, 0 there = all cores); "
                             "the output is identical for any number")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--part", type=parse_part, metavar="i/K",
                      help="build only part i of K (shards u with u %% K == i), e.g. one Slurm array task; "
                           "then run --merge once all K parts are done")
    mode.add_argument("--prepare", action="store_true",
                      help="only train the tokenizer, count the density statistics and write the plan (build.json), "
                           "once, before the --part i/K builds, which then reuse them")
    mode.add_argument("--repair", action="store_true",
                      help="check every shard of the build against its recorded size and sha256 and rebuild "
                           "exactly the missing or damaged ones (byte-identical to a clean build), then the indexes")
    mode.add_argument("--merge", action="store_true",
                      help="write the index of a build whose parts are all done (names the missing ones otherwise)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    slurm = parser.add_argument_group("Slurm (resources from the recipe's launch.slurm section)")
    slurm.add_argument("--slurm", type=int, metavar="K",
                       help="submit the build as a Slurm job array of K parts (--part i/K each), then a job that "
                            "merges the indexes once all parts succeeded; --set launch.slurm.KEY=VALUE overrides")
    slurm.add_argument("--wait", action="store_true", help="with --slurm: wait for the jobs and report the result")
    slurm.add_argument("--dry-run", action="store_true",
                       help="with --slurm: print the submitit parameters and sbatch header, submit nothing")
    args = parser.parse_args(argv)
    if args.slurm is not None:
        if args.slurm < 1 or args.part or args.merge or args.prepare or args.repair:
            parser.error("--slurm K needs K >= 1 and excludes --prepare/--part/--merge/--repair (it submits them)")
        main_slurm = load_plugin(SLURM_BUILD, "build --slurm")
        return main_slurm(args.config, args.overrides, args.slurm, args.workers, args.dry_run, args.wait)
    if args.dry_run or args.wait:
        parser.error("--dry-run and --wait go with --slurm K")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_data_config(args.config, args.overrides)
        if args.workers is not None and args.workers < 1:
            raise ConfigError(f"--workers {args.workers}: must be >= 1")
        shard_dir = resolve_shard_dir(cfg)
        if remote.is_remote(cfg.shard_dir) and (args.merge or args.prepare or args.repair or args.part):
            raise ConfigError(f"data.shard_dir={cfg.shard_dir}: --part/--prepare/--merge/--repair work on a local or "
                              "shared directory; a remote one is built (staged, then uploaded) by a plain invocation")
        if remote.is_remote(cfg.shard_dir) and remote.is_complete_remote(cfg.shard_dir):
            print(summary(_open_build(remote.mirror_build(cfg.shard_dir), cfg, reused=True)))
            return 0
        if args.merge:
            merge(shard_dir)
            info = _open_build(shard_dir, cfg, reused=False)
            print(summary(info))
            return 0
        if args.prepare:
            prepared = prepare_build(cfg, workers=args.workers)
            print(f"prepared {prepared} (tokenizer, plan{', density statistics' if needs_stats(cfg.density) else ''});"
                  " next: python -m data_pipeline.build --config ... --part i/K for every i, then --merge")
            return 0
        if args.repair:
            problems, rep = repair(cfg, workers=args.workers, progress=not args.no_progress)
            if rep is None:
                print(f"nothing to repair: every shard of {shard_dir} matches its index")
                return 0
            print("\n".join(f"bad: {p}" for p in problems))
            print(f"repaired {shard_dir} in {rep.seconds:.1f} s")
            print("\n".join(_report_lines(rep)))
            print(summary(_open_build(shard_dir, cfg, reused=False)))
            return 0
        if is_complete(shard_dir) and not remote.is_remote(cfg.shard_dir):
            print(summary(_open_build(shard_dir, cfg, reused=True)))
            return 0
        part, n_parts = args.part or (0, 1)
        report = build(cfg, workers=args.workers, part=part, n_parts=n_parts, progress=not args.no_progress)
    except (ConfigError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    where = cfg.shard_dir if remote.is_remote(cfg.shard_dir) else report.shard_dir
    print(f"{'built' if report.merged else f'part {part}/{n_parts} of'} {where} in {report.seconds:.1f} s")
    print("\n".join(_report_lines(report)))
    if report.merged:
        print(summary(_open_build(shard_dir, cfg, reused=False)))
    else:
        print(f"next: when all {n_parts} parts are done, python -m data_pipeline.build --config ... --merge")
    return 0


if __name__ == "__main__":
    sys.exit(main())
