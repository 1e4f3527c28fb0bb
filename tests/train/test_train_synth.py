"""The synthetic dataset of the trainer tests (tests/helpers.py) honours the dataset contract the
trainer relies on: deterministic per (seed, index), padded at the end, labels equal to the ids."""

from __future__ import annotations

import torch

from helpers import VOCAB, SynthData


def test_synth_data_is_deterministic_and_padded():
    a, b = SynthData(), SynthData()
    for i in range(len(a)):
        assert torch.equal(a[i]["ids"], b[i]["ids"])
        pad = a[i]["labels"] == -100
        assert (a[i]["ids"][pad] == VOCAB.pad_id).all()
        assert (a[i]["labels"][~pad] == a[i]["ids"][~pad]).all()
    assert not torch.equal(SynthData(seed=1)[0]["ids"], a[0]["ids"])
