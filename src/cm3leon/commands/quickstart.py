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
                   help="smoke: ~2 min on 2 CPU cores; default: ~15 min on 2 CPU cores; gpu: one GPU")
    p.add_argument("--force", action="store_true", help="redo every stage")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of pretraining and SFT (default 0); other seeds redo those stages and the evaluations, "
                   "to show the run-to-run spread")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default: CUDA when available)")
    p.add_argument("--sft-steps", type=int, default=None,
                   help="SFT steps (default: the SFT recipe's; 480 for default); the recipe scales its schedule to "
                   "them. A rerun with other steps redoes only SFT and its evaluation")
    p.add_argument("--sft-mix", default=None, choices=["default", "copy"],
                   help="SFT task shares (default: the recipe's). copy: shares shifted to editing, edge/seg/depth-to-"
                   "image and grounding, at the cost of VQA. Redoes only SFT and its evaluation. The long SFT of "
                   "docs/results.md: --sft-steps 3840 --sft-mix copy --sft-records 16000")
    p.add_argument("--sft-records", type=int, default=None,
                   help="Shapes train records the SFT examples are built from, 12 tasks each (default: the preset's; "
                   "4800 for default). Redoes the SFT examples, SFT and its evaluation")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    import json

    from cm3leon.quickstart import StageInterrupted, get_preset, run_quickstart

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
