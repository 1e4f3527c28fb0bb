"""A tiny deterministic map-style dataset for the trainer tests (shared by test_train_*.py and
test_distributed.py), plus checks that it honours the dataset contract the trainer relies on."""

from __future__ import annotations

import contextlib
import time

import torch

from cm3leon.config import ModelConfig
from cm3leon.vocab import Vocab


@contextlib.contextmanager
def one_thread():
    """Tiny models run fastest on one thread (and shared cores make extra threads very slow)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


VOCAB = Vocab(text_size=20, image_size=16, image_seq_len=8)


def tiny_model_config(**kw) -> ModelConfig:
    base = dict(vocab_size=VOCAB.size, d_model=32, n_layers=2, n_heads=4, max_seq_len=64)
    base.update(kw)
    return ModelConfig(**base)


class SynthData:
    """``<eos> text <break> IMAGE <pad>...``: the image codes follow from the first text id, so the
    image tokens are learnable from context. ``__getitem__(i)`` depends only on (seed, i)."""

    def __init__(self, n: int = 24, seq_len: int = 24, seed: int = 0, delay: float = 0.0) -> None:
        self.n, self.T, self.seed, self.delay = n, seq_len, seed, delay

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < self.n:
            raise IndexError(i)
        if self.delay:
            time.sleep(self.delay)
        v = VOCAB
        g = torch.Generator().manual_seed(self.seed * 100_003 + i)
        k = int(torch.randint(2, 6, (1,), generator=g))
        text = torch.randint(0, v.text_size, (k,), generator=g)
        codes = (text[0] + torch.arange(v.image_seq_len)) % v.image_size
        ids = [v.eos_id, *v.text_to_ids(text.tolist()), v.break_id, *v.codes_to_ids(codes.tolist())][: self.T]
        out = torch.full((self.T,), v.pad_id, dtype=torch.long)
        out[: len(ids)] = torch.tensor(ids)
        labels = out.clone()
        labels[len(ids) :] = -100
        return {"ids": out, "labels": labels}


def test_synth_data_is_deterministic_and_padded():
    a, b = SynthData(), SynthData()
    for i in range(len(a)):
        assert torch.equal(a[i]["ids"], b[i]["ids"])
        pad = a[i]["labels"] == -100
        assert (a[i]["ids"][pad] == VOCAB.pad_id).all()
        assert (a[i]["labels"][~pad] == a[i]["ids"][~pad]).all()
    assert not torch.equal(SynthData(seed=1)[0]["ids"], a[0]["ids"])
