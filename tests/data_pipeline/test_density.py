"""Density annotators rank informative tokens above glue; normalisation and hubs; annotated builds."""

import json
import types

import numpy as np
import pytest
import torch

from data_pipeline.config import DataConfig, DensityConfig
from data_pipeline.density import (
    ModelAnnotator,
    StructureAnnotator,
    TfidfAnnotator,
    UnigramAnnotator,
    annotate,
    hubs,
    normalize_per_document,
)
from data_pipeline.density.annotators import chunk_counts


class WordTok:
    """A whitespace word tokenizer over a fixed vocabulary (ids 0-3 are pad, bos, eos, mask)."""

    def __init__(self, words):
        self.words = ["<pad>", "<s>", "</s>", "<mask>", *words]
        self.ids = {w: i for i, w in enumerate(self.words)}
        self.pad_id, self.bos_id, self.eos_id, self.mask_id = range(4)
        self.vocab_size = len(self.words)
        self.fingerprint = "wordtok"

    @property
    def special_ids(self):
        return 0, 1, 2, 3

    def encode(self, text):
        return [self.ids[w] for w in text.split()]

    def encode_batch(self, texts):
        return [self.encode(t) for t in texts]

    def decode(self, ids):
        return " ".join(self.words[i] for i in ids if i >= 4)

    def encode_flat(self, texts):  # what the build's encode_chunk calls
        return _flat(self, texts)


CORPUS = [
    "the cat sat on the mat .",
    "the dog ate the bone , and the cat slept .",
    "the weather is nice , the sun is warm .",
    "the ferromagnetic sample was heated to 300 kelvin .",
    "the result is 12 + 30 = 42 .",
]
WORDS = sorted({w for line in CORPUS for w in line.split()} | {"x", "y", "=", "if", "return", ">", ";", ":", "3",
                                                               "5", "def", "f", "(", ")", "+", "*", "print"})


def _flat(tok, texts):
    ids = tok.encode_batch(texts)
    return np.array([i for d in ids for i in d], dtype=np.int64), np.array([len(d) for d in ids], dtype=np.int64)


def _score_of(tok, text, scores, word):
    words = text.split()
    return max(float(scores[i]) for i, w in enumerate(words) if w == word)


@pytest.fixture
def tok():
    return WordTok(WORDS)


def _corpus_annotators(tok):
    flat, lengths = _flat(tok, CORPUS)
    counts, df = chunk_counts(flat, lengths, tok.vocab_size)
    return {"unigram": UnigramAnnotator(counts), "tfidf": TfidfAnnotator(df, len(CORPUS))}


@pytest.mark.parametrize("name", ["unigram", "tfidf"])
def test_corpus_annotators_rank_rare_content_above_glue(tok, name):
    ann = _corpus_annotators(tok)[name]
    text = "the ferromagnetic sample was heated to 300 kelvin ."
    flat, lengths = _flat(tok, [text])
    s = ann.scores(flat, lengths)
    assert s.dtype == np.float32 and s.min() >= 0 and s.max() <= 1
    for rare in ("ferromagnetic", "300", "kelvin"):
        for glue in ("the", "."):
            assert _score_of(tok, text, s, rare) > _score_of(tok, text, s, glue), (rare, glue)


def test_structure_annotator_ranks_numbers_operators_branches_above_glue(tok):
    ann = StructureAnnotator.for_tokenizer(tok)
    text = "x = 3 + 5 ; if x > 5 : return x ; the y"
    flat, lengths = _flat(tok, [text])
    s = ann.scores(flat, lengths)
    for hi in ("3", "5", "+", ">", "if", "return", "x"):
        for lo in (";", ":", "the"):
            assert _score_of(tok, text, s, hi) > _score_of(tok, text, s, lo), (hi, lo)
    # an identifier defined and used again outranks one that appears once
    assert _score_of(tok, text, s, "x") > _score_of(tok, text, s, "y")
    # arithmetic in prose: the numbers are the hubs
    text2 = "the result is 12 + 30 = 42 ."
    f2, l2 = _flat(tok, [text2])
    s2 = ann.scores(f2, l2)
    assert min(_score_of(tok, text2, s2, n) for n in ("12", "30", "42")) > max(
        _score_of(tok, text2, s2, g) for g in ("the", ".", "is"))


class _UnigramModel(torch.nn.Module):
    """A 'trained' model that predicts a fixed unigram distribution favouring glue words."""

    def __init__(self, tok, variant):
        super().__init__()
        logits = torch.full((tok.vocab_size,), -4.0)
        for w in ("the", ".", ",", "is"):
            logits[tok.ids[w]] = 3.0
        self.register_buffer("logits", logits)
        self.variant, self.calls = variant, []

    def forward(self, x, t=None, key_padding_mask=None, x0=None):
        self.calls.append((tuple(x.shape), t is None))
        return self.logits.expand(*x.shape, -1).clone()


@pytest.mark.parametrize("variant", ["ar", "mdm"])
def test_model_annotator_uses_per_token_loss(tok, variant, monkeypatch):
    import pretrain.checkpoint

    model = _UnigramModel(tok, variant)
    monkeypatch.setattr(pretrain.checkpoint, "load_model_for_inference", lambda path, device="cpu": (
        model, {"variant": variant, "vocab_size": tok.vocab_size, "seq_len": 8, "tokenizer_fingerprint": "wordtok"}))
    ann = ModelAnnotator("ckpt", tok, device="cpu", batch_size=2, context_masks=3)
    texts = ["the ferromagnetic sample was heated to 300 kelvin .", "the cat sat ."]
    flat, lengths = _flat(tok, texts)  # 9 tokens > seq_len - 2: cut into windows
    s = ann.scores(flat, lengths)
    assert len(s) == len(flat)
    d0 = s[:lengths[0]]
    for rare in ("ferromagnetic", "300", "kelvin"):
        assert _score_of(tok, texts[0], d0, rare) > _score_of(tok, texts[0], d0, "the")
    assert all(c[1] == (variant == "ar") for c in model.calls)  # diffusion passes get a time
    if variant == "mdm":
        assert len(model.calls) == 3 * 2  # K masks x 2 batches (3 windows, batch_size 2)


def test_model_annotator_refuses_another_vocabulary(tok, monkeypatch):
    import pretrain.checkpoint

    monkeypatch.setattr(pretrain.checkpoint, "load_model_for_inference", lambda path, device="cpu": (
        None, {"variant": "mdm", "vocab_size": 7, "seq_len": 8}))
    with pytest.raises(ValueError, match="vocabulary"):
        ModelAnnotator("ckpt", tok, device="cpu")


def test_normalisation_per_document_and_hubs():
    raw = np.array([5.0, 1.0, 3.0, 3.0, 10.0, 7.0, 7.0, 7.0], dtype=np.float32)
    lengths = np.array([4, 1, 3, 0])
    r = normalize_per_document(raw, lengths, "rank")
    assert np.allclose(r[:4], [1.0, 0.0, 0.5, 0.5]) and r[4] == 0.5 and np.allclose(r[5:], 0.5)
    m = normalize_per_document(raw, lengths, "minmax")
    assert np.allclose(m[:4], [1.0, 0.0, 0.5, 0.5])
    h = hubs(np.array([0.1, 0.9, 0.5, 0.2, 0.3, 0.8], dtype=np.float32), np.array([4, 2]), 0.5)
    assert h.tolist() == [0, 1, 1, 0, 0, 1]
    ann = types.SimpleNamespace(scores=lambda f, lens, t=None: np.linspace(0, 1, len(f), dtype=np.float32))
    v = annotate(ann, np.arange(8), np.array([8]), view="hubs", hub_fraction=0.25)
    assert v.sum() == 2 and v[-2:].tolist() == [1, 1]


@pytest.mark.parametrize("annotator", ["unigram", "structure"])
def test_annotated_shards_build_via_config(tmp_path, annotator):
    from data_pipeline.build import BUILD_FILE, default_shard_dir, ensure_shards
    from data_pipeline.density import STATS_FILE
    from data_pipeline.shards import ShardReader
    from data_pipeline.stream import ShardStream

    cfg = DataConfig(source="task:sudoku", shard_dir=str(tmp_path / "s"),
                     density=DensityConfig(annotator=annotator, dtype="float16"))
    cfg.task.num_train, cfg.task.num_val = 60, 8
    info = ensure_shards(cfg, progress=False, workers=1)
    idx = ShardReader(info.train_dir).index
    assert idx["has_density"] and idx["density_dtype"] == "float16"
    data = ShardReader(info.train_dir).load_shard(0, with_density=True)
    assert data.density is not None and len(data.density) == len(data.tokens)
    assert 0.0 <= float(data.density.min()) and float(data.density.max()) <= 1.0
    assert json.loads((info.shard_dir / BUILD_FILE).read_text())["fields"]["density"]["annotator"] == annotator
    assert (info.shard_dir / STATS_FILE).is_file() == (annotator == "unigram")
    stream = ShardStream(info.train_dir, seq_len=100, pad_id=info.pad_id, bos_id=info.bos_id, eos_id=info.eos_id,
                         batch_size=4)
    batch = next(iter(stream))
    assert batch["density"].shape == batch["input_ids"].shape
    # task data trains on responses: the prompt's tokens carry no density, the responses do
    from data_pipeline.stream import prompt_mask_of
    from data_pipeline.tasks import get_task

    prompt = prompt_mask_of(batch["input_ids"], info.tokenizer.encode(get_task("sudoku").separator)[0])
    assert not batch["density"][prompt].any() and batch["density"][~prompt].any()
    # inspect's summary shows the density histogram, its counts covering every stored token
    from data_pipeline.inspect import describe_split

    text = describe_split(info.train_dir, top_k=3, progress=False)
    hist = [int(c.replace(",", "")) for c in text.split("density histogram (10 bins over [0, 1]): ")[1].split()]
    assert len(hist) == 10 and sum(hist) == idx["total_tokens"]
    # the annotator is part of the content: another one builds elsewhere; none keeps the old name
    assert default_shard_dir(cfg) != default_shard_dir(DataConfig(source="task:sudoku", task=cfg.task))
    from data_pipeline.build import build_fields

    assert build_fields(DataConfig())["density"] is None  # no annotator: no density in the content


def test_parallel_build_gives_identical_density(tmp_path):
    from data_pipeline.build import ensure_shards

    hashes = []
    for w in (1, 2):
        cfg = DataConfig(source="task:sudoku", shard_dir=str(tmp_path / f"w{w}"),
                         density=DensityConfig(annotator="tfidf"))
        cfg.task.num_train, cfg.task.num_val = 60, 8
        info = ensure_shards(cfg, progress=False, workers=w)
        hashes.append(json.loads((info.train_dir / "index.json").read_text())["shards"][0]["sha256"])
    assert hashes[0] == hashes[1]


def test_bad_density_config_is_refused(tmp_path):
    from common.config_file import ConfigError
    from data_pipeline.build import build

    with pytest.raises(ConfigError, match="annotator"):
        build(DataConfig(source="task:sudoku", shard_dir=str(tmp_path), density=DensityConfig(annotator="bogus")))
    with pytest.raises(ConfigError, match="checkpoint"):
        build(DataConfig(source="task:sudoku", shard_dir=str(tmp_path), density=DensityConfig(annotator="model")))


# Task data trains on responses (issue 17): the masking policies only see the response, so its density
# is scored with the prompt clean and visible, and normalised (and its hubs chosen) among the response.
TASK_DOCS = ["the ferromagnetic sample was heated = to 300 kelvin .", "x = 12 + x = 42 ;",
             "the cat = sat on the mat .", "the result is 42 ."]  # the first '=' ends a prompt; the last has none


class _Recorder(torch.nn.Module):
    """Records every call's input and prompt_mask, then runs the real model."""

    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, []

    def forward(self, x, t=None, key_padding_mask=None, x0=None, prompt_mask=None):
        self.calls.append((x.clone(), None if prompt_mask is None else prompt_mask.clone()))
        return self.model(x, t, key_padding_mask=key_padding_mask, prompt_mask=prompt_mask)


def _prompt_lens(tok, texts):
    """Each document's prompt length; a document without '=' is all prompt (nothing trained on)."""
    return np.array([t.split().index("=") + 1 if "=" in t.split() else len(t.split()) for t in texts])


def test_annotate_with_a_prompt_scores_and_normalises_the_response_only(tok):
    flat, lengths = _flat(tok, TASK_DOCS)
    sep = tok.ids["="]
    counts, _ = chunk_counts(flat, lengths, tok.vocab_size)
    ann = UnigramAnnotator(counts)
    plen = _prompt_lens(tok, TASK_DOCS)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    for view in ("scores", "hubs"):
        s = annotate(ann, flat, lengths, view, hub_fraction=0.5, prompt_id=sep)
        for d, (a, n, p) in enumerate(zip(starts, lengths, plen, strict=True)):
            prompt, resp = s[a:a + p], s[a + p:a + n]
            assert not prompt.any(), (view, d)  # the prompt stores 0
            if n == p:  # no separator: all prompt, nothing to score
                continue
            if view == "scores":  # minmax over the response alone: its own 0 and 1
                assert resp.min() == 0.0 and resp.max() == 1.0, (d, resp)
            else:  # hubs among the response: ceil(0.5 n_response) of them
                assert resp.sum() == np.ceil(0.5 * (n - p)), (d, resp)
    # without a prompt the whole document is scored, as before
    assert annotate(ann, flat, lengths, "scores")[:plen[0]].any()


@pytest.mark.parametrize("variant", ["scatter", "mdm"])
def test_model_annotator_keeps_the_prompt_clean_and_visible(tok, variant, monkeypatch):
    import pretrain.checkpoint
    from pretrain.config import ModelConfig
    from pretrain.model import build_model

    torch.manual_seed(0)
    net = build_model(ModelConfig(variant=variant, n_layers=2, d_model=32, n_heads=2, block_size=4), tok.vocab_size, 16)
    model = _Recorder(net.eval())
    monkeypatch.setattr(pretrain.checkpoint, "load_model_for_inference", lambda path, device="cpu": (
        model, {"variant": variant, "vocab_size": tok.vocab_size, "seq_len": 16, "tokenizer_fingerprint": "wordtok",
                "trains_on_response": True}))
    ann = ModelAnnotator("ckpt", tok, device="cpu", batch_size=4, context_masks=2)
    flat, lengths = _flat(tok, TASK_DOCS)
    plen = _prompt_lens(tok, TASK_DOCS)
    s = annotate(ann, flat, lengths, "scores", prompt_id=tok.ids["="])
    assert model.calls
    for x, prompt in model.calls:
        assert prompt is not None  # the model trained on responses is told where its prompt is
        for r in range(len(TASK_DOCS)):
            k = int(plen[r])
            assert prompt[r].tolist() == [True] * (k + 1) + [False] * (16 - k - 1)  # [BOS] + prompt
            assert not (x[r, :k + 1] == tok.mask_id).any()  # never masked
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    assert not s[starts[3]:starts[3] + lengths[3]].any()  # no separator: all prompt, all 0
    # the response's scores are the model's CE with the prompt clean: recompute one directly
    r, k = 1, int(plen[1])  # "x =" then "12 + x = 42 ;"
    ids = torch.tensor([[tok.bos_id, *flat[starts[r]:starts[r] + lengths[r]], tok.eos_id]])
    real, pm = torch.ones_like(ids, dtype=torch.bool), torch.zeros_like(ids, dtype=torch.bool)
    pm[0, :k + 1] = True
    ce = []
    with torch.no_grad():
        for j in range(k, lengths[r]):  # each response token masked with its pass's other tokens (K = 2)
            m = torch.zeros_like(pm)
            m[0, 1 + k:1 + lengths[r]] = (torch.arange(1 + k, 1 + lengths[r]) % 2) == ((1 + j) % 2)
            x_t = torch.where(m, tok.mask_id, ids)
            logits = net(x_t, torch.tensor([0.5]), key_padding_mask=real, prompt_mask=pm).float()
            logits[..., tok.mask_id] = float("-inf")
            ce.append(float(-logits[0, 1 + j].log_softmax(-1)[ids[0, 1 + j]]))
    expect = normalize_per_document(np.array(ce), np.array([len(ce)]))
    assert np.allclose(s[starts[r] + k:starts[r] + lengths[r]], expect, atol=1e-5)


def test_the_build_annotates_task_data_over_the_response(tok):
    """The build passes the prompt separator to its annotating workers when the data trains on
    responses (task data by default), and only then."""
    from data_pipeline.build import density_settings
    from data_pipeline.encode import encode_annotate_chunk

    task = DataConfig(source="task:pathfinding", density=DensityConfig(annotator="unigram"))
    assert density_settings(task)["prompt_separator"] == "="
    assert "prompt_separator" not in density_settings(DataConfig(source="task:pathfinding", train_on="all",
                                                                 density=DensityConfig(annotator="unigram")))
    assert "prompt_separator" not in density_settings(DataConfig(source="c.txt", density=DensityConfig(annotator="unigram")))
    flat, lengths = _flat(tok, TASK_DOCS)
    ann = UnigramAnnotator(chunk_counts(flat, lengths, tok.vocab_size)[0])
    dens = {"view": "scores", "hub_fraction": 0.25, "prompt_separator": "="}
    _, _, _, d, _ = encode_annotate_chunk(TASK_DOCS, tokenizer=tok, annotator=ann, density=dens)
    assert np.array_equal(d, annotate(ann, flat, lengths, "scores", prompt_id=tok.ids["="]))
    assert not d[:_prompt_lens(tok, TASK_DOCS)[0]].any()
