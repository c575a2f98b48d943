from pathlib import Path

import numpy as np
import pytest

from data_pipeline.config import DataConfig
from data_pipeline.document import Document
from data_pipeline.tokenizer import (
    CharTokenizer,
    SentencePieceTokenizer,
    TokenizerError,
    load_tokenizer,
    make_tokenizer,
)

SHAKESPEARE = Path("/work/shared/corpora/tinyshakespeare/input.txt")


def _corpus() -> list[str]:
    if SHAKESPEARE.is_file():
        lines = [ln for ln in SHAKESPEARE.read_text().splitlines() if ln.strip()][:4000]
    else:  # a self-written corpus keeps the test meaningful elsewhere
        lines = [f"line {i}: the quick brown fox jumps over the lazy dog {i * 7 % 13}" for i in range(4000)]
    return lines


def test_char_tokenizer_round_trip_and_specials(tmp_path):
    tok = make_tokenizer(DataConfig(source="task:sudoku", tokenizer="task"))
    assert isinstance(tok, CharTokenizer)
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.mask_id) == (0, 1, 2, 3)
    assert tok.vocab_size == 4 + len("0123456789.=")
    text = "." * 40 + "123456789" * 4 + "5=" + "123456789" * 9
    ids = tok.encode(text)
    assert min(ids) >= 4 and tok.decode(ids) == text
    assert tok.decode([1, *ids[:3], 2, 0]) == text[:3]
    assert tok.decode([1, 3], skip_special=False) == "[BOS][MASK]"
    assert tok.encode_batch(["12", "3"]) == [tok.encode("12"), tok.encode("3")]
    with pytest.raises(TokenizerError, match="'x'"):
        tok.encode("12x")
    tok.save(tmp_path)
    again = load_tokenizer(tmp_path)
    assert again.fingerprint == tok.fingerprint and again.encode(text) == ids
    assert CharTokenizer("ab").fingerprint != CharTokenizer("ba").fingerprint


def test_char_tokenizer_for_text_takes_the_alphabet_of_both_splits(tmp_path):
    corpus = tmp_path / "corpus.txt"
    lines = [f"line {i}: to be or not {i % 7}" for i in range(200)] + ["Zebra quïz!"]
    corpus.write_text("\n".join(lines) + "\n")
    cfg = DataConfig(source=str(corpus), tokenizer="char", txt_documents="line", val_fraction=0.2)
    tok = make_tokenizer(cfg)
    assert isinstance(tok, CharTokenizer)
    assert tok.symbols == "".join(sorted(set("".join(lines))))
    assert tok.vocab_size == 4 + len(tok.symbols)
    for text in lines:  # whichever split a line fell in, it encodes, one id per character
        ids = tok.encode(text)
        assert len(ids) == len(text) and min(ids) >= 4 and tok.decode(ids) == text


def test_sentencepiece_trains_round_trips_and_saves(tmp_path):
    lines = _corpus()
    cfg = DataConfig(source=str(SHAKESPEARE), tokenizer="sentencepiece", vocab_size=600)
    tok = make_tokenizer(cfg, (Document(str(i), t) for i, t in enumerate(lines)))
    assert isinstance(tok, SentencePieceTokenizer)
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.mask_id) == (0, 1, 2, 3)
    assert tok.vocab_size == 600
    for text in [*lines[:50], "Unseen  double  spaces, ünïcode ☃ and\ttabs"]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert tok.mask_id not in ids
    tok.save(tmp_path / "tok")
    again = load_tokenizer(tmp_path / "tok")
    assert again.fingerprint == tok.fingerprint
    assert again.encode_batch(lines[:5]) == tok.encode_batch(lines[:5])
    model = tmp_path / "tok" / "tokenizer.model"
    from_path = make_tokenizer(DataConfig(tokenizer=f"sentencepiece:{model}", vocab_size=600))
    assert from_path.fingerprint == tok.fingerprint
    # the build's flat form: every text's ids back to back in the shard dtype, and the lengths
    texts = [*lines[:300], "", "Unseen  double  spaces, ünïcode ☃ and\ttabs"]
    expected = tok.encode_batch(texts)
    flat, lengths = tok.encode_flat(texts)
    assert flat.dtype == np.uint16 and lengths.dtype == np.int64
    assert lengths.tolist() == [len(ids) for ids in expected]
    assert flat.tolist() == [i for ids in expected for i in ids]


def test_tokenizer_errors_say_what_to_do(tmp_path):
    missing = tmp_path / "nope.model"
    with pytest.raises(TokenizerError, match="nope.model"):
        make_tokenizer(DataConfig(tokenizer=f"sentencepiece:{missing}"))
    with pytest.raises(TokenizerError, match="task:NAME source"):
        make_tokenizer(DataConfig(source="corpus.txt", tokenizer="task"))
    with pytest.raises(TokenizerError, match="tokenizer.json"):
        load_tokenizer(tmp_path)
    with pytest.raises(TokenizerError, match="expected task, char, sentencepiece"):
        make_tokenizer(DataConfig(tokenizer="bpe"))


def test_hf_tokenizer_from_an_unreachable_hub_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # unreachable on any machine
    with pytest.raises(TokenizerError, match="could not be loaded.*sentencepiece"):
        make_tokenizer(DataConfig(tokenizer="hf:bert-base-uncased"))
