"""The main job: the whole CM3Leon recipe on the built-in Shapes world, end to end.

Stages (each writes its own folder under ``out``; a rerun reuses finished stages)::

    data -> text_tokenizer -> image_tokenizer -> encoder -> index -> shards -> pretrain
         -> sft_shards -> sft -> model dirs -> eval (pretrained and SFT) -> report.html / report.json

Presets: ``smoke`` (about 2 minutes on 2 CPU cores, used by the tests), ``default``
(about 20 minutes on 2 CPU cores), ``gpu`` (a larger run for one GPU).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cm3leon.config import atomic_write_text

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class QuickstartPreset:
    """Sizes and budgets of one quickstart run."""

    name: str
    n_train: int
    n_val: int
    image_size: int = 32
    snap: int = 4  # Shapes objects on the image tokenizer's 4-px patch grid (ShapesConfig.snap)
    max_objects: int = 3  # objects per Shapes scene: 1..max_objects (ShapesConfig.max_objects)
    caption_order: str = "z"  # order of the objects in detailed captions (ShapesConfig.caption_order)
    text_vocab: int = 512
    vq_preset: str = "shapes-32"
    vq_steps: int | None = None  # default: the image tokenizer preset's
    vq_batch: int | None = None  # default: the image tokenizer preset's
    vq_overrides: dict[str, Any] = field(default_factory=dict)  # VQConfig field overrides
    vq_images: int = 12000
    encoder_steps: int = 250
    # Share of the encoder's training pairs that use the detailed caption (the rest the
    # short one, which names no positions or sizes). Re-ranking scores detailed prompts.
    encoder_detailed_prob: float = 0.5
    # Hard-negative captions per training pair (the caption with two objects' attributes
    # swapped, or one attribute changed; data.shapes.hard_negative_captions): 0 = none. Off by
    # default: with the default text tower they teach it little (docs/retrieval.md).
    encoder_hard_negatives: int = 0
    encoder_overrides: dict[str, Any] = field(default_factory=dict)  # DualEncoderConfig field overrides
    # A second dual encoder trained on detailed captions only, used for re-ranking generated
    # images only (the model directory's reranker/); 0: re-rank with the retrieval encoder.
    # Detailed captions name sizes and positions, so it re-ranks two-object samples better,
    # while as the retriever the same encoder gave worse training neighbours (fifth session).
    reranker_steps: int = 0
    model_preset: str = "shapes"
    model_overrides: dict[str, Any] = field(default_factory=dict)
    # Add a learned place-in-image embedding (ModelConfig.image_tokens; not in the paper):
    # at this budget it is what lets the model draw whole objects (see docs/training.md).
    image_pos_emb: bool = True
    seq_len: int = 384
    n_retrieved: int = 3
    detailed_caption_prob: float = 0.7
    sft_records: int = 4000  # Shapes records the SFT examples are built from (each gives 12 tasks)
    pretrain_steps: int = 1000
    pretrain_batch: int = 16
    pretrain_lr: float = 2e-3
    sft_steps: int = 400
    sft_batch: int = 16
    sft_lr: float = 1e-3
    # Share of SFT examples trained in their inference layout (the answer/output as the one
    # CM3 span); the rest get random CM3 spans as in pretraining (SFTDataset).
    sft_target_infill_prob: float = 0.5
    # Relative target shares of the SFT tasks (None: equal), turned into sampling weights
    # with the paper's up/down thresholds (3 / 0.3; SFTDataset prints the table).
    sft_shares: dict[str, float] | None = None
    eval_n: int = 64
    # Records per instructable task (caption, VQA, edit, control, grounding; at most n_val):
    # one image or answer each, so 256 cost seconds and narrow the 64-record noise (+-6 points).
    eval_tasks_n: int = 256
    eval_samples: int = 4
    # Nucleus cut for evaluation sampling. With a dominant background code a 0.9 cut removes
    # the rare "an object starts here" tokens and a weak model then draws blank canvases.
    eval_top_p: float = 1.0
    # Sampling temperature and retrieved documents for evaluation (the ablations vary one
    # at a time around these). The model is trained with n_retrieved documents in front of
    # every query, and the paper decodes with one or two. On the default model one document
    # is as good as none and better than two on two-object prompts (two seeds: 16% / 20% /
    # 9% for 1 / 0 / 2 documents; docs/training.md, fifth session), and half as slow as two.
    eval_temperature: float = 0.5
    eval_retrieve: int = 1
    # CFG scale and the sample mix (paper §3.1: half CFG + top-p, half CD-K, then CLIP
    # re-ranking). Measured on the default model (docs/training.md, fifth session): scale
    # 1.5 beats 1 (no CFG) and 3; CD-K's candidate set needs k = 1 here, because with one
    # dominant background code the k-th largest probability for k >= 2 is so small that
    # improbable object codes pass and win on the ratio score (0% all-correct at k = 8).
    eval_guidance: float = 1.5
    eval_mode: str = "mix"
    eval_cd_k: int = 1
    eval_cd_alpha: float = 0.3
    # Editing's image / text CFG scales. The paper's 1.5 / 7.5 gave 0% right edits (noise) on
    # the default model; 1 / 1, 1.5 / 1.5 and 1.25 / 1.25 gave 22 / 20 / 27% and 19 / 19 / 28% on two
    # SFT models (docs/sft.md, seventh session).
    eval_edit_guidance: tuple[float, float] = (1.25, 1.25)
    # Images per prompt in each ablation run (the main t2i run uses eval_samples). Runs without
    # re-ranking judge every one of them, so more samples make those rates more precise.
    ablation_samples: int = 4
    # Seed of pretraining and SFT (model init, batch order, CM3 spans). At this budget two
    # seeds of the same recipe can differ by 10 points on two-object prompts (docs/training.md,
    # sixth session): vary it to see the spread before trusting a difference.
    train_seed: int = 0
    ablations: bool = True
    device: str = "auto"

    def __post_init__(self) -> None:
        for name in ("encoder_detailed_prob", "detailed_caption_prob", "sft_target_infill_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"QuickstartPreset.{name} must be in [0, 1], got {getattr(self, name)}")
        if self.reranker_steps < 0:
            raise ValueError(f"QuickstartPreset.reranker_steps must be >= 0 (0: none), got {self.reranker_steps}")
        if self.encoder_hard_negatives < 0:
            raise ValueError(f"QuickstartPreset.encoder_hard_negatives must be >= 0, got {self.encoder_hard_negatives}")
        from cm3leon.generate.logits import IMAGE_SAMPLE_MODES

        if self.eval_mode not in IMAGE_SAMPLE_MODES:
            raise ValueError(f"QuickstartPreset.eval_mode must be one of {IMAGE_SAMPLE_MODES}, got {self.eval_mode!r}")
        if self.eval_retrieve not in (0, 1, 2):
            raise ValueError(f"QuickstartPreset.eval_retrieve must be 0, 1 or 2, got {self.eval_retrieve}")


# SFT shares after the paper's mixture (Table 5 sizes): VQA (VQA2 1.3M + VizWiz + OKVQA) far
# above ScienceQA-style reasoning (6k) and Image Paragraph-style detailed captions (14k). With
# equal shares the Shapes model answers VQA questions with reasoning text ("The image shows").
SHAPES_SFT_SHARES: dict[str, float] = {
    "vqa": 3.0, "caption": 2.0, "edit": 1.5, "text_to_image": 1.0, "edge_to_image": 1.0, "seg_to_image": 1.0,
    "depth_to_image": 1.0, "grounding": 1.0, "write": 0.5, "narration": 0.5, "detailed_caption": 0.5,
    "reasoning": 0.3,
}
# Shares shifted toward the tasks that output an image conditioned on another ("copy" tasks):
# edit 3, edge / seg / depth-to-image and grounding 2 each, VQA 1.5, caption 1. A trade of SFT
# compute, measured on one base at 1920 steps (docs/sft.md, ninth session). From 4800 records:
# edge / seg / depth 59-62 / 65-66 / 68-70% vs 60 / 59 / 59% with the default shares, IoU
# 0.48-0.49 vs 0.45, edit 31-37% vs 28%, but VQA 73-75% vs 89%. From all 16000 records
# (`--sft-steps 1920 --sft-mix copy --sft-records 16000`, two seeds): VQA 78-82%, captions
# 82-83%, edge / seg / depth 63-66 / 65-67 / 74-75%, IoU 0.48-0.50, edit 34-37%; with 3840 steps
# (three pretraining + SFT seeds, tenth session) edit 51-55%, edge / seg / depth 69-70 / 69-79 /
# 80-82%, IoU 0.62-0.74, captions 93-97%, VQA 75-87%. At 960 steps they cost captions 25 points.
SHAPES_SFT_SHARES_COPY: dict[str, float] = {
    "vqa": 1.5, "caption": 1.0, "edit": 3.0, "text_to_image": 1.0, "edge_to_image": 2.0, "seg_to_image": 2.0,
    "depth_to_image": 2.0, "grounding": 2.0, "write": 0.5, "narration": 0.3, "detailed_caption": 0.3,
    "reasoning": 0.3,
}
# Named SFT mixtures (`cm3leon quickstart --sft-mix NAME`).
SFT_MIXES: dict[str, dict[str, float]] = {"default": SHAPES_SFT_SHARES, "copy": SHAPES_SFT_SHARES_COPY}

PRESETS: dict[str, QuickstartPreset] = {
    "smoke": QuickstartPreset(
        name="smoke", n_train=600, n_val=24, text_vocab=384, vq_steps=60, vq_batch=8, vq_images=1200,
        vq_overrides={"ch": 8, "z_channels": 16, "codebook_size": 128, "num_groups": 4}, encoder_steps=20,
        model_preset="tiny", model_overrides={"max_seq_len": 384}, seq_len=320, n_retrieved=2, reranker_steps=10,
        pretrain_steps=24, pretrain_batch=4, sft_steps=12, sft_batch=4, eval_n=6, eval_samples=2, ablation_samples=2,
        ablations=True,
    ),
    "default": QuickstartPreset(
        # seq 320: two retrieved documents + a detailed caption + 64 image tokens fit, in
        # training and at inference (the retrieval ablation decodes with 0, 1 and 2).
        # (An encoder trained on detailed captions only re-ranks fixed samples better, but the
        # whole run with it drew worse two-object images: docs/training.md, fifth session.)
        name="default", n_train=16000, n_val=256, vq_steps=1200, encoder_steps=120,
        # The evaluated prompts have one or two objects: a world of 1-2 objects with captions in
        # reading order lifted single-object accuracy from 58% to 75% and two-object from 3% to 8%
        # at the same compute (docs/training.md, fourth session; the full run: 73% and 2%).
        max_objects=2, caption_order="reading",
        # d128 x 4 layers for ~1200 steps beats d192 for 700 steps in the same minutes (held-out
        # image loss 0.35 vs 0.47, docs/training.md): at this compute a smaller model that
        # sees more tokens wins.
        model_overrides={"d_model": 128, "n_layers": 4, "n_heads": 4, "max_seq_len": 320, "image_axial": True},
        # Pretraining and SFT split the minutes: 280 SFT steps left VQA at 17-45% from run to
        # run, 560 reached 69% (docs/sft.md, fifth session), while the pretrained model's
        # one-object text-to-image was far above its target, so SFT got steps from pretraining
        # (and a higher LR: 2e-3 gave VQA 55% vs 45% at 1e-3 after 480 steps).
        # Batch 4 x 3400 steps, the same tokens and minutes as 16 x 850 (a 2-core CPU runs
        # ~12k tokens/s at either size): at this budget more, noisier steps win by far
        # (held-out image loss 0.19 vs 0.25-0.27, two-object all-correct 70% vs 11-22%;
        # docs/training.md, seventh session).
        # SFT length is what VQA and captions need (480 / 960 / 1920 steps: VQA 54 / 76 / 86%,
        # captions 59 / 75 / 88%; docs/sft.md, eighth session), but 1920 steps cost ~10 more
        # minutes than the budget has: `cm3leon quickstart --sft-steps 1920` reruns SFT alone.
        seq_len=320, n_retrieved=2, pretrain_batch=4, pretrain_steps=3400, sft_steps=480, sft_lr=2e-3,
        # 4800 records (57,600 SFT examples, ~30 s to tokenize; their own stage, sft_shards):
        # 1920 SFT steps on 1200 records see each example ~2 times and overfit (train loss 0.15,
        # held-out 0.23); on 4800 the same steps gave edge / seg / depth-to-image 60 / 59 / 59%
        # vs 49 / 52 / 51% and grounding IoU 0.45 vs 0.35 (docs/sft.md, ninth session).
        sft_records=4800,
        sft_target_infill_prob=0.8, sft_shares=dict(SHAPES_SFT_SHARES),
        # Main text-to-image evaluation: 16 CFG + top-p samples without retrieved documents,
        # re-ranked by a re-ranker trained on detailed captions. Measured (docs/training.md,
        # sixth session): 16 top-p samples are the most diverse set (on the fifth session's
        # model the best of 16 was right for ~40% of two-object prompts vs ~26% for the
        # paper's top-p/CD-K mix, whose CD-K half is precise but alike; the re-ranker picked
        # a right one for 22-34% over four seeds vs 16% for the previous default of 8 mixed
        # samples, one document, retrieval encoder), and on a fresh run's model it lifts
        # one-object prompts from 77% to 94% and two-object from 6% to 11%. The mix is in
        # the ablations.
        # A 150-step re-ranker picks as well as a 250-step one on the batch-4 model (two-object
        # 67% vs 66%; the retrieval encoder: 58%) in half the minutes (seventh session).
        eval_samples=16, eval_mode="top_p", eval_retrieve=0, reranker_steps=150,
    ),
    "gpu": QuickstartPreset(
        name="gpu", n_train=100000, n_val=512, vq_steps=6000, vq_images=60000, encoder_steps=2000,
        model_overrides={"d_model": 512, "n_layers": 8, "n_heads": 8, "max_seq_len": 512}, seq_len=512,
        pretrain_steps=6000, pretrain_batch=64, pretrain_lr=1e-3, sft_steps=2000, sft_batch=64, sft_lr=5e-4,
        eval_n=256, eval_samples=8,
    ),
}


def get_preset(name: str, **overrides: Any) -> QuickstartPreset:
    """A named preset with optional field overrides."""
    if name not in PRESETS:
        raise ValueError(f"unknown quickstart preset {name!r}; choose one of {sorted(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **overrides)


# ---- stage bookkeeping -------------------------------------------------------------------
# Part of every stage's key: bump it when a code change makes earlier outputs stale under
# unchanged preset fields (3: SFT shards gained text_to_image, rows carry true image places).
STAGE_FORMAT = 3
# Fields that join a stage's key only when set to something other than their default, so
# that adding such a knob does not invalidate the workspaces made before it existed.
KEY_ONLY_IF_SET = frozenset({"train_seed"})
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(QuickstartPreset) if f.name in KEY_ONLY_IF_SET}


class StageInterrupted(Exception):
    """A training stage stopped before its last step (Ctrl-C, SIGTERM); its checkpoint is kept
    and running the same quickstart again resumes it."""


class Stages:
    """Runs named stages once: a finished stage leaves ``stage.json`` and is reused."""

    def __init__(self, out: Path, preset: QuickstartPreset, *, force: bool = False) -> None:
        self.out, self.preset, self.force = out, preset, force
        self.timings: dict[str, float] = {}
        self.results: dict[str, Any] = {}
        self._fields: dict[str, list[str]] = {}

    def run(self, name: str, fn: Callable[[Path], dict[str, Any]], fields: tuple[str, ...] = (),
            after: tuple[str, ...] = (), complete: Callable[[dict[str, Any]], bool] | None = None) -> dict[str, Any]:
        """Run stage ``name`` unless a finished run with the same inputs exists.

        A stage's inputs are the preset ``fields`` it reads plus those of the stages it
        uses (``after``, and theirs in turn), so changing e.g. ``sft_steps`` redoes SFT and
        its evaluation but reuses the tokenizers, the index, pretraining and the pretrained
        model's evaluation. A finished stage whose inputs changed is deleted and redone; an
        interrupted training stage resumes from its last checkpoint. ``complete`` checks a
        recorded result before reuse: a stage whose result fails it is run again in place (a
        training stage that an older version recorded as done when it was stopped resumes).
        """
        unknown = [a for a in after if a not in self._fields]
        if unknown:
            raise ValueError(f"stage {name!r} runs after {unknown}, which have not run yet")
        names = ["image_size", "device"]
        for src in (*(self._fields[a] for a in after), fields):
            names += [f for f in src if f not in names]
        self._fields[name] = names
        key = {"format": STAGE_FORMAT, **{f: getattr(self.preset, f) for f in names
                                          if f not in KEY_ONLY_IF_SET or getattr(self.preset, f) != _DEFAULTS[f]}}
        d = self.out / name
        marker = d / "stage.json"
        if marker.exists() and not self.force:
            rec = json.loads(marker.read_text())
            if rec.get("inputs") == json.loads(json.dumps(key)):
                if complete is None or complete(rec["result"]):
                    log.info("stage %-16s reused (%.1fs when it ran)", name, rec["seconds"])
                    self.timings[name] = rec["seconds"]
                    self.results[name] = rec["result"]
                    return rec["result"]
                log.warning("stage %s was recorded unfinished (steps: %s); running it again", name,
                            rec["result"].get("steps"))
                marker.unlink()
        if d.exists() and (marker.exists() or self.force):
            shutil.rmtree(d)  # outputs of a finished run with other inputs: stale
        d.mkdir(parents=True, exist_ok=True)
        print(f"== stage {name}", flush=True)
        t0 = time.perf_counter()
        result = fn(d)
        secs = time.perf_counter() - t0
        atomic_write_text(marker, json.dumps({"seconds": secs, "result": result, "inputs": key}, indent=2, default=float))
        print(f"   {name} done in {secs:.1f}s", flush=True)
        self.timings[name] = secs
        self.results[name] = result
        return result


# ---- stage implementations ------------------------------------------------------------------
def _stage_data(p: QuickstartPreset) -> Callable[[Path], dict[str, Any]]:
    def fn(d: Path) -> dict[str, Any]:
        from cm3leon.data.shapes import ShapesConfig, write_shapes_dataset

        cfg = ShapesConfig(size=p.image_size, snap=p.snap, max_objects=p.max_objects, caption_order=p.caption_order)
        write_shapes_dataset(d / "train", p.n_train, size=p.image_size, seed=0, cfg=cfg, overwrite=True, progress=True)
        write_shapes_dataset(d / "val", p.n_val, size=p.image_size, seed=1, cfg=cfg, overwrite=True)
        return {"train": str(d / "train"), "val": str(d / "val"), "n_train": p.n_train, "n_val": p.n_val}

    return fn


def _corpus(data_dir: Path) -> Iterator[str]:
    """Every string the model will read: captions, questions, answers, instructions, templates."""
    from cm3leon.data.dataset import read_dataset
    from cm3leon.sequence.sft import TASKS

    for t in TASKS.values():
        for variant in t.variants:
            for slot in variant:
                if hasattr(slot, "template"):
                    yield slot.template
    for rec in read_dataset(data_dir, columns=["id", "text", "meta"]):
        m = rec.meta
        yield rec.text or ""
        yield m["captions"]["detailed"]
        for qa in m.get("vqa", []):
            yield qa["question"]
            yield qa["answer"]
        if "edit" in m:
            yield m["edit"]["instruction"]
        if "reasoning" in m:
            r = m["reasoning"]
            yield " ".join(str(r.get(k) or "") for k in ("question", "context", "explanation", "answer"))
        if "write" in m:
            yield f'draw "{m["write"]["text"]}"'


def _stage_text_tokenizer(p: QuickstartPreset, data: dict[str, Any]) -> Callable[[Path], dict[str, Any]]:
    def fn(d: Path) -> dict[str, Any]:
        from cm3leon.tokenize.text_bpe import TextTokenizer

        tok = TextTokenizer.train(_corpus(Path(data["train"])), p.text_vocab)
        tok.save(d)
        return {"dir": str(d), "vocab_size": tok.vocab_size}

    return fn


def _uint8_images(images: list[Any]) -> torch.Tensor:
    arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.uint8) for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def _stage_image_tokenizer(p: QuickstartPreset, data: dict[str, Any]) -> Callable[[Path], dict[str, Any]]:
    def fn(d: Path) -> dict[str, Any]:
        from cm3leon.data.dataset import Dataset
        from cm3leon.tokenize.image_vq import VQConfig
        from cm3leon.tokenize.image_vq_train import TRAIN_PRESETS, train_image_tokenizer

        ds = Dataset(data["train"])
        n_scene = min(len(ds), int(p.vq_images * 0.7))
        extra_names = ("seg", "edge", "depth", "edit_image", "write_image")
        n_extra = max(1, (p.vq_images - n_scene) // len(extra_names))
        imgs = []
        for i in range(max(n_scene, n_extra)):
            rec = ds[i]
            if i < n_scene:
                imgs.append(rec.image)
            if i < n_extra:
                imgs.extend(rec.meta["images"][k] for k in extra_names)
        val = [r.image for r in Dataset(data["val"])]
        base = TRAIN_PRESETS[p.vq_preset]
        steps = p.vq_steps or base.steps
        cfg = dataclasses.replace(base, steps=steps, batch_size=p.vq_batch or base.batch_size,
                                  checkpoint_every=steps, sample_every=max(steps // 2, 1))
        metrics = train_image_tokenizer(VQConfig.from_name(p.vq_preset, **p.vq_overrides), cfg, _uint8_images(imgs),
                                        _uint8_images(val), d, device=_device(p))
        return {"dir": str(d), **{k: v for k, v in metrics.items() if isinstance(v, (int, float, str))}}

    return fn


def _train_encoder(p: QuickstartPreset, data: dict[str, Any], text: dict[str, Any], *, steps: int,
                   detailed_prob: float, hard_negatives: int = 0, overrides: dict[str, Any] | None = None) -> Any:
    """A dual encoder trained on the Shapes training pairs, each with its detailed caption
    with probability ``detailed_prob`` (else the short one)."""
    from cm3leon.data.dataset import Dataset
    from cm3leon.data.shapes import hard_negative_captions
    from cm3leon.retrieval.encoder import DualEncoderConfig, EncoderTrainConfig, train_dual_encoder
    from cm3leon.tokenize.text_bpe import TextTokenizer

    tok = TextTokenizer.load(text["dir"])
    recs = list(Dataset(data["train"], columns=["id", "image", "text", "meta"]))
    rng = random.Random(0)
    texts = [r.meta["captions"]["detailed"] if rng.random() < detailed_prob else r.text for r in recs]
    nrng = np.random.default_rng(0)
    negatives = [hard_negative_captions(t, nrng, hard_negatives) for t in texts] if hard_negatives else None
    return train_dual_encoder(
        texts, [r.image for r in recs], tokenizer=tok,
        cfg=DualEncoderConfig(vocab_size=tok.vocab_size, image_size=p.image_size, **(overrides or {})),
        train_cfg=EncoderTrainConfig(steps=steps), device=_device(p), progress=True, negatives=negatives,
    )


def _stage_encoder(p: QuickstartPreset, data: dict[str, Any], text: dict[str, Any]) -> Callable[[Path], dict[str, Any]]:
    def fn(d: Path) -> dict[str, Any]:
        from cm3leon.data.dataset import Dataset
        from cm3leon.retrieval.encoder import text_to_image_recall

        enc = _train_encoder(p, data, text, steps=p.encoder_steps, detailed_prob=p.encoder_detailed_prob,
                             hard_negatives=p.encoder_hard_negatives, overrides=p.encoder_overrides)
        enc.save(d)
        val = list(Dataset(data["val"]))
        keys = [tuple(sorted((o["shape"], o["color"]) for o in r.meta["objects"])) for r in val]
        rec = text_to_image_recall(enc.embed_text([r.text for r in val]), enc.embed_image([r.image for r in val]), keys)
        return {"dir": str(d), **rec}

    return fn


def _stage_reranker(p: QuickstartPreset, data: dict[str, Any], text: dict[str, Any]) -> Callable[[Path], dict[str, Any]]:
    def fn(d: Path) -> dict[str, Any]:
        enc = _train_encoder(p, data, text, steps=p.reranker_steps, detailed_prob=1.0)  # detailed captions only
        enc.save(d)
        return {"dir": str(d), "final_loss": enc.info["train"]["final_loss"]}

    return fn


def _stage_index(p: QuickstartPreset, data: dict[str, Any], enc: dict[str, Any]) -> Callable[[Path], dict[str, Any]]:
    def fn(d: Path) -> dict[str, Any]:
        from cm3leon.data.dataset import Dataset
        from cm3leon.retrieval.encoder import load_encoder
        from cm3leon.retrieval.index import build_bank

        ds = Dataset(data["train"], columns=["id", "image", "text", "meta"])
        build_bank(iter(ds), n=len(ds), encoder=load_encoder(enc["dir"]), out=d, factory="Flat",
                   info={"data": data["train"], "encoder": enc["dir"]}, progress=True)
        return {"dir": str(d), "n": len(ds)}

    return fn


def _pretrain_view(p: QuickstartPreset, data_dir: str) -> Iterator[Any]:
    """Caption-image documents for pretraining: the detailed caption with probability p, else the short one."""
    from cm3leon.data.dataset import read_dataset
    from cm3leon.data.records import DocRecord

    rng = random.Random(1)
    for r in read_dataset(data_dir, columns=["id", "image", "text", "meta"]):
        text = r.meta["captions"]["detailed"] if rng.random() < p.detailed_caption_prob else r.text
        yield DocRecord(r.id, text, r.image, {})


def _load_tokenizers(text: dict[str, Any], image: dict[str, Any]) -> tuple[Any, Any]:
    """The text and image tokenizers that the ``text_tokenizer`` / ``image_tokenizer`` stages wrote."""
    from cm3leon.tokenize.image_vq import ImageTokenizer
    from cm3leon.tokenize.text_bpe import TextTokenizer

    return TextTokenizer.load(text["dir"]), ImageTokenizer.from_pretrained(image["dir"]).eval()


def _stage_shards(p: QuickstartPreset, data: dict[str, Any], text: dict[str, Any], image: dict[str, Any],
                  enc: dict[str, Any], index: dict[str, Any]) -> Callable[[Path], dict[str, Any]]:
    def fn(d: Path) -> dict[str, Any]:
        from cm3leon.data.dataset import Dataset, write_dataset
        from cm3leon.data.shards import attach_neighbors, tokenize_dataset
        from cm3leon.retrieval.encoder import load_encoder
        from cm3leon.retrieval.index import MemoryBank
        from cm3leon.retrieval.retriever import Retriever, RetrieverConfig

        text_tok, image_tok = _load_tokenizers(text, image)
        write_dataset(d / "pretrain_view", _pretrain_view(p, data["train"]), overwrite=True)
        sh = tokenize_dataset(d / "pretrain_view", text_tok, image_tok, d / "pretrain", overwrite=True)
        # Training neighbours: the paper's policy with query dropout, the query itself excluded.
        retriever = Retriever(MemoryBank.load(index["dir"]), load_encoder(enc["dir"]),
                              RetrieverConfig(k_text=2, k_image=2, seed=0, overfetch=64))
        ds = Dataset(data["train"], columns=["id", "image", "text", "meta"])
        recs = list(ds)
        got = retriever.retrieve(recs, query_ids=np.arange(len(recs)), training=True)
        attach_neighbors(d / "pretrain", got.ids, rows="dataset")
        # Held-out validation shards (validated without retrieved documents: their neighbours
        # live in the train shards, which a PretrainDataset over these shards cannot address).
        write_dataset(d / "pretrain_val_view", _pretrain_view(p, data["val"]), overwrite=True)
        tokenize_dataset(d / "pretrain_val_view", text_tok, image_tok, d / "pretrain_val", overwrite=True)
        filled = float((got.ids >= 0).mean())
        return {"pretrain": str(d / "pretrain"), "pretrain_val": str(d / "pretrain_val"), "pretrain_docs": len(sh),
                "pretrain_tokens": int(sh.n_tokens), "neighbour_fill": filled, "policy": got.stats.as_dict()}

    return fn


def _stage_sft_shards(p: QuickstartPreset, data: dict[str, Any], text: dict[str, Any],
                      image: dict[str, Any]) -> Callable[[Path], dict[str, Any]]:
    """The SFT examples of the first ``sft_records`` train records (12 tasks each) and of every
    val record, tokenized. A stage of its own, so that changing ``sft_records`` redoes SFT only."""
    def fn(d: Path) -> dict[str, Any]:
        from cm3leon.data.dataset import Dataset
        from cm3leon.sequence.sft import record_sft_examples, tokenize_sft

        text_tok, image_tok = _load_tokenizers(text, image)
        rng = random.Random(0)
        train_full = Dataset(data["train"])
        sft_rows = range(min(p.sft_records, len(train_full)))
        sft = tokenize_sft((ex for i in sft_rows for ex in record_sft_examples(train_full[i], rng)), text_tok,
                           image_tok, d / "sft", overwrite=True)
        tokenize_sft((ex for r in Dataset(data["val"]) for ex in record_sft_examples(r, rng)), text_tok, image_tok,
                     d / "sft_val", overwrite=True)
        return {"sft": str(d / "sft"), "sft_val": str(d / "sft_val"), "sft_docs": len(sft), "sft_records": len(sft_rows)}

    return fn


def _device(p: QuickstartPreset) -> str:
    if p.device != "auto":
        return p.device
    return "cuda" if torch.cuda.is_available() else "cpu"


def _model_config(p: QuickstartPreset, vocab: Any) -> Any:
    from cm3leon.config import ModelConfig

    over = dict(p.model_overrides)
    if p.image_pos_emb:
        over.update(image_tokens=vocab.image_seq_len, image_vocab=vocab.image_size)
    else:
        over.pop("image_axial", None)  # row/column embeddings sit on top of the place-in-image one
    return ModelConfig.from_name(p.model_preset, vocab_size=vocab.size, **over)


def _interrupted(d: Path) -> bool:
    """True if ``d`` holds checkpoints of a training stage that was stopped before it finished."""
    return (d / "checkpoints").is_dir() and any((d / "checkpoints").iterdir())


def _check_completed(stage: str, res: Any, d: Path) -> None:
    """Raise :class:`StageInterrupted` unless training run ``res`` reached its last step."""
    if res.status != "completed":
        raise StageInterrupted(f"{stage} stopped at step {res.step} ({res.status}); its checkpoint is in "
                               f"{d / 'checkpoints'}. Run the same quickstart command again to resume it.")


def _stage_pretrain(p: QuickstartPreset, shards: dict[str, Any]) -> Callable[[Path], dict[str, Any]]:
    def fn(d: Path) -> dict[str, Any]:
        from cm3leon.data.shards import Shards
        from cm3leon.sequence.build import PretrainDataset
        from cm3leon.train.config import TrainConfig
        from cm3leon.train.loop import train

        vocab = Shards(shards["pretrain"]).vocab
        data = PretrainDataset(shards["pretrain"], seq_len=p.seq_len, n_retrieved=p.n_retrieved, seed=p.train_seed)
        val = PretrainDataset(shards["pretrain_val"], seq_len=p.seq_len, n_retrieved=0, seed=1)
        cfg = TrainConfig(steps=p.pretrain_steps, batch_size=p.pretrain_batch, lr=p.pretrain_lr,
                          warmup_steps=max(1, p.pretrain_steps // 20), decay="cosine", weight_decay=0.1,
                          log_every=max(1, p.pretrain_steps // 50), ckpt_every=max(p.pretrain_steps // 2, 1),
                          eval_batches=4, eval_batch_size=16, device=_device(p), seed=p.train_seed)
        res = train(_model_config(p, vocab), cfg, data, d, vocab=vocab, val_data=val, resume=_interrupted(d))
        _check_completed("pretraining", res, d)
        return {"dir": str(d), "tokens": res.tokens, "steps": res.step, "val": res.val or {},
                "final_loss": res.losses[max(res.losses)] if res.losses else None}

    return fn


def _stage_sft(p: QuickstartPreset, sft_shards: dict[str, Any], pre: dict[str, Any]) -> Callable[[Path], dict[str, Any]]:
    def fn(d: Path) -> dict[str, Any]:
        from cm3leon.data.shards import Shards
        from cm3leon.sequence.sft import SFTDataset
        from cm3leon.train.config import TrainConfig
        from cm3leon.train.loop import train

        vocab = Shards(sft_shards["sft"]).vocab
        data = SFTDataset(sft_shards["sft"], seq_len=p.seq_len, seed=p.train_seed, target_infill_prob=p.sft_target_infill_prob,
                          target_shares=p.sft_shares)
        print(data.table(), flush=True)
        cfg = TrainConfig(steps=p.sft_steps, batch_size=p.sft_batch, lr=p.sft_lr,
                          warmup_steps=max(1, p.sft_steps // 20), decay="cosine", weight_decay=0.1,
                          log_every=max(1, p.sft_steps // 50), ckpt_every=max(p.sft_steps // 2, 1),
                          eval_batches=4, eval_batch_size=16, device=_device(p), seed=p.train_seed)
        val = SFTDataset(sft_shards["sft_val"], seq_len=p.seq_len, seed=1, target_infill_prob=p.sft_target_infill_prob,
                         target_shares=p.sft_shares)
        res = train(_model_config(p, vocab), cfg, data, d, vocab=vocab, val_data=val, init_from=pre["dir"],
                    resume=_interrupted(d))
        _check_completed("SFT", res, d)
        return {"dir": str(d), "tokens": res.tokens, "steps": res.step, "val": res.val or {},
                "mixture": data.table()}

    return fn


def _stage_assemble(which: str, text: dict[str, Any], image: dict[str, Any], enc: dict[str, Any],
                    index: dict[str, Any], shards: dict[str, Any], trained: dict[str, Any],
                    reranker: dict[str, Any] | None) -> Callable[[Path], dict[str, Any]]:
    def fn(d: Path) -> dict[str, Any]:
        from cm3leon.pipeline import CM3Leon

        CM3Leon.assemble(d, model_dir=trained["dir"], text_tokenizer_dir=text["dir"], image_tokenizer_dir=image["dir"],
                         encoder_dir=enc["dir"], bank_dir=index["dir"], memory_dir=shards["pretrain"],
                         reranker_dir=reranker["dir"] if reranker else None)
        return {"dir": str(d), "which": which}

    return fn


def _real_features(pipe: Any, data_dir: str) -> np.ndarray:
    from cm3leon.data.dataset import Dataset
    from cm3leon.eval.metrics import image_features

    return image_features([r.image for r in Dataset(data_dir)], pipe.encoder)


def _stage_eval(p: QuickstartPreset, data: dict[str, Any], model: dict[str, Any], *, ablations: bool,
                tasks: tuple[str, ...]) -> Callable[[Path], dict[str, Any]]:
    def fn(d: Path) -> dict[str, Any]:
        from cm3leon.data.dataset import Dataset
        from cm3leon.eval.harness import EvalConfig, eval_t2i, run_eval
        from cm3leon.pipeline import CM3Leon

        pipe = CM3Leon.from_pretrained(model["dir"], device=_device(p))
        records = list(Dataset(data["val"]))
        one = [r for r in records if len(r.meta["objects"]) == 1][: p.eval_n]
        two = [r for r in records if len(r.meta["objects"]) == 2][: p.eval_n]
        t2i_records = one + two
        cfg = EvalConfig(n=p.eval_n, samples=p.eval_samples, grid_dir=str(d / "grids"), batch_size=32,
                         top_p=p.eval_top_p, temperature=p.eval_temperature, retrieve=p.eval_retrieve,
                         guidance=p.eval_guidance, mode=p.eval_mode, cd_k=p.eval_cd_k, cd_alpha=p.eval_cd_alpha,
                         edit_image_guidance=p.eval_edit_guidance[0], edit_text_guidance=p.eval_edit_guidance[1])
        real = _real_features(pipe, data["val"])
        out: dict[str, Any] = {"tasks": {}, "ablations": {}}
        main = eval_t2i(pipe, t2i_records, cfg, name="t2i", real_features=real)
        out["tasks"]["t2i"] = dataclasses.asdict(main)
        others = [t for t in tasks if t != "t2i"]
        for name, res in run_eval(pipe, records, others, dataclasses.replace(cfg, n=p.eval_tasks_n)).items():
            out["tasks"][name] = dataclasses.asdict(res)
        if ablations:
            quiet = dataclasses.replace(cfg, grid_dir=None, samples=p.ablation_samples)
            done: dict[tuple[Any, ...], dict[str, float]] = {}

            # One knob at a time around the main setting, without re-ranking (one CFG + top-p
            # stream), except the sampling rows, which compare the three sample sets re-ranked.
            def ablate(guidance: float = cfg.guidance, retrieve: int = cfg.retrieve, mode: str = "top_p",
                       rerank: bool = False) -> dict[str, float]:
                key = (guidance, retrieve, mode, rerank)  # one run per distinct setting
                if key not in done:
                    done[key] = eval_t2i(pipe, t2i_records, quiet, guidance=guidance, retrieve=retrieve, mode=mode,
                                         rerank=rerank).metrics
                return done[key]

            ab: dict[str, Any] = {}
            for g in sorted({1.0, cfg.guidance, 2.0, 3.0, 5.0}):
                ab[f"cfg_{g:g}"] = ablate(guidance=g)
            for k in (0, 1, 2):
                ab[f"retrieve_{k}"] = ablate(retrieve=k)
            for mode in ("top_p", "cd_k", "mix"):
                ab[f"sampling_{mode}"] = ablate(mode=mode, rerank=True)
            ab["rerank_off"] = ablate()
            ab["rerank_on"] = main.metrics
            out["ablations"] = ab
        (d / "metrics.json").write_text(json.dumps(out, indent=2, default=float))
        return out

    return fn


# ---- entry point ------------------------------------------------------------------------------
def run_quickstart(out: str | Path, preset: str | QuickstartPreset = "default", *, force: bool = False) -> dict[str, Any]:
    """Run (or resume) the whole recipe into ``out``; returns the report dict."""
    p = get_preset(preset) if isinstance(preset, str) else preset
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if p.device == "auto" and not torch.cuda.is_available() and os.environ.get("CM3LEON_THREADS"):
        torch.set_num_threads(int(os.environ["CM3LEON_THREADS"]))
    t0 = time.perf_counter()
    st = Stages(out, p, force=force)
    data = st.run("data", _stage_data(p), ("n_train", "n_val", "snap", "max_objects", "caption_order"))
    text = st.run("text_tokenizer", _stage_text_tokenizer(p, data), ("text_vocab",), after=("data",))
    image = st.run("image_tokenizer", _stage_image_tokenizer(p, data),
                   ("vq_preset", "vq_steps", "vq_batch", "vq_overrides", "vq_images"), after=("data",))
    enc = st.run("encoder", _stage_encoder(p, data, text), ("encoder_steps", "encoder_detailed_prob", "encoder_hard_negatives",
                                                         "encoder_overrides"),
                 after=("data", "text_tokenizer"))
    index = st.run("index", _stage_index(p, data, enc), after=("data", "encoder"))
    shards = st.run("shards", _stage_shards(p, data, text, image, enc, index), ("detailed_caption_prob",),
                    after=("text_tokenizer", "image_tokenizer", "index"))
    pre = st.run("pretrain", _stage_pretrain(p, shards),
                 ("model_preset", "model_overrides", "image_pos_emb", "seq_len", "n_retrieved", "pretrain_steps",
                  "pretrain_batch", "pretrain_lr", "train_seed"), after=("shards",),
                 complete=lambda r: r.get("steps") == p.pretrain_steps)
    reranker = None
    if p.reranker_steps:
        reranker = st.run("reranker", _stage_reranker(p, data, text), ("reranker_steps",),
                          after=("data", "text_tokenizer"))
    with_reranker = ("reranker",) if reranker else ()
    pre_dir = st.run("model_pretrained", _stage_assemble("pretrained", text, image, enc, index, shards, pre, reranker),
                     after=("pretrain", *with_reranker))
    # The paper's text-to-image results and ablations are of the pretrained model (§3); SFT
    # is for the instructable tasks, so the ablations run here.
    eval_fields = ("eval_n", "eval_tasks_n", "eval_samples", "eval_top_p", "eval_temperature", "eval_retrieve", "eval_guidance",
                   "eval_mode", "eval_cd_k", "eval_cd_alpha", "eval_edit_guidance")
    ev_pre = st.run("eval_pretrained", _stage_eval(p, data, pre_dir, ablations=p.ablations,
                                                   tasks=("t2i", "caption", "vqa")),
                    (*eval_fields, "ablations", "ablation_samples"), after=("model_pretrained",))
    sft_shards = st.run("sft_shards", _stage_sft_shards(p, data, text, image), ("sft_records",),
                        after=("text_tokenizer", "image_tokenizer"))
    sft = st.run("sft", _stage_sft(p, sft_shards, pre),
                 ("sft_steps", "sft_batch", "sft_lr", "sft_target_infill_prob", "sft_shares"),
                 after=("pretrain", "sft_shards"), complete=lambda r: r.get("steps") == p.sft_steps)
    sft_dir = st.run("model", _stage_assemble("sft", text, image, enc, index, shards, sft, reranker),
                     after=("sft", *with_reranker))
    all_tasks = ("t2i", "caption", "vqa", "edit", "control", "ground")
    ev_sft = st.run("eval", _stage_eval(p, data, sft_dir, ablations=False, tasks=all_tasks), eval_fields,
                    after=("model",))
    from cm3leon.report import write_report

    report = write_report(out, preset=p, timings=st.timings, results=st.results, eval_pre=ev_pre, eval_sft=ev_sft,
                          wall=time.perf_counter() - t0)
    return report
