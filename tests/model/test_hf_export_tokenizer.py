"""The exported transformers folder on its own: its tokenizer encodes like the pipeline, its
OPTForCausalLM decodes the pipeline's greedy image, its README's code runs; models with the
image-place embedding are refused with one message that says why and what exports instead."""

from __future__ import annotations

import re

import pytest
import torch
from transformers import AutoTokenizer, LogitsProcessor, LogitsProcessorList, OPTForCausalLM

from cm3leon.cli import main as cli_main
from cm3leon.config import ModelConfig, save_json
from cm3leon.generate.decode import generate_image_tokens
from cm3leon.generate.logits import SamplingConfig
from cm3leon.model.hf import export_hf
from cm3leon.model.io import save_model
from cm3leon.model.transformer import Transformer
from cm3leon.pipeline import CM3Leon
from cm3leon.sequence.sft_templates import render_prompt
from cm3leon.vocab import Vocab
from helpers import build_tiny_model_dir

CAPTIONS = ["a red circle at the top left", "two green triangles", "a blue square in the middle of the image"]
TEXTS = [
    "a red circle",
    " a red circle",  # leading space: the BPE's "Ġa"
    "  two  spaces\tand a tab\nand a newline ",
    "héllo wörld ✓ 日本語 🎨",
    "what color is the circle?",
    "",
]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny paper-pure pipeline directory (16 px images, 64 tokens) and its export via the CLI."""
    root = tmp_path_factory.mktemp("export")
    model_dir = build_tiny_model_dir(root / "model", resolution=16, encoder=False)
    assert cli_main(["export-hf", "--model", str(model_dir), "--out", str(root / "hf")]) == 0
    return CM3Leon.from_pretrained(model_dir), root / "hf"


class ImageIdsOnly(LogitsProcessor):
    """Every id that is not an image id gets -inf (plain torch; the ids come from the tokenizer)."""

    def __init__(self, image_ids: list[int], size: int) -> None:
        self.blocked = torch.ones(size, dtype=torch.bool)
        self.blocked[image_ids] = False

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return scores.masked_fill(self.blocked.to(scores.device), float("-inf"))


def test_export_writes_a_folder_transformers_loads(exported):
    pipe, hf_dir = exported
    names = {p.name for p in hf_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "README.md",
            "image_tokenizer"} <= names
    tok = AutoTokenizer.from_pretrained(hf_dir)
    model = OPTForCausalLM.from_pretrained(hf_dir)
    v = pipe.vocab
    assert len(tok) == v.size == model.config.vocab_size
    assert tok.convert_tokens_to_ids(v.special_tokens) == list(range(v.n_special))
    codes = [0, 7, v.image_size - 1]
    assert tok.convert_tokens_to_ids([f"<img:{c}>" for c in codes]) == v.codes_to_ids(codes)
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.mask_token) == ("<eos>", "<eos>", "<pad>", "<mask:0>")
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (v.eos_id, v.eos_id, v.pad_id)
    assert tok.padding_side == "left" and tok.model_max_length == pipe.model.cfg.max_seq_len
    assert set(tok("a red circle")) == {"input_ids", "attention_mask"}  # OPT's generate takes both, nothing else


@pytest.mark.parametrize("text", TEXTS)
def test_text_encodes_to_the_pipelines_unified_ids(exported, text):
    pipe, hf_dir = exported
    tok = AutoTokenizer.from_pretrained(hf_dir)
    ids = tok(text)["input_ids"]
    assert ids == pipe.text_ids(text)  # no <eos> or anything else added
    assert all(pipe.vocab.text_offset <= i < pipe.vocab.image_offset for i in ids)
    assert tok.decode(ids) == text


def test_specials_and_image_tokens_in_a_prompt(exported):
    pipe, hf_dir = exported
    tok, v = AutoTokenizer.from_pretrained(hf_dir), pipe.vocab
    core = pipe.text_ids("a red circle")
    want = [v.eos_id, *core, v.break_id]
    assert tok("<eos>a red circle<break>")["input_ids"] == want
    assert tok("<eos> a red circle <break>")["input_ids"] == want  # <eos>/<break> take the spaces next to them
    assert tok("<eos>a red circle<break><img:3><img:0>")["input_ids"] == want + v.codes_to_ids([3, 0])
    assert tok("a <mask:0> circle<infill>")["input_ids"] == [
        *pipe.text_ids("a "), v.mask_id(0), *pipe.text_ids(" circle"), v.infill_id]
    ids = want + v.codes_to_ids([5, 1])
    assert tok.decode(ids) == "<eos>a red circle<break><img:5><img:1>"
    assert tok.decode(ids, skip_special_tokens=True) == "a red circle<img:5><img:1>"


@torch.no_grad()
def test_folder_alone_greedy_decodes_the_pipelines_image_tokens(exported):
    """HF tokenizer + OPTForCausalLM.generate from the folder give our greedy text-to-image tokens."""
    pipe, hf_dir = exported
    v = pipe.vocab
    tok = AutoTokenizer.from_pretrained(hf_dir)
    hf = OPTForCausalLM.from_pretrained(hf_dir).eval()
    image_ids = [i for name, i in tok.get_vocab().items() if re.fullmatch(r"<img:\d+>", name)]
    L = v.image_seq_len
    assert len(image_ids) == v.image_size and L == 64
    batch = tok([f"<eos> {c} <break>" for c in CAPTIONS], padding=True, return_tensors="pt")  # left-padded
    ours_prompts = [render_prompt("text_to_image", {"caption": c}, pipe.text_tokenizer, v)[0] for c in CAPTIONS]
    for row, mask, ours in zip(batch["input_ids"], batch["attention_mask"], ours_prompts):
        assert row[mask.bool()].tolist() == ours
    out = hf.generate(**batch, max_new_tokens=L, min_new_tokens=L, do_sample=False, num_beams=1,
                      logits_processor=LogitsProcessorList([ImageIdsOnly(image_ids, len(tok))]))
    theirs = out[:, batch["input_ids"].shape[1]:]
    ours = generate_image_tokens(pipe.model, v, ours_prompts, SamplingConfig(greedy=True, guidance=1.0))
    assert theirs.shape == ours.shape == (len(CAPTIONS), L) and ours.unique().numel() > 1
    agree = (theirs == v.codes_to_ids(ours)).float().mean().item()
    assert agree == 1.0, f"{agree:.1%} of the greedy image tokens agree"
    # the export's VQ-GAN turns the codes into the pipeline's pixels
    from cm3leon.tokenize.image_vq import ImageTokenizer

    vq = ImageTokenizer.from_pretrained(hf_dir / "image_tokenizer")
    torch.testing.assert_close(vq.decode(theirs - v.image_offset), pipe.image_tokenizer.decode(ours), atol=0, rtol=0)


def test_readme_describes_the_model_and_its_code_runs(exported, tmp_path, monkeypatch):
    pipe, hf_dir = exported
    v = pipe.vocab
    card = (hf_dir / "README.md").read_text()
    for fact in (f"IMAGE_OFFSET, L = {v.image_offset}, {v.image_seq_len}", "`<eos> caption <break>`",
                 f"| {v.image_offset} .. {v.size - 1} | image", "CFG", "cm3leon import-hf"):
        assert fact in card, fact
    blocks = re.findall(r"```python\n(.*?)```", card, flags=re.S)
    assert len(blocks) == 2
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec("\n".join(blocks).replace("path/to/this/folder", str(hf_dir)), scope)  # noqa: S102
    assert scope["codes"].shape == (1, v.image_seq_len)
    assert int(scope["codes"].min()) >= 0 and int(scope["codes"].max()) < v.image_size
    assert (tmp_path / "image.png").is_file()


def test_a_decoder_without_its_text_tokenizer_exports_weights_and_card(tmp_path, capsys):
    vocab = Vocab(text_size=40, image_size=16, image_seq_len=16)
    model = Transformer(ModelConfig(vocab_size=vocab.size, d_model=32, n_layers=1, n_heads=4, max_seq_len=64))
    save_model(model, tmp_path / "model")
    save_json(vocab.to_dict(), tmp_path / "model" / "vocab.json")
    assert cli_main(["export-hf", "--model", str(tmp_path / "model"), "--out", str(tmp_path / "hf")]) == 0
    assert "no tokenizer written (pass --text-tokenizer DIR)" in capsys.readouterr().out
    names = {p.name for p in (tmp_path / "hf").iterdir()}
    assert {"config.json", "model.safetensors", "README.md"} <= names and "tokenizer.json" not in names
    assert "this folder has no tokenizer" in (tmp_path / "hf" / "README.md").read_text()


# ---------------------------------------------------------------- the refusal

REFUSAL = ("image-place embedding", "OPTForCausalLM does not have",
           "model_overrides.image_tokens=0 model_overrides.image_vocab=0 model_overrides.image_axial=false",
           "docs/cli.md#exporting-to-transformers")


def _image_place_model_dir(path):
    vocab = Vocab(text_size=40, image_size=16, image_seq_len=16)
    cfg = ModelConfig(vocab_size=vocab.size, d_model=32, n_layers=1, n_heads=4, max_seq_len=64,
                      image_tokens=vocab.image_seq_len, image_vocab=vocab.image_size, image_axial=True)
    model = Transformer(cfg)
    save_model(model, path)
    save_json(vocab.to_dict(), path / "vocab.json")
    return model, vocab


def test_export_refuses_the_image_place_embedding(tmp_path):
    model, vocab = _image_place_model_dir(tmp_path / "model")
    with pytest.raises(ValueError) as e:
        export_hf(model, tmp_path / "hf", vocab=vocab)
    msg = str(e.value)
    for part in REFUSAL + ("image_tokens=16", "image_axial=true"):
        assert part in msg, part
    assert "\n" not in msg
    assert not (tmp_path / "hf").exists()


def test_cli_export_refuses_the_image_place_embedding_in_one_line(tmp_path, capsys):
    _image_place_model_dir(tmp_path / "model")
    assert cli_main(["export-hf", "--model", str(tmp_path / "model"), "--out", str(tmp_path / "hf")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: cannot export to transformers") and len(err.splitlines()) == 1
    for part in REFUSAL:
        assert part in err, part
    assert not (tmp_path / "hf").exists()
