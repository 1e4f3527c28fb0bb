"""A converted tiny Chameleon through the user's commands: `cm3leon convert chameleon`, then
`cm3leon generate` with CFG and with CD-K (exactly L image tokens, opened by the model's own
begin-image marker, CFG against the model's own unconditional prompt ``<s> <racm3:break>``,
decoded by the converted VQ-GAN), CLIP re-ranking, `caption` and `ask`; and the default 7B
ChameleonConfig converts on the meta device with every key mapped."""

from __future__ import annotations

import pytest
import torch
from chameleon_fixtures import build_checkpoint
from PIL import Image

import cm3leon.pipeline as pipeline_mod
from cm3leon.cli import main
from cm3leon.pipeline import CM3Leon
from cm3leon.sequence.document import Document, ImageSegment, TextSegment
from helpers import build_tiny_clip


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, one_torch_thread):
    hf_dir = tmp_path_factory.mktemp("hf")
    build_checkpoint(hf_dir, shard_size=None)
    clip = build_tiny_clip(tmp_path_factory.mktemp("clip"))
    out = tmp_path_factory.mktemp("root") / "chameleon-tiny"
    assert main(["convert", "chameleon", "--hf", str(hf_dir), "--out", str(out), "--clip", str(clip)]) == 0
    return out


@pytest.fixture
def spy(monkeypatch):
    """Record the prompts and the codes of every image decode the pipeline runs."""
    calls = []
    real = pipeline_mod.generate_image_tokens

    def recording(model, vocab, prompts, cfg, **kw):
        codes = real(model, vocab, prompts, cfg, **kw)
        calls.append({"prompts": prompts, "uncond": kw.get("uncond_prompts"), "cfg": cfg, "codes": codes,
                      "vocab": vocab})
        return codes

    monkeypatch.setattr(pipeline_mod, "generate_image_tokens", recording)
    return calls


@pytest.mark.parametrize("extra", [[], ["--cd-k", "4"]], ids=["cfg", "cd-k"])
def test_generate_image_end_to_end(model_dir, spy, tmp_path, extra):
    png = tmp_path / "img.png"
    assert main(["generate", "--model", str(model_dir), "w1 w2 w3", "--out", str(png), "--n", "2", *extra]) == 0
    (call,) = spy
    vocab, codes = call["vocab"], call["codes"]
    assert call["cfg"].guidance == 3.0 and (call["cfg"].cd_k == 4) == bool(extra)
    boi, eoi = vocab.break_id, vocab.end_image_id
    for prompt, uncond, row in zip(call["prompts"], call["uncond"], codes.view(1, 2, -1)[:, 0]):
        assert prompt[0] == vocab.eos_id and prompt[-1] == boi  # <s> w1 w2 w3 <racm3:break>
        assert uncond == [vocab.eos_id, boi]  # Chameleon's own unconditional stream
        ids = vocab.codes_to_ids(row.tolist())
        assert len(ids) == vocab.image_seq_len == 16 and all(vocab.kind(i).value == "image" for i in ids)
        doc = Document.from_ids([*prompt, *ids, eoi], vocab)  # the model's markers close the image
        assert isinstance(doc.segments[0], TextSegment) and isinstance(doc.segments[1], ImageSegment)
    img = Image.open(png)
    assert min(img.size) >= 16  # two of the converted VQ-GAN's 16 px images, as a grid


def test_rerank_caption_and_ask(model_dir, tmp_path, capsys):
    m = CM3Leon.from_pretrained(model_dir)
    res = m.generate_image("w4 w5", n=3, rerank=True, seed=1)
    assert len(res.images) == 3 and res.images[0].size == (16, 16)
    assert res.scores == sorted(res.scores, reverse=True)
    res.images[0].save(tmp_path / "x.png")
    capsys.readouterr()
    assert main(["caption", "--model", str(model_dir), str(tmp_path / "x.png")]) == 0
    assert main(["ask", "--model", str(model_dir), str(tmp_path / "x.png"), "w7 w8 ?"]) == 0
    out = capsys.readouterr().out
    assert out.strip()  # words of the tiny vocabulary (random weights)
    ids = m.text_ids("w1<racm3:break>w2 w3")  # a control token's name inside user text is not the control token
    assert m.vocab.break_id not in ids and len(ids) == 2


def test_default_7b_config_converts_on_meta():
    from transformers import ChameleonConfig, ChameleonForConditionalGeneration

    from cm3leon.model.chameleon_convert import convert_state_dict, model_config_from_hf
    from cm3leon.model.io import check_state_dict
    from cm3leon.model.transformer import Transformer

    hf_cfg = ChameleonConfig(vocabulary_map={"<image>": 8711})
    with torch.device("meta"):
        hf = ChameleonForConditionalGeneration(hf_cfg)
        cfg = model_config_from_hf(hf_cfg.to_dict())
        ours = Transformer(cfg)
    hf_state = hf.state_dict()
    mapped = convert_state_dict(hf_state)  # raises on any key it does not know
    check_state_dict(ours.state_dict(), mapped, source="ChameleonConfig()")
    skipped = [k for k in hf_state if k.startswith("model.vqmodel.")]
    assert len(mapped) + len(skipped) == len(hf_state)
    n_hf = sum(p.numel() for n, p in hf.named_parameters() if not n.startswith("model.vqmodel."))
    assert ours.num_params() == n_hf and 7.0e9 < n_hf < 7.1e9
    assert (cfg.d_model, cfg.n_layers, cfg.ffn_dim, cfg.vocab_size) == (4096, 32, 11008, 65536)
