"""``cm3leon data ...``: make the Shapes dataset, inspect any data source, convert raw data.

Each subcommand is added by one ``add_<name>(subparsers)`` function listed in
:data:`SUBCOMMANDS`; to add a subcommand, write such a function (setting ``func=handler``)
and append it to that tuple.
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any


def _raw(text: str) -> str:
    return textwrap.dedent(text).strip("\n")


def add_shapes(sub: argparse._SubParsersAction) -> None:
    """``cm3leon data shapes``."""
    p = sub.add_parser(
        "shapes",
        help="generate the built-in Shapes dataset (every SFT task with exact ground truth)",
        description="Generate N Shapes examples (images of colored shapes with captions, boxes, "
        "segmentation/edge/depth maps, VQA, reasoning, edit pairs and rendered words) as a cm3leon "
        "dataset directory. Output depends only on --n, --size and --seed, not on --workers.",
        epilog=_raw("""
            example:
              cm3leon data shapes --out data/shapes32 --n 20000 --size 32 --seed 0
            """),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", required=True, help="output dataset directory")
    p.add_argument("--n", type=int, default=20000, help="number of examples (default 20000)")
    p.add_argument("--size", type=int, default=32, choices=(32, 64, 128, 256), help="image side in pixels")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--max-objects", type=int, default=3, help="objects per image, 1..N (default 3)")
    p.add_argument("--snap", type=int, default=1,
                   help="object corners on multiples of this many pixels (1 = anywhere; the quickstart uses 4)")
    p.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --out if it holds a dataset (a directory holding other files is refused)")
    p.set_defaults(func=_run_shapes)


def _run_shapes(args: argparse.Namespace) -> int:
    import time

    from cm3leon.shapes.dataset import write_shapes_dataset
    from cm3leon.shapes.world import ShapesConfig

    cfg = ShapesConfig(size=args.size, max_objects=args.max_objects, snap=args.snap)
    t0 = time.perf_counter()
    out = write_shapes_dataset(args.out, args.n, size=args.size, seed=args.seed, workers=args.workers,
                               cfg=cfg, overwrite=args.overwrite, progress=True)
    print(f"wrote {args.n} Shapes examples ({args.size}px) to {out} in {time.perf_counter() - t0:.1f}s")
    return 0


def _add_source_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="dataset dir, image folder, COCO .json, .tar shard(s) or parquet")
    p.add_argument("--kind", choices=("dataset", "folder", "coco", "webdataset", "parquet"),
                   help="force the source kind instead of auto-detecting it")
    p.add_argument("--limit", type=int, default=None, help="read at most this many good records")
    p.add_argument("--images", help="COCO: the image folder (guessed from the json path if omitted)")
    p.add_argument("--captions", help="folder: a captions.jsonl file (default: <folder>/captions.jsonl)")
    p.add_argument("--image-column", help="parquet: column holding image bytes")
    p.add_argument("--text-column", help="parquet: column holding the caption")


def _open(args: argparse.Namespace) -> tuple[Any, str]:
    from cm3leon.data.sources import detect_kind, open_source

    kind = args.kind or detect_kind(args.path)
    opts: dict[str, Any] = {"limit": args.limit}
    if kind == "coco" and args.images:
        opts["images"] = args.images
    if kind == "folder" and args.captions:
        opts["captions"] = args.captions
    if kind == "parquet":
        opts.update(image_column=args.image_column, text_column=args.text_column)
    return open_source(args.path, kind=kind, **opts), kind


def add_convert(sub: argparse._SubParsersAction) -> None:
    """``cm3leon data convert``."""
    p = sub.add_parser(
        "convert",
        help="convert a raw source (folder, COCO, WebDataset, parquet) to a cm3leon dataset",
        description="Read a raw source, skip and count bad rows, and write the good records as a "
        "cm3leon dataset directory (manifest.json + parquet parts, images as PNG).",
        epilog=_raw("""
            examples:
              cm3leon data convert coco/annotations/captions_val2017.json --out data/coco-val
              cm3leon data convert laion-shards/ --out data/laion --limit 100000
            """),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_source_options(p)
    p.add_argument("--out", required=True, help="output dataset directory")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --out if it holds a dataset (a directory holding other files is refused)")
    p.set_defaults(func=_run_convert)


def _run_convert(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from cm3leon.data.dataset import write_dataset
    from cm3leon.workspace import check_not_inside

    check_not_inside(args.out, args.path, args.images, args.captions)
    src, kind = _open(args)

    def records() -> Any:  # the bar starts with the first record, after write_dataset checked --out
        yield from tqdm(src, unit="rec", desc=f"convert {kind}")

    out = write_dataset(args.out, _WithStats(records, src), source=f"{kind}:{args.path}", overwrite=args.overwrite)
    print(f"wrote {src.stats.ok} records to {out}; bad rows: {src.stats.summary()}")
    return 0


class _WithStats:
    """The records of ``records()`` (started on first iteration) with ``source.stats`` beside
    them, which :func:`~cm3leon.data.dataset.write_dataset` keeps in the manifest's ``skipped``."""

    def __init__(self, records: Callable[[], Iterator[Any]], source: Any) -> None:
        self.records, self.source = records, source

    @property
    def stats(self) -> Any:
        return self.source.stats

    def __iter__(self) -> Iterator[Any]:
        return iter(self.records())


def add_inspect(sub: argparse._SubParsersAction) -> None:
    """``cm3leon data inspect``."""
    p = sub.add_parser(
        "inspect",
        help="summarize a dataset or raw source: format, counts, tasks, examples, bad rows",
        description="Read a cm3leon dataset or a raw source (image folder, COCO json, WebDataset "
        "tars, parquet), print its format, record count, per-task counts, a few examples and the "
        "bad-row summary.",
        epilog=_raw("""
            examples:
              cm3leon data inspect data/shapes32
              cm3leon data inspect coco/annotations/captions_val2017.json --images coco/val2017
              cm3leon data inspect laion/ --text-column caption --limit 1000
            """),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_source_options(p)
    p.add_argument("--examples", type=int, default=3, help="how many examples to print (default 3)")
    p.set_defaults(func=_run_inspect)


def _short(value: Any, width: int = 100) -> str:
    text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
    return text if len(text) <= width else text[: width - 3] + "..."


def _run_inspect(args: argparse.Namespace) -> int:
    from cm3leon.data.sources import NoGoodRowsError

    src, kind = _open(args)
    print(f"path:    {args.path}")
    print(f"format:  {kind}")
    if kind == "dataset":
        mf = src.dataset.manifest  # type: ignore[attr-defined]
        print(f"manifest: n={mf['n']} parts={len(mf['parts'])} source={mf.get('source')} seed={mf.get('seed')}")
        print(f"columns: {', '.join(mf['columns'])}")
    tasks: Counter[str] = Counter()
    sizes: Counter[str] = Counter()
    examples = []
    unusable: NoGoodRowsError | None = None
    try:
        for rec in src:
            tasks.update(rec.meta.get("tasks", []) if kind == "dataset" else ["caption"] if rec.is_multimodal else [])
            if rec.image is not None:
                sizes[f"{rec.image.width}x{rec.image.height}"] += 1
            if len(examples) < args.examples:
                examples.append(rec)
    except NoGoodRowsError as e:  # still print the counts, then the one-line verdict
        unusable = e
    st = src.stats
    print(f"records: {st.ok} read" + (f" (stopped at --limit {args.limit})" if args.limit else ""))
    if sizes:
        common = ", ".join(f"{k} ({v})" for k, v in sizes.most_common(3))
        print(f"image sizes: {common}" + (f" and {len(sizes) - 3} more" if len(sizes) > 3 else ""))
    print("tasks:")
    for name, k in sorted(tasks.items()):
        print(f"  {name:<18} {k}")
    print(f"bad rows: {st.summary()}")
    for rec in examples:
        print(f"--- example {rec.id}")
        print(f"  text:  {rec.text!r}")
        if rec.image is not None:
            print(f"  image: {rec.image.width}x{rec.image.height} {rec.image.mode}")
        for key, value in rec.meta.items():
            if key == "images":
                print(f"  images: {', '.join(value)}")
            elif key != "tasks":
                print(f"  {key}: {_short(value)}")
    if unusable is not None:
        print(f"error: {unusable}", file=sys.stderr)
        return 1
    return 0


# Subcommands of `cm3leon data`, in --help order; append new `add_*` functions here.
def add_tokenize(sub: argparse._SubParsersAction) -> None:
    from cm3leon.commands.data_tokenize import add_tokenize_parser

    add_tokenize_parser(sub)


SUBCOMMANDS: tuple[Callable[[argparse._SubParsersAction], None], ...] = (
    add_shapes, add_inspect, add_convert, add_tokenize,
)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Attach ``cm3leon data`` and its subcommands to the top-level parser."""
    p = subparsers.add_parser(
        "data",
        help="make and inspect datasets (Shapes generator, readers for folders/COCO/WebDataset/parquet)",
        description="Datasets: generate the built-in Shapes world, inspect any supported source, "
        "convert raw data to the cm3leon dataset format.",
    )
    sub = p.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    for add in SUBCOMMANDS:
        add(sub)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])
