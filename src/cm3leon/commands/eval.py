"""``cm3leon eval``: run the evaluation harness on a Shapes dataset, or GenEval's prompts
(``--geneval-prompts``: GenEval's output layout, scored with the Shapes judge)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def register(sub: Any) -> None:
    p = sub.add_parser(
        "eval", help="evaluate a model on held-out Shapes data (judge, FD-CLIP, CLIP score, CIDEr, VQA) or on "
                     "GenEval prompts",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run the evaluation harness: benchmark prompts -> pipeline -> metrics.json; or, with "
                    "--geneval-prompts, write GenEval's output layout and score it with the Shapes judge.",
        epilog="example: cm3leon data shapes --out /tmp/val --n 256 --seed 1\n"
               "         cm3leon eval --model runs/quickstart/model --task t2i --task vqa --data /tmp/val --n 64 "
               "--json metrics.json\n"
               "         cm3leon eval --model runs/quickstart/model --geneval-prompts shapes --out /tmp/geneval "
               "--samples 4",
    )
    p.add_argument("--model", required=True, help="model directory")
    p.add_argument("--data", default=None, help="Shapes dataset directory (cm3leon data shapes); not with "
                   "--geneval-prompts")
    p.add_argument("--task", action="append", choices=["t2i", "caption", "vqa", "edit", "control", "ground"],
                   help="task to evaluate (repeatable; default: all)")
    p.add_argument("--n", type=int, default=None,
                   help="records per task (default 64); with --geneval-prompts: the first N prompts (default: all)")
    p.add_argument("--geneval-prompts", default=None, metavar="FILE",
                   help="GenEval metadata (evaluation_metadata.jsonl format; 'shapes': the shipped Shapes prompts): "
                        "write GenEval's layout into --out and score it with the Shapes judge")
    p.add_argument("--out", default=None, help="with --geneval-prompts: the output folder (GenEval's layout)")
    d = "default: the model's generation_config.json"
    p.add_argument("--samples", type=int, default=None, help=f"images per text-to-image prompt ({d})")
    p.add_argument("--guidance", type=float, default=None, help=f"CFG scale of the image tasks but editing ({d})")
    # the values of generate.logits.IMAGE_SAMPLE_MODES, spelled out: the CLI starts without torch
    p.add_argument("--mode", default=None, choices=["top_p", "cd_k", "mix"],
                   help=f"text-to-image sampling: CFG + top-p, CD-K, or half each (paper §3.1; {d})")
    p.add_argument("--cd-k", type=int, default=None, help=f"CD-K's k ({d})")
    p.add_argument("--cd-alpha", type=float, default=None, help=f"CD-K's alpha ({d})")
    p.add_argument("--retrieve", type=int, default=None, choices=[0, 1, 2],
                   help=f"retrieved documents in front of each text-to-image prompt ({d})")
    p.add_argument("--temperature", type=float, default=None, help=f"sampling temperature of the image tasks ({d})")
    p.add_argument("--top-p", type=float, default=None, help=f"nucleus cut of the image tasks ({d})")
    p.add_argument("--edit-guidance", type=float, nargs=2, default=(None, None), metavar=("IMAGE", "TEXT"),
                   help=f"editing's image and text CFG scales ({d})")
    p.add_argument("--rerank", action=argparse.BooleanOptionalAction, default=None,
                   help=f"re-rank text-to-image samples by CLIP score ({d})")
    p.add_argument("--grids", default=None, help="write sample grids (PNG) into this directory")
    p.add_argument("--json", default=None, help="write metrics here")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    if args.geneval_prompts is not None:
        return _run_geneval(args)
    if args.data is None:
        raise ValueError("give --data (a Shapes dataset) or --geneval-prompts (GenEval metadata)")
    if args.out is not None:
        raise ValueError("--out is the GenEval output folder: use it with --geneval-prompts")
    import dataclasses

    from cm3leon.data.dataset import Dataset
    from cm3leon.eval.harness import TASKS, EvalConfig, run_eval
    from cm3leon.pipeline import CM3Leon

    args.n = 64 if args.n is None else args.n
    if args.n <= 0:
        raise ValueError(f"--n must be positive, got {args.n}")
    records = list(Dataset(args.data))
    if not records or "objects" not in records[0].meta:
        raise ValueError(f"{args.data} is not a Shapes dataset; the harness needs Shapes annotations")
    pipe = CM3Leon.from_pretrained(args.model, device=args.device)
    gen = pipe.generation_config
    common = {"guidance": args.guidance, "temperature": args.temperature, "top_p": args.top_p}
    gen = dataclasses.replace(
        gen,
        text_to_image=gen.text_to_image.replace(**common, samples=args.samples, mode=args.mode, cd_k=args.cd_k,
                                                cd_alpha=args.cd_alpha, retrieve=args.retrieve, rerank=args.rerank),
        edit=gen.edit.replace(temperature=args.temperature, top_p=args.top_p, image_guidance=args.edit_guidance[0],
                              text_guidance=args.edit_guidance[1]),
        control=gen.control.replace(**common), grounding=gen.grounding.replace(**common),
    )
    cfg = EvalConfig(n=args.n, decoding=gen, grid_dir=args.grids)
    results = run_eval(pipe, records, args.task or list(TASKS), cfg)
    out = {t: dataclasses.asdict(r) for t, r in results.items()}
    for t, r in results.items():
        print(f"{t:8s} " + "  ".join(f"{k}={v:.3f}" for k, v in r.metrics.items()) + f"  ({r.seconds:.1f}s)")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2, default=float))
        print(f"wrote {args.json}")
    return 0


def _run_geneval(args: argparse.Namespace) -> int:
    from cm3leon.eval.geneval import MARKER, RESULTS, load_metadata, run_geneval, shapes_prompts_path
    from cm3leon.pipeline import CM3Leon
    from cm3leon.workspace import check_not_inside

    harness_only = [f for f, given in (("--data", args.data), ("--task", args.task), ("--grids", args.grids),
                                       ("--edit-guidance", any(v is not None for v in args.edit_guidance)))
                    if given]
    if harness_only:
        raise ValueError(f"{', '.join(harness_only)} belong to the Shapes harness, not to --geneval-prompts")
    if args.out is None:
        raise ValueError("--geneval-prompts needs --out (the folder for GenEval's layout)")
    if args.n is not None and args.n <= 0:
        raise ValueError(f"--n must be positive, got {args.n}")
    if args.samples is not None and args.samples <= 0:
        raise ValueError(f"--samples must be positive, got {args.samples}")
    source = shapes_prompts_path() if args.geneval_prompts == "shapes" else args.geneval_prompts
    check_not_inside(args.out, args.model, source, replaces=True)
    load_metadata(source)  # a malformed file fails before the model loads
    pipe = CM3Leon.from_pretrained(args.model, device=args.device)
    scores = run_geneval(pipe, str(source), args.out, samples=args.samples, limit=args.n, guidance=args.guidance,
                         temperature=args.temperature, top_p=args.top_p, mode=args.mode, cd_k=args.cd_k,
                         cd_alpha=args.cd_alpha, retrieve=args.retrieve, rerank=args.rerank)
    print(scores.table())
    print(f"wrote {args.out} (GenEval's layout; {RESULTS} and {MARKER} hold the Shapes judge's verdicts); "
          f"the official scorer: python evaluation/evaluate_images.py {args.out} --outfile results.jsonl "
          "--model-path <OBJECT_DETECTOR_FOLDER>")
    if args.json:
        Path(args.json).write_text(json.dumps(scores.to_dict(), indent=2, default=float))
        print(f"wrote {args.json}")
    return 0
