"""``cm3leon eval``: run the evaluation harness on a Shapes dataset."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def register(sub: Any) -> None:
    p = sub.add_parser(
        "eval", help="evaluate a model on held-out Shapes data (judge, FD-CLIP, CLIP score, CIDEr, VQA)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run the evaluation harness: benchmark prompts -> pipeline -> metrics.json.",
        epilog="example: cm3leon data shapes --out /tmp/val --n 256 --seed 1\n"
               "         cm3leon eval --model runs/quickstart/model --task t2i --task vqa --data /tmp/val --n 64 "
               "--json metrics.json",
    )
    p.add_argument("--model", required=True, help="model directory")
    p.add_argument("--data", required=True, help="Shapes dataset directory (cm3leon data shapes)")
    p.add_argument("--task", action="append", choices=["t2i", "caption", "vqa", "edit", "control", "ground"],
                   help="task to evaluate (repeatable; default: all)")
    p.add_argument("--n", type=int, default=64, help="records per task (default 64)")
    p.add_argument("--samples", type=int, default=4, help="images per text-to-image prompt (default 4)")
    p.add_argument("--guidance", type=float, default=3.0, help="CFG scale (default 3; the quickstart uses 1.5)")
    # the values of generate.logits.IMAGE_SAMPLE_MODES, spelled out: the CLI starts without torch
    p.add_argument("--mode", default="top_p", choices=["top_p", "cd_k", "mix"],
                   help="text-to-image sampling: CFG + top-p, CD-K, or half each (paper §3.1; default top_p)")
    p.add_argument("--cd-k", type=int, default=8, help="CD-K's k (default 8; the quickstart uses 1)")
    p.add_argument("--cd-alpha", type=float, default=0.1, help="CD-K's alpha (default 0.1; the quickstart uses 0.3)")
    p.add_argument("--retrieve", type=int, default=0, choices=[0, 1, 2],
                   help="retrieved documents in front of each text-to-image prompt (the quickstart uses 2)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (the quickstart uses 0.5)")
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus cut (the quickstart uses 1.0)")
    p.add_argument("--edit-guidance", type=float, nargs=2, default=(1.5, 7.5), metavar=("IMAGE", "TEXT"),
                   help="editing's image and text CFG scales (default the paper's 1.5 7.5; the quickstart uses 1.25 1.25)")
    p.add_argument("--no-rerank", action="store_true")
    p.add_argument("--grids", default=None, help="write sample grids (PNG) into this directory")
    p.add_argument("--json", default=None, help="write metrics here")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    import dataclasses

    from cm3leon.data.dataset import Dataset
    from cm3leon.eval.harness import TASKS, EvalConfig, run_eval
    from cm3leon.pipeline import CM3Leon

    if args.n <= 0:
        raise ValueError(f"--n must be positive, got {args.n}")
    if not (args.temperature > 0 and 0 < args.top_p <= 1):
        raise ValueError(f"need --temperature > 0 and 0 < --top-p <= 1, got {args.temperature} and {args.top_p}")
    records = list(Dataset(args.data))
    if not records or "objects" not in records[0].meta:
        raise ValueError(f"{args.data} is not a Shapes dataset; the harness needs Shapes annotations")
    pipe = CM3Leon.from_pretrained(args.model, device=args.device)
    cfg = EvalConfig(n=args.n, samples=args.samples, guidance=args.guidance, retrieve=args.retrieve,
                     temperature=args.temperature, top_p=args.top_p, rerank=not args.no_rerank, grid_dir=args.grids,
                     mode=args.mode, cd_k=args.cd_k, cd_alpha=args.cd_alpha, edit_image_guidance=args.edit_guidance[0],
                     edit_text_guidance=args.edit_guidance[1])
    results = run_eval(pipe, records, args.task or list(TASKS), cfg)
    out = {t: dataclasses.asdict(r) for t, r in results.items()}
    for t, r in results.items():
        print(f"{t:8s} " + "  ".join(f"{k}={v:.3f}" for k, v in r.metrics.items()) + f"  ({r.seconds:.1f}s)")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2, default=float))
        print(f"wrote {args.json}")
    return 0
