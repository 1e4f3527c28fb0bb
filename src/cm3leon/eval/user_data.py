"""Evaluation on a user's own image-caption data (no task annotations, no judge).

Held-out records (their images and captions were never trained on) are scored with the
generic metrics of :mod:`cm3leon.eval.metrics`:

- text-to-image from each held-out caption: FD between the retrieval encoder's features of the
  real held-out images and of the generated ones (``fd_encoder``), FID with Inception-v3 when
  its weights are given, and CLIP score (the encoder's caption-image cosine x 100) of the
  generated images, next to the same score of the real images as a reference;
- captioning of each held-out image: CIDEr-D against its caption(s) and the exact-match rate;
- a grid PNG: held-out caption, the real image, then the samples (best first when re-ranked);
- every best generated image as a PNG with ``t2i.jsonl`` (prompt, record id, file), so an
  outside judge (e.g. a classifier of the data's labels) can score them.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cm3leon.config import atomic_write_text
from cm3leon.data.records import DocRecord
from cm3leon.eval import metrics
from cm3leon.eval.harness import save_grid
from cm3leon.pipeline import CM3Leon


@dataclass(frozen=True)
class UserEvalConfig:
    """How much of the held-out set is judged: ``n`` records (prompts) for text-to-image and
    ``caption_n`` for captioning; ``samples`` images per prompt (None: the generation config's);
    ``grid_rows`` prompts shown in the grid; ``inception`` FID weights (None: no FID)."""

    n: int = 100
    caption_n: int = 200
    samples: int | None = None
    grid_rows: int = 10
    batch_size: int = 32
    seed: int = 0
    inception: str | None = None

    def __post_init__(self) -> None:
        for name in ("n", "caption_n", "grid_rows", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"UserEvalConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.samples is not None and self.samples < 1:
            raise ValueError(f"UserEvalConfig.samples must be >= 1, got {self.samples}")


def _grid_picks(records: Sequence[DocRecord], k: int) -> list[int]:
    """Up to ``k`` record indices with distinct captions first (a grid of ten "digit 3" rows
    shows less than one row per digit)."""
    seen: set[str] = set()
    first = [i for i, r in enumerate(records) if not (r.text in seen or seen.add(r.text or ""))]
    rest = [i for i in range(len(records)) if i not in set(first)]
    return sorted((first + rest)[:k])


def eval_text_to_image(pipe: CM3Leon, records: Sequence[DocRecord], cfg: UserEvalConfig, out: Path) -> dict[str, Any]:
    """Text-to-image from the captions of ``records``; writes ``out/t2i.png`` (grid),
    ``out/t2i/NNNNN.png`` (the best sample of each prompt) and ``out/t2i.jsonl``."""
    t0 = time.perf_counter()
    records = list(records)[: cfg.n]
    prompts = [r.text or "" for r in records]
    d = pipe.generation_config.text_to_image
    n = cfg.samples or d.samples
    rerank = d.rerank and pipe.reranker is not None
    samples: list[list[Any]] = []
    for i in range(0, len(prompts), cfg.batch_size):
        for res in pipe.generate_images(prompts[i:i + cfg.batch_size], n=n, rerank=rerank, seed=cfg.seed + i):
            samples.append(res.images)
    best = [s[0] for s in samples]
    m: dict[str, Any] = {"prompts": len(prompts), "samples_per_prompt": n, "reranked": rerank}
    if pipe.encoder is not None:
        real = [r.image for r in records]
        m["clip_score"] = metrics.clip_score(prompts, best, pipe.encoder)
        m["clip_score_real"] = metrics.clip_score(prompts, real, pipe.encoder)
        if len(best) >= 2:
            m["fd_encoder"] = metrics.fid(real, best, pipe.encoder)
    if cfg.inception:
        from cm3leon.eval.inception import load_fid_inception

        m["fid"] = metrics.fid([r.image for r in records], best, load_fid_inception(cfg.inception))
    img_dir = out / "t2i"
    img_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, (r, im) in enumerate(zip(records, best)):
        im.save(img_dir / f"{i:05d}.png")
        lines.append(json.dumps({"prompt": prompts[i], "id": r.id, "file": f"t2i/{i:05d}.png"}))
    atomic_write_text(out / "t2i.jsonl", "\n".join(lines) + "\n")
    shown = _grid_picks(records, cfg.grid_rows)
    grid = save_grid([[records[i].image, *samples[i]] for i in shown], out / "t2i.png",
                     labels=[prompts[i] for i in shown],
                     headers=["real", "samples, best first" if rerank else "samples"])
    examples = [{"prompt": prompts[i], "id": records[i].id, "file": f"t2i/{i:05d}.png"} for i in shown]
    return {"metrics": m, "grid": str(grid), "images": str(out / "t2i.jsonl"), "examples": examples,
            "seconds": time.perf_counter() - t0}


def eval_captioning(pipe: CM3Leon, records: Sequence[DocRecord], cfg: UserEvalConfig,
                    references: dict[str, list[str]] | None = None) -> dict[str, Any]:
    """Caption each held-out image; CIDEr-D against its caption (or ``references[id]``, every
    caption of that image) and the share of captions equal to a reference."""
    t0 = time.perf_counter()
    records = list(records)[: cfg.caption_n]
    outs: list[str] = []
    for i in range(0, len(records), cfg.batch_size):
        outs.extend(pipe.captions([r.image for r in records[i:i + cfg.batch_size]]))
    refs = {i: (references or {}).get(r.id) or [r.text or ""] for i, r in enumerate(records)}
    norm = [metrics.caption_tokens(c) for c in outs]
    exact = [n in {metrics.caption_tokens(x) for x in refs[i]} for i, n in enumerate(norm)]
    m = {"cider": metrics.cider(dict(enumerate(outs)), refs), "exact_match": float(np.mean(exact)),
         "images": len(records)}
    examples = [{"reference": refs[i][0], "caption": outs[i], "exact": bool(exact[i])}
                for i in range(min(8, len(outs)))]
    return {"metrics": m, "examples": examples, "seconds": time.perf_counter() - t0}


def eval_user_data(pipe: CM3Leon, records: Sequence[DocRecord], cfg: UserEvalConfig, out: str | Path, *,
                   captioning: bool = True) -> dict[str, Any]:
    """Every own-data evaluation of ``pipe`` on held-out ``records``; writes ``out/metrics.json``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    res: dict[str, Any] = {"t2i": eval_text_to_image(pipe, records, cfg, out)}
    if captioning:
        res["caption"] = eval_captioning(pipe, records, cfg)
    atomic_write_text(out / "metrics.json", json.dumps(res, indent=2, default=float))
    return res
