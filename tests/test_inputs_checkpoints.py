"""Inputs every stage must agree on (micro-batch splitting, fingerprints, randomness) and checkpoints
a user can rely on (atomic overwrite, consolidation into one ordinary Lightning checkpoint)."""

from __future__ import annotations

from collections import OrderedDict, namedtuple

import pytest
import torch

from lightning_paci.runtime import split_batch


def test_split_batch_splits_per_sample_lists_with_the_tensors():
    """A collated batch of (tokens, texts, ids): every micro-batch gets its own samples' strings."""
    batch = (torch.arange(10), [f"text{i}" for i in range(10)], {"id": list(range(10)), "lang": "en",
                                                                  "mask": torch.ones(10, 2), "t": torch.tensor(1.0)})
    parts = split_batch(batch, 4, exact=False)
    assert [p[0].tolist() for p in parts] == [[0, 1, 2], [3, 4, 5], [6, 7], [8, 9]]
    for x, texts, extra in parts:
        assert texts == [f"text{i}" for i in x.tolist()]
        assert extra["id"] == x.tolist() and extra["lang"] == "en" and extra["mask"].shape == (len(x), 2)
        assert extra["t"].item() == 1.0
    Pair = namedtuple("Pair", "x names")
    (a, b) = split_batch(OrderedDict(p=Pair(torch.arange(4), list("abcd"))), 2, exact=True)
    assert isinstance(a, OrderedDict) and isinstance(a["p"], Pair)
    assert a["p"].names == ["a", "b"] and b["p"].names == ["c", "d"]
    assert split_batch([list("abcd")], 2, exact=True) == [[["a", "b"]], [["c", "d"]]]  # no tensors at all


def test_split_batch_refuses_a_list_it_cannot_split():
    with pytest.raises(ValueError, match=r"batch\[1\] is a list of 3 entries without tensors, but the batch has 4"):
        split_batch((torch.zeros(4, 2), ["a", "b", "c"]), 2, exact=True)
