"""Token data for the GPT recipe: corpora built into token memmaps, and their data modules.

Every corpus is tokenized once into ``<cache_dir>/<name>-<key>/{train,val}.bin`` (a flat array of
token ids) plus ``meta.json``; the key hashes everything the tokens depend on, so a changed setting
builds a new cache instead of reading a stale one. Nothing is downloaded at run time except by
``OpenWebText``, which a user asks for explicitly.

- ``StdlibCorpus`` (the default): the Python sources of the standard library of the running
  interpreter, byte-level tokens (vocabulary 256). Every Python installation has them, so the
  recipe needs no download; the build is deterministic for a given interpreter.
- ``TextFile``: any local text file, byte-level tokens, the last ``val_fraction`` held out.
- ``OpenWebText``: the corpus of the paper, GPT-2 BPE tokens (needs ``datasets`` and ``tiktoken``,
  and network access while it prepares).

Batches are ``(x, y)`` with ``y`` the next tokens of ``x``, both (B, T) int64. The order of the
training windows is fixed by ``seed`` inside the dataset and the loaders do not shuffle, so every
pipeline stage (each its own process) reads the same batches in the same order.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import shutil
import sysconfig
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

META = "meta.json"
# Standard-library folders left out of the default corpus: tests and vendored packages, and
# generated tables (codec maps, pydoc topics) that a model would learn by rote.
_STDLIB_SKIP = {"site-packages", "dist-packages", "test", "tests", "idle_test", "encodings", "pydoc_data",
                "__pycache__"}


def unigram_perplexity(tokens: np.ndarray, vocab_size: int) -> float:
    """exp of the entropy of the token frequencies of ``tokens``: the best perplexity any model
    that ignores context can reach on them (with their own frequencies)."""
    counts = np.bincount(np.asarray(tokens), minlength=vocab_size).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(math.exp(-(p * np.log(p)).sum()))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_meta(out_dir: Path, vocab_size: int, dtype: str, source: str) -> dict:
    """Describe the finished ``train.bin``/``val.bin`` of ``out_dir`` in ``meta.json``."""
    val = np.fromfile(out_dir / "val.bin", dtype=dtype)
    meta = {
        "source": source,
        "vocab_size": vocab_size,
        "dtype": dtype,
        "train_tokens": (out_dir / "train.bin").stat().st_size // np.dtype(dtype).itemsize,
        "val_tokens": int(val.size),
        "sha256": {split: _sha256(out_dir / f"{split}.bin") for split in ("train", "val")},
        "val_unigram_ppl": unigram_perplexity(val, vocab_size),
    }
    (out_dir / META).write_text(json.dumps(meta, indent=2) + "\n")
    return meta


class TokenWindows(Dataset):
    """Windows of ``block_size + 1`` tokens of a token file, starting at ``offsets``.

    The memmap opens lazily and is not pickled, so the dataset travels cheaply to spawned
    processes."""

    def __init__(self, path: Path, dtype: str, block_size: int, offsets: np.ndarray) -> None:
        self.path, self.dtype, self.block_size, self.offsets = Path(path), dtype, block_size, offsets
        self._tokens: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.offsets)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._tokens is None:
            self._tokens = np.memmap(self.path, dtype=self.dtype, mode="r")
        o = int(self.offsets[i])
        chunk = torch.from_numpy(self._tokens[o : o + self.block_size + 1].astype(np.int64))
        return chunk[:-1], chunk[1:]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_tokens": None}


class TokenDataModule(L.LightningDataModule):
    """Shared machinery: a cached token build, random training windows, fixed validation windows.

    Subclasses set ``name``, ``vocab_size`` and ``dtype`` and implement ``_cache_key`` (what the
    tokens depend on) and ``_build`` (write ``train.bin`` and ``val.bin`` into a folder).

    Args:
        block_size: tokens per training sequence (the model's context length).
        batch_size: sequences per global batch (a pipeline splits it into micro-batches).
        val_batches: validation batches per evaluation; their windows are spread evenly over the
            validation split and are the same at every evaluation.
        cache_dir: where token caches live.
        seed: order of the training windows.
    """

    name = "tokens"
    vocab_size = 256
    dtype = "uint8"

    def __init__(self, block_size: int, batch_size: int, val_batches: int, cache_dir: str, seed: int) -> None:
        super().__init__()
        self.block_size, self.batch_size, self.val_batches = block_size, batch_size, val_batches
        self.cache_dir, self.seed = Path(cache_dir), seed
        self.train_set: TokenWindows | None = None
        self.val_set: TokenWindows | None = None

    def _cache_key(self) -> dict:
        raise NotImplementedError

    def _build(self, out_dir: Path) -> str:
        """Write ``train.bin`` and ``val.bin`` into ``out_dir``; return a one-line source note."""
        raise NotImplementedError

    @property
    def cache_path(self) -> Path:
        key = json.dumps({"name": self.name, **self._cache_key()}, sort_keys=True)
        return self.cache_dir / f"{self.name}-{hashlib.sha1(key.encode()).hexdigest()[:10]}"

    def prepare_data(self) -> None:
        """Build the token cache unless it exists; the build lands in a temporary folder that is
        renamed into place, so concurrent or interrupted builds never leave a half cache."""
        final = self.cache_path
        if (final / META).exists():
            return
        tmp = final.with_name(f"{final.name}.tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        source = self._build(tmp)
        write_meta(tmp, self.vocab_size, self.dtype, source)
        try:
            tmp.rename(final)
        except OSError:  # another process finished the same build first
            shutil.rmtree(tmp, ignore_errors=True)

    @property
    def meta(self) -> dict:
        return json.loads((self.cache_path / META).read_text())

    def val_unigram_perplexity(self) -> float:
        return self.meta["val_unigram_ppl"]

    def setup(self, stage: str | None = None) -> None:
        self.prepare_data()  # cheap when cached; makes setup() alone enough outside a Trainer
        meta, T = self.meta, self.block_size
        n_train, n_val = meta["train_tokens"], meta["val_tokens"]
        for split, n in (("train", n_train), ("validation", n_val)):
            if n < T + 1:
                raise ValueError(f"the {split} split has {n} tokens, fewer than block_size+1={T + 1}")
        # One pass over the training split in random windows, in an order fixed by the seed.
        rng = np.random.default_rng(self.seed)
        n_windows = max(self.batch_size, n_train // T)
        train_offsets = rng.integers(0, n_train - T, size=n_windows)
        val_offsets = np.linspace(0, n_val - T - 1, self.val_batches * self.batch_size).astype(np.int64)
        self.train_set = TokenWindows(self.cache_path / "train.bin", meta["dtype"], T, train_offsets)
        self.val_set = TokenWindows(self.cache_path / "val.bin", meta["dtype"], T, val_offsets)

    def train_dataloader(self) -> DataLoader:
        # shuffle=False: the dataset is already in a seeded random order, the same in every process.
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=False, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.batch_size, shuffle=False, drop_last=True)


def stdlib_sources(max_bytes: int) -> list[Path]:
    """The standard library's .py files used for the corpus, sorted by path.

    If they hold more than ``max_bytes``, a subset is taken in an order set by a checksum of each
    path, which spreads the corpus over the whole library and is the same on every run."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [f for f in root.rglob("*.py") if not _STDLIB_SKIP.intersection(f.relative_to(root).parts[:-1])]
    files.sort(key=lambda f: zlib.crc32(f.relative_to(root).as_posix().encode()))
    chosen, total = [], 0
    for f in files:
        if total >= max_bytes:
            break
        chosen.append(f)
        total += f.stat().st_size
    if total < 100_000:
        raise RuntimeError(
            f"found only {total} bytes of Python sources under {root}; this installation ships no "
            "standard-library sources, train on a local file instead: data=text_file data.path=<file>"
        )
    return sorted(chosen, key=lambda f: f.relative_to(root).as_posix())


class StdlibCorpus(TokenDataModule):
    """The default corpus: this interpreter's standard-library sources as bytes.

    Args:
        max_bytes: size of the corpus (about that many tokens, byte-level).
        val_fraction: share of source files held out for validation; a file goes there when a
            checksum of its path falls below this fraction, so the split is fixed by the file list.
        (other arguments: see ``TokenDataModule``)
    """

    name = "stdlib"

    def __init__(self, max_bytes: int = 8_000_000, val_fraction: float = 0.05, *, block_size: int,
                 batch_size: int, val_batches: int, cache_dir: str, seed: int) -> None:
        super().__init__(block_size, batch_size, val_batches, cache_dir, seed)
        self.max_bytes, self.val_fraction = max_bytes, val_fraction

    def _cache_key(self) -> dict:
        return {"python": platform.python_version(), "stdlib": sysconfig.get_paths()["stdlib"],
                "max_bytes": self.max_bytes, "val_fraction": self.val_fraction}

    def _build(self, out_dir: Path) -> str:
        root = Path(sysconfig.get_paths()["stdlib"])
        files = stdlib_sources(self.max_bytes)
        with open(out_dir / "train.bin", "wb") as train, open(out_dir / "val.bin", "wb") as val:
            for f in files:
                rel = f.relative_to(root).as_posix().encode()
                held_out = zlib.crc32(rel) / 2**32 < self.val_fraction
                (val if held_out else train).write(f.read_bytes() + b"\n")
        return f"{len(files)} standard-library sources of Python {platform.python_version()} under {root}"


class TextFile(TokenDataModule):
    """Any local text file as bytes; the last ``val_fraction`` of it is the validation split.

    Args:
        path: the file (relative paths are taken from the directory the recipe is launched in).
        val_fraction: share of the file, from its end, held out for validation.
        (other arguments: see ``TokenDataModule``)
    """

    name = "text_file"

    def __init__(self, path: str, val_fraction: float = 0.1, *, block_size: int, batch_size: int,
                 val_batches: int, cache_dir: str, seed: int) -> None:
        super().__init__(block_size, batch_size, val_batches, cache_dir, seed)
        self.path, self.val_fraction = Path(path).resolve(), val_fraction

    def _cache_key(self) -> dict:
        stat = self.path.stat()
        return {"path": str(self.path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                "val_fraction": self.val_fraction}

    def _build(self, out_dir: Path) -> str:
        data = self.path.read_bytes()
        cut = len(data) - int(len(data) * self.val_fraction)
        (out_dir / "train.bin").write_bytes(data[:cut])
        (out_dir / "val.bin").write_bytes(data[cut:])
        return f"bytes of {self.path}"


def load_openwebtext(hf_path: str, hf_revision: str | None) -> Iterator[str]:
    """The documents of OpenWebText from the Hugging Face hub, as strings."""
    try:
        import datasets
    except ImportError as e:
        raise ImportError("data=openwebtext needs Hugging Face datasets: "
                          "pip install datasets tiktoken") from e
    ds = datasets.load_dataset(hf_path, split="train", revision=hf_revision)
    return (row["text"] for row in ds)


def gpt2_tokenizer():
    """tiktoken's GPT-2 BPE (50257 tokens; its end-of-text token 50256 separates documents)."""
    try:
        import tiktoken
    except ImportError as e:
        raise ImportError("data=openwebtext needs tiktoken for the GPT-2 BPE: pip install tiktoken") from e
    return tiktoken.get_encoding("gpt2")


def write_bpe_corpus(out_dir: Path, documents: Iterable[str], tokenizer, val_every: int,
                     max_documents: int | None = None, chunk: int = 1024, num_threads: int = 8) -> int:
    """Tokenize ``documents`` into ``out_dir/{train,val}.bin`` (uint16), each followed by the
    end-of-text token; document i goes to validation when ``i % val_every == 0`` (so validation
    is never empty). ``tokenizer`` needs ``encode_ordinary`` and ``eot_token`` (tiktoken's
    interface); ``encode_ordinary_batch`` is used when present. Returns the document count."""
    if tokenizer.eot_token >= 2**16:
        raise ValueError(f"token ids up to {tokenizer.eot_token} do not fit the uint16 token files")
    n = 0
    with open(out_dir / "train.bin", "wb") as train, open(out_dir / "val.bin", "wb") as val:

        def flush(texts: list[str], first: int) -> None:
            if hasattr(tokenizer, "encode_ordinary_batch"):
                encoded = tokenizer.encode_ordinary_batch(texts, num_threads=num_threads)
            else:
                encoded = [tokenizer.encode_ordinary(t) for t in texts]
            for i, ids in enumerate(encoded, start=first):
                out = val if i % val_every == 0 else train
                np.asarray([*ids, tokenizer.eot_token], dtype=np.uint16).tofile(out)

        texts: list[str] = []
        for text in documents:
            if max_documents is not None and n >= max_documents:
                break
            texts.append(text)
            n += 1
            if len(texts) == chunk:
                flush(texts, n - len(texts))
                texts = []
        if texts:
            flush(texts, n - len(texts))
    if n < 2:
        raise ValueError(f"got {n} documents; a train and a validation split need at least 2")
    return n


class OpenWebText(TokenDataModule):
    """OpenWebText with the GPT-2 BPE, prepared once (needs network, datasets and tiktoken).

    Args:
        hf_path, hf_revision: where ``datasets.load_dataset`` finds the corpus.
        val_every: every val_every-th document is held out for validation (2000: 0.05%, as nanoGPT).
        max_documents: prepare only the first documents (a quick start); null takes all (~8M).
        num_threads: tokenizer threads.
        (other arguments: see ``TokenDataModule``)
    """

    name = "openwebtext"
    vocab_size = 50257
    dtype = "uint16"

    def __init__(self, hf_path: str = "Skylion007/openwebtext", hf_revision: str | None = None,
                 val_every: int = 2000, max_documents: int | None = None, num_threads: int = 8, *,
                 block_size: int, batch_size: int, val_batches: int, cache_dir: str, seed: int) -> None:
        super().__init__(block_size, batch_size, val_batches, cache_dir, seed)
        self.hf_path, self.hf_revision, self.val_every = hf_path, hf_revision, val_every
        self.max_documents, self.num_threads = max_documents, num_threads

    def _cache_key(self) -> dict:
        return {"hf_path": self.hf_path, "hf_revision": self.hf_revision, "val_every": self.val_every,
                "max_documents": self.max_documents, "tokenizer": "gpt2"}

    def _build(self, out_dir: Path) -> str:
        documents = load_openwebtext(self.hf_path, self.hf_revision)
        n = write_bpe_corpus(out_dir, documents, gpt2_tokenizer(), self.val_every, self.max_documents,
                             num_threads=self.num_threads)
        return f"{n} documents of {self.hf_path} ({self.hf_revision or 'default revision'}), GPT-2 BPE"
