"""The ``cm3leon`` command. Each stage registers its subcommands from its own module in
``cm3leon.commands`` (``register(subparsers)``); heavy imports happen inside handlers so
``cm3leon --help`` stays fast."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from cm3leon.workspace import WorkspaceError

# One module per stage of the data flow, in pipeline order.
COMMAND_MODULES = [
    "data",        # cm3leon data shapes|inspect|tokenize
    "tokenizer",   # cm3leon tokenizer train-text|train-image|convert
    "retrieval",   # cm3leon retrieval train-encoder ; cm3leon index build|search
    "train",       # cm3leon train ; cm3leon sft
    "export",      # cm3leon export-hf|import-hf
    "convert",     # cm3leon convert chameleon
    "generate",    # cm3leon generate|caption|ask|edit|control|infill
    "eval",        # cm3leon eval
    "model",       # cm3leon model assemble
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
    p.add_argument("--debug", action="store_true",
                   help="show the full traceback of an error (also: CM3LEON_DEBUG=1)")
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
    except (CLIError, OSError, ValueError, WorkspaceError) as e:  # OSError: missing files, disk full...
        if args.debug or os.environ.get("CM3LEON_DEBUG", "") not in ("", "0"):
            raise
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


def _one_line(e: BaseException) -> str:
    """The error's message on one line (an OSError without its own text reads as its strerror and file)."""
    msg = str(e)
    if isinstance(e, OSError) and e.strerror and msg.startswith("[Errno"):
        msg = f"{e.strerror}: {e.filename}" if e.filename else e.strerror
    return " ".join(msg.split()) or type(e).__name__


if __name__ == "__main__":
    # ``python -m cm3leon.cli`` runs this file as ``__main__``; the commands import ``cm3leon.cli``
    # and raise its CLIError, so run that module's main (one CLIError class, caught above).
    from cm3leon.cli import main as _main

    sys.exit(_main())
