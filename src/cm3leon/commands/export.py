"""``cm3leon export-hf`` / ``cm3leon import-hf``: convert between our model directory
(config.json + model.safetensors) and a transformers OPTForCausalLM directory."""

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
        "(config.json + model.safetensors) that gives identical logits in `transformers`. "
        "Special token ids come from the model directory's vocab.json when present.",
    )
    p.add_argument("--model", required=True, type=Path,
                   help="cm3leon model directory (config.json + model.safetensors)")
    p.add_argument("--out", required=True, type=Path, help="output directory for the OPT model")
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
    from cm3leon.model.hf import export_hf
    from cm3leon.model.io import load_model

    _refuse_same_dir(args.model, args.out)
    model = load_model(args.model)
    vocab = None
    if (args.model / "vocab.json").exists():  # a pipeline model directory names its vocabulary
        from cm3leon.config import load_json
        from cm3leon.vocab import Vocab

        vocab = Vocab.from_dict(load_json(args.model / "vocab.json"))
    export_hf(model, args.out, vocab=vocab)
    print(f"exported {model.num_params() / 1e6:.1f}M-parameter model to {args.out} (OPTForCausalLM)")
    return 0


def _import(args: argparse.Namespace) -> int:
    from cm3leon.model.hf import import_hf
    from cm3leon.model.io import save_model

    _refuse_same_dir(args.hf, args.out)
    model, _ = import_hf(args.hf)
    save_model(model, args.out)
    print(f"imported {model.num_params() / 1e6:.1f}M-parameter model to {args.out}")
    return 0
