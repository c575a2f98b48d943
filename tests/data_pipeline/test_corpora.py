"""The public corpora the repro and density recipes read: each recipe's local source is a known corpus
with a pinned download, `fetch` checks the sha256 before writing, and a missing corpus file says how
to fetch it."""

import glob
import hashlib

import pytest

from data_pipeline.corpora import CORPORA, Corpus, CorpusError, fetch
from data_pipeline.remote import STDLIB_MARK, local_path
from data_pipeline.sources import DataSourceError, local_files
from pretrain.config import load_config


def test_every_recipe_reads_a_task_a_hub_dataset_or_a_fetchable_corpus():
    """...or this Python's standard library (`{stdlib}`), which every machine that runs the product has."""
    for recipe in sorted(glob.glob("configs/**/*.yaml", recursive=True)):
        source = load_config(recipe).data.source
        if source.startswith(("task:", "hf:")):
            continue
        for path in source.split(","):
            if path.startswith(STDLIB_MARK + "/"):
                assert local_path(path).exists(), (recipe, path, local_path(path))
                continue
            assert path.startswith("../shared/corpora/"), (recipe, path)
            assert path.removeprefix("../shared/corpora/") in CORPORA, (recipe, path)


def test_fetch_checks_the_sha256_and_keeps_a_good_copy(tmp_path):
    origin = tmp_path / "origin.txt"
    origin.write_bytes(b"the cat sat\n")
    good = Corpus("text/a.txt", origin.as_uri(), hashlib.sha256(b"the cat sat\n").hexdigest(), "test")
    dest = tmp_path / "corpora"
    assert fetch(good, dest).read_bytes() == b"the cat sat\n"
    origin.write_bytes(b"changed\n")  # a copy with the recorded sha256 is not downloaded again
    assert fetch(good, dest).read_bytes() == b"the cat sat\n"

    bad = Corpus("text/b.txt", origin.as_uri(), good.sha256, "test")
    with pytest.raises(CorpusError, match="expected"):
        fetch(bad, dest)
    assert not (dest / "text" / "b.txt").exists()


def test_a_missing_corpus_file_names_the_fetch_command(tmp_path):
    with pytest.raises(DataSourceError, match="python -m data_pipeline.corpora fetch --dest .* gsm8k/train.jsonl"):
        local_files(str(tmp_path / "corpora" / "gsm8k" / "train.jsonl"))
