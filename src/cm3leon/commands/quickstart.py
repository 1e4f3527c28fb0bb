"""``cm3leon quickstart``: the whole recipe on the built-in Shapes world."""

from __future__ import annotations

import argparse
import sys
from typing import Any


def register(sub: Any) -> None:
    p = sub.add_parser(
        "quickstart",
        help="run the whole recipe on Shapes: data -> tokenizers -> retrieval -> pretrain -> SFT -> eval -> report",
        description="Run every stage of CM3Leon on the built-in Shapes world and write DIR/report.html. "
        "Finished stages are reused on a rerun (delete DIR/<stage> or pass --force to redo).",
        epilog="example: cm3leon quickstart --out runs/quickstart --preset default",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", default="runs/quickstart", help="output directory (default: runs/quickstart)")
    p.add_argument("--preset", default="default", choices=["smoke", "default", "gpu"],
                   help="smoke: ~2 min on 2 CPU cores; default: ~20 min on 2 CPU cores; gpu: one GPU")
    p.add_argument("--force", action="store_true", help="redo every stage")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of pretraining and SFT (default 0); other seeds redo those stages and the evaluations, "
                   "to show the run-to-run spread")
    p.add_argument("--sft-steps", type=int, default=None,
                   help="SFT steps (default: the preset's; 480 for default). A rerun with more steps redoes only SFT "
                   "and its evaluation: 1920 takes ~7-13 and 3840 ~13-20 more minutes on 2 cores (docs/sft.md)")
    p.add_argument("--sft-mix", default=None, choices=["default", "copy"],
                   help="SFT task shares (default: the preset's). copy: shares shifted to editing, edge/seg/depth-to-"
                   "image and grounding, which gain at the cost of VQA (with --sft-steps 1920 on 4800 records: "
                   "seg/depth-to-image ~66/69%% vs 59%%, edit 31-37%% vs 28%%, VQA ~74%% vs 89%%; docs/sft.md). Redoes "
                   "only SFT and its evaluation. The long-SFT run of docs/sft.md (every SFT target met in two seeds of three, all but VQA in the third): --sft-steps 3840 "
                   "--sft-mix copy --sft-records 16000")
    p.add_argument("--sft-records", type=int, default=None,
                   help="Shapes train records the SFT examples are built from, 12 tasks each (default: the preset's; "
                   "4800 for default). Long SFT runs gain from more: with --sft-steps 3840 --sft-mix copy, 16000 gave "
                   "edit 51-55%%, edge/seg-to-image 69-70/69-79%%, grounding IoU 0.62-0.74, captions 93-97%%, "
                   "VQA 75-87%% over three seeds (docs/sft.md). Redoes the SFT examples, SFT and its evaluation")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    import json

    from cm3leon.quickstart import SFT_MIXES, StageInterrupted, get_preset, run_quickstart

    for flag, value in (("--sft-steps", args.sft_steps), ("--sft-records", args.sft_records)):
        if value is not None and value < 1:
            raise SystemExit(f"cm3leon quickstart: {flag} must be >= 1, got {value}")
    over: dict[str, object] = {"train_seed": args.seed}
    if args.sft_steps is not None:
        over["sft_steps"] = args.sft_steps
    if args.sft_records is not None:
        over["sft_records"] = args.sft_records
    if args.sft_mix is not None:
        over["sft_shares"] = dict(SFT_MIXES[args.sft_mix])
    try:
        report = run_quickstart(args.out, get_preset(args.preset, **over), force=args.force)
    except StageInterrupted as e:
        print(f"interrupted: {e}", file=sys.stderr)
        return 130
    print(f"\nreport: {args.out}/report.html  ({args.out}/report.json)")
    for row in report["metrics"]:
        tgt = "" if row["target"] is None else f"  (target {row['target']:.2f}: {'ok' if row['meets_target'] else 'MISSED'})"
        pre = "" if row["pretrained"] is None else f"  pretrained-only {row['pretrained']:.3f}"
        print(f"  {row['task']:8s} {row['metric']:30s} {row['sft']:.3f}{pre}{tgt}")
    print(f"stage seconds: {json.dumps({k: round(v, 1) for k, v in report['stage_seconds'].items()})}")
    return 0
