"""Token corpora: the embedded corpus is deterministic, local files read back exactly, and the
OpenWebText preparation works on a tiny local sample (documents and tokenizer injected, no network)."""

from __future__ import annotations

import importlib.util
import json
import math

import numpy as np
import pytest
import torch

import recipes.data as data
from recipes.data import OpenWebText, StdlibCorpus, TextFile, unigram_perplexity, write_bpe_corpus

pytestmark = pytest.mark.timeout(120)
SIZES = dict(block_size=32, batch_size=4, val_batches=2, seed=0)


def test_unigram_perplexity_of_uniform_tokens_is_the_alphabet_size():
    assert unigram_perplexity(np.arange(256).repeat(3), 256) == pytest.approx(256)
    assert unigram_perplexity(np.array([7] * 10), 256) == pytest.approx(1)


def test_embedded_corpus_is_built_deterministically(tmp_path):
    built = []
    for k in range(2):
        dm = StdlibCorpus(max_bytes=300_000, cache_dir=str(tmp_path / f"cache{k}"), **SIZES)
        dm.setup("fit")
        built.append(dm)
    a, b = built
    for split in ("train", "val"):
        tokens = (a.cache_path / f"{split}.bin").read_bytes()
        assert tokens == (b.cache_path / f"{split}.bin").read_bytes()  # same tokens twice
        assert len(tokens) > 1000
    assert a.cache_path.name == b.cache_path.name and a.meta == b.meta
    assert 300_000 <= a.meta["train_tokens"] + a.meta["val_tokens"] < 600_000
    assert b"def " in (a.cache_path / "train.bin").read_bytes()  # Python sources, byte-level
    assert 10 < a.val_unigram_perplexity() < 60  # byte frequencies of code: ~20-30
    # the same windows in the same order, and y is x shifted by one token
    assert np.array_equal(a.train_set.offsets, b.train_set.offsets)
    x, y = next(iter(a.train_dataloader()))
    assert x.shape == y.shape == (4, 32) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert len(a.val_dataloader()) == 2


def test_a_changed_setting_builds_a_new_cache(tmp_path):
    small = StdlibCorpus(max_bytes=150_000, cache_dir=str(tmp_path), **SIZES)
    large = StdlibCorpus(max_bytes=300_000, cache_dir=str(tmp_path), **SIZES)
    assert small.cache_path != large.cache_path


def test_text_file_reads_a_local_file(tmp_path):
    text = "".join(f"line {i}: the quick brown fox jumps over the lazy dog\n" for i in range(400)).encode()
    path = tmp_path / "notes.txt"
    path.write_bytes(text)
    dm = TextFile(path=str(path), val_fraction=0.1, cache_dir=str(tmp_path / "cache"), **SIZES)
    dm.setup("fit")
    train, val = ((dm.cache_path / f"{s}.bin").read_bytes() for s in ("train", "val"))
    assert train + val == text and len(val) == int(len(text) * 0.1)
    assert dm.meta["vocab_size"] == 256 and dm.meta["sha256"]["val"]
    x, y = next(iter(dm.val_dataloader()))
    assert bytes(x[0].tolist()) in text


def test_text_file_too_small_for_a_window_says_so(tmp_path):
    path = tmp_path / "tiny.txt"
    path.write_text("x" * 50)
    dm = TextFile(path=str(path), cache_dir=str(tmp_path / "cache"), **SIZES)
    with pytest.raises(ValueError, match="validation split has 5 tokens"):
        dm.setup("fit")


class FakeBPE:
    """tiktoken's interface (encode_ordinary, eot_token) over words: no BPE file to download."""

    eot_token = 50256

    def encode_ordinary(self, text: str) -> list[int]:
        return [sum(map(ord, w)) % 50000 for w in text.split()]


DOCS = [f"document {i} " + " ".join(f"word{(i * j) % 97}" for j in range(60)) for i in range(30)]


def test_bpe_preparation_splits_documents_and_separates_them_with_eot(tmp_path):
    n = write_bpe_corpus(tmp_path, iter(DOCS), FakeBPE(), val_every=10)
    assert n == 30
    train, val = (np.fromfile(tmp_path / f"{s}.bin", dtype=np.uint16) for s in ("train", "val"))
    tok = FakeBPE()
    expect = {False: [], True: []}
    for i, doc in enumerate(DOCS):
        expect[i % 10 == 0] += [*tok.encode_ordinary(doc), tok.eot_token]
    assert train.tolist() == expect[False] and val.tolist() == expect[True]
    assert (val == 50256).sum() == 3  # documents 0, 10 and 20


def test_openwebtext_data_module_prepares_a_local_sample(tmp_path, monkeypatch):
    asked = {}

    def fake_load(hf_path, hf_revision):
        asked.update(path=hf_path, revision=hf_revision)
        return iter(DOCS)

    monkeypatch.setattr(data, "load_openwebtext", fake_load)
    monkeypatch.setattr(data, "gpt2_tokenizer", FakeBPE)
    dm = OpenWebText(val_every=5, max_documents=25, cache_dir=str(tmp_path), block_size=16, batch_size=2,
                     val_batches=2, seed=0)
    dm.setup("fit")
    meta = json.loads((dm.cache_path / "meta.json").read_text())
    assert asked == {"path": "Skylion007/openwebtext", "revision": None}
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == 50257 == dm.vocab_size
    assert "25 documents" in meta["source"]
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (2, 16) and int(x.max()) <= 50256 and torch.equal(x[:, 1:], y[:, :-1])
    assert math.isfinite(dm.val_unigram_perplexity())


@pytest.mark.skipif(importlib.util.find_spec("tiktoken") is not None, reason="tiktoken is installed")
def test_missing_tokenizer_package_says_what_to_install():
    with pytest.raises(ImportError, match="pip install tiktoken"):
        data.gpt2_tokenizer()


@pytest.mark.skipif(importlib.util.find_spec("datasets") is not None, reason="datasets is installed")
def test_missing_datasets_package_says_what_to_install():
    with pytest.raises(ImportError, match="pip install datasets"):
        data.load_openwebtext("Skylion007/openwebtext", None)
