"""The VQ-GAN a converted Chameleon decodes with: Meta's taming-format vqgan.ckpt + vqgan.yaml become our
ImageTokenizer (encoder and decoder). Its encoder gives transformers' ChameleonVQVAE codes exactly on the
same random weights; its decoder turns codes into images of the configured size, and the saved tokenizer
decodes and re-encodes exactly like the one in memory."""

from __future__ import annotations

import pytest
import torch
from chameleon_fixtures import N_CODES, build_checkpoint

from cm3leon.convert import convert_chameleon
from cm3leon.tokenize.image_vq import ImageTokenizer
from cm3leon.tokenize.image_vq_convert import read_checkpoint


@pytest.fixture(scope="module")
def dirs(tmp_path_factory, one_torch_thread):
    hf_dir = tmp_path_factory.mktemp("hf")
    build_checkpoint(hf_dir, shard_size=None)
    return hf_dir, convert_chameleon(hf_dir, tmp_path_factory.mktemp("ours"))


def test_encoder_equals_transformers_chameleon_vqvae(dirs):
    from transformers import ChameleonVQVAEConfig
    from transformers.models.chameleon.modeling_chameleon import ChameleonVQVAE

    hf_dir, out = dirs
    ours = ImageTokenizer.from_pretrained(out / "image_tokenizer").eval()
    hc = ChameleonVQVAEConfig(embed_dim=8, num_embeddings=N_CODES, latent_channels=32, resolution=16,
                              base_channels=32, channel_multiplier=[1, 1, 2], num_res_blocks=1, attn_resolutions=[])
    hf = ChameleonVQVAE(hc).eval()
    ckpt = read_checkpoint(hf_dir / "vqgan.ckpt")  # Meta's file: encoder, quantizer, convs and the decoder
    hf_keys = set(hf.state_dict())
    hf.load_state_dict({k: v for k, v in ckpt.items() if k in hf_keys}, strict=True)
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        want = hf.encode(x).image_tokens.view(3, -1)
        got = ours.encode(x)
    assert got.shape == (3, 16) and torch.equal(got, want)


def test_decoder_shapes_and_round_trip(dirs, tmp_path):
    _, out = dirs
    vq = ImageTokenizer.from_pretrained(out / "image_tokenizer").eval()
    assert (vq.tokens_per_image, vq.codebook_size, vq.resolution) == (16, N_CODES, 16)
    codes = torch.randint(0, N_CODES, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        img = vq.decode(codes)
        assert img.shape == (2, 3, 16, 16) and torch.isfinite(img).all()
        again = vq.encode(img)  # a decoded image encodes to a full grid of valid codes
        assert again.shape == (2, 16) and int(again.min()) >= 0 and int(again.max()) < N_CODES
        vq.save_pretrained(tmp_path / "vq")
        back = ImageTokenizer.from_pretrained(tmp_path / "vq").eval()
        assert torch.equal(back.decode(codes), img) and torch.equal(back.encode(img), again)
    pil = vq.postprocess(img)
    assert pil[0].size == (16, 16) and pil[0].mode == "RGB"
