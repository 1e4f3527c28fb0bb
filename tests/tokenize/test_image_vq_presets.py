"""The CPU image tokenizer presets beyond 32 px: token counts, a real encode/decode, and the
decoder's image length following the tokenizer."""

from __future__ import annotations

import pytest
import torch

from cm3leon.tokenize.image_vq import VQ_PRESETS, ImageTokenizer, VQConfig
from cm3leon.tokenize.image_vq_train import TRAIN_PRESETS
from cm3leon.train.recipes import get_recipe
from cm3leon.train.run import model_config
from cm3leon.vocab import Vocab

SIZES = {"shapes-64": (64, 8, 64), "shapes-128": (128, 8, 256), "shapes-256": (256, 16, 256)}


@pytest.mark.parametrize("name", sorted(SIZES))
def test_preset_grid_and_a_real_round_trip(name):
    res, f, tokens = SIZES[name]
    cfg = VQConfig.from_name(name)
    assert (cfg.resolution, cfg.downsample_factor, cfg.tokens_per_image) == (res, f, tokens)
    assert tokens == (res // f) ** 2 and cfg.patch_local and name in TRAIN_PRESETS
    torch.manual_seed(0)
    with torch.no_grad():
        vq = ImageTokenizer(cfg).eval()
        codes = vq.encode(torch.rand(1, 3, res, res) * 2 - 1)
        assert codes.shape == (1, tokens) and 0 <= int(codes.min()) and int(codes.max()) < cfg.codebook_size
        assert vq.decode(codes).shape == (1, 3, res, res)


def test_every_shapes_preset_trains():
    assert {n for n in VQ_PRESETS if n.startswith("shapes-")} <= set(TRAIN_PRESETS)


@pytest.mark.parametrize("name", sorted(SIZES))
def test_decoder_image_place_embedding_follows_the_tokenizer(name):
    cfg = VQConfig.from_name(name)
    vocab = Vocab(text_size=512, image_size=cfg.codebook_size, image_seq_len=cfg.tokens_per_image)
    mc = model_config(get_recipe("quickstart"), vocab)
    assert (mc.image_tokens, mc.image_vocab, mc.vocab_size) == (cfg.tokens_per_image, cfg.codebook_size, vocab.size)
