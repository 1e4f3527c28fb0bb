"""Export to / import from Hugging Face ``transformers`` OPTForCausalLM (DESIGN.md "Model").

CM3Leon is OPT without biases and without LayerNorm parameters, so it maps onto
``OPTConfig(enable_bias=False, layer_norm_elementwise_affine=False,
do_layer_norm_before=True, tie_word_embeddings=False)`` with identical logits. The one
layout difference is OPT's learned positional embedding, which looks up
``position + 2``: the exported table carries two extra (zero) leading rows. OPT derives
positions from ``attention_mask`` as ``cumsum(mask) - 1`` (pads -> -1 -> row 1), the
same positions our model uses for left-padded batches (:func:`positions_from_valid`).

All key renaming lives in :func:`to_opt_state_dict` / :func:`from_opt_state_dict`.

The image-place embedding (``ModelConfig.image_tokens``, ``image_axial``; not in the paper)
has no OPT counterpart: an image token's place depends on where its run of image ids starts,
not on its absolute position, so such models are refused (:func:`image_place_refusal`).
:func:`export_hf` also writes the unified vocabulary's tokenizer
(:mod:`cm3leon.model.hf_tokenizer`), the VQ-GAN and a model card when given them.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from cm3leon.config import ModelConfig
from cm3leon.model.io import check_state_dict
from cm3leon.model.transformer import Transformer
from cm3leon.safetensors_io import read_safetensors
from cm3leon.vocab import Vocab

if TYPE_CHECKING:
    from transformers import OPTConfig, OPTForCausalLM

    from cm3leon.tokenize.image_vq import ImageTokenizer
    from cm3leon.tokenize.text_bpe import TextTokenizer

log = logging.getLogger(__name__)

OPT_POS_OFFSET = 2  # OPTLearnedPositionalEmbedding looks up position + 2


EXPORTABLE_OVERRIDES = "model_overrides.image_tokens=0 model_overrides.image_vocab=0 model_overrides.image_axial=false"
EXPORT_DOCS = "docs/cli.md#exporting-to-transformers"


def image_place_refusal(cfg: ModelConfig) -> str:
    """Why a model with the image-place embedding cannot be an OPT, and what exports instead (one line)."""
    return (
        f"cannot export to transformers: this model has the image-place embedding (image_tokens={cfg.image_tokens}, "
        f"image_vocab={cfg.image_vocab}, image_axial={str(cfg.image_axial).lower()}; not in the paper), a learned "
        "vector for each token's place inside its image, which OPTForCausalLM does not have: OPT adds one vector per "
        "absolute position, and an image token's place depends on where its run of image ids starts, so no OPT "
        "weights give the same logits. Train an exportable model with `cm3leon train ... --override "
        f"{EXPORTABLE_OVERRIDES}` (SFT from it keeps that shape); see {EXPORT_DOCS}"
    )


def to_opt_config(cfg: ModelConfig, vocab: Vocab | None = None) -> OPTConfig:
    """The ``OPTConfig`` describing the same network as ``cfg`` (special ids from ``vocab``)."""
    from transformers import OPTConfig

    if cfg.image_tokens:
        raise ValueError(image_place_refusal(cfg))
    v = vocab or Vocab.paper()  # special ids are the same in every Vocab
    if vocab is not None and vocab.size != cfg.vocab_size:
        raise ValueError(f"vocab.size={vocab.size} does not match ModelConfig.vocab_size={cfg.vocab_size}")
    return OPTConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        ffn_dim=cfg.ffn_dim,
        max_position_embeddings=cfg.max_seq_len,
        do_layer_norm_before=True,
        word_embed_proj_dim=cfg.d_model,
        dropout=0.0,
        attention_dropout=0.0,
        layerdrop=0.0,
        activation_function=cfg.activation,
        init_std=cfg.init_std,
        enable_bias=False,
        layer_norm_elementwise_affine=False,
        tie_word_embeddings=False,
        pad_token_id=v.pad_id,
        bos_token_id=v.eos_id,  # every document starts with <eos> (paper §2.1)
        eos_token_id=v.eos_id,
    )


def from_opt_config(opt: OPTConfig | dict[str, Any]) -> ModelConfig:
    """The :class:`ModelConfig` of an OPT config, refusing features our decoder does not have."""
    d = opt if isinstance(opt, dict) else opt.to_dict()
    if d.get("model_type", "opt") != "opt":
        raise ValueError(f"expected an OPT config (model_type 'opt'), got model_type {d.get('model_type')!r}")
    hidden = d["hidden_size"]
    refusals = []
    if d.get("enable_bias", True):
        refusals.append("enable_bias=True (CM3Leon has no bias terms)")
    if d.get("layer_norm_elementwise_affine", True):
        refusals.append("layer_norm_elementwise_affine=True (CM3Leon LayerNorms have no parameters)")
    if not d.get("do_layer_norm_before", True):
        refusals.append("do_layer_norm_before=False (post-LN; CM3Leon is pre-LN)")
    if d.get("_remove_final_layer_norm", False):
        refusals.append("_remove_final_layer_norm=True (CM3Leon has a final LayerNorm)")
    proj = d.get("word_embed_proj_dim") or hidden
    if proj != hidden:
        refusals.append(f"word_embed_proj_dim={proj} != hidden_size={hidden} (no embedding projections)")
    act = d.get("activation_function", "relu")
    if act not in ("relu", "gelu"):
        refusals.append(f"activation_function={act!r} (supported: 'relu', 'gelu')")
    if refusals:
        raise ValueError("this OPT checkpoint cannot be represented by the CM3Leon decoder: " + "; ".join(refusals))
    return ModelConfig(
        vocab_size=d["vocab_size"],
        d_model=hidden,
        n_layers=d["num_hidden_layers"],
        n_heads=d["num_attention_heads"],
        d_ff=None if d["ffn_dim"] == 4 * hidden else d["ffn_dim"],
        max_seq_len=d["max_position_embeddings"],
        activation=act,
        init_std=d.get("init_std", ModelConfig.init_std),
    )


def to_opt_state_dict(model: Transformer) -> dict[str, Tensor]:
    """Our weights renamed/reshaped to OPTForCausalLM keys (q/k/v split, position rows offset by 2)."""
    sd = model.state_dict()
    pos = sd["pos_emb.weight"]
    out = {
        "model.decoder.embed_tokens.weight": sd["tok_emb.weight"],
        "model.decoder.embed_positions.weight": torch.cat([pos.new_zeros(OPT_POS_OFFSET, pos.shape[1]), pos]),
        "lm_head.weight": sd["lm_head.weight"],
    }
    for i in range(model.cfg.n_layers):
        src, dst = f"blocks.{i}.", f"model.decoder.layers.{i}."
        q, k, v = sd[src + "attn.qkv.weight"].chunk(3, dim=0)
        out[dst + "self_attn.q_proj.weight"] = q
        out[dst + "self_attn.k_proj.weight"] = k
        out[dst + "self_attn.v_proj.weight"] = v
        out[dst + "self_attn.out_proj.weight"] = sd[src + "attn.out.weight"]
        out[dst + "fc1.weight"] = sd[src + "mlp.fc1.weight"]
        out[dst + "fc2.weight"] = sd[src + "mlp.fc2.weight"]
    return {k: t.contiguous() for k, t in out.items()}


def from_opt_state_dict(hf: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """Inverse of :func:`to_opt_state_dict`; an OPT checkpoint with tied embeddings gets an untied copy."""
    hf = {("model." + k if k.startswith("decoder.") else k): t for k, t in hf.items()}  # OPTModel keys
    expected = to_opt_state_dict_shapes(cfg)
    if "lm_head.weight" not in hf and "model.decoder.embed_tokens.weight" in hf:
        log.info("OPT checkpoint ties lm_head to embed_tokens; importing an untied copy")
        hf = {**hf, "lm_head.weight": hf["model.decoder.embed_tokens.weight"]}
    check_state_dict(expected, hf, source="the OPT checkpoint")
    out = {
        "tok_emb.weight": hf["model.decoder.embed_tokens.weight"],
        "pos_emb.weight": hf["model.decoder.embed_positions.weight"][OPT_POS_OFFSET:],
        "lm_head.weight": hf["lm_head.weight"],
    }
    for i in range(cfg.n_layers):
        src, dst = f"model.decoder.layers.{i}.", f"blocks.{i}."
        out[dst + "attn.qkv.weight"] = torch.cat(
            [hf[src + f"self_attn.{n}_proj.weight"] for n in ("q", "k", "v")], dim=0
        )
        out[dst + "attn.out.weight"] = hf[src + "self_attn.out_proj.weight"]
        out[dst + "mlp.fc1.weight"] = hf[src + "fc1.weight"]
        out[dst + "mlp.fc2.weight"] = hf[src + "fc2.weight"]
    return {k: t.contiguous() for k, t in out.items()}


def to_opt_state_dict_shapes(cfg: ModelConfig) -> dict[str, Tensor]:
    """Meta tensors with the shape of every OPT key for ``cfg`` (for strict checks)."""
    with torch.device("meta"):
        return to_opt_state_dict(Transformer(cfg))


def to_hf(model: Transformer, vocab: Vocab | None = None) -> OPTForCausalLM:
    """An in-memory OPTForCausalLM with ``model``'s weights (same device and dtype)."""
    from transformers import OPTForCausalLM

    p = next(model.parameters())
    with torch.device("meta"):
        hf = OPTForCausalLM(to_opt_config(model.cfg, vocab))
    state = {k: t.detach().clone() for k, t in to_opt_state_dict(model).items()}  # no shared storage
    hf.load_state_dict(state, strict=True, assign=True)
    return hf.to(device=p.device, dtype=p.dtype).eval()


IMAGE_TOKENIZER_SUBDIR = "image_tokenizer"  # the VQ-GAN's folder inside an export


def export_hf(
    model: Transformer,
    out_dir: str | Path,
    *,
    vocab: Vocab | None = None,
    text_tokenizer: TextTokenizer | None = None,
    image_tokenizer: ImageTokenizer | None = None,
) -> Path:
    """Write ``model`` as a transformers OPTForCausalLM directory (config.json, generation_config.json,
    model.safetensors). With ``vocab``: also a README.md model card. With ``vocab`` and
    ``text_tokenizer``: the unified vocabulary's tokenizer (tokenizer.json, tokenizer_config.json;
    :mod:`cm3leon.model.hf_tokenizer`), so ``AutoTokenizer.from_pretrained(out_dir)`` encodes prompts.
    With ``image_tokenizer``: its VQ-GAN in ``image_tokenizer/``, to turn generated image ids into pixels.
    A model OPT cannot express (the image-place embedding) is refused before anything is written."""
    if text_tokenizer is not None and vocab is None:
        raise ValueError("a tokenizer export needs the model's vocabulary (vocab.json): pass vocab")
    hf = to_hf(model, vocab)  # refuses what OPT cannot express
    tokenizer = None
    if text_tokenizer is not None and vocab is not None:
        from cm3leon.model.hf_tokenizer import to_hf_tokenizer

        tokenizer = to_hf_tokenizer(text_tokenizer, vocab, model_max_length=model.cfg.max_seq_len)
    if image_tokenizer is not None and vocab is not None and (
            image_tokenizer.tokens_per_image, image_tokenizer.codebook_size) != (vocab.image_seq_len, vocab.image_size):
        raise ValueError(f"the image tokenizer makes {image_tokenizer.tokens_per_image} tokens from "
                         f"{image_tokenizer.codebook_size} codes but the vocabulary expects {vocab.image_seq_len} "
                         f"from {vocab.image_size}")
    out = Path(out_dir)
    hf.save_pretrained(str(out))
    if tokenizer is not None:
        from cm3leon.model.hf_tokenizer import save_hf_tokenizer

        save_hf_tokenizer(tokenizer, out)
    if image_tokenizer is not None:
        image_tokenizer.save_pretrained(out / IMAGE_TOKENIZER_SUBDIR)
    if vocab is not None:
        card = model_card(model, vocab, tokenizer=tokenizer is not None, image_tokenizer=image_tokenizer is not None)
        (out / "README.md").write_text(card, encoding="utf-8")
    log.info("exported OPTForCausalLM to %s", out)
    return out


def model_card(model: Transformer, vocab: Vocab, *, tokenizer: bool, image_tokenizer: bool) -> str:
    """The README.md of an exported folder: what the model is, its vocabulary, how to prompt it."""
    cfg, v = model.cfg, vocab
    masks = f"`<mask:0>` ... `<mask:{v.n_masks - 1}>`" if v.n_masks > 1 else "`<mask:0>`"
    lines = [
        "---",
        "library_name: transformers",
        "tags: [cm3leon, opt, text-to-image, image-to-text, multimodal]",
        "---",
        "",
        "# CM3Leon decoder (exported by cm3leon)",
        "",
        "A decoder-only transformer that reads and writes text and images as tokens of one vocabulary "
        "(CM3Leon, Yu et al. 2023), trained with cm3leon and exported with "
        "`cm3leon export-hf`. The network is an `OPTForCausalLM` without biases and without LayerNorm "
        "parameters; in float32 it gives the same logits as cm3leon's own decoder.",
        "",
        f"- {model.num_params() / 1e6:.1f}M parameters: {cfg.n_layers} layers, d_model {cfg.d_model}, "
        f"{cfg.n_heads} heads, FFN {cfg.ffn_dim}, {cfg.activation}, context {cfg.max_seq_len} tokens",
        f"- images: {v.image_seq_len} tokens per image from a VQ-GAN codebook of {v.image_size} codes",
        "",
        "## Vocabulary",
        "",
        "| ids | what | token names |",
        "|---|---|---|",
        f"| 0 .. {v.n_special - 1} | specials | `<pad>` `<eos>` `<break>` `<infill>` {masks} |",
        f"| {v.text_offset} .. {v.image_offset - 1} | text: byte-level BPE id t is id {v.text_offset} + t | "
        "BPE symbols |",
        f"| {v.image_offset} .. {v.size - 1} | image: VQ code c is id {v.image_offset} + c | `<img:0>` ... "
        f"`<img:{v.image_size - 1}>` |",
        "",
        "A document is `<eos> text <break> image` (every document starts with `<eos>`; `<break>` "
        f"switches modality; an image is exactly {v.image_seq_len} image ids). `<mask:i>` and `<infill>` "
        "are the CM3 infilling sentinels.",
        "",
    ]
    if tokenizer:
        lines += [
            "## Tokenizer",
            "",
            "`AutoTokenizer.from_pretrained` gives the tokenizer of the whole vocabulary. It adds no tokens "
            "of its own: write `<eos>` and `<break>` in the prompt. Plain text encodes exactly as in "
            'cm3leon (`tokenizer(s).input_ids == CM3Leon.text_ids(s)`). '
            '`<eos>`, `<break>` and `<infill>` take the spaces next to them, so `"<eos> a red circle '
            '<break>"` is the trained layout; `<mask:i>` takes none. Text that spells a token name '
            "(`<break>`, `<img:5>`) becomes that token. Batches pad on the left with `<pad>`.",
            "",
        ]
    lines += [
        "## Text to image",
        "",
        f"Prompt `<eos> caption <break>`, then generate exactly {v.image_seq_len} tokens restricted to "
        "image ids:",
        "",
        "```python",
        "import torch",
        "from transformers import AutoTokenizer, LogitsProcessor, LogitsProcessorList, OPTForCausalLM",
        "",
        'FOLDER = "path/to/this/folder"',
        "model = OPTForCausalLM.from_pretrained(FOLDER).eval()",
        f"IMAGE_OFFSET, L = {v.image_offset}, {v.image_seq_len}",
        "",
        "class ImageIdsOnly(LogitsProcessor):",
        "    def __call__(self, input_ids, scores):",
        '        scores[:, :IMAGE_OFFSET] = -float("inf")',
        "        return scores",
        "",
    ]
    if tokenizer:
        lines += [
            "tokenizer = AutoTokenizer.from_pretrained(FOLDER)",
            'prompt = tokenizer("<eos>a red circle at the top left<break>", return_tensors="pt")',
        ]
    else:
        lines += [
            f"# this folder has no tokenizer: caption ids are cm3leon TextTokenizer ids + {v.text_offset}",
            "caption_ids = [...]",
            f'prompt = {{"input_ids": torch.tensor([[{v.eos_id}, *caption_ids, {v.break_id}]])}}',
        ]
    lines += [
        "out = model.generate(**prompt, max_new_tokens=L, min_new_tokens=L, do_sample=True, top_p=0.9,",
        "                     logits_processor=LogitsProcessorList([ImageIdsOnly()]))",
        'codes = out[:, prompt["input_ids"].shape[1]:] - IMAGE_OFFSET  # VQ codes, Long[1, L]',
        "```",
        "",
    ]
    if image_tokenizer:
        lines += [
            f"Turn the codes into pixels with the VQ-GAN in `{IMAGE_TOKENIZER_SUBDIR}/` (cm3leon's decoder):",
            "",
            "```python",
            "from cm3leon.tokenize.image_vq import ImageTokenizer",
            "",
            f'vq = ImageTokenizer.from_pretrained(f"{{FOLDER}}/{IMAGE_TOKENIZER_SUBDIR}")',
            'ImageTokenizer.postprocess(vq.decode(codes))[0].save("image.png")',
            "```",
            "",
        ]
    else:
        lines += ["Turn the codes into pixels with the VQ-GAN the model was trained with "
                  "(`cm3leon.tokenize.image_vq.ImageTokenizer.decode`).", ""]
    lines += [
        "## What stays in cm3leon",
        "",
        "`transformers` gives the network, the tokenizer and plain decoding. Classifier-free guidance "
        "(CFG), contrastive decoding (CD-K), CLIP re-ranking, retrieval-augmented prompts and the "
        "task templates (captioning, VQA, editing, control) are in cm3leon: "
        "`CM3Leon.from_pretrained(model_dir).generate_image(...)`. `cm3leon import-hf` turns this folder "
        "back into a cm3leon decoder.",
        "",
    ]
    return "\n".join(lines)


def _read_hf_weights(hf_dir: Path) -> dict[str, Tensor]:
    single = hf_dir / "model.safetensors"
    index = hf_dir / "model.safetensors.index.json"
    if single.exists():
        return read_safetensors(single)
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        state: dict[str, Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            state.update(read_safetensors(hf_dir / shard))
        return state
    raise FileNotFoundError(
        f"no model.safetensors (or model.safetensors.index.json) in {hf_dir}; "
        "only safetensors checkpoints are supported (re-save with save_pretrained)"
    )


def import_hf(hf_dir: str | Path) -> tuple[Transformer, ModelConfig]:
    """Load an OPTForCausalLM directory as our :class:`Transformer` (strict; clear refusals)."""
    d = Path(hf_dir)
    cfg_path = d / "config.json"
    if not cfg_path.exists():
        raise FileNotFoundError(f"{cfg_path} not found; expected a transformers model directory")
    try:
        raw = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_path} is not valid JSON ({e})") from e
    cfg = from_opt_config(raw)
    state = from_opt_state_dict(_read_hf_weights(d), cfg)
    with torch.device("meta"):
        model = Transformer(cfg)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval(), cfg
