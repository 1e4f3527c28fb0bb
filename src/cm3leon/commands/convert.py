"""``cm3leon convert chameleon``: a transformers-format Chameleon / Anole / Lumina-mGPT checkpoint
plus Meta's VQ-GAN become a cm3leon model directory (docs/chameleon.md)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def register(subparsers: Any) -> None:
    """Attach ``convert chameleon``."""
    p = subparsers.add_parser("convert", help="convert another project's released model into a cm3leon model directory",
                              description="Convert released weights of another project into a cm3leon model "
                              "directory (see docs/chameleon.md).")
    sub = p.add_subparsers(dest="source", required=True)
    c = sub.add_parser(
        "chameleon",
        help="a transformers-format Chameleon / Anole / Lumina-mGPT checkpoint + Meta's VQ-GAN",
        description="Write a model directory of the chameleon family: the decoder (weights streamed shard by "
        "shard, dtype kept), Chameleon's own token ids and tokenizer, the VQ-GAN (encoder and decoder, from "
        "vqgan.ckpt + vqgan.yaml) and Chameleon's published decoding defaults in generation_config.json. "
        "The result works with `cm3leon generate / caption / ask / serve --model OUT`.",
        epilog="example: cm3leon convert chameleon --hf ckpt/chameleon-7b --vqgan ckpt/anole/tokenizer "
        "--out models/chameleon-7b",
    )
    c.add_argument("--hf", required=True, type=Path,
                   help="transformers checkpoint directory (config.json, *.safetensors, tokenizer.json)")
    c.add_argument("--out", required=True, type=Path, help="output cm3leon model directory")
    c.add_argument("--vqgan", type=Path, default=None,
                   help="folder holding vqgan.ckpt + vqgan.yaml (default: HF or HF/tokenizer)")
    c.add_argument("--clip", type=Path, default=None,
                   help="a local transformers CLIP directory, copied in as OUT/reranker for CLIP re-ranking")
    c.set_defaults(func=_chameleon)


def _chameleon(args: argparse.Namespace) -> int:
    from cm3leon.convert import convert_chameleon
    from cm3leon.workspace import WorkspaceLock, check_not_inside

    check_not_inside(args.out, args.hf, args.vqgan, args.clip, replaces=False)
    args.out.mkdir(parents=True, exist_ok=True)
    with WorkspaceLock(args.out):  # one writer of --out at a time
        out = convert_chameleon(args.hf, args.out, vqgan_dir=args.vqgan, clip_dir=args.clip)
    print(f"wrote {out}; try: cm3leon generate --model {out} \"a chameleon on a branch\" --out chameleon.png")
    return 0
