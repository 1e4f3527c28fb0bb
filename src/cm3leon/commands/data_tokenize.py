"""``cm3leon data tokenize``: a dataset -> tokenized shards (plain documents or the SFT mixture).

The data CLI (:mod:`cm3leon.commands.data`) attaches this subcommand by calling
:func:`add_tokenize_parser` on its subparsers. The work is the library's:
:func:`cm3leon.data.shards.tokenize_dataset` and :func:`cm3leon.sequence.sft_shards.tokenize_sft`.
"""

from __future__ import annotations

import argparse
import textwrap
from pathlib import Path


def add_tokenize_parser(data_subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``tokenize`` to ``cm3leon data``'s subparsers; returns the new parser."""
    p = data_subparsers.add_parser(
        "tokenize",
        help="tokenize a dataset once, offline, into memory-mapped shards (pretraining or SFT)",
        description="Encode every record with the text BPE and the image VQ tokenizer (images in "
        "batches) and write tokenized shards (manifest.json, tokens.bin, offsets.npy). With --sft, "
        "render the SFT task templates (paper Table 5) instead: every task of a Shapes record, "
        "captioning for other caption+image records, plus examples from --sft-jsonl files.",
        epilog=textwrap.dedent("""\
            retrieval neighbours (two steps): build the index and its neighbours file with the
            retrieval commands, then pass --index DIR (uses DIR/neighbors.npy) or --neighbors FILE;
            rows are dataset rows and are mapped onto shard rows (skipped rows become -1).

            examples:
              cm3leon data tokenize --data data/shapes32 --text-tokenizer tok/text \\
                  --image-tokenizer tok/image --out shards/train --index index/
              cm3leon data tokenize --data data/shapes32 --text-tokenizer tok/text \\
                  --image-tokenizer tok/image --out shards/sft-train --sft
              cm3leon data tokenize --data data/shapes32 --model models/anole-7b \\
                  --out shards/sft-anole --sft --sft-jsonl extra.jsonl

            --model DIR takes the tokenizers and the ids (vocab.json) of a model directory: a
            converted Chameleon's shards hold its own ids and image markers, laid out causally.
            """),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--data", help="dataset dir or any source `cm3leon data inspect` reads (with --sft it may be "
                   "left out when --sft-jsonl gives the examples)")
    p.add_argument("--text-tokenizer", help="text tokenizer directory (tokenizer.json)")
    p.add_argument("--image-tokenizer", help="image tokenizer directory (config.json + model.safetensors)")
    p.add_argument("--model", help="a model directory instead of the two tokenizers: its text_tokenizer/, "
                   "image_tokenizer/ and ids (vocab.json; needed for a converted model)")
    p.add_argument("--out", required=True, help="output shard directory")
    p.add_argument("--index", help="retrieval index directory holding neighbors.npy for --data")
    p.add_argument("--neighbors", help="a neighbors.npy (int64 [N,k], dataset rows, -1 = none) to attach")
    p.add_argument("--sft", action="store_true", help="render SFT task examples instead of plain documents")
    p.add_argument("--sft-jsonl", action="append", default=[],
                   help="extra SFT examples, one JSON object per line (repeatable; see docs/sft.md)")
    p.add_argument("--fields", default="text,image",
                   help="plain documents: record fields in order, e.g. text,image or image,text (default text,image)")
    p.add_argument("--batch-size", type=int, default=64, help="images per VQ encode call (default 64)")
    p.add_argument("--seed", type=int, default=0, help="SFT: seed for template variants and VQA picks (default 0)")
    p.add_argument("--limit", type=int, default=None, help="read at most this many records")
    p.add_argument("--device", default="cpu", help="device for the image tokenizer (default cpu)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --out if it holds shards (a directory holding other files is refused)")
    p.set_defaults(func=run_tokenize)
    return p


def _neighbors_path(args: argparse.Namespace) -> Path | None:
    if args.neighbors and args.index:
        raise ValueError("give either --index or --neighbors, not both")
    if args.neighbors:
        path = Path(args.neighbors)
        if not path.is_file():
            raise FileNotFoundError(f"--neighbors {path} not found")
        return path
    if args.index:
        from cm3leon.retrieval.neighbors import NEIGHBORS_FILE

        path = Path(args.index) / NEIGHBORS_FILE
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} not found: compute the dataset's neighbours with the retrieval commands first "
                "(they write neighbors.npy into the index directory), or pass --neighbors FILE"
            )
        return path
    return None


def _tokenizer_dirs(args: argparse.Namespace) -> tuple[Path, Path, Path | None]:
    """(text tokenizer dir, image tokenizer dir, vocab.json or None) from --model or the two tokenizer flags."""
    if args.model:
        if args.text_tokenizer or args.image_tokenizer:
            raise ValueError("give either --model DIR or --text-tokenizer/--image-tokenizer, not both")
        d = Path(args.model)
        missing = [n for n in ("vocab.json", "text_tokenizer", "image_tokenizer") if not (d / n).exists()]
        if missing:
            raise FileNotFoundError(f"--model {d} lacks {', '.join(missing)}; point it at a model directory")
        return d / "text_tokenizer", d / "image_tokenizer", d / "vocab.json"
    if not (args.text_tokenizer and args.image_tokenizer):
        raise ValueError("give --text-tokenizer DIR and --image-tokenizer DIR, or --model DIR")
    return Path(args.text_tokenizer), Path(args.image_tokenizer), None


def run_tokenize(args: argparse.Namespace) -> int:
    """Handler of ``cm3leon data tokenize``."""
    import random

    import numpy as np
    import torch

    from cm3leon.config import load_json
    from cm3leon.data.shards import attach_neighbors, tokenize_dataset
    from cm3leon.data.sources import open_source
    from cm3leon.sequence.sft_shards import tokenize_sft
    from cm3leon.sequence.sft_sources import read_sft_jsonl, record_sft_examples
    from cm3leon.tokenize.image_vq import ImageTokenizer
    from cm3leon.tokenize.text_hf import HFTextTokenizer, load_text_tokenizer
    from cm3leon.vocab import Vocab
    from cm3leon.workspace import check_not_inside, check_not_replaced

    text_dir, image_dir, vocab_file = _tokenizer_dirs(args)
    if not args.data and not (args.sft and args.sft_jsonl):
        raise ValueError("give --data DIR (with --sft, --sft-jsonl FILE alone also works)")
    if args.data:
        check_not_inside(args.out, args.data)
    check_not_replaced(args.out, text_dir, image_dir, args.model, args.index, args.neighbors, *args.sft_jsonl)
    if args.batch_size <= 0:
        raise ValueError(f"--batch-size must be positive, got {args.batch_size}")
    nb_path = _neighbors_path(args)  # fail before the long work
    if nb_path is not None and args.sft:
        raise ValueError("--sft shards do not use retrieval; drop --index/--neighbors")
    text_tok = load_text_tokenizer(text_dir)
    vocab = Vocab.from_dict(load_json(vocab_file)) if vocab_file is not None else None
    if vocab is None and isinstance(text_tok, HFTextTokenizer):
        raise ValueError(f"--text-tokenizer {text_dir} is a converted model's own tokenizer: give --model "
                         "MODEL_DIR instead, so the shards use the model's ids (its vocab.json)")
    image_tok = ImageTokenizer.from_pretrained(image_dir).to(torch.device(args.device)).eval()
    meta = {"text_tokenizer": str(text_dir), "image_tokenizer": str(image_dir),
            **({"model": str(args.model)} if args.model else {})}
    if args.sft:
        source = open_source(args.data, limit=args.limit) if args.data else []

        def examples():  # a generator of SFTExample
            for row, rec in enumerate(source):
                yield from record_sft_examples(rec, random.Random(f"sft:{args.seed}:{row}"))
            for path in args.sft_jsonl:
                yield from read_sft_jsonl(path, seed=args.seed)

        meta["source"] = str(args.data or ",".join(args.sft_jsonl))
        shards = tokenize_sft(examples(), text_tok, image_tok, args.out, batch_size=args.batch_size,
                              overwrite=args.overwrite, meta=meta, vocab=vocab)
        counts = shards.manifest.get("task_counts", {})
        print(f"wrote {len(shards)} SFT examples ({shards.n_tokens} tokens) to {args.out}")
        for task, n in counts.items():
            print(f"  {task:<20} {n}")
        return 0
    fields = tuple(f.strip() for f in args.fields.split(",") if f.strip())
    shards = tokenize_dataset(args.data, text_tok, image_tok, args.out, batch_size=args.batch_size,
                              fields=fields, overwrite=args.overwrite, meta=meta, limit=args.limit, vocab=vocab)
    if nb_path is not None:
        attach_neighbors(args.out, np.load(nb_path, allow_pickle=False))
    stats = shards.manifest.get("stats", {})
    print(f"wrote {len(shards)} documents ({shards.n_tokens} tokens) to {args.out}; "
          f"skipped {stats.get('skipped_empty', 0)} empty and {sum(stats.get('source_bad_rows', {}).values())} bad rows"
          + ("; neighbours attached" if nb_path is not None else ""))
    return 0
