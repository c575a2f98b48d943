"""Tokenizers: a character vocabulary for tasks and character-level text, sentencepiece for text, Hugging Face by name.

Every kind exposes the same small surface (`encode`, `encode_batch`, `decode`, `vocab_size`,
`pad_id/bos_id/eos_id/mask_id`, `fingerprint`, `save`) so the shard builder and the trainer never
care which one is in use. `fingerprint` is a hash of the vocabulary (or model file): shards record
it, and a shard directory whose tokenizer does not match its index is refused.

`save(dir)` writes `tokenizer.json` (the kind and its settings) plus, for sentencepiece, the
`.model` file, so `load_tokenizer(dir)` restores the exact tokenizer without the original source.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from common.fsutil import atomic_write_bytes
from data_pipeline.config import DataConfig
from data_pipeline.document import Document
from data_pipeline.shards import token_dtype
from data_pipeline.sources import SPLITS, hub_reachable, iter_documents
from data_pipeline.tasks import get_task

log = logging.getLogger(__name__)

TOKENIZER_FILE = "tokenizer.json"
SP_MODEL_FILE = "tokenizer.model"
SPECIALS = ("[PAD]", "[BOS]", "[EOS]", "[MASK]")  # ids 0..3 for the char and sentencepiece kinds
SP_MAX_SAMPLE_DOCS = 2_000_000  # documents handed to the sentencepiece trainer at most
SP_INPUT_SENTENCE_SIZE = 1_000_000  # ... of which it samples this many (its own seeded sampling)
SP_MODEL_TYPES = ("unigram", "bpe")
# The trainer's result depends on its thread count (work is split per thread), not on the cores:
# a fixed count makes the same sample give the same model on every machine and in every Slurm part.
SP_TRAIN_THREADS = 16


class TokenizerError(ValueError):
    pass


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


class Tokenizer:
    """Base class: subclasses set the special ids and implement `encode`/`decode`/`_describe`."""

    kind: str = ""
    pad_id: int
    bos_id: int
    eos_id: int
    mask_id: int

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    @property
    def fingerprint(self) -> str:
        raise NotImplementedError

    @property
    def special_ids(self) -> tuple[int, int, int, int]:
        return self.pad_id, self.bos_id, self.eos_id, self.mask_id

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def encode_flat(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(every text's ids back to back as the shard dtype, per-text lengths as int64): the build's form."""
        ids = self.encode_batch(texts)
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=token_dtype(self.vocab_size),
                           count=int(lengths.sum()))
        return flat, lengths

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        meta = {"kind": self.kind, "fingerprint": self.fingerprint, "vocab_size": self.vocab_size,
                **self._describe(directory)}
        atomic_write_bytes(directory / TOKENIZER_FILE, json.dumps(meta, indent=2).encode())

    def _describe(self, directory: Path) -> dict:
        """Kind-specific settings for tokenizer.json; may write extra files into `directory`."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size}, fingerprint={self.fingerprint})"


class CharTokenizer(Tokenizer):
    """One id per symbol after the four specials: [PAD]=0 [BOS]=1 [EOS]=2 [MASK]=3."""

    kind = "char"

    def __init__(self, symbols: str):
        if len(set(symbols)) != len(symbols) or not symbols:
            raise TokenizerError(f"symbols must be non-empty and distinct, got {symbols!r}")
        self.symbols = symbols
        self.pad_id, self.bos_id, self.eos_id, self.mask_id = range(4)
        self._ids = {ch: i + len(SPECIALS) for i, ch in enumerate(symbols)}

    @property
    def vocab_size(self) -> int:
        return len(SPECIALS) + len(self.symbols)

    @property
    def fingerprint(self) -> str:
        return _sha(json.dumps({"kind": self.kind, "specials": SPECIALS, "symbols": self.symbols}).encode())

    def encode(self, text: str) -> list[int]:
        ids = self._ids
        try:
            return [ids[ch] for ch in text]
        except KeyError as e:
            raise TokenizerError(
                f"character {e.args[0]!r} is not in the vocabulary {self.symbols!r} "
                f"(at position {text.index(e.args[0])} of {text[:60]!r})"
            ) from None

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        out = []
        for i in ids:
            i = int(i)
            if i < len(SPECIALS):
                if not skip_special:
                    out.append(SPECIALS[i])
            elif i < self.vocab_size:
                out.append(self.symbols[i - len(SPECIALS)])
            else:
                raise TokenizerError(f"id {i} is outside the vocabulary (size {self.vocab_size})")
        return "".join(out)

    def _describe(self, directory: Path) -> dict:
        return {"symbols": self.symbols}


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece model with [PAD]=0 [BOS]=1 [EOS]=2 [MASK]=3 (control) and [UNK]=4.

    Models trained here use identity normalization, keep whitespace and fall back to bytes (when
    the vocabulary has room), so decode(encode(text)) == text. Models loaded from elsewhere keep
    their own special ids; [MASK] must exist in them, since the diffusion objective needs it.
    """

    kind = "sentencepiece"

    def __init__(self, model_proto: bytes, source: str = ""):
        import sentencepiece as spm

        self._proto = model_proto
        self.source = source
        self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self.pad_id, self.bos_id, self.eos_id = self.sp.pad_id(), self.sp.bos_id(), self.sp.eos_id()
        self.mask_id = self.sp.piece_to_id("[MASK]")
        where = source or "this sentencepiece model"
        if min(self.pad_id, self.bos_id, self.eos_id) < 0:
            raise TokenizerError(f"{where}: needs pad, bos and eos pieces (train it with pad_id/bos_id/eos_id)")
        if self.mask_id == self.sp.unk_id():
            raise TokenizerError(f"{where}: has no [MASK] piece (add it with control_symbols=['[MASK]'])")

    @classmethod
    def from_file(cls, path: str | Path) -> SentencePieceTokenizer:
        path = Path(path).expanduser()
        if not path.is_file():
            raise TokenizerError(
                f"sentencepiece model not found: {path}; check data.tokenizer=sentencepiece:PATH.model, "
                "or set data.tokenizer=sentencepiece to train one at build time"
            )
        return cls(path.read_bytes(), source=str(path))

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, model_type: str = "unigram",
              seed: int = 0) -> SentencePieceTokenizer:
        import sentencepiece as spm

        spm.set_random_generator_seed(seed)  # its sentence sampling is seeded: reproducible builds
        n_meta = 5  # [PAD] [BOS] [EOS] [MASK] [UNK]
        model = io.BytesIO()
        texts = (t for t in texts if t)
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts),
            model_writer=model,
            vocab_size=vocab_size,
            model_type=model_type,
            pad_id=0, bos_id=1, eos_id=2, unk_id=4, control_symbols=["[MASK]"],
            pad_piece="[PAD]", bos_piece="[BOS]", eos_piece="[EOS]", unk_piece="[UNK]",
            normalization_rule_name="identity", remove_extra_whitespaces=False,
            byte_fallback=vocab_size >= 256 + n_meta + 64,  # room for 256 byte pieces and some words
            hard_vocab_limit=False,  # small samples yield a smaller vocabulary instead of failing
            input_sentence_size=SP_INPUT_SENTENCE_SIZE, shuffle_input_sentence=True,
            train_extremely_large_corpus=False, minloglevel=2, num_threads=SP_TRAIN_THREADS,
        )
        tok = cls(model.getvalue(), source="trained")
        if tok.vocab_size != vocab_size:
            log.warning("sentencepiece vocabulary is %d pieces (asked for %d): the sample is small",
                        tok.vocab_size, vocab_size)
        return tok

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    @property
    def fingerprint(self) -> str:
        return _sha(self._proto)

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        # one thread: the build parallelises over processes; sentencepiece's own pool only competes
        return self.sp.encode(list(texts), num_threads=1)

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.decode([int(i) for i in ids])

    def _describe(self, directory: Path) -> dict:
        atomic_write_bytes(directory / SP_MODEL_FILE, self._proto)
        return {"model_file": SP_MODEL_FILE, "source": self.source}


class HFTokenizer(Tokenizer):
    """A Hugging Face tokenizer (`tokenizers` library) by hub name or local `tokenizer.json`.

    `hf:bert-base-uncased` (MDLM's LM1B tokenizer, so perplexities compare with the papers') is
    fetched from the hub once, at shard-build time, and saved with the shards; training runs load
    that copy and never touch the hub. `hf:/path/to/tokenizer.json` works offline. The `tokenizers`
    package (Rust, a few MB) is used rather than `transformers` (a large install) for this alone.
    BOS/EOS fall back to [CLS]/[SEP] for BERT-style vocabularies; a [MASK] token is required.
    """

    kind = "hf"
    FILE = "hf_tokenizer.json"

    def __init__(self, name_or_path: str, name: str | None = None):
        from tokenizers import Tokenizer as HFFast

        self.name = name or name_or_path
        path = Path(name_or_path)
        try:
            if path.is_file():
                self.hf = HFFast.from_file(str(path))
            elif path.is_dir() and (path / "tokenizer.json").is_file():
                self.hf = HFFast.from_file(str(path / "tokenizer.json"))
            else:
                if not hub_reachable():  # fail in ~3 s, not after half a minute of retries
                    raise ConnectionError("the Hugging Face hub is not reachable from this machine")
                self.hf = HFFast.from_pretrained(name_or_path)
        except Exception as e:  # no hub access, unknown name, unreadable file
            raise TokenizerError(
                f"tokenizer hf:{self.name} could not be loaded ({type(e).__name__}: {str(e)[:200]}); offline, "
                "point data.tokenizer at a local tokenizer.json (hf:/path/to/tokenizer.json) or use "
                "data.tokenizer=sentencepiece"
            ) from None
        self.hf.no_padding()
        self.hf.no_truncation()
        vocab = self.hf.get_vocab(with_added_tokens=True)

        def first(*names: str) -> int | None:
            return next((vocab[n] for n in names if n in vocab), None)

        self.pad_id = first("[PAD]", "<pad>")
        self.bos_id = first("[BOS]", "<s>", "[CLS]", "<bos>")
        self.eos_id = first("[EOS]", "</s>", "[SEP]", "<eos>")
        self.mask_id = first("[MASK]", "<mask>")
        missing = [n for n, v in zip(("pad", "bos/cls", "eos/sep", "mask"), self.special_ids, strict=True) if v is None]
        if missing:
            raise TokenizerError(f"hf:{self.name} lacks special tokens: {missing}")

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    @property
    def fingerprint(self) -> str:
        return _sha(json.dumps(sorted(self.hf.get_vocab(with_added_tokens=True).items())).encode())

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.hf.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=True)

    def _describe(self, directory: Path) -> dict:
        self.hf.save(str(directory / self.FILE))  # a local copy: reuse needs no hub access
        return {"name": self.name, "files": self.FILE}


def load_tokenizer(directory: str | Path) -> Tokenizer:
    """Restore the tokenizer `Tokenizer.save(directory)` wrote, whichever kind it was."""
    directory = Path(directory)
    meta_path = directory / TOKENIZER_FILE
    if not meta_path.is_file():
        raise TokenizerError(
            f"no saved tokenizer at {meta_path}; rebuild the shards (python -m data_pipeline.build) "
            "or point data.shard_dir at a complete build"
        )
    meta = json.loads(meta_path.read_text())
    kind = meta.get("kind")
    if kind == "char":
        tok: Tokenizer = CharTokenizer(meta["symbols"])
    elif kind == "sentencepiece":
        model_path = directory / meta["model_file"]
        if not model_path.is_file():
            raise TokenizerError(f"{meta_path} refers to {model_path}, which is missing; rebuild the shards")
        tok = SentencePieceTokenizer(model_path.read_bytes(), source=meta.get("source", ""))
    elif kind == "hf":
        tok = HFTokenizer(str(directory / meta["files"]), name=meta["name"])
    else:
        raise TokenizerError(f"{meta_path}: unknown tokenizer kind {kind!r}")
    if meta.get("fingerprint") not in (None, tok.fingerprint):
        raise TokenizerError(f"{meta_path}: fingerprint {meta['fingerprint']} does not match the loaded files "
                             f"({tok.fingerprint}); the directory was modified, rebuild the shards")
    return tok


def make_tokenizer(cfg: DataConfig, documents_sample: Iterable[Document] | None = None) -> Tokenizer:
    """The tokenizer `cfg.tokenizer` names; sentencepiece training reads `documents_sample`."""
    spec = cfg.tokenizer
    if spec == "task":
        if not cfg.source.startswith("task:"):
            raise TokenizerError(
                f"data.tokenizer=task needs a task:NAME source, but data.source={cfg.source!r}; "
                "use data.tokenizer=sentencepiece (trained at build time) or hf:NAME"
            )
        return CharTokenizer(get_task(cfg.source.removeprefix("task:")).symbols)
    if spec == "char":
        # character-level text (issue 22): one id per character of the source. The alphabet is
        # read from both splits, so a character seen only in the held-out lines still encodes
        # (char-rnn's convention); it leaks nothing but which characters exist.
        chars: set[str] = set()
        for split in SPLITS:
            for doc in iter_documents(cfg, split):
                chars.update(doc.text)
        return CharTokenizer("".join(sorted(chars)))
    if spec == "sentencepiece":
        if cfg.tokenizer_model_type not in SP_MODEL_TYPES:
            raise TokenizerError(f"data.tokenizer_model_type={cfg.tokenizer_model_type!r}: "
                                 f"expected one of {SP_MODEL_TYPES}")
        if documents_sample is None:
            raise TokenizerError("training a sentencepiece tokenizer needs a sample of documents")
        texts = (d.text for d in itertools.islice(documents_sample, SP_MAX_SAMPLE_DOCS))
        return SentencePieceTokenizer.train(texts, cfg.vocab_size, model_type=cfg.tokenizer_model_type)
    if spec.startswith("sentencepiece:"):
        tok = SentencePieceTokenizer.from_file(spec.removeprefix("sentencepiece:"))
        if tok.vocab_size != cfg.vocab_size:
            raise TokenizerError(
                f"{tok.source} has {tok.vocab_size} pieces but data.vocab_size={cfg.vocab_size}: the model "
                f"would be built for the wrong vocabulary; set data.vocab_size={tok.vocab_size} (or use "
                "another .model)"
            )
        return tok
    if spec.startswith("hf:"):
        return HFTokenizer(spec.removeprefix("hf:"))
    raise TokenizerError(
        f"data.tokenizer={spec!r}: expected task, char, sentencepiece, sentencepiece:PATH.model or hf:NAME"
    )


def check_model_vocab(tokenizer: Tokenizer, model_vocab_size: int) -> None:
    """A model configured for a fixed vocabulary (0 = take the tokenizer's) must match the shards'."""
    if model_vocab_size and model_vocab_size != tokenizer.vocab_size:
        raise TokenizerError(
            f"the model is configured for {model_vocab_size} tokens but the shards' tokenizer {tokenizer} has "
            f"{tokenizer.vocab_size}; set model.vocab_size=0 (take it from the tokenizer) or "
            f"{tokenizer.vocab_size}, or rebuild the shards with another tokenizer"
        )
