"""The ``cm3leon`` command. Each stage registers its subcommands from its own module in
``cm3leon.commands`` (``register(subparsers)``); heavy imports happen inside handlers so
``cm3leon --help`` stays fast."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from cm3leon.workspace import WorkspaceError

# One module per stage of the data flow, in pipeline order.
COMMAND_MODULES = [
    "data",        # cm3leon data shapes|inspect|tokenize
    "tokenizer",   # cm3leon tokenizer train-text|train-image|convert
    "retrieval",   # cm3leon retrieval train-encoder ; cm3leon index build|search
    "train",       # cm3leon train ; cm3leon sft
    "export",      # cm3leon export-hf|import-hf
    "generate",    # cm3leon generate|caption|ask|edit|control|infill
    "eval",        # cm3leon eval
    "quickstart",  # cm3leon quickstart
    "serve",       # cm3leon serve
]


class CLIError(Exception):
    """An error the CLI reports as one line without a traceback."""


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every stage's subcommands attached."""
    p = argparse.ArgumentParser(
        prog="cm3leon",
        description="CM3Leon: retrieval-augmented multimodal transformer - data, tokenizers, "
        "retrieval, pretraining, SFT, decoding, evaluation and serving.",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            mod = importlib.import_module(f"cm3leon.commands.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"cm3leon.commands.{name}":
                continue  # stage not built yet
            raise
        mod.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``cm3leon`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # its INFO lines about CPU builds are noise
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        rc = args.func(args)
    except (CLIError, FileNotFoundError, FileExistsError, ValueError, WorkspaceError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
