"""``cm3leon export-hf`` / ``cm3leon import-hf``: convert between our model directory
(config.json + model.safetensors) and a transformers OPTForCausalLM directory (with the
unified vocabulary's tokenizer, the VQ-GAN and a model card on export)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def register(subparsers: Any) -> None:
    """Attach the export-hf and import-hf subcommands."""
    p = subparsers.add_parser(
        "export-hf",
        help="export a cm3leon model to a transformers OPTForCausalLM directory",
        description="Write a cm3leon decoder as a Hugging Face OPTForCausalLM directory "
        "(config.json + model.safetensors) that gives identical logits in `transformers`, with the "
        "unified vocabulary's tokenizer (AutoTokenizer), the VQ-GAN in image_tokenizer/ and a README.md "
        "model card. Special token ids come from the model directory's vocab.json. Models with the "
        "image-place embedding (the quickstart's) have no OPT form and are refused; train with "
        "--override model_overrides.image_tokens=0 model_overrides.image_vocab=0 "
        "model_overrides.image_axial=false for an exportable one (docs/cli.md, Exporting to transformers).",
        epilog="example: cm3leon export-hf --model runs/opt/sft --text-tokenizer runs/quickstart/text_tokenizer "
        "--image-tokenizer runs/quickstart/image_tokenizer --out hf/",
    )
    p.add_argument("--model", required=True, type=Path,
                   help="cm3leon model directory (config.json + model.safetensors [+ vocab.json])")
    p.add_argument("--out", required=True, type=Path, help="output directory for the OPT model")
    p.add_argument("--text-tokenizer", type=Path,
                   help="text tokenizer directory (default: MODEL/text_tokenizer when present)")
    p.add_argument("--image-tokenizer", type=Path,
                   help="image tokenizer (VQ-GAN) directory (default: MODEL/image_tokenizer when present)")
    p.set_defaults(func=_export)

    p = subparsers.add_parser(
        "import-hf",
        help="import a transformers OPTForCausalLM directory as a cm3leon model",
        description="Convert an OPT checkpoint without biases and without LayerNorm parameters "
        "(e.g. one written by export-hf) into a cm3leon model directory.",
    )
    p.add_argument("--hf", required=True, type=Path, help="transformers OPT model directory")
    p.add_argument("--out", required=True, type=Path, help="output cm3leon model directory")
    p.set_defaults(func=_import)


def _refuse_same_dir(src: Path, out: Path) -> None:
    from cm3leon.cli import CLIError

    if out.resolve() == src.resolve():
        raise CLIError(f"--out {out} is the input directory; choose a different output directory")


def _export(args: argparse.Namespace) -> int:
    from cm3leon.cli import CLIError
    from cm3leon.model.hf import export_hf, image_place_refusal
    from cm3leon.model.io import load_config, load_model

    _refuse_same_dir(args.model, args.out)
    cfg = load_config(args.model)
    if cfg.image_tokens:  # refused before anything is loaded or written
        raise CLIError(image_place_refusal(cfg))
    text_dir = args.text_tokenizer or _default_part(args.model, "text_tokenizer")
    image_dir = args.image_tokenizer or _default_part(args.model, "image_tokenizer")
    vocab = text_tok = image_tok = None
    if (args.model / "vocab.json").exists():  # a pipeline or training output directory names its vocabulary
        from cm3leon.config import load_json
        from cm3leon.vocab import Vocab

        vocab = Vocab.from_dict(load_json(args.model / "vocab.json"))
    elif args.text_tokenizer or args.image_tokenizer:
        raise CLIError(f"{args.model / 'vocab.json'} not found: the tokenizers' ids are laid out by the model's "
                       "vocabulary; export a model directory written by `cm3leon train` / `cm3leon sft`")
    if vocab is not None and text_dir is not None:
        from cm3leon.tokenize.text_bpe import TextTokenizer

        text_tok = TextTokenizer.load(text_dir)
    if vocab is not None and image_dir is not None:
        from cm3leon.tokenize.image_vq import ImageTokenizer

        image_tok = ImageTokenizer.from_pretrained(image_dir)
    model = load_model(args.model)
    export_hf(model, args.out, vocab=vocab, text_tokenizer=text_tok, image_tokenizer=image_tok)
    wrote = ["OPTForCausalLM"] + (["tokenizer"] if text_tok else []) + (["image_tokenizer/"] if image_tok else [])
    wrote += ["README.md"] if vocab is not None else []
    print(f"exported {model.num_params() / 1e6:.1f}M-parameter model to {args.out} ({', '.join(wrote)})")
    if text_tok is None:
        why = "no vocab.json in --model" if vocab is None else "pass --text-tokenizer DIR"
        print(f"note: no tokenizer written ({why}); AutoTokenizer will not load {args.out}")
    return 0


def _default_part(model_dir: Path, name: str) -> Path | None:
    return model_dir / name if (model_dir / name).is_dir() else None


def _import(args: argparse.Namespace) -> int:
    from cm3leon.model.hf import import_hf
    from cm3leon.model.io import save_model

    _refuse_same_dir(args.hf, args.out)
    model, _ = import_hf(args.hf)
    save_model(model, args.out)
    print(f"imported {model.num_params() / 1e6:.1f}M-parameter model to {args.out}")
    return 0
