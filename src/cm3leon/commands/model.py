"""``cm3leon model assemble``: one model directory from separately trained parts."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def register(sub: Any) -> None:
    p = sub.add_parser("model", help="model directories: assemble one from separately trained parts",
                       description="Work with model directories (the layout generate, caption, ask and serve load; "
                       "docs/python-api.md).")
    msub = p.add_subparsers(dest="model_command", metavar="SUBCOMMAND", required=True)
    a = msub.add_parser(
        "assemble",
        help="copy a text tokenizer, an image tokenizer, a trained decoder (+ retrieval, re-ranker, decoding "
        "defaults) into one model directory that generate / caption / serve accept",
        description="Build a model directory (docs/python-api.md) from separately trained parts. Every part is "
        "checked first and every problem is named in one error: a missing part or file, a text tokenizer with more "
        "ids than the model's vocabulary, an image tokenizer whose tokens per image or codebook differ from the "
        "model's, a retrieval memory that does not match its index. The result is loaded once before it replaces "
        "--out.",
        epilog="example: cm3leon model assemble --text-tokenizer WS/text_tokenizer --image-tokenizer "
        "WS/image_tokenizer --model WS/pretrain --retriever WS/encoder --out my-model",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    a.add_argument("--text-tokenizer", required=True, type=Path, help="text BPE directory (tokenizer.json)")
    a.add_argument("--image-tokenizer", required=True, type=Path, help="VQ-GAN directory (config.json + weights)")
    a.add_argument("--model", required=True, type=Path,
                   help="trained decoder: the output directory of `cm3leon train|sft` (config.json, "
                   "model.safetensors, vocab.json)")
    a.add_argument("--retriever", type=Path, default=None,
                   help="retrieval encoder directory (or a local CLIP folder), or a folder with encoder/ and "
                   "optionally bank/ + memory/ (the index and its tokenized documents)")
    a.add_argument("--reranker", type=Path, default=None, help="an encoder used only to re-rank generated images")
    a.add_argument("--generation-config", type=Path, default=None,
                   help="decoding defaults per task (a generation_config.json)")
    a.add_argument("--out", required=True, type=Path, help="the model directory to write")
    a.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    a.set_defaults(func=_assemble)


def _assemble(args: argparse.Namespace) -> int:
    from cm3leon.model_dir import ModelParts, assemble_model_dir

    parts = ModelParts(text_tokenizer=args.text_tokenizer, image_tokenizer=args.image_tokenizer, model=args.model,
                       retriever=args.retriever, reranker=args.reranker, generation_config=args.generation_config)
    out = assemble_model_dir(parts, args.out, overwrite=args.overwrite)
    print(f"model directory: {out}  (try: cm3leon generate --model {out} \"<a caption>\")")
    return 0
