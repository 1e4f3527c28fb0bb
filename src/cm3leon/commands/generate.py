"""``cm3leon generate|caption|ask|edit|control|ground|infill``: the pipeline's tasks from the shell."""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any


def _model_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model directory (e.g. runs/quickstart/model)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")


# Every decoding flag defaults to the model directory's generation_config.json (paper-like
# values when it has none: CFG 3, temperature 1, top-p 0.9, edits 1.5 / 7.5).
_FROM_MODEL = "default: the model's generation_config.json"


def _sampling_args(p: argparse.ArgumentParser, *, guidance: bool = True) -> None:
    p.add_argument("--n", type=int, default=None, help=f"images to generate ({_FROM_MODEL})")
    if guidance:
        p.add_argument("--guidance", type=float, default=None, help=f"CFG scale, 1 = off ({_FROM_MODEL})")
    p.add_argument("--temperature", type=float, default=None, help=f"sampling temperature ({_FROM_MODEL})")
    p.add_argument("--top-p", type=float, default=None, help=f"nucleus mass, 1 = off ({_FROM_MODEL})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="out.png", help="output PNG; several images are written as a grid")


def register(sub: Any) -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    g = sub.add_parser("generate", help="text-to-image", formatter_class=fmt,
                       description="Generate images from a text prompt (CFG, CD-K, retrieval, CLIP re-ranking).",
                       epilog="example: cm3leon generate --model runs/quickstart/model "
                              '"a large red circle at the top left" --n 8 --out grid.png')
    _model_arg(g)
    g.add_argument("prompt")
    _sampling_args(g)
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--mode", default=None, choices=["top_p", "cd_k", "mix"],
                   help=f"sample set: CFG + top-p, CD-K (paper Eq. 3), or half each, the paper's mix ({_FROM_MODEL})")
    g.add_argument("--cd-k", type=int, default=None, help="CD-K's k; without --mode it selects CD-K")
    g.add_argument("--cd-alpha", type=float, default=None,
                   help=f"CD-K's alpha: candidates have p >= alpha x the k-th largest probability ({_FROM_MODEL})")
    g.add_argument("--mix", action="store_const", const="mix", dest="mode", help="same as --mode mix")
    g.add_argument("--retrieve", type=int, default=None, choices=[0, 1, 2],
                   help=f"retrieved documents to prepend ({_FROM_MODEL})")
    g.add_argument("--rerank", action=argparse.BooleanOptionalAction, default=None,
                   help=f"order samples by CLIP score, best first ({_FROM_MODEL})")
    g.add_argument("--jacobi-window", type=int, default=None,
                   help=f"speculative Jacobi decoding with this many draft tokens, 0 = sequential ({_FROM_MODEL})")
    g.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "int8"],
                   help="decode with a bf16 or int8 (dynamic quantization, CPU) copy of the model (default fp32)")
    g.set_defaults(func=_generate)

    c = sub.add_parser("caption", help="image-to-text", formatter_class=fmt, description="Describe an image.",
                       epilog="example: cm3leon caption --model runs/quickstart/model photo.png --detailed")
    _model_arg(c)
    c.add_argument("image")
    c.add_argument("--detailed", action="store_true", help='"describe in very detail" template')
    c.set_defaults(func=_caption)

    a = sub.add_parser("ask", help="visual question answering", formatter_class=fmt,
                       description="Answer a question about an image.",
                       epilog="example: cm3leon ask --model runs/quickstart/model photo.png "
                              '"what color is the circle?"')
    _model_arg(a)
    a.add_argument("image")
    a.add_argument("question")
    a.set_defaults(func=_ask)

    e = sub.add_parser("edit", help="instruction-guided image editing", formatter_class=fmt,
                       description="Edit an image following an instruction (instruct-CFG, paper §4.1).",
                       epilog='example: cm3leon edit --model runs/quickstart/model in.png "make the red circle blue" '
                              "--out edited.png")
    _model_arg(e)
    e.add_argument("image")
    e.add_argument("instruction")
    _sampling_args(e, guidance=False)
    e.add_argument("--image-guidance", type=float, default=None, help=f"image-stream CFG ({_FROM_MODEL})")
    e.add_argument("--text-guidance", type=float, default=None, help=f"text-stream CFG ({_FROM_MODEL})")
    e.set_defaults(func=_edit)

    k = sub.add_parser("control", help="edge/segmentation/depth-to-image", formatter_class=fmt,
                       description="Generate an image from a structure map and a caption.",
                       epilog='example: cm3leon control --model runs/quickstart/model edge edges.png "a red circle" '
                              "--out out.png")
    _model_arg(k)
    k.add_argument("kind", choices=["edge", "seg", "depth", "hed", "pose", "norm", "scribble"])
    k.add_argument("condition")
    k.add_argument("caption")
    _sampling_args(k)
    k.set_defaults(func=_control)

    gr = sub.add_parser("ground", help="spatially grounded generation", formatter_class=fmt,
                        description="Generate an image with objects in given boxes. Each --object is "
                                    "'NAME:x0,y0,x1,y1' in pixels of the model's resolution.",
                        epilog='example: cm3leon ground --model runs/quickstart/model "a red circle" '
                               "--object 'red circle:2,2,14,14' --out out.png")
    _model_arg(gr)
    gr.add_argument("caption")
    gr.add_argument("--object", action="append", required=True, help="NAME:x0,y0,x1,y1 (repeatable)")
    _sampling_args(gr)
    gr.set_defaults(func=_ground)

    i = sub.add_parser("infill", help="fill <mask> in a caption of an image (CM3 infilling)", formatter_class=fmt,
                       description="Fill the first '<mask>' of a text that describes an image: the prompt is "
                                   "'<eos> text-with-<mask:0> <break> IMAGE <infill>' (paper §2.2).",
                       epilog="example: cm3leon infill --model runs/quickstart/model photo.png "
                              '"a <mask> at the top left"')
    _model_arg(i)
    i.add_argument("image")
    i.add_argument("text", help="text containing the literal marker <mask>")
    i.set_defaults(func=_infill)


def _load(args: argparse.Namespace) -> Any:
    from cm3leon.pipeline import CM3Leon

    return CM3Leon.from_pretrained(args.model, device=args.device)


def _check_common(args: argparse.Namespace) -> None:
    if args.n is not None and not 1 <= args.n <= 64:
        raise ValueError(f"--n must be between 1 and 64, got {args.n}")
    for name in ("guidance", "temperature", "top_p", "image_guidance", "text_guidance", "cd_alpha"):
        v = getattr(args, name, None)
        if v is not None and not math.isfinite(v):
            raise ValueError(f"--{name.replace('_', '-')} must be a finite number, got {v}")


def _save(images: list[Any], out: str) -> None:
    from cm3leon.eval.harness import save_grid

    path = Path(out)
    if len(images) == 1:
        path.parent.mkdir(parents=True, exist_ok=True)
        images[0].save(path)
    else:
        save_grid([images], path, scale=1)
    print(f"wrote {path} ({len(images)} image{'s' if len(images) > 1 else ''})")


def _generate(args: argparse.Namespace) -> int:
    _check_common(args)
    pipe = _load(args)
    if args.precision != "fp32":
        from cm3leon.generate.precision import for_decoding

        pipe.model = for_decoding(pipe.model, args.precision)
    res = pipe.generate_image(args.prompt, n=args.n, guidance=args.guidance, temperature=args.temperature,
                              top_p=args.top_p, top_k=args.top_k, cd_k=args.cd_k, cd_alpha=args.cd_alpha,
                              mode=args.mode, retrieve=args.retrieve, rerank=args.rerank, seed=args.seed,
                              jacobi_window=args.jacobi_window)
    if res.retrieved:
        print("retrieved:", " | ".join(res.retrieved))
    if res.scores:
        print("CLIP scores (best first):", " ".join(f"{s:.3f}" for s in res.scores))
    _save(res.images, args.out)
    return 0


def _caption(args: argparse.Namespace) -> int:
    print(_load(args).caption(args.image, detailed=args.detailed))
    return 0


def _ask(args: argparse.Namespace) -> int:
    print(_load(args).answer(args.image, args.question))
    return 0


def _edit(args: argparse.Namespace) -> int:
    _check_common(args)
    images = _load(args).edit(args.image, args.instruction, image_guidance=args.image_guidance,
                              text_guidance=args.text_guidance, temperature=args.temperature, top_p=args.top_p,
                              n=args.n, seed=args.seed)
    _save(images, args.out)
    return 0


def _control(args: argparse.Namespace) -> int:
    _check_common(args)
    images = _load(args).control(args.kind, args.condition, args.caption, guidance=args.guidance,
                                 temperature=args.temperature, top_p=args.top_p, n=args.n, seed=args.seed)
    _save(images, args.out)
    return 0


def _parse_object(spec: str) -> tuple[str, list[float]]:
    name, sep, box = spec.rpartition(":")
    try:
        coords = [float(v) for v in box.split(",")]
    except ValueError:
        coords = []
    if not sep or not name.strip() or len(coords) != 4:
        raise ValueError(f"--object {spec!r} must look like 'red circle:2,2,14,14' (NAME:x0,y0,x1,y1)")
    return name.strip(), coords


def _ground(args: argparse.Namespace) -> int:
    _check_common(args)
    objs = [_parse_object(o) for o in args.object]
    images = _load(args).ground(args.caption, objs, guidance=args.guidance, temperature=args.temperature,
                                top_p=args.top_p, n=args.n, seed=args.seed)
    _save(images, args.out)
    return 0


def _infill(args: argparse.Namespace) -> int:
    if args.text.count("<mask>") != 1:
        raise ValueError("the text must contain exactly one literal '<mask>' marker to fill")
    pipe = _load(args)
    before, after = args.text.split("<mask>")
    v = pipe.vocab
    codes = pipe.encode_images([args.image])[0].tolist()
    head = pipe.text_ids(before.rstrip()) if before.strip() else []
    tail = pipe.text_ids(after) if after else []
    ids = [v.eos_id, *head, v.mask_id(0), *tail, v.break_id, *v.codes_to_ids(codes), v.infill_id]
    span = pipe.decode_text(pipe.infill(ids, kind="text"))
    print(args.text.replace("<mask>", span.strip()))
    return 0
