"""``cm3leon quickstart``: the whole recipe on the built-in Shapes world, or on your own data (``--data``)."""

from __future__ import annotations

import argparse
import sys
from typing import Any


def register(sub: Any) -> None:
    p = sub.add_parser(
        "quickstart",
        help="run the whole recipe on Shapes or on your own images + captions (--data): data -> tokenizers -> "
        "retrieval -> pretrain -> SFT -> eval -> report",
        description="Run every stage of CM3Leon on the built-in Shapes world, or with --data on your own "
        "image-caption data (docs/own-data.md), and write DIR/report.html; with --data the run ends in DIR/model, "
        "a model directory for generate / caption / serve. Finished stages are reused on a rerun (delete "
        "DIR/<stage> or pass --force to redo).",
        epilog="examples:\n  cm3leon quickstart --out runs/quickstart --preset default\n"
        "  cm3leon quickstart --data my-images/ --out runs/mine   # a folder of images + captions.jsonl",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", default=None,
                   help="output directory (default: runs/quickstart; with --data: runs/<name of the data>)")
    p.add_argument("--preset", default="default", choices=["smoke", "default", "gpu"],
                   help="smoke: ~2 min on 2 CPU cores; default: ~15 min on 2 CPU cores; gpu: one GPU. With --data: "
                   "smoke is a tiny plan that runs in seconds and learns nothing (for tests)")
    own = p.add_argument_group("your own data (docs/own-data.md)")
    own.add_argument("--data", default=None,
                     help="image-caption data: a folder of images with captions.jsonl or sidecar .txt files, a COCO "
                     "captions .json (images next to it), a folder of WebDataset .tar shards or of .parquet files")
    own.add_argument("--format", default=None, choices=["folder", "coco", "webdataset", "parquet", "dataset"],
                     help="the layout of --data (default: detected)")
    own.add_argument("--image-size", type=int, default=32, choices=[32, 64, 128, 256],
                     help="side of the square images the model makes, in px (default 32); picks the image "
                     "tokenizer preset and the decoder size")
    own.add_argument("--clip", default=None, metavar="DIR",
                     help="a local Hugging Face CLIP directory as the retrieval encoder (default: train the "
                     "in-house one)")
    budget = own.add_mutually_exclusive_group()
    budget.add_argument("--minutes", type=float, default=None,
                        help="time budget of the whole run on this machine (default 15); training gets what the "
                        "other stages leave, 4/5 pretraining and 1/5 SFT")
    budget.add_argument("--tokens", type=int, default=None,
                        help="pretraining token budget instead (SFT gets 1/5 of its steps)")
    own.add_argument("--inception", default=None, metavar="FILE",
                     help="pytorch-fid Inception weights: adds FID to the evaluation")
    p.add_argument("--force", action="store_true", help="redo every stage")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of pretraining and SFT (default 0); other seeds redo those stages and the evaluations, "
                   "to show the run-to-run spread")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default: CUDA when available)")
    p.add_argument("--sft-steps", type=int, default=None,
                   help="SFT steps (default: the SFT recipe's; 1440 for default); the recipe scales its schedule to "
                   "them. A rerun with other steps redoes only SFT and its evaluation")
    p.add_argument("--sft-mix", default=None, choices=["default", "copy"],
                   help="SFT task shares (default: the recipe's). copy: shares shifted to editing, edge/seg/depth-to-"
                   "image and grounding, at the cost of VQA. Redoes only SFT and its evaluation. The long SFT of "
                   "docs/results.md: --sft-steps 3840 --sft-mix copy --sft-records 16000")
    p.add_argument("--sft-records", type=int, default=None,
                   help="Shapes train records the SFT examples are built from, 12 tasks each (default: the preset's; "
                   "16000 for default). Redoes the SFT examples, SFT and its evaluation")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    import json

    from cm3leon.quickstart import StageInterrupted, get_preset, run_quickstart

    if args.data is not None:
        return _run_own_data(args)
    if args.out is None:
        args.out = "runs/quickstart"

    for flag, value in (("--sft-steps", args.sft_steps), ("--sft-records", args.sft_records)):
        if value is not None and value < 1:
            raise SystemExit(f"cm3leon quickstart: {flag} must be >= 1, got {value}")
    over: dict[str, object] = {"seed": args.seed}
    for name in ("sft_steps", "sft_records", "sft_mix"):
        if getattr(args, name) is not None:
            over[name] = getattr(args, name)
    try:
        report = run_quickstart(args.out, get_preset(args.preset, **over), device=args.device, force=args.force)
    except StageInterrupted as e:
        print(f"interrupted: {e}", file=sys.stderr)
        return 130
    print(f"\nreport: {args.out}/report.html  ({args.out}/report.json)")
    print(f"  {'task':8s} {'metric':30s} {'SFT':>6s} {'pretrained':>10s}  target (judged on the SFT model)")
    for row in report["metrics"]:
        tgt = ("" if row["target"] is None
               else f"  {row['target']:.2f}: {'met' if row['meets_target'] else 'MISSED'}")
        pre = "" if row["pretrained"] is None else f"{row['pretrained']:.3f}"
        print(f"  {row['task']:8s} {row['metric']:30s} {row['sft']:6.3f} {pre:>10s}{tgt}")
    print(f"stage seconds: {json.dumps({k: round(v, 1) for k, v in report['stage_seconds'].items()})}")
    return 0


def _run_own_data(args: argparse.Namespace) -> int:
    from pathlib import Path

    from cm3leon.cli import CLIError
    from cm3leon.data.sources import detect_kind
    from cm3leon.quickstart import StageInterrupted
    from cm3leon.quickstart.own_data import PlanRequest, Source, fingerprint, run_own_data

    for flag in ("sft_steps", "sft_records", "sft_mix"):
        if getattr(args, flag) is not None:
            raise CLIError(f"--{flag.replace('_', '-')} is a Shapes option; with --data the plan sizes SFT "
                           "(use --minutes or --tokens)")
    data = Path(args.data)
    if not data.exists():
        raise CLIError(f"--data {data} does not exist; give a folder of images + captions.jsonl, a COCO .json, "
                       "or a folder of .tar / .parquet files")
    kind = args.format or detect_kind(data)
    source = Source(str(data.resolve()), kind, fingerprint(data))
    req = PlanRequest(source=source, image_size=args.image_size, clip=args.clip, minutes=args.minutes,
                      tokens=args.tokens, seed=args.seed, smoke=args.preset == "smoke", inception=args.inception)
    out = Path(args.out) if args.out else Path("runs") / (data.stem if data.is_file() else data.resolve().name)
    try:
        report = run_own_data(out, req, device=args.device, force=args.force)
    except StageInterrupted as e:
        print(f"interrupted: {e}", file=sys.stderr)
        return 130
    print(f"\nreport: {out}/report.html  ({out}/report.json)")
    for row in report["metrics"]:
        print(f"  {row['task']:8s} {row['metric']:16s} {row['value']:8.3f}  {row['meaning']}")
    grid = report["examples"].get("t2i") and out / "eval" / "t2i.png"
    if grid:
        print(f"held-out captions -> generated images: {grid}")
    print(f"model directory: {out}/model   try: cm3leon generate --model {out}/model \"{_a_caption(report)}\"")
    return 0


def _a_caption(report: dict[str, Any]) -> str:
    ex = report["examples"].get("t2i") or [{"prompt": "a caption"}]
    return str(ex[0]["prompt"])
