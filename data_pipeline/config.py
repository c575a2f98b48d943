"""Configuration of the data pipeline: where documents come from, how they are tokenized and sharded,
and how the stream packs them. Part of the run's `Config` (pretrain.config), defined here because
data flows one way: `data_pipeline` never imports `pretrain`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from common.config_file import ConfigError, merge_layers, read_layers


@dataclass
class SudokuTaskConfig:
    givens: int = 40  # clues left in each puzzle: fewer = harder (17 is the known minimum)


@dataclass
class LinRegTaskConfig:
    """In-context linear regression (data_pipeline/tasks/linreg.py documents the tokenisation)."""

    dim: int = 3  # d: components of each x
    num_points: int = 10  # k: (x, y) pairs in the prompt before the query x
    noise: float = 0.1  # std of the Gaussian noise added to y = w.x
    levels: int = 41  # odd number of grid values per scalar, one token each (at most 61)
    value_range: float = 2.0  # scalars are clipped to [-value_range, value_range] before rounding


@dataclass
class PathfindingTaskConfig:
    """Graph path-finding (data_pipeline/tasks/pathfinding.py): the answer is max_path + 1 characters."""

    graph: str = "random"  # random | star (path-star hard instances)
    nodes: int = 12  # random: nodes (at most 62)
    edges: int = 16  # random: edges in total (a spanning tree plus random extra edges)
    min_path: int = 2  # random: shortest-path length (edges) of the start/goal pair, at least
    max_path: int = 5  # random: ... at most; also the answer's room (max_path + 1 nodes)
    star_degree: int = 3  # star: arms leaving the centre
    star_arm: int = 4  # star: nodes per arm (the path has star_arm edges)


@dataclass
class TaskConfig:
    """Built-in task generators (source `task:NAME`): seeded, so shards are reproducible."""

    num_train: int = 4000  # documents generated for the train split
    num_val: int = 256  # documents generated for the validation split
    seed: int = 1234  # generator seed (independent of the training seed)
    sudoku: SudokuTaskConfig = field(default_factory=SudokuTaskConfig)
    linreg: LinRegTaskConfig = field(default_factory=LinRegTaskConfig)
    pathfinding: PathfindingTaskConfig = field(default_factory=PathfindingTaskConfig)


@dataclass
class DensityConfig:
    """Per-token information density, annotated at build time and stored in the shards (seed 002;
    data_pipeline/density/). Scores are normalised per document to [0, 1]."""

    # none | unigram (corpus surprisal -log p(token)) | tfidf (document-level idf x tf)
    # | structure (code/math rules) | model (per-token loss of a trained checkpoint of this framework)
    annotator: str = "none"
    normalize: str = "minmax"  # per document: minmax (O(n)) | rank (average rank / (n - 1); a sort, slower)
    view: str = "scores"  # scores | hubs: 1 for the top hub_fraction of each document's tokens, else 0
    hub_fraction: float = 0.25  # rho of the hubs view
    dtype: str = "uint8"  # stored column: uint8 (1/255 resolution) | float16
    smoothing: float = 1.0  # unigram/tfidf: add-k smoothing of the first-pass counts
    checkpoint: str = ""  # model: a checkpoint directory (.../checkpoints/step_*) or a run directory
    device: str = "auto"  # model: auto (cuda when present) | cpu | cuda
    batch_size: int = 32  # model: windows per forward pass
    context_masks: int = 4  # model, diffusion checkpoints: K strided masks; each token is scored once


@dataclass
class FilterConfig:
    """Documents removed at build time (data_pipeline/dedup.py), each rule counted in the build report.
    All off by default. Decided once over the whole source in the preparation step, so every part of
    a build removes the same documents; the val split never keeps a document that is also in train."""

    exact_dedup: bool = False  # drop later copies of a document equal after lower-casing and collapsing whitespace
    # MinHash LSH (datasketch) over word 3-gram shingles: drop a train document whose estimated Jaccard
    # similarity to an earlier kept one is at least this (0 = off; 0.8 is a common choice)
    near_dedup_threshold: float = 0.0
    num_perm: int = 128  # MinHash permutations: more = a closer estimate, slower
    shingle_words: int = 3  # words per shingle
    min_chars: int = 0  # drop documents shorter than this (0 = no bound)
    max_chars: int = 0  # drop documents longer than this (0 = no bound)
    max_nonprintable: float = 1.0  # drop documents whose share of non-printable characters is above this


@dataclass
class MixtureSource:
    """Another built shard directory mixed into training (its train split), e.g. code beside prose."""

    shard_dir: str = ""  # a build directory (holding train/) or a split directory (holding index.json)
    weight: float = 1.0  # relative share of training samples; the main source weighs data.main_weight


@dataclass
class DataConfig:
    # task:NAME (built-in generator) | hf:NAME[/CONFIG] (Hugging Face datasets, build time only)
    # | a local .txt/.jsonl/.parquet file or a directory of them
    source: str = "task:sudoku"
    text_field: str = "text"  # field holding the text in jsonl/parquet/HF rows
    # jsonl/parquet/HF rows: a Python format string over the row's fields, used instead of text_field,
    # e.g. "{question}\n{answer}" (QA data stored as separate fields); "" = the text_field alone
    text_template: str = ""
    # How a .txt or .py file is cut into documents. line: one document per line, because sentence-level
    # corpora (LM1B, PTB) are stored that way; paragraph: runs of lines separated by blank lines,
    # because article/book corpora (WikiText, Gutenberg) put one document across many lines; file:
    # the whole file, because a source file (.py) is code's unit.
    txt_documents: str = "line"
    # A local line that is not UTF-8. error: stop, naming the file and byte offset (silently dropping
    # text hides a wrong encoding); skip: drop that document, count it, and go on (web scrapes).
    decode_errors: str = "error"
    # HF sources: stream rows instead of downloading/preparing the whole dataset first (a dataset that
    # cannot stream falls back to a normal load); hf_local_dir: a local copy of the hub repo's files
    # (e.g. `huggingface-cli download --repo-type dataset lm1b`), read by the same loader offline.
    hf_streaming: bool = True
    hf_local_dir: str = ""
    train_split: str = "train"
    val_split: str = "test"  # HF split for validation; local/task sources hold out val_fraction
    val_fraction: float = 0.01  # share of local documents held out (by a hash of the document id)
    # task (the task's own symbol vocabulary) | char (one id per character of a text source)
    # | sentencepiece (trained on the source at build time)
    # | sentencepiece:PATH.model | hf:NAME (a Hugging Face tokenizer, e.g. hf:bert-base-uncased)
    tokenizer: str = "task"
    vocab_size: int = 8192  # sentencepiece: the trained size, or what a given .model must have
    tokenizer_model_type: str = "unigram"  # sentencepiece training algorithm: unigram | bpe
    # Documents longer than this many tokens (0 = no limit) are split into pieces of at most this
    # length (long_docs: split; nothing is lost, but a piece starts mid-text) or cut (truncate).
    # Counted per shard; the builder reports how many documents it changed.
    max_doc_tokens: int = 0
    long_docs: str = "split"
    shard_dir: str = ""  # "" = data/shards/<derived from source and tokenizer>; or a URL (s3://, gs://): see remote.py
    # Local cache of remote storage (data_pipeline/remote.py): copies of remote sources, the staging
    # directory of a build to a remote shard_dir, and the shards a run streams from one. "" = data/cache.
    cache_dir: str = ""
    # Bound on the cached shards (all runs sharing cache_dir): least recently used ones are evicted
    # beyond it and at most this much is downloaded ahead. 0 = no bound. Keep it above a few shards.
    cache_limit_gb: float = 0.0
    shard_size_mb: float = 64.0  # uncompressed bytes per shard (aimed at: a shard is a fixed document range)
    build_workers: int = 0  # tokenizing processes of the shard build; 0 = all cores (CLI: --workers)
    # Bind each build worker to its own CPU (when there are no more workers than CPUs this process may
    # use): unpinned, Linux was seen running two workers on one core while the other idled. Turn off
    # when several builds share a node without per-job cpusets (they would all pin to the same CPUs).
    build_pin_workers: bool = True
    seq_len: int = 168
    # Which tokens are trained on. response: a row is `[BOS] prompt answer [EOS]` and the prompt (up to
    # and including the first `prompt_separator` token) stays clean and visible and is never scored,
    # as in seed 000's code, LLaDA's SFT and seed 002; batches carry `prompt_mask`. all: every real
    # token (language modelling). auto: response for task:NAME sources, all otherwise.
    train_on: str = "auto"
    # the token (its text, one token of the tokenizer) that ends a prompt; "" = the task's separator
    prompt_separator: str = ""
    packing: str = "pad"  # pad: one document per sequence (MDLM LM1B) | wrap: concatenate and cut (BD3-LM)
    num_workers: int = 0  # dataloader worker processes per rank
    shuffle_buffer: int = 1024  # sequences per seeded shuffle window (bounds memory, mixes across shards)
    # wrap: False (MDLM) cuts each shard's documents in storage order, so rows are the same every
    # epoch and only their order is shuffled; True shuffles the documents inside each shard every
    # epoch before cutting (rows differ between epochs; one more gather of every token per epoch)
    wrap_doc_shuffle: bool = False
    # Extra train sources, interleaved by weight in a seeded schedule that every rank computes alike,
    # so mixing keeps exact and elastic resume. Each must use the run's tokenizer (else refused).
    mixture: list[MixtureSource] = field(default_factory=list)
    main_weight: float = 1.0  # weight of the main source (the one built from data.source) in the mixture
    prefetch_factor: int = 4  # chunks (~1M tokens each) each worker prepares ahead, so the loader is never the bottleneck
    # A shard failing its checksum stops the run by default (naming the file). True: its rows become
    # fully masked padding (order and resume position unchanged), logged per shard and counted in the
    # train/skipped_rows metric (MLflow): for a long run that should survive one bad file rather than stop.
    skip_corrupt_shards: bool = False
    # Before the first step the trainer checks that every shard exists with its recorded size (a stat
    # each); True: it checksums and decodes every shard instead (reads the whole dataset once).
    verify_shards: bool = False
    task: TaskConfig = field(default_factory=TaskConfig)
    filter: FilterConfig = field(default_factory=FilterConfig)
    density: DensityConfig = field(default_factory=DensityConfig)


def load_data_config(path: str | Path | None = None, overrides: list[str] | None = None) -> DataConfig:
    """The `data:` section of a run recipe (other sections ignored); `--set` keys must be `data.*`."""
    for item in overrides or []:
        if not item.strip().startswith("data."):
            raise ConfigError(
                f"--set {item!r}: expected data.KEY=VALUE (the shard builder reads only data.* keys), "
                "e.g. data.source=/path/train.txt"
            )
    layers = []
    for origin, data in read_layers(path, overrides):
        section = data.get("data") or {}
        if not isinstance(section, dict):
            raise ConfigError(f"{origin}: `data:` must be a mapping, got {type(section).__name__}")
        layers.append((origin, section))
    return merge_layers(DataConfig, layers, prefix="data.")
