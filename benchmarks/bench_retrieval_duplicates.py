"""Retrieval on data with repeated captions: the paper's relevance cap vs the content rule.

Data: scikit-learn's bundled handwritten digits (1,797 8x8 images, upscaled to 32 px),
captioned "a handwritten digit N", so every caption is shared by ~180 documents. The
in-house dual encoder is trained briefly on them, the memory bank holds all of them, and
every document retrieves its neighbours (k_text=2, k_image=2) under
``RetrieverConfig(duplicates="score")`` (the paper's rule, the baseline) and
``duplicates="content"``. Figure: the fraction of retrieved neighbours whose digit is the
query's, over all picks, and for the text-query and image-query picks apart.

Prints ONE JSON line.

    .venv/bin/pip install scikit-learn
    python benchmarks/bench_retrieval_duplicates.py          # ~1-2 minutes on one CPU thread
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import numpy as np
import torch
from PIL import Image

from cm3leon.data.records import DocRecord
from cm3leon.retrieval.encoder import DualEncoderConfig, EncoderTrainConfig, train_dual_encoder
from cm3leon.retrieval.index import build_bank
from cm3leon.retrieval.retriever import Retriever, RetrieverConfig
from cm3leon.tokenize.text_bpe import TextTokenizer


def digits(size: int) -> tuple[list[DocRecord], np.ndarray]:
    """The digits as records (white ink on black, bilinear upscale) and their labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    recs = []
    for i, (im, y) in enumerate(zip(d.images, d.target)):
        g = Image.fromarray((im * (255.0 / 16.0)).astype(np.uint8), "L").resize((size, size), Image.BILINEAR)
        recs.append(DocRecord(str(i), f"a handwritten digit {int(y)}", g.convert("RGB"), {}))
    return recs, np.asarray(d.target)


def label_match(ids: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Fraction of filled neighbour slots with the query's label (all, text picks, image picks)."""
    q = labels[:, None]
    hit = np.where(ids >= 0, labels[np.clip(ids, 0, None)] == q, False)
    filled = ids >= 0
    k_text = ids.shape[1] // 2

    def frac(cols: slice) -> float:
        return round(float(hit[:, cols].sum() / max(1, filled[:, cols].sum())), 4)

    return {"all": frac(slice(None)), "text": frac(slice(0, k_text)), "image": frac(slice(k_text, None)),
            "fill_rate": round(float(filled.mean()), 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=150, help="encoder training steps (default 150)")
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    recs, labels = digits(args.size)
    texts = [r.text for r in recs]
    t0 = time.time()
    tok = TextTokenizer.train(texts, 300)
    enc = train_dual_encoder(texts, [r.image for r in recs], tokenizer=tok,
                             cfg=DualEncoderConfig(vocab_size=tok.vocab_size, image_size=args.size),
                             train_cfg=EncoderTrainConfig(steps=args.steps, seed=args.seed))
    train_s = time.time() - t0
    out: dict = {"data": "sklearn digits", "n": len(recs), "captions": len(set(texts)),
                 "encoder_steps": args.steps, "encoder_seconds": round(train_s, 1)}
    with tempfile.TemporaryDirectory() as tmp:
        bank = build_bank(recs, n=len(recs), encoder=enc, out=f"{tmp}/bank")
        for rule in ("score", "content"):
            for training in (False, True):
                cfg = RetrieverConfig(k_text=2, k_image=2, duplicates=rule, seed=args.seed)
                t = time.time()
                got = Retriever(bank, enc, cfg).retrieve(recs, query_ids=np.arange(len(recs)), training=training)
                st = got.stats.as_dict()
                out[f"{rule}{'_dropout' if training else ''}"] = {
                    "label_match": label_match(got.ids, labels), "mean_relevance": round(st["mean_relevance"], 4),
                    "dropped_relevance_per_query": round(st["dropped_relevance"] / st["queries"], 2),
                    "dropped_copy": st["dropped_copy"], "seconds": round(time.time() - t, 2),
                }
    out["ratio_label_match_content_vs_score"] = round(
        out["content"]["label_match"]["all"] / max(1e-9, out["score"]["label_match"]["all"]), 3)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
