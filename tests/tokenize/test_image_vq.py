"""Image tokenizer: shapes, quantizer maths, weight formats (taming / HF Chameleon), persistence."""

import dataclasses

import pytest
import torch

from cm3leon.tokenize.image_vq import VQ_PRESETS, ImageTokenizer, VQConfig
from cm3leon.tokenize.image_vq_convert import (
    config_from_hf_chameleon,
    config_from_taming,
    convert_checkpoint,
    convert_state_dict,
    detect_source,
    load_converted,
    read_checkpoint,
)
from cm3leon.tokenize.image_vq_quantizer import VectorQuantizer, codebook_stats

TINY = VQConfig(
    resolution=16, ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), z_channels=8,
    embed_dim=4, codebook_size=32, num_groups=4,
)


# Tiny models gain nothing from threads, and on a shared CPU extra threads stall each other.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _images(n: int = 3, r: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, r, r, generator=g) * 2 - 1


def _randomize(model: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))


@pytest.fixture
def tiny() -> ImageTokenizer:
    torch.manual_seed(0)
    m = ImageTokenizer(TINY)
    _randomize(m)
    return m.eval()


# ---- config ------------------------------------------------------------------------
def test_presets_shapes():
    assert VQConfig.from_name("shapes-32").tokens_per_image == 64
    assert VQConfig.from_name("shapes-32").downsample_factor == 4
    paper = VQConfig.from_name("paper-256")
    assert (paper.tokens_per_image, paper.codebook_size, paper.downsample_factor) == (1024, 8192, 8)
    for name in VQ_PRESETS:
        cfg = VQConfig.from_name(name)
        assert VQConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(resolution=17), "divisible"),
        (dict(ch=10), "num_groups"),
        (dict(quantizer="gumbel"), "quantizer"),
        (dict(codebook_size=0), "positive"),
    ],
)
def test_bad_config(bad, match):
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(TINY, **bad)


def test_unknown_preset():
    with pytest.raises(ValueError, match="shapes-32"):
        VQConfig.from_name("nope")


# ---- encode / decode ---------------------------------------------------------------
def test_encode_decode_shapes_and_ranges(tiny):
    x = _images()
    codes = tiny.encode(x)
    assert codes.shape == (3, tiny.tokens_per_image) and codes.dtype == torch.long
    assert int(codes.min()) >= 0 and int(codes.max()) < tiny.codebook_size
    y = tiny.decode(codes)
    assert y.shape == x.shape and y.dtype == torch.float32
    assert float(y.min()) >= -1 and float(y.max()) <= 1


def test_codes_are_nearest_codebook_entries(tiny):
    """Independent reference: brute-force nearest neighbour with torch.cdist."""
    x = _images()
    with torch.no_grad():
        z = tiny.quant_conv(tiny.encoder(x))  # (B, D, h, w)
        flat = z.permute(0, 2, 3, 1).reshape(-1, TINY.embed_dim)
        ref = torch.cdist(flat, tiny.quantize.embedding.weight).argmin(1).view(3, -1)
    assert torch.equal(tiny.encode(x), ref)


def test_decode_of_codes_matches_training_reconstruction(tiny):
    x = _images()
    with torch.no_grad():
        out = tiny(x)
    assert torch.allclose(out.recon.clamp(-1, 1), tiny.decode(out.quant.indices.flatten(1)), atol=1e-5)


def test_encode_rejects_wrong_inputs(tiny):
    with pytest.raises(ValueError, match="preprocess"):
        tiny.encode(torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match="float"):
        tiny.encode(torch.zeros(1, 3, 16, 16, dtype=torch.uint8))


def test_decode_rejects_bad_codes(tiny):
    with pytest.raises(ValueError, match=r"\[0, 32\)"):
        tiny.decode(torch.full((1, 64), 32))
    with pytest.raises(ValueError, match="Long"):
        tiny.decode(torch.zeros(1, 10, dtype=torch.long))


def test_quantizer_and_decoder_stay_fp32_under_bf16_autocast(tiny):
    x = _images()
    codes = tiny.encode(x)
    ref = tiny.decode(codes)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = tiny.decode(codes)
        _, q = tiny.quantize_latents(x)
    assert y.dtype == torch.float32 and q.z_q.dtype == torch.float32
    assert torch.equal(y, ref)


def test_straight_through_gradients(tiny):
    tiny.train()
    out = tiny(_images())
    ((out.recon - _images()).abs().mean() + out.quant.loss).backward()
    assert tiny.encoder.conv_in.weight.grad.abs().sum() > 0  # through the straight-through estimator
    assert tiny.quantize.embedding.weight.grad.abs().sum() > 0  # codebook loss (classic)


# ---- quantizer variants ------------------------------------------------------------
def test_codebook_stats_reference():
    s = codebook_stats(torch.tensor([5.0, 5.0, 5.0, 5.0, 0, 0, 0, 0]))
    assert s["usage"] == pytest.approx(0.5)
    assert s["perplexity"] == pytest.approx(4.0)


def test_ema_codebook_moves_to_cluster_means():
    torch.manual_seed(0)
    q = VectorQuantizer(4, 2, kind="ema", ema_decay=0.0).train()
    assert not q.embedding.weight.requires_grad
    z = torch.randn(2, 2, 3, 3)
    out = q(z)
    flat = z.permute(0, 2, 3, 1).reshape(-1, 2)
    idx = out.indices.flatten()
    for k in idx.unique():
        assert torch.allclose(q.embedding.weight[k], flat[idx == k].mean(0), atol=1e-4)
    assert set(dict(q.state_dict())) >= {"embedding.weight", "embedding.cluster_size", "embedding.embed_avg"}


def test_encode_never_updates_the_codebook():
    torch.manual_seed(0)
    m = ImageTokenizer(dataclasses.replace(TINY, quantizer="ema")).train()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    m.encode(_images())
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    m(_images())  # a training forward does update the EMA statistics
    assert not torch.equal(before["quantize.embedding.embed_avg"], m.quantize.embedding.embed_avg)


def test_l2_normalized_codes():
    torch.manual_seed(0)
    q = VectorQuantizer(16, 8, l2_norm=True).eval()
    z = torch.randn(2, 8, 4, 4) * 5
    out = q(z)
    norms = out.z_q.permute(0, 2, 3, 1).reshape(-1, 8).norm(dim=1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)
    # nearest in L2 among unit vectors == largest cosine similarity
    zn = torch.nn.functional.normalize(z.permute(0, 2, 3, 1).reshape(-1, 8), dim=1)
    ref = (zn @ torch.nn.functional.normalize(q.embedding.weight, dim=1).t()).argmax(1)
    assert torch.equal(out.indices.flatten(), ref)


def test_dead_code_restart_uses_recent_latents():
    torch.manual_seed(0)
    q = VectorQuantizer(8, 3)
    q.usage.copy_(torch.tensor([5.0, 0, 5, 0, 5, 0, 5, 0]))
    recent = torch.randn(20, 3) + 100.0  # far from the initial codebook
    old = q.embedding.weight.detach().clone()
    n = q.restart_dead_codes(recent, threshold=1.0, generator=torch.Generator().manual_seed(0))
    assert n == 4
    w = q.embedding.weight.detach()
    assert torch.equal(w[0::2], old[0::2])
    assert (w[1::2] > 90).all()  # copied (with tiny noise) from the recent latents
    assert (q.usage >= 1.0).all()


def test_error_weighted_restart_targets_poorly_fitted_latents():
    """Dead codes go to latents far from every live code, never to well-fitted ones."""
    q = VectorQuantizer(4, 2)
    with torch.no_grad():
        q.embedding.weight.copy_(torch.tensor([[0.0, 0.0], [5.0, 5.0], [9.0, 9.0], [9.0, 9.0]]))
    q.usage.copy_(torch.tensor([5.0, 0.0, 5.0, 0.0]))  # codes 1 and 3 are dead
    white = torch.zeros(95, 2)  # fitted exactly by live code 0 (zero error)
    odd = torch.full((5, 2), -50.0)  # far from every live code
    n = q.restart_dead_codes(torch.cat([white, odd]), threshold=1.0, sampling="error",
                             generator=torch.Generator().manual_seed(0))
    assert n == 2
    assert (q.embedding.weight.detach()[[1, 3]] < -49).all()
    with pytest.raises(ValueError, match="uniform"):
        q.restart_dead_codes(white, threshold=1.0, sampling="nope")


def _patch_local_tokenizer() -> ImageTokenizer:
    """A randomly initialised TINY tokenizer whose encoder sees each patch alone, in eval mode."""
    torch.manual_seed(0)
    m = ImageTokenizer(dataclasses.replace(TINY, attn_resolutions=(), mid_attn=False, patch_local=True))
    _randomize(m)
    return m.eval()


def test_patch_local_encoder_gives_identical_patches_identical_codes():
    m = _patch_local_tokenizer()
    x = torch.ones(2, 3, 16, 16)  # white canvases ...
    x[0, :, 0:2, 0:2] = -1.0  # ... with something in one corner patch of the first
    x[1, :, 8:16, 8:16] = torch.rand(3, 8, 8) * 2 - 1  # and noise in a quarter of the second
    codes = m.encode(x).view(2, 8, 8)
    # every fully-white 2x2 patch gets the same code, wherever it is and whatever else is drawn
    white = torch.ones(2, 8, 8, dtype=torch.bool)
    white[0, 0, 0] = False
    white[1, 4:, 4:] = False
    assert codes[white].unique().numel() == 1
    # and the patch-local map equals the encoder run on each patch alone
    with torch.no_grad():
        one = m.encoder(x[1:, :, 10:12, 4:6])
        ref = m.quantize(m.quant_conv(one)).indices.item()
    assert codes[1, 5, 2].item() == ref


def test_patch_local_encode_of_distinct_patches_equals_the_full_map():
    """encode() computes each distinct patch once; the codes equal the whole batch's map."""
    m = _patch_local_tokenizer()
    x = torch.ones(4, 3, 16, 16)
    x[0, :, 2:10, 4:12] = torch.tensor([1.0, -1.0, -1.0]).view(3, 1, 1)  # a flat red square
    x[1] = x[0].roll(4, dims=2)  # the same square moved by whole patches
    x[2] = _images(1)[0]  # all-distinct patches
    x[3, :, :, :8] = -1.0  # half black
    with torch.no_grad():
        _, q = m.quantize_latents(x)
    full = q.indices.flatten(1)
    assert torch.equal(m.encode(x), full)
    assert torch.equal(m.encode(x[2:3]), full[2:3])  # batch composition does not matter


def test_unique_rows_groups_exactly():
    from cm3leon.tokenize.image_vq import _unique_rows

    g = torch.Generator().manual_seed(0)
    base = torch.rand(7, 12, generator=g)
    x = base[torch.randint(0, 7, (50,), generator=g)]
    x[3, 5] = -0.25  # one row differs from its copies in a single value
    uniq, inverse = _unique_rows(x)
    assert torch.equal(uniq[inverse], x)
    assert len(uniq) == len(torch.unique(x, dim=0))


def test_channel_norm_is_local_layer_norm_over_channels():
    from cm3leon.tokenize.image_vq import ChannelNorm

    n = ChannelNorm(4)
    with torch.no_grad():
        n.weight.copy_(torch.tensor([1.0, 2.0, 3.0, 4.0]))
        n.bias.copy_(torch.tensor([0.1, 0.2, 0.3, 0.4]))
    x = torch.randn(2, 4, 5, 5)
    ref = torch.nn.functional.layer_norm(x.permute(0, 2, 3, 1), (4,), n.weight, n.bias, 1e-6).permute(0, 3, 1, 2)
    assert torch.allclose(n(x), ref, atol=1e-6)
    y = x.clone()
    y[0, :, 0, 0] += 10.0  # a change at one position changes only that position (GroupNorm: all)
    diff = (n(x) - n(y)).abs().sum(1)
    assert diff[0, 0, 0] > 0 and diff.sum() == diff[0, 0, 0]
    m = ImageTokenizer(dataclasses.replace(TINY, norm="channel"))
    assert isinstance(m.encoder.norm_out, ChannelNorm)
    with pytest.raises(ValueError, match="norm"):
        dataclasses.replace(TINY, norm="batch")


# ---- weight formats ----------------------------------------------------------------
def taming_state_dict(ch, ch_mult, num_res_blocks, attn_resolutions, resolution, z_channels, embed_dim,
                      n_embed, in_ch=3, out_ch=3, seed=0):
    """Random weights under taming-transformers' VQModel key names, written out from taming's
    Encoder/Decoder/VQModel constructors (independent of cm3leon's module tree)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}

    def conv(name, cin, cout, k):
        sd[f"{name}.weight"] = torch.randn(cout, cin, k, k, generator=g) * 0.1
        sd[f"{name}.bias"] = torch.randn(cout, generator=g) * 0.1

    def norm(name, c):
        sd[f"{name}.weight"] = 1 + 0.1 * torch.randn(c, generator=g)
        sd[f"{name}.bias"] = 0.1 * torch.randn(c, generator=g)

    def resnet(name, cin, cout):
        norm(f"{name}.norm1", cin)
        conv(f"{name}.conv1", cin, cout, 3)
        norm(f"{name}.norm2", cout)
        conv(f"{name}.conv2", cout, cout, 3)
        if cin != cout:
            conv(f"{name}.nin_shortcut", cin, cout, 1)

    def attn(name, c):
        norm(f"{name}.norm", c)
        for p in ("q", "k", "v", "proj_out"):
            conv(f"{name}.{p}", c, c, 1)

    n = len(ch_mult)
    in_mult = (1,) + tuple(ch_mult)
    # Encoder
    conv("encoder.conv_in", in_ch, ch, 3)
    res = resolution
    for i in range(n):
        bin_, bout = ch * in_mult[i], ch * ch_mult[i]
        for b in range(num_res_blocks):
            resnet(f"encoder.down.{i}.block.{b}", bin_, bout)
            bin_ = bout
            if res in attn_resolutions:
                attn(f"encoder.down.{i}.attn.{b}", bin_)
        if i != n - 1:
            conv(f"encoder.down.{i}.downsample.conv", bin_, bin_, 3)
            res //= 2
    resnet("encoder.mid.block_1", bin_, bin_)
    attn("encoder.mid.attn_1", bin_)
    resnet("encoder.mid.block_2", bin_, bin_)
    norm("encoder.norm_out", bin_)
    conv("encoder.conv_out", bin_, z_channels, 3)
    # Decoder
    bin_ = ch * ch_mult[-1]
    res = resolution // 2 ** (n - 1)
    conv("decoder.conv_in", z_channels, bin_, 3)
    resnet("decoder.mid.block_1", bin_, bin_)
    attn("decoder.mid.attn_1", bin_)
    resnet("decoder.mid.block_2", bin_, bin_)
    for i in reversed(range(n)):
        bout = ch * ch_mult[i]
        for b in range(num_res_blocks + 1):
            resnet(f"decoder.up.{i}.block.{b}", bin_, bout)
            bin_ = bout
            if res in attn_resolutions:
                attn(f"decoder.up.{i}.attn.{b}", bin_)
        if i != 0:
            conv(f"decoder.up.{i}.upsample.conv", bin_, bin_, 3)
            res *= 2
    norm("decoder.norm_out", bin_)
    conv("decoder.conv_out", bin_, out_ch, 3)
    # VQModel
    sd["quantize.embedding.weight"] = torch.randn(n_embed, embed_dim, generator=g)
    conv("quant_conv", z_channels, embed_dim, 1)
    conv("post_quant_conv", embed_dim, z_channels, 1)
    # training-only entries a real .ckpt carries
    sd["loss.discriminator.main.0.weight"] = torch.randn(64, 3, 4, 4, generator=g)
    sd["loss.perceptual_loss.lin0.model.1.weight"] = torch.randn(1, 64, 1, 1, generator=g)
    return sd


TAMING_PARAMS = {
    "embed_dim": 8,
    "n_embed": 64,
    "ddconfig": {"double_z": False, "z_channels": 32, "resolution": 16, "in_channels": 3, "out_ch": 3,
                 "ch": 32, "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [8], "dropout": 0.0},
}


def test_taming_state_dict_loads_and_round_trips(tmp_path):
    dd = TAMING_PARAMS["ddconfig"]
    sd = taming_state_dict(dd["ch"], dd["ch_mult"], dd["num_res_blocks"], dd["attn_resolutions"], dd["resolution"],
                           dd["z_channels"], TAMING_PARAMS["embed_dim"], TAMING_PARAMS["n_embed"])
    cfg = config_from_taming(TAMING_PARAMS)
    model = ImageTokenizer(cfg).eval()
    load_converted(model, sd, src="taming")  # strict: every key and shape must match
    conv = convert_state_dict(sd, "taming")
    assert not any(k.startswith("loss.") for k in conv)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in conv.items())

    x = _images(2, 16)
    codes, img = model.encode(x), model.decode(model.encode(x))
    model.save_pretrained(tmp_path / "tok")
    again = ImageTokenizer.from_pretrained(tmp_path / "tok")
    assert again.cfg == cfg
    assert torch.equal(again.encode(x), codes)
    assert torch.equal(again.decode(codes), img)


def test_convert_checkpoint_from_ckpt_and_yaml(tmp_path):
    import yaml

    dd = TAMING_PARAMS["ddconfig"]
    sd = taming_state_dict(dd["ch"], dd["ch_mult"], dd["num_res_blocks"], dd["attn_resolutions"], dd["resolution"],
                           dd["z_channels"], TAMING_PARAMS["embed_dim"], TAMING_PARAMS["n_embed"], seed=1)
    torch.save({"state_dict": sd, "global_step": 7}, tmp_path / "vqgan.ckpt")
    (tmp_path / "vqgan.yaml").write_text(yaml.safe_dump({"model": {"params": TAMING_PARAMS}}))
    model = convert_checkpoint(tmp_path / "vqgan.ckpt", tmp_path / "vqgan.yaml", tmp_path / "out")
    loaded = ImageTokenizer.from_pretrained(tmp_path / "out")
    assert torch.equal(loaded.quantize.embedding.weight, sd["quantize.embedding.weight"])
    x = _images(1, 16)
    assert torch.equal(loaded.encode(x), model.encode(x))


class Opaque:
    """A non-tensor object that weights-only unpickling must refuse."""


def test_read_checkpoint_refuses_pickled_objects(tmp_path):
    torch.save({"state_dict": {"w": torch.zeros(1)}, "obj": Opaque()}, tmp_path / "bad.ckpt")
    with pytest.raises(ValueError, match="weights-only"):
        read_checkpoint(tmp_path / "bad.ckpt")
    (tmp_path / "trunc.ckpt").write_bytes((tmp_path / "bad.ckpt").read_bytes()[:50])
    with pytest.raises(ValueError):
        read_checkpoint(tmp_path / "trunc.ckpt")


def test_hf_chameleon_vqvae_gives_identical_codes():
    """Independent implementation: transformers' ChameleonVQVAE with random weights."""
    from transformers import ChameleonVQVAEConfig
    from transformers.models.chameleon.modeling_chameleon import ChameleonVQVAE

    torch.manual_seed(0)
    hc = ChameleonVQVAEConfig(embed_dim=16, num_embeddings=128, latent_channels=32, resolution=32, base_channels=32,
                              channel_multiplier=[1, 2, 2], num_res_blocks=1, attn_resolutions=[16])
    hf = ChameleonVQVAE(hc).eval()
    _randomize(hf, seed=1)
    full = {f"model.vqmodel.{k}": v for k, v in hf.state_dict().items()}
    full["model.embed_tokens.weight"] = torch.zeros(4, 4)  # a language-model weight to be skipped
    assert detect_source(full) == "hf_chameleon"

    ours = ImageTokenizer(config_from_hf_chameleon(hc.to_dict())).eval()
    load_converted(ours, full, src="hf_chameleon")
    x = _images(4, 32, seed=3)
    with torch.no_grad():
        ref = hf.encode(x)
        h, q = ours.quantize_latents(x)
    assert torch.allclose(h, ref.last_hidden_state, atol=1e-4)
    assert torch.allclose(q.z_q, ref.quantized_last_hidden_state, atol=1e-4)
    assert torch.equal(ours.encode(x), ref.image_tokens.view(4, -1))


# ---- persistence errors ------------------------------------------------------------
def test_from_pretrained_wrong_shape_names_key_and_shapes(tiny, tmp_path):
    tiny.save_pretrained(tmp_path)
    bigger = ImageTokenizer(dataclasses.replace(TINY, codebook_size=64))
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in bigger.state_dict().items()}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"quantize\.embedding\.weight.*\(64, 4\).*\(32, 4\)"):
        ImageTokenizer.from_pretrained(tmp_path)


def test_from_pretrained_missing_key(tiny, tmp_path):
    from safetensors.torch import save_file

    tiny.save_pretrained(tmp_path)
    sd = {k: v.contiguous() for k, v in tiny.state_dict().items() if k != "post_quant_conv.bias"}
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="post_quant_conv.bias"):
        ImageTokenizer.from_pretrained(tmp_path)


def test_from_pretrained_truncated_weights(tiny, tmp_path):
    tiny.save_pretrained(tmp_path)
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        ImageTokenizer.from_pretrained(tmp_path)


def test_from_pretrained_missing_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        ImageTokenizer.from_pretrained(tmp_path / "none")


def test_save_pretrained_leaves_no_temp_files(tiny, tmp_path):
    tiny.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
