"""Trained image tokenizers at several sizes on held-out Shapes images: reconstruction PSNR,
codebook usage and perplexity, encode / decode images/s, and the share of reconstructions the
Shapes judge finds all-correct against the scene's objects (what a model drawing those codes
could at best reach). Ratios are against the first tokenizer given, timed in the same process.

Prints ONE JSON line.

    python benchmarks/bench_image_vq_sizes.py --tok tok64 tok128 tok256 --data val64 val128 val256
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from cm3leon.data.dataset import Dataset
from cm3leon.pixels import pixels_to_unit, unit_to_pixels
from cm3leon.shapes.judge import judge
from cm3leon.tokenize.image_vq import ImageTokenizer
from cm3leon.tokenize.image_vq_preprocess import images_to_tensor
from cm3leon.tokenize.image_vq_train import evaluate


def _median_s(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


@torch.no_grad()
def measure(tok_dir: str, data_dir: str, *, n: int, batch: int, repeats: int) -> dict:
    vq = ImageTokenizer.from_pretrained(tok_dir).eval()
    r = vq.cfg.resolution
    ds = Dataset(data_dir, columns=["image", "meta"])
    recs = [ds[i] for i in range(min(n, len(ds)))]
    x = images_to_tensor([rec.image for rec in recs], r)
    u8 = unit_to_pixels(x)
    ev = evaluate(vq, u8)
    xb = pixels_to_unit(u8[:batch])
    codes = vq.encode(xb)
    enc_s = _median_s(lambda: vq.encode(xb), repeats)
    dec_s = _median_s(lambda: vq.decode(codes), repeats)
    recon = vq.postprocess(vq.decode(vq.encode(pixels_to_unit(u8))))
    ok = sum(judge(im, rec.meta["objects"]).all_correct for im, rec in zip(recon, recs))
    train_metrics = json.loads((Path(tok_dir) / "metrics.json").read_text()) if (
        Path(tok_dir) / "metrics.json").exists() else {}
    return {
        "resolution": r, "tokens": vq.tokens_per_image, "codebook": vq.codebook_size,
        "params_m": round(sum(p.numel() for p in vq.parameters()) / 1e6, 2),
        "psnr": round(ev["psnr"], 2), "psnr_min": round(ev["psnr_min"], 2),
        "codebook_usage": round(ev["codebook_usage"], 4), "codebook_perplexity": round(ev["codebook_perplexity"], 1),
        "judge_all_correct_recon": round(ok / len(recs), 4), "n_images": len(recs),
        "encode_img_s": round(batch / enc_s, 1), "decode_img_s": round(batch / dec_s, 1),
        "train_steps": train_metrics.get("steps"), "train_seconds": train_metrics.get("train_seconds"),
        "train_cpu_seconds": train_metrics.get("train_cpu_seconds_this_run"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tok", nargs="+", required=True, help="trained tokenizer directories")
    ap.add_argument("--data", nargs="+", required=True, help="held-out Shapes dataset per tokenizer")
    ap.add_argument("--n", type=int, default=256, help="held-out images per tokenizer (default 256)")
    ap.add_argument("--batch", type=int, default=16, help="images per timed encode / decode (default 16)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    if len(args.tok) != len(args.data):
        raise SystemExit("give one --data directory per --tok directory")
    torch.set_num_threads(args.threads)
    rows = {t: measure(t, d, n=args.n, batch=args.batch, repeats=args.repeats) for t, d in zip(args.tok, args.data)}
    base = rows[args.tok[0]]
    for row in rows.values():
        row["encode_vs_first"] = round(row["encode_img_s"] / base["encode_img_s"], 3)
        row["decode_vs_first"] = round(row["decode_img_s"] / base["decode_img_s"], 3)
    print(json.dumps({"threads": args.threads, "batch": args.batch, "tokenizers": rows}))


if __name__ == "__main__":
    main()
