"""Whole model directories from other projects' releases: ``convert_chameleon`` turns a
``transformers``-format Chameleon / Anole / Lumina-mGPT checkpoint plus Meta's VQ-GAN into a
directory :meth:`cm3leon.pipeline.CM3Leon.from_pretrained` loads (see docs/chameleon.md)::

    out/
      config.json, model*.safetensors (+ index), vocab.json   the decoder and Chameleon's ids
      text_tokenizer/                                          the checkpoint's tokenizer.json
      image_tokenizer/                                         the VQ-GAN, encoder and decoder
      generation_config.json                                   Chameleon's published decoding defaults
      reranker/                                                optional: a local CLIP directory, for re-ranking

The decoder's keys and vocabulary are mapped in :mod:`cm3leon.model.chameleon_convert`, the
VQ-GAN's in :mod:`cm3leon.tokenize.image_vq_convert`.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from cm3leon.config import load_json
from cm3leon.generate.generation_config import GenerationConfig, TaskDecoding
from cm3leon.generate.logits import SamplingConfig
from cm3leon.model.chameleon_convert import model_config_from_hf, write_model
from cm3leon.tokenize.image_vq_convert import convert_checkpoint, read_config
from cm3leon.tokenize.text_hf import HFTextTokenizer

log = logging.getLogger(__name__)

VQGAN_FILES = ("vqgan.ckpt", "vqgan.yaml")

# Chameleon's own inference defaults (facebookresearch/chameleon, chameleon/inference/chameleon.py,
# ``Options``; Anole generates with the same code): images with text guidance 3.0 and image
# guidance 1.2, temperature 0.7, top-p 0.9; text with temperature 0.7, top-p 0.9 and repetition
# penalty 1.2. Text-to-image has no input image, so its instruct-CFG is plain CFG with scale 3.0.
_IMAGE = SamplingConfig(guidance=3.0, text_guidance=3.0, image_guidance=1.2, temperature=0.7, top_p=0.9)
_TEXT = SamplingConfig(temperature=0.7, top_p=0.9, repetition_penalty=1.2)
CHAMELEON_GENERATION = GenerationConfig(
    text_to_image=TaskDecoding(_IMAGE),
    caption=TaskDecoding(_TEXT, max_new_tokens=64),
    vqa=TaskDecoding(_TEXT, max_new_tokens=32),
    edit=TaskDecoding(_IMAGE),
    control=TaskDecoding(_IMAGE),
    grounding=TaskDecoding(_IMAGE),
)


def find_vqgan(hf_dir: str | Path, vqgan_dir: str | Path | None = None) -> tuple[Path, Path]:
    """``(vqgan.ckpt, vqgan.yaml)`` in ``vqgan_dir``, else in the checkpoint directory or its ``tokenizer/``."""
    places = [Path(vqgan_dir)] if vqgan_dir is not None else [Path(hf_dir), Path(hf_dir) / "tokenizer"]
    for d in places:
        if all((d / f).is_file() for f in VQGAN_FILES):
            return d / VQGAN_FILES[0], d / VQGAN_FILES[1]
    raise FileNotFoundError(
        f"no vqgan.ckpt + vqgan.yaml in {' or '.join(str(p) for p in places)}: the image tokenizer comes from Meta's "
        "VQ-GAN release (e.g. `huggingface-cli download GAIR/Anole-7b-v0.1 --include 'tokenizer/*'`); "
        "pass its folder with --vqgan DIR"
    )


def convert_chameleon(hf_dir: str | Path, out_dir: str | Path, *, vqgan_dir: str | Path | None = None,
                      clip_dir: str | Path | None = None) -> Path:
    """Write a model directory of the chameleon family from a transformers checkpoint and Meta's VQ-GAN;
    ``clip_dir`` (a local transformers CLIP directory) is copied in as the re-ranker."""
    hf, out = Path(hf_dir), Path(out_dir)
    if not hf.is_dir():
        raise FileNotFoundError(f"checkpoint directory {hf} not found")
    model_config_from_hf(load_json(hf / "config.json"))  # not a Chameleon checkpoint: say so before anything else
    ckpt, yaml = find_vqgan(hf, vqgan_dir)
    if clip_dir is not None:
        from cm3leon.retrieval.encoder import load_encoder

        load_encoder(clip_dir)  # refuses a directory that is not a loadable CLIP before anything is written
    text_tok = HFTextTokenizer.from_file(hf / "tokenizer.json")
    vq_cfg, _ = read_config(yaml)
    cfg, vocab = write_model(hf, out, image_seq_len=vq_cfg.tokens_per_image)
    if vq_cfg.codebook_size != vocab.image_size:
        raise ValueError(f"{yaml} describes {vq_cfg.codebook_size} codes but the tokenizer has {vocab.image_size} "
                         "IMGIMG entries; the VQ-GAN belongs to another model")
    if text_tok.vocab_size > cfg.vocab_size:
        raise ValueError(f"tokenizer.json has {text_tok.vocab_size} ids but the model only {cfg.vocab_size}")
    text_tok.save(out / "text_tokenizer")
    convert_checkpoint(ckpt, yaml, out / "image_tokenizer", src="chameleon")
    CHAMELEON_GENERATION.save(out)
    if clip_dir is not None:
        if (out / "reranker").exists():
            shutil.rmtree(out / "reranker")
        shutil.copytree(clip_dir, out / "reranker")
    log.info("converted %s (%d layers, d_model %d) -> %s", hf, cfg.n_layers, cfg.d_model, out)
    return out
