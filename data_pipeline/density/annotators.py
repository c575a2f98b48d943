"""The annotators (see the package docstring) and the build's entry points `build_annotator`/`annotate`."""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np

from common.device import resolve_device
from common.fsutil import atomic_write_bytes
from common.plugins import load_plugin
from data_pipeline.density.normalize import NORMALIZERS, hubs, normalize_per_document

ANNOTATOR_VERSION = 1  # part of the build's content hash: bump when an annotator's scores change
STATS_FILE = "density_stats.npz"  # first-pass counts of the train split, stored with the dataset
VIEWS = ("scores", "hubs")


class Annotator:
    """scores(flat_ids, lengths, texts=None) -> float32 [N] in [0, 1], normalised per document."""

    name = "base"
    needs_stats = False

    def __init__(self, normalize: str = "minmax"):
        self.normalize = normalize

    def raw(self, flat: np.ndarray, lengths: np.ndarray, texts=None, prompt_lens=None) -> np.ndarray:
        raise NotImplementedError

    def scores(self, flat: np.ndarray, lengths: np.ndarray, texts=None, prompt_lens=None) -> np.ndarray:
        """Normalised per document; with `prompt_lens` (task data trained on responses) over each
        document's response only, the prompt's tokens getting 0 (see `response_only`)."""
        flat, lengths = np.asarray(flat), np.asarray(lengths, dtype=np.int64)
        raw = self.raw(flat, lengths, texts, prompt_lens=prompt_lens)
        if prompt_lens is None:
            return normalize_per_document(raw, lengths, self.normalize)
        return response_only(raw, lengths, prompt_lens, lambda r, n: normalize_per_document(r, n, self.normalize))


def prompt_lengths(flat: np.ndarray, lengths: np.ndarray, separator_id: int) -> np.ndarray:
    """Int64 [D]: tokens of each document's prompt, up to and including its first `separator_id`
    (the whole document when it has none: data_pipeline.stream.prompt_mask_of trains on nothing of
    such a row)."""
    flat, lengths = np.asarray(flat), np.asarray(lengths, dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    out = lengths.copy()
    hits = np.flatnonzero(flat == separator_id)
    if len(hits):
        doc = np.repeat(np.arange(len(lengths)), lengths)[hits]
        docs, first = np.unique(doc, return_index=True)  # hits ascend: the first of each document
        out[docs] = hits[first] - starts[docs] + 1
    return out


def response_only(values: np.ndarray, lengths: np.ndarray, prompt_lens: np.ndarray, per_document) -> np.ndarray:
    """float32 [N]: `per_document(values of the responses, response lengths)` at the response tokens,
    0 at the prompt tokens. Task data trains on responses: the masking policies only ever see the
    response (pretrain/diffusion/objective.py, targets_of), so its density must be normalised (and its
    hubs chosen) among the response's own tokens, not against the prompt's."""
    lengths = np.asarray(lengths, dtype=np.int64)
    prompt_lens = np.minimum(np.asarray(prompt_lens, dtype=np.int64), lengths)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    pos = np.arange(int(lengths.sum())) - np.repeat(starts, lengths)
    resp = pos >= np.repeat(prompt_lens, lengths)
    out = np.zeros(len(resp), dtype=np.float32)
    out[resp] = per_document(np.asarray(values)[resp], lengths - prompt_lens)
    return out


# ------------------------------------------------------------------------------------------------
# Corpus statistics: unigram and tfidf
# ------------------------------------------------------------------------------------------------


def chunk_counts(flat: np.ndarray, lengths: np.ndarray, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(token counts [V], document frequencies [V]) of a chunk of documents."""
    flat = np.asarray(flat, dtype=np.int64)
    counts = np.bincount(flat, minlength=vocab_size).astype(np.int64)
    doc = np.repeat(np.arange(len(lengths), dtype=np.int64), lengths)
    pairs = np.unique(doc * vocab_size + flat)
    df = np.bincount(pairs % vocab_size, minlength=vocab_size).astype(np.int64)
    return counts, df


def save_stats(path: Path, counts: np.ndarray, df: np.ndarray, n_docs: int) -> None:
    buf = io.BytesIO()
    np.savez(buf, counts=counts, doc_freq=df, n_docs=np.int64(n_docs))
    atomic_write_bytes(path, buf.getvalue())


def load_stats(path: Path) -> dict:
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: the density first-pass counts are missing; rerun the build")
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


class UnigramAnnotator(Annotator):
    """Corpus-level surprisal -log p(token), p = (count + k) / (total + k V)."""

    name = "unigram"
    needs_stats = True

    def __init__(self, counts: np.ndarray, smoothing: float = 1.0, normalize: str = "minmax"):
        super().__init__(normalize)
        c = counts.astype(np.float64) + smoothing
        self.table = (-np.log(c / c.sum())).astype(np.float32)

    def raw(self, flat, lengths, texts=None, prompt_lens=None):
        return self.table[flat]


class TfidfAnnotator(Annotator):
    """Document-level inverse document frequency idf(token) = log((N + k) / (df + k)) + 1 (sklearn's
    smooth idf) over the train split's N documents; `use_tf` multiplies by (1 + log tf in the
    document) (a sort per chunk: costlier, off by default)."""

    name = "tfidf"
    needs_stats = True

    def __init__(self, doc_freq: np.ndarray, n_docs: int, smoothing: float = 1.0, normalize: str = "minmax",
                 use_tf: bool = False):
        super().__init__(normalize)
        self.use_tf = use_tf
        self.V = len(doc_freq)
        self.idf = (np.log((n_docs + smoothing) / (doc_freq.astype(np.float64) + smoothing)) + 1.0).astype(np.float32)

    def raw(self, flat, lengths, texts=None, prompt_lens=None):
        flat = np.asarray(flat, dtype=np.int64)
        if not self.use_tf or not len(flat):
            return self.idf[flat]
        doc = np.repeat(np.arange(len(lengths), dtype=np.int64), lengths)
        _, inv, tf = np.unique(doc * self.V + flat, return_inverse=True, return_counts=True)
        return self.idf[flat] * (1.0 + np.log(tf[inv]))


# ------------------------------------------------------------------------------------------------
# Structure rules (code and math)
# ------------------------------------------------------------------------------------------------

BRANCH_KEYWORDS = {"if", "elif", "else", "for", "while", "return", "break", "continue", "try", "except",
                   "finally", "case", "switch", "match", "and", "or", "not", "yield", "raise", "assert",
                   "then", "therefore", "so", "because", "thus", "hence"}
DEF_KEYWORDS = {"def", "class", "lambda", "let", "var", "const", "function", "fn", "import", "from", "in",
                "is", "None", "True", "False", "null", "true", "false"}
STOP_WORDS = {"the", "a", "an", "of", "to", "and", "in", "on", "at", "by", "with", "as", "is", "are", "was",
              "were", "be", "been", "it", "its", "this", "that", "these", "those", "he", "she", "they", "we",
              "you", "i", "his", "her", "their", "our", "your", "has", "have", "had", "do", "does", "did",
              "for", "from", "or", "but", "not", "so", "than", "then", "there", "which", "who", "what"}
OPERATOR_CHARS = set("+-*/=<>%^&|!~@")
# class -> raw score (normalised per document afterwards)
SPACE, PUNCT, STOP, WORD, DEFKW, OP, BRANCH, NUMBER = range(8)
CLASS_SCORE = np.array([0.0, 0.05, 0.1, 0.4, 0.5, 0.8, 0.9, 1.0], dtype=np.float32)
IDENT_BONUS = 0.35  # an identifier that is defined (x = ..., def x) or used again in the document
_NUMBER = re.compile(r"^[+-]?(\d[\d_,]*\.?\d*|\.\d+)([eE][+-]?\d+)?%?$")
_WORDLIKE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def classify_piece(piece: str) -> int:
    s = piece.replace("\u2581", " ").strip()  # sentencepiece's word-boundary mark
    if not s:
        return SPACE
    has_alpha = any(ch.isalpha() for ch in s)
    if _NUMBER.match(s) or (not has_alpha and any(ch.isdigit() for ch in s)):
        return NUMBER  # also subword pieces of equations such as '>>24' or '/2='
    if not has_alpha and any(ch in OPERATOR_CHARS for ch in s):
        return OP  # '=', '+', '>>', '**', '->', ...
    if s in BRANCH_KEYWORDS or s.lower() in BRANCH_KEYWORDS - STOP_WORDS:
        return BRANCH
    if s in DEF_KEYWORDS:
        return DEFKW
    if s.lower() in STOP_WORDS:
        return STOP
    if _WORDLIKE.match(s) or any(ch.isalnum() for ch in s):
        return WORD
    return PUNCT


def _piece_strings(tokenizer) -> list[str]:
    pieces = []
    specials = set(tokenizer.special_ids)
    sp = getattr(tokenizer, "sp", None)
    for i in range(tokenizer.vocab_size):
        if i in specials:
            pieces.append("")
            continue
        try:
            pieces.append(sp.id_to_piece(i) if sp is not None else tokenizer.decode([i]))
        except Exception:  # ids a tokenizer cannot decode alone
            pieces.append("")
    return pieces


class StructureAnnotator(Annotator):
    """Rules for code and math, on the tokens' surface strings: numbers 1.0, branching keywords
    (if/else/for/while/return/and/or/not, "therefore"...) 0.9, operators 0.8, definition keywords
    0.5, other words/identifiers 0.4 (+0.35 when the identifier is defined, i.e. followed by `=` or
    preceded by def/class/let/..., or used again in the document), stop words 0.1, punctuation 0.05,
    whitespace 0."""

    name = "structure"

    def __init__(self, pieces: list[str], normalize: str = "minmax"):
        super().__init__(normalize)
        self.V = len(pieces)
        self.cls = np.array([classify_piece(p) for p in pieces], dtype=np.int8)
        stripped = [p.replace("\u2581", " ").strip() for p in pieces]
        self.is_assign = np.array([s == "=" for s in stripped], dtype=bool)
        self.is_defkw = np.array([s in {"def", "class", "let", "var", "const", "function", "fn"} for s in stripped],
                                 dtype=bool)

    @classmethod
    def for_tokenizer(cls, tokenizer, normalize: str = "minmax") -> StructureAnnotator:
        return cls(_piece_strings(tokenizer), normalize)

    def raw(self, flat, lengths, texts=None, prompt_lens=None):
        flat = np.asarray(flat, dtype=np.int64)
        n = len(flat)
        if n == 0:
            return np.zeros(0, np.float32)
        c = self.cls[flat]
        score = CLASS_SCORE[c].copy()
        word = c == WORD
        doc = np.repeat(np.arange(len(lengths), dtype=np.int32), lengths)
        reused = np.zeros(n, bool)
        w_idx = np.flatnonzero(word)
        if len(w_idx):  # repeats of (document, word id), sorting only the word tokens
            key = doc[w_idx].astype(np.int64) * self.V + flat[w_idx]
            order = np.argsort(key, kind="stable")
            sk = key[order]
            dup = np.zeros(len(sk), bool)
            same = sk[1:] == sk[:-1]
            dup[1:] |= same
            dup[:-1] |= same
            reused[w_idx[order]] = dup
        same_next = np.zeros(n, bool)
        same_next[:-1] = doc[1:] == doc[:-1]
        defined = np.zeros(n, bool)
        defined[:-1] = self.is_assign[flat[1:]] & same_next[:-1]  # x = ...
        defined[1:] |= self.is_defkw[flat[:-1]] & same_next[:-1]  # def x
        score[word & (reused | defined)] += IDENT_BONUS
        return score


# ------------------------------------------------------------------------------------------------
# Model surprisal
# ------------------------------------------------------------------------------------------------


# The checkpoint loader lives in pretrain, a layer above: named, resolved when a model annotator is
# built (common/plugins.py), so data_pipeline never imports pretrain. (checkpoint, device=) -> (model, info)
MODEL_LOADER = "pretrain.checkpoint:load_model_for_inference"


class ModelAnnotator(Annotator):
    """Per-token loss (nats) of a trained checkpoint as surprisal. Documents are cut into windows of
    the checkpoint's seq_len - 2 tokens laid out as the trainer sees them ([BOS] tokens [EOS] PAD...),
    `batch_size` windows per forward. ar: next-token CE of each token given its window prefix.
    mdm / scatter / block: K = `context_masks` passes; pass k masks the tokens at window positions
    = k (mod K) (so each token is masked once, with ~1/K of its context masked), time t = 1/K; the
    score is the CE of the token where it was masked."""

    name = "model"

    def __init__(self, checkpoint: str, tokenizer, device: str = "auto", batch_size: int = 32,
                 context_masks: int = 4, normalize: str = "minmax"):
        super().__init__(normalize)

        self.device = resolve_device(device, "density.device")
        load_model_for_inference = load_plugin(MODEL_LOADER, "data.density.annotator=model")
        self.model, info = load_model_for_inference(checkpoint, device=self.device)
        if info["vocab_size"] != tokenizer.vocab_size:
            raise ValueError(f"data.density.checkpoint {checkpoint}: its vocabulary has {info['vocab_size']} ids, "
                             f"this build's tokenizer {tokenizer.vocab_size}: annotate with a model of the same tokenizer")
        fp = info.get("tokenizer_fingerprint")
        if fp and fp != tokenizer.fingerprint:
            raise ValueError(f"data.density.checkpoint {checkpoint} was trained with tokenizer {fp}, "
                             f"this build uses {tokenizer.fingerprint}")
        self.variant = info["variant"]
        if self.variant not in ("ar", "mdm", "scatter", "block"):
            raise ValueError(f"the model annotator supports ar, mdm, scatter and block checkpoints, not {self.variant}")
        self.seq_len = int(info["seq_len"])
        self.on_response = bool(info.get("trains_on_response", False))
        self.pad, self.bos, self.eos, self.mask = tokenizer.special_ids
        self.batch_size, self.K = max(1, batch_size), max(1, context_masks)

    def _windows(self, flat, lengths):
        W = self.seq_len - 2
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        spans = [(int(s) + o, min(W, int(n) - o)) for s, n in zip(starts, lengths, strict=True) for o in range(0, int(n), W)]
        return spans

    def raw(self, flat, lengths, texts=None, prompt_lens=None):
        import torch
        import torch.nn.functional as F

        flat = np.asarray(flat, dtype=np.int64)
        out = np.zeros(len(flat), dtype=np.float32)
        lengths = np.asarray(lengths, dtype=np.int64)
        spans = self._windows(flat, lengths)
        L = self.seq_len
        if prompt_lens is not None:  # per token: where its document's prompt ends (flat index)
            starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
            prompt_end = np.repeat(starts + np.minimum(np.asarray(prompt_lens, dtype=np.int64), lengths), lengths)
        # a model trained on responses sees its prompt as such (Scatter and Jigsaw's masks depend on it)
        use_prompt = prompt_lens is not None and self.on_response
        for b0 in range(0, len(spans), self.batch_size):
            chunk = spans[b0:b0 + self.batch_size]
            R = len(chunk)
            ids = np.full((R, L), self.pad, dtype=np.int64)
            tok = np.zeros((R, L), dtype=bool)  # the tokens to mask and score (a task's response only)
            real_np = np.zeros((R, L), dtype=bool)  # [BOS] document [EOS]: the keys the model may see
            prompt = np.zeros((R, L), dtype=bool)  # [BOS] and the window's prompt tokens (task data)
            prompt[:, 0] = True
            for r, (s, n) in enumerate(chunk):
                ids[r, 0], ids[r, 1:1 + n], ids[r, 1 + n] = self.bos, flat[s:s + n], self.eos
                tok[r, 1:1 + n] = True
                real_np[r, :n + 2] = True
                if prompt_lens is not None:
                    k = min(n, max(0, int(prompt_end[s]) - s))  # prompt tokens inside this window
                    prompt[r, 1:1 + k] = True
                    tok[r, 1:1 + k] = False  # the prompt stays clean: never masked, never scored
            x = torch.from_numpy(ids).to(self.device)
            # its own array: `real` was once built by editing a tensor that shared tok's memory on the CPU
            # (from_numpy(...).to(cpu) is no copy), which also masked [BOS] and the EOS slot (CPU only)
            real = torch.from_numpy(real_np).to(self.device)
            ce = torch.zeros(R, L, dtype=torch.float32, device=self.device)
            with torch.no_grad():
                if self.variant == "ar":
                    logits = self.model(x, None, key_padding_mask=real)
                    ce[:, 1:] = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), x[:, 1:], reduction="none")
                else:
                    pos = torch.arange(L, device=self.device)
                    tokt = torch.from_numpy(tok).to(self.device)
                    t = torch.full((R,), 1.0 / self.K, device=self.device)
                    for k in range(self.K):
                        m = tokt & (pos % self.K == k)
                        x_t = torch.where(m, torch.full_like(x, self.mask), x)
                        kw = {"x0": x} if self.variant == "block" else {}
                        if use_prompt:
                            kw["prompt_mask"] = torch.from_numpy(prompt).to(self.device)
                        logits = self.model(x_t, t, key_padding_mask=real, **kw)
                        logits = logits.float()
                        logits[..., self.mask] = float("-inf")  # SUBS: [MASK] is never a prediction
                        ce_k = F.cross_entropy(logits.transpose(1, 2), x, reduction="none")
                        ce = torch.where(m, ce_k, ce)
            ce = ce.cpu().numpy()
            for r, (s, n) in enumerate(chunk):
                out[s:s + n] = ce[r, 1:1 + n]
        return out


# ------------------------------------------------------------------------------------------------
# Entry points for the build
# ------------------------------------------------------------------------------------------------

ANNOTATORS = ("none", "unigram", "tfidf", "structure", "model")


def needs_stats(dcfg) -> bool:
    return dcfg.annotator in ("unigram", "tfidf")


def check_density_config(dcfg) -> list[str]:
    """Problems of a `data.density` section (empty when valid)."""
    problems = []
    if dcfg.annotator not in ANNOTATORS:
        problems.append(f"data.density.annotator={dcfg.annotator!r}: expected one of {', '.join(ANNOTATORS)}")
    if dcfg.normalize not in NORMALIZERS:
        problems.append(f"data.density.normalize={dcfg.normalize!r}: expected one of {', '.join(NORMALIZERS)}")
    if dcfg.view not in VIEWS:
        problems.append(f"data.density.view={dcfg.view!r}: expected one of {', '.join(VIEWS)}")
    if not 0.0 < dcfg.hub_fraction <= 1.0:
        problems.append(f"data.density.hub_fraction={dcfg.hub_fraction}: must be in (0, 1]")
    if dcfg.dtype not in ("uint8", "float16"):
        problems.append(f"data.density.dtype={dcfg.dtype!r}: expected uint8 or float16")
    if dcfg.smoothing <= 0:
        problems.append(f"data.density.smoothing={dcfg.smoothing}: must be > 0")
    if dcfg.annotator == "model" and not dcfg.checkpoint:
        problems.append("data.density.annotator=model needs data.density.checkpoint (a checkpoint or run directory)")
    if dcfg.device not in ("auto", "cpu", "cuda"):
        problems.append(f"data.density.device={dcfg.device!r}: expected auto, cpu or cuda")
    if dcfg.batch_size < 1 or dcfg.context_masks < 1:
        problems.append("data.density.batch_size and context_masks must be >= 1")
    return problems


def build_annotator(dcfg, tokenizer, shard_dir: str | Path | None = None) -> Annotator | None:
    """The configured annotator (None for `none`); unigram/tfidf read the first pass's counts."""
    a = dcfg.annotator
    if a == "none":
        return None
    if a in ("unigram", "tfidf"):
        if shard_dir is None:
            raise ValueError(f"the {a} annotator needs the dataset's {STATS_FILE} (no shard_dir given)")
        stats = load_stats(Path(shard_dir) / STATS_FILE)
        if a == "unigram":
            return UnigramAnnotator(stats["counts"], dcfg.smoothing, dcfg.normalize)
        return TfidfAnnotator(stats["doc_freq"], int(stats["n_docs"]), dcfg.smoothing, dcfg.normalize)
    if a == "structure":
        return StructureAnnotator.for_tokenizer(tokenizer, dcfg.normalize)
    if a == "model":
        return ModelAnnotator(dcfg.checkpoint, tokenizer, dcfg.device, dcfg.batch_size, dcfg.context_masks,
                              dcfg.normalize)
    raise ValueError(f"data.density.annotator={a!r}: expected one of {', '.join(ANNOTATORS)}")


def annotate(annotator: Annotator, flat: np.ndarray, lengths: np.ndarray, view: str = "scores",
             hub_fraction: float = 0.25, texts=None, prompt_id: int | None = None) -> np.ndarray:
    """What the build stores: per-document normalised scores, or the hubs view of them. prompt_id:
    the prompt separator's id when the data trains on responses (data.train_on): scores, their
    normalisation and the hubs then cover each document's response only; the prompt stores 0."""
    if prompt_id is None:
        s = annotator.scores(flat, lengths, texts)
        return hubs(s, lengths, hub_fraction) if view == "hubs" else s
    plen = prompt_lengths(flat, lengths, prompt_id)
    s = annotator.scores(flat, lengths, texts, prompt_lens=plen)
    if view != "hubs":
        return s
    return response_only(s, lengths, plen, lambda r, n: hubs(r, n, hub_fraction))
