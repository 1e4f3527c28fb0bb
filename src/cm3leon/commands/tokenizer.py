"""``cm3leon tokenizer ...``: train the text BPE and the image VQ-GAN, convert released VQ weights."""

from __future__ import annotations

import argparse
import json
import textwrap
from typing import Any


def _raw(text: str) -> str:
    return textwrap.dedent(text).strip("\n")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``cm3leon tokenizer train-text|train-image|convert``."""
    p = subparsers.add_parser("tokenizer",
                              help="train the text BPE / image VQ-GAN; convert taming/Chameleon VQ weights",
                              description="Tokenizers: byte-level BPE for text, VQ-GAN for images (paper §2.1).")
    sub = p.add_subparsers(dest="tokenizer_command", metavar="SUBCOMMAND")
    _add_train_text(sub)
    _add_train_image(sub)
    _add_convert(sub)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


# ---- train-text --------------------------------------------------------------------
def _add_train_text(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train-text",
        help="train the byte-level BPE text tokenizer on a data source",
        description="Train a byte-level BPE (no special tokens; control tokens live in the unified vocabulary) "
        "on every record's text plus caption-like strings of its meta (detailed captions, VQA questions and "
        "answers, edit instructions, reasoning text).",
        epilog=_raw("""
            example:
              cm3leon tokenizer train-text --data data/shapes32 --vocab-size 1024 --out tok/text
            """),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--data", required=True, help="dataset dir or raw source (image folder, COCO json, tars, parquet)")
    p.add_argument("--vocab-size", type=int, required=True, help="BPE vocabulary size (>= 256; paper: 56320)")
    p.add_argument("--out", required=True, help="output directory (tokenizer.json + tokenizer_config.json)")
    p.add_argument("--min-frequency", type=int, default=2, help="minimum pair count for a merge (default 2)")
    p.add_argument("--limit", type=int, default=None, help="read at most this many records")
    p.set_defaults(func=_run_train_text)


def _run_train_text(args: argparse.Namespace) -> int:
    from cm3leon.workspace import WorkspaceLock, check_not_inside

    check_not_inside(args.out, args.data, replaces=False)
    with WorkspaceLock(args.out):  # one writer of --out at a time
        return _train_text(args)


def _train_text(args: argparse.Namespace) -> int:
    from cm3leon.data.sources import open_source
    from cm3leon.tokenize.text_bpe import TextTokenizer, record_texts

    source = open_source(args.data, require_image=False, limit=args.limit)
    counts = {"records": 0, "strings": 0}

    def texts() -> Any:
        for rec in source:
            counts["records"] += 1
            for t in record_texts(rec.text, rec.meta):
                counts["strings"] += 1
                yield t

    tok = TextTokenizer.train(texts(), args.vocab_size, min_frequency=args.min_frequency)
    if counts["strings"] == 0:
        raise ValueError(f"{args.data} yielded no text to train on ({source.stats.summary()})")
    tok.save(args.out)
    print(f"text tokenizer: {tok.vocab_size} ids from {counts['strings']} strings of {counts['records']} records "
          f"-> {args.out}")
    return 0


# ---- train-image -------------------------------------------------------------------
def _add_train_image(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train-image",
        help="train the VQ-GAN image tokenizer on a data source",
        description="Train a VQ-GAN image tokenizer from a preset. Images are preprocessed once (shorter side "
        "resized, center crop to the preset's resolution) and kept in memory as uint8. The last --n-val images "
        "of --data are held out (or all of --val-data) for the final PSNR / codebook usage in metrics.json.",
        epilog=_raw("""
            examples:
              cm3leon tokenizer train-image --data data/shapes32 --preset shapes-32 --out tok/image
              cm3leon tokenizer train-image --data data/shapes32 --preset shapes-32 --out tok/image \\
                  --steps 3000 --resume
            """),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--data", required=True, help="dataset dir or raw source with images")
    p.add_argument("--preset", default="shapes-32",
                   help="model + training preset: shapes-32, shapes-64, shapes-128, shapes-256 (CPU-sized), paper-256")
    p.add_argument("--out", required=True, help="output directory (tokenizer, checkpoint/, samples/, metrics.json)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the preset's)")
    p.add_argument("--resume", action="store_true", help="continue from --out/checkpoint")
    p.add_argument("--val-data", default=None, help="held-out images (default: the last --n-val of --data)")
    p.add_argument("--n-val", type=int, default=256, help="images held out of --data when --val-data is not given")
    p.add_argument("--max-images", type=int, default=None, help="read at most this many training images")
    p.add_argument("--task-images", action="store_true",
                   help="also train on a record's extra images (Shapes: seg/edge/depth/edit/word images)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 is best on a shared CPU)")
    p.add_argument("--bf16", action="store_true",
                   help="bf16 autocast for the encoder (GPU); quantizer/decoder stay fp32")
    p.add_argument("--max-minutes", type=float, default=None, help="stop training after this much time")
    p.add_argument("--perceptual-weight", type=float, default=None, help="LPIPS weight (needs --lpips-vgg/--lpips-lin)")
    p.add_argument("--lpips-vgg", default=None, help="local torchvision VGG16 weights (vgg16-397923af.pth)")
    p.add_argument("--lpips-lin", default=None, help="local LPIPS heads (lpips vgg.pth)")
    p.add_argument("--adversarial-weight", type=float, default=None, help="PatchGAN loss weight (0 = off)")
    p.add_argument("--adversarial-start", type=int, default=None, help="step at which the GAN loss starts")
    p.add_argument("--seed", type=int, default=None)
    p.set_defaults(func=_run_train_image)


def _load_images(path: str, resolution: int, *, limit: int | None, task_images: bool) -> Any:
    import numpy as np
    import torch
    from PIL import Image

    from cm3leon.data.sources import open_source
    from cm3leon.pixels import unit_to_pixels
    from cm3leon.tokenize.image_vq_preprocess import images_to_tensor

    source = open_source(path, require_text=False, limit=limit)
    out = []
    for rec in source:
        imgs = [rec.image]
        if task_images:
            extra = rec.meta.get("images") or {}
            imgs += [extra[k] for k in extra if isinstance(extra[k], Image.Image)]
        for im in imgs:
            x = images_to_tensor([im], resolution)[0]
            out.append(unit_to_pixels(x).numpy())
    if not out:
        raise ValueError(f"{path} yielded no images ({source.stats.summary()})")
    return torch.from_numpy(np.stack(out))


def _run_train_image(args: argparse.Namespace) -> int:
    from cm3leon.tokenize.image_vq_train import TRAIN_PRESETS
    from cm3leon.workspace import WorkspaceLock, check_not_inside

    if args.preset not in TRAIN_PRESETS:
        raise ValueError(f"unknown preset {args.preset!r}; choose one of {sorted(TRAIN_PRESETS)}")
    check_not_inside(args.out, args.data, args.val_data, replaces=False)
    with WorkspaceLock(args.out):  # one writer of --out at a time
        return _train_image(args)


def _train_image(args: argparse.Namespace) -> int:
    import dataclasses

    from cm3leon.tokenize.image_vq import VQConfig
    from cm3leon.tokenize.image_vq_train import TRAIN_PRESETS, train_image_tokenizer

    model_cfg = VQConfig.from_name(args.preset)
    overrides = {
        "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed,
        "perceptual_weight": args.perceptual_weight, "lpips_vgg_path": args.lpips_vgg, "lpips_lin_path": args.lpips_lin,
        "adversarial_weight": args.adversarial_weight, "adversarial_start": args.adversarial_start,
        "max_seconds": None if args.max_minutes is None else 60.0 * args.max_minutes,
        "bf16": True if args.bf16 else None, "num_threads": args.threads,
    }
    cfg = dataclasses.replace(TRAIN_PRESETS[args.preset], **{k: v for k, v in overrides.items() if v is not None})
    r = model_cfg.resolution
    train = _load_images(args.data, r, limit=args.max_images, task_images=args.task_images)
    if args.val_data:
        val = _load_images(args.val_data, r, limit=None, task_images=False)
    else:
        if len(train) <= args.n_val:
            raise ValueError(f"{args.data} has {len(train)} images, not more than --n-val={args.n_val}; "
                             "lower --n-val or pass --val-data")
        train, val = train[: -args.n_val], train[-args.n_val:]
    print(f"training {args.preset} on {len(train)} images ({r}px), {len(val)} held out, {cfg.steps} steps")
    metrics = train_image_tokenizer(model_cfg, cfg, train, val, args.out, resume=args.resume, device=args.device)
    print(json.dumps(metrics))
    return 0


# ---- convert -----------------------------------------------------------------------
def _add_convert(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert",
        help="convert taming / Chameleon / HF-Chameleon VQ-GAN weights to a cm3leon image tokenizer",
        description="Read released VQ-GAN weights (.ckpt/.pt/.pth/.bin with weights-only unpickling, or "
        ".safetensors) and their config (taming/Chameleon .yaml, transformers Chameleon config.json), load them "
        "strictly and write config.json + model.safetensors.",
        epilog=_raw("""
            examples:
              cm3leon tokenizer convert --ckpt chameleon/tokenizer/vqgan.ckpt \\
                  --config chameleon/tokenizer/vqgan.yaml --out tok/chameleon
              cm3leon tokenizer convert --ckpt logs/vqgan_imagenet_f16_16384/checkpoints/last.ckpt \\
                  --config logs/vqgan_imagenet_f16_16384/configs/model.yaml --out tok/taming-f16
            """),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--ckpt", required=True, help="weights file")
    p.add_argument("--config", required=True, help="taming/Chameleon .yaml or a config.json")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--src", choices=("taming", "chameleon", "hf_chameleon"), default=None,
                   help="key layout of --ckpt (default: guessed from the config and key names)")
    p.set_defaults(func=_run_convert)


def _run_convert(args: argparse.Namespace) -> int:
    from cm3leon.tokenize.image_vq_convert import convert_checkpoint

    m = convert_checkpoint(args.ckpt, args.config, args.out, src=args.src)
    print(f"wrote {args.out}: {m.resolution}px -> {m.tokens_per_image} tokens, codebook {m.codebook_size}")
    return 0
