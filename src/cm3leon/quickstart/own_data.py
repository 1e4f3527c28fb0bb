"""The whole recipe on a user's own image-caption data: ``cm3leon quickstart --data PATH``.

Stages (the same :class:`~cm3leon.quickstart.Stages` machinery as the Shapes quickstart:
a rerun reuses finished stages, an interrupted training stage resumes)::

    data -> text_tokenizer -> image_tokenizer -> encoder -> index -> shards -> pretrain
         -> sft_shards -> sft -> model -> eval -> report.html / report.json

The ``data`` stage reads any layout of :mod:`cm3leon.data.sources` (bad rows are skipped and
counted), fits every image to ``image_size`` px (centre crop, bicubic) and holds out
``clamp(5 %, 32, 1000)`` records (at most a fifth). The plan (:func:`make_plan`) is then sized from the number
of records and printed with an estimated time per stage: the image tokenizer preset and the
decoder from ``image_size``, pretraining steps from a token budget (``tokens``) or from what a
time budget (``minutes``, the whole run) leaves after the other stages. SFT trains the two
tasks every caption-image record gives (captioning and text-to-image,
:func:`cm3leon.sequence.sft_sources.record_sft_examples`). The run ends in ``OUT/model``, a
model directory that ``cm3leon generate|caption|serve --model OUT/model`` take as it is.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
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
from PIL import Image, ImageOps

from cm3leon.eval.user_data import UserEvalConfig
from cm3leon.generate.generation_config import GenerationConfig
from cm3leon.quickstart import (
    SHAPES_GENERATION,
    Stages,
    _check_completed,
    _interrupted,
    _load_tokenizers,
    _resolve_device,
    _stage_index,
    _train_inputs,
    _uint8_images,
)
from cm3leon.train.config import RunConfig
from cm3leon.train.recipes import get_recipe
from cm3leon.workspace import WorkspaceLock

IMAGE_SIZES = (32, 64, 128, 256)
VAL_FRACTION, VAL_MIN, VAL_MAX = 0.05, 32, 1000
MIN_TRAIN = 64  # fewer training records than this cannot train a tokenizer, an encoder and a decoder
DEFAULT_MINUTES = 15.0

# Seconds per step (or per item) measured on this project's 2-core CPU machine (no GPU) with
# one training process: the Shapes `default` quickstart of docs/results.md (2026-12-02) and the
# own-data digits runs (their times divided by the slowdown their plan probed). Sizes not
# measured (128 / 256 px) are scaled from these by pixels or parameters, and the plan says
# "scaled".
MEASURED = {
    "vq_step_32": 0.059,  # shapes-32 VQ-GAN, batch 8
    "vq_step_64": 0.3,  # shapes-64 VQ-GAN, batch 8 (docs/tokenizers.md: 1200 steps in ~6 CPU minutes)
    "encoder_step_32": 0.19,  # in-house dual encoder, batch 256, 32 px
    "encoder_step_64": 0.55,  # the same at 64 px (the 64 px digits run, divided by its probed slowdown)
    "pretrain_tokens_per_s_small": 17_800,  # the 4-layer d 128 decoder: 3400 steps of 4 x 320 in 244 s
    "sft_tokens_per_s_small": 19_000,  # 480 SFT steps of 16 x 320 tokens in 129 s
    "image_per_s_small": 150.0,  # text-to-image samples (64 tokens, CFG), batched
    "caption_per_s_small": 100.0,
    "record_per_s": 400.0,  # reading + resizing + tokenizing + retrieving one record, all stages
}


@dataclass(frozen=True)
class Source:
    """Where the user's data is: ``path`` (absolute), its ``format`` (a kind of
    :data:`cm3leon.data.sources.SOURCE_KINDS`) and a ``fingerprint`` of its files (names,
    sizes, modification times), so that changed data redoes the run."""

    path: str
    format: str
    fingerprint: str


def fingerprint(path: str | os.PathLike[str]) -> str:
    """A hash of every file's relative name, size and mtime under ``path`` (or of the file itself)."""
    p = Path(path)
    h = hashlib.sha256()
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())
    if p.is_file() and p.suffix == ".json":  # COCO: the images folder next to it counts too
        files += sorted(f for f in p.parent.rglob("*") if f.is_file() and f != p)
    for f in files:
        st = f.stat()
        h.update(f"{f.relative_to(p.parent if p.is_file() else p)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class OwnDataPlan:
    """Sizes and stage choices of one own-data run (what each stage reads is named by field)."""

    name: str
    source: Source
    image_size: int
    n_train: int
    n_val: int
    text_vocab: int
    vq_preset: str
    vq_steps: int
    vq_batch: int
    vq_overrides: dict[str, Any]
    clip: str | None  # a local CLIP directory as the retrieval encoder; None: train the in-house one
    encoder_steps: int
    pretrain: str  # recipe name
    pretrain_steps: int
    pretrain_batch: int
    seq_len: int
    n_retrieved: int
    duplicates: str  # the retriever's rule for exact duplicate captions (RetrieverConfig.duplicates)
    model_overrides: dict[str, Any]
    sft: str
    sft_steps: int  # 0: no SFT
    sft_batch: int
    sft_seq_len: int
    eval: UserEvalConfig = field(default_factory=UserEvalConfig)
    seed: int = 0
    estimates: dict[str, float] = field(default_factory=dict)  # seconds per stage (not a stage input)
    budget: str = ""  # how the training steps were chosen, for the printed plan
    slowdown: float = 1.0  # this machine at plan time vs the MEASURED constants (probe_slowdown)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> OwnDataPlan:
        """The plan :func:`dataclasses.asdict` wrote (the ``plan`` stage's result)."""
        return cls(**{**d, "source": Source(**d["source"]), "eval": UserEvalConfig(**d["eval"])})

    def pretrain_run(self, workspace: Path, device: str) -> RunConfig:
        """The pretraining run: recipe ``pretrain`` resized to this plan, in ``workspace``."""
        over = [f"train.seed={self.seed}", f"train.device={device}", f"train.batch_size={self.pretrain_batch}",
                f"data.seq_len={self.seq_len}", f"data.options.n_retrieved={self.n_retrieved}"]
        over += [f"model_overrides.{k}={json.dumps(v)}" for k, v in self.model_overrides.items()]
        return get_recipe(self.pretrain, steps=self.pretrain_steps).with_overrides(over).resolve_paths(workspace)

    def sft_run(self, workspace: Path, device: str) -> RunConfig:
        """The SFT run (captioning + text-to-image, equal shares) from the pretrained model."""
        over = [f"train.seed={self.seed}", f"train.device={device}", f"train.batch_size={self.sft_batch}",
                f"data.seq_len={self.sft_seq_len}",
                'data.options.target_shares={"caption": 1.0, "text_to_image": 1.0}']
        over += [f"model_overrides.{k}={json.dumps(v)}" for k, v in self.model_overrides.items()]
        return get_recipe(self.sft, steps=self.sft_steps).with_overrides(over).resolve_paths(workspace)


# Decoding defaults written into OUT/model: the Shapes quickstart's measured settings (CFG 1.5,
# temperature 0.5, top-p 1.0: a plain background is one dominant code), 8 samples re-ranked.
OWN_DATA_GENERATION = dataclasses.replace(
    SHAPES_GENERATION, text_to_image=SHAPES_GENERATION.text_to_image.replace(samples=8))


# ---- the plan ---------------------------------------------------------------------------------
def held_out(n: int) -> int:
    """Records held out of ``n``: 5 % of them, at least 32, at most 1000, and never more than a
    fifth (:func:`cm3leon.data.split.holdout_size`, the rule of ``retrieval train-encoder``)."""
    from cm3leon.data.split import holdout_size

    return holdout_size(n, fraction=VAL_FRACTION, floor=VAL_MIN, cap=VAL_MAX)


def min_records() -> int:
    """The fewest good records a plan accepts: what leaves :data:`MIN_TRAIN` to train on."""
    n = MIN_TRAIN
    while n - held_out(n) < MIN_TRAIN:
        n += 1
    return n


def _vq_preset(size: int) -> str:
    from cm3leon.tokenize.image_vq import VQ_PRESETS
    from cm3leon.tokenize.image_vq_train import TRAIN_PRESETS

    named = {32: "shapes-32", 64: "shapes-64"}
    if size in named:
        return named[size]
    fits = [n for n, c in VQ_PRESETS.items() if c.resolution == size and n in TRAIN_PRESETS]
    if not fits:
        raise ValueError(f"no image tokenizer preset trains {size} px images (presets: "
                         f"{sorted((n, c.resolution) for n, c in VQ_PRESETS.items())}); choose --image-size 32 or 64")
    return min(fits, key=lambda n: (VQ_PRESETS[n].tokens_per_image, VQ_PRESETS[n].codebook_size))


@dataclass(frozen=True)
class PlanRequest:
    """What the user asked for (``cm3leon quickstart --data ...``)."""

    source: Source
    image_size: int = 32
    clip: str | None = None
    minutes: float | None = None
    tokens: int | None = None
    seed: int = 0
    smoke: bool = False  # tiny sizes for tests: seconds per stage, nothing learned
    inception: str | None = None

    def __post_init__(self) -> None:
        if self.image_size not in IMAGE_SIZES:
            raise ValueError(f"--image-size must be one of {IMAGE_SIZES}, got {self.image_size}")
        if self.minutes is not None and self.tokens is not None:
            raise ValueError("give --minutes or --tokens, not both")
        if self.minutes is not None and not self.minutes > 0:
            raise ValueError(f"--minutes must be > 0, got {self.minutes}")
        if self.tokens is not None and self.tokens < 1:
            raise ValueError(f"--tokens must be >= 1, got {self.tokens}")


def make_plan(req: PlanRequest, n_train: int, n_val: int, caption_chars: int, *,
              slowdown: float = 1.0) -> OwnDataPlan:
    """The plan for ``n_train`` / ``n_val`` records whose captions have up to ``caption_chars``
    characters (95th percentile): sizes from ``req.image_size``, training steps from the budget.
    Time estimates are the :data:`MEASURED` constants times ``slowdown`` (:func:`probe_slowdown`)."""
    from cm3leon.tokenize.image_vq import VQConfig
    from cm3leon.tokenize.image_vq_train import TRAIN_PRESETS

    size = req.image_size
    vq_preset = _vq_preset(size)
    vq_over: dict[str, Any] = {}
    if req.smoke:
        vq_over = {"ch": 8, "z_channels": 16, "codebook_size": 128, "num_groups": 4}
    tokens_per_image = VQConfig.from_name(vq_preset, **vq_over).tokens_per_image
    big = tokens_per_image > 64
    # Caption tokens: a byte-level BPE of a few hundred ids spends about one id per 2 characters.
    cap_tokens = min(64, math.ceil(caption_chars / 2) + 2)
    n_retrieved = 2 if tokens_per_image <= 256 else 1
    doc = tokens_per_image + cap_tokens + 3
    seq_len = 32 * math.ceil((n_retrieved + 1) * doc / 32)
    sft_seq = 32 * math.ceil((doc + 24) / 32)  # one example and its task template
    model_over = {"max_seq_len": max(seq_len, sft_seq)}
    if big:  # a wider decoder for hundreds of tokens per image
        model_over.update(d_model=256, n_layers=6, n_heads=8)
    pre_recipe, sft_recipe = ("smoke", "sft-smoke") if req.smoke else ("quickstart", "sft-quickstart")
    pre_batch, sft_batch = 4, 16
    if req.smoke:
        sft_batch = 4
    slow = 4.0 if big else 1.0  # the wider decoder: ~4x the parameters (scaled, not measured)
    pre_tps = MEASURED["pretrain_tokens_per_s_small"] / slow / slowdown
    sft_tps = MEASURED["sft_tokens_per_s_small"] / slow / slowdown
    scale_px = (size / 32) ** 2
    vq_base = TRAIN_PRESETS[vq_preset]
    # a VQ-GAN step sees 8 images: about 3 passes over the data, 400 steps at least
    vq_steps = 12 if req.smoke else max(400, min(3 * n_train // 8, vq_base.steps // 2))
    vq_step_s = MEASURED["vq_step_64"] * (size / 64) ** 2 if size >= 64 else MEASURED["vq_step_32"]
    enc_steps = 5 if req.smoke else 120
    n_eval = min(n_val, 4 if req.smoke else 100)
    samples = 2 if req.smoke else OWN_DATA_GENERATION.text_to_image.samples
    ev = UserEvalConfig(n=n_eval, caption_n=min(n_val, 4 if req.smoke else 200), samples=samples,
                        grid_rows=min(10, n_eval), seed=req.seed, inception=req.inception)
    n_all = n_train + n_val
    est = {
        "data": n_all / MEASURED["record_per_s"] * 0.3 * scale_px,
        "text_tokenizer": 0.5,
        "image_tokenizer": vq_steps * vq_step_s,
        "encoder": 10.0 if req.clip else enc_steps * (MEASURED["encoder_step_32"] if size < 64 else
                                                       MEASURED["encoder_step_64"] * scale_px / 4),
        "index": n_train / MEASURED["record_per_s"] * 0.2 * scale_px,
        "shards": n_all / MEASURED["record_per_s"] * 0.5 * scale_px,
        "sft_shards": n_all / MEASURED["record_per_s"] * 0.5 * scale_px,
        "model": 1.0,
        "eval": (ev.n * samples * tokens_per_image / 64 / MEASURED["image_per_s_small"]
                 + ev.caption_n / MEASURED["caption_per_s_small"]) * slow + 5,
    }
    est = {k: v * slowdown for k, v in est.items()}
    if req.tokens is not None:
        pre_steps = max(1, math.ceil(req.tokens / (pre_batch * seq_len)))
        sft_steps = max(1, pre_steps // 5)
        budget = f"--tokens {req.tokens:,}: {pre_steps} steps of {pre_batch} x {seq_len} tokens"
    elif req.smoke:
        pre_steps, sft_steps, budget = 4, 2, "smoke: a few steps"
    else:
        minutes = req.minutes if req.minutes is not None else DEFAULT_MINUTES
        left = minutes * 60 - sum(est.values())
        need = 60.0
        if left < need:
            raise ValueError(f"--minutes {minutes:g} leaves {max(left, 0):.0f} s for training after the other stages "
                             f"(estimated {sum(est.values()):.0f} s); give at least "
                             f"--minutes {math.ceil((sum(est.values()) + need) / 60)} or a --tokens budget")
        # pretraining gets 4/5 of the training time, SFT 1/5
        pre_steps = max(1, int(0.8 * left * pre_tps / (pre_batch * seq_len)))
        sft_steps = max(1, int(0.2 * left * sft_tps / (sft_batch * sft_seq)))
        budget = (f"--minutes {minutes:g} (the whole run): {left:.0f} s left for training after the other stages, "
                  "4/5 pretraining, 1/5 SFT")
    est["pretrain"] = pre_steps * pre_batch * seq_len / pre_tps
    est["sft"] = sft_steps * sft_batch * sft_seq / sft_tps
    return OwnDataPlan(
        name="own-data-smoke" if req.smoke else "own-data", source=req.source, image_size=size, n_train=n_train,
        n_val=n_val, text_vocab=384 if req.smoke else 512, vq_preset=vq_preset, vq_steps=vq_steps, vq_batch=8,
        vq_overrides=vq_over, clip=req.clip, encoder_steps=enc_steps, pretrain=pre_recipe, pretrain_steps=pre_steps,
        pretrain_batch=pre_batch, seq_len=seq_len, n_retrieved=n_retrieved, duplicates="content",
        model_overrides=model_over,
        sft=sft_recipe, sft_steps=sft_steps, sft_batch=sft_batch, sft_seq_len=sft_seq, eval=ev, seed=req.seed,
        estimates=est, budget=budget, slowdown=slowdown,
    )


def probe_slowdown(*, batch: int = 4, seq_len: int = 256, steps: int = 6) -> float:
    """How many times slower than :data:`MEASURED` this machine trains the small decoder right
    now (a few AdamW steps on random tokens; > 1 on a machine shared with other jobs)."""
    from cm3leon.config import ModelConfig
    from cm3leon.model.transformer import Transformer

    run = get_recipe("quickstart")
    over = {**run.model_overrides, "max_seq_len": seq_len, "image_axial": False, "image_tokens": 0, "image_vocab": 0}
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_name(run.model, vocab_size=1100, **over))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, 1100, (batch, seq_len))
    times = []
    for _ in range(steps + 2):
        t0 = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    tokens_per_s = batch * seq_len / float(np.median(times[2:]))
    return max(1.0, MEASURED["pretrain_tokens_per_s_small"] / tokens_per_s)


def _stage_plan(req: PlanRequest, data: dict[str, Any]) -> Callable[[Path], dict[str, Any]]:
    """The plan as a stage: made once (a time budget is calibrated on this machine first) and
    reused by every rerun, so that a resumed run keeps its step counts."""
    def fn(d: Path) -> dict[str, Any]:
        timed = req.tokens is None and not req.smoke
        slowdown = probe_slowdown() if timed else 1.0
        p = make_plan(req, data["n_train"], data["n_val"], data["caption_chars_p95"], slowdown=slowdown)
        return {"plan": dataclasses.asdict(p)}

    return fn


STAGE_ORDER = ("data", "text_tokenizer", "image_tokenizer", "encoder", "index", "shards", "pretrain", "sft_shards",
               "sft", "model", "eval")


def format_plan(p: OwnDataPlan, data: dict[str, Any]) -> str:
    """The plan as printed at the start of a run: data, sizes, and an estimated time per stage."""
    skipped = data.get("skipped", {})
    lines = [
        f"plan ({p.name}): {data['n_good']} good records of {p.source.format} data at {p.source.path}"
        + (f"; {sum(skipped.values())} bad rows skipped ({', '.join(f'{k} {v}' for k, v in skipped.items())})"
           if skipped else ""),
        f"  held out {p.n_val} (5 %, at least {VAL_MIN}, at most {VAL_MAX}, at most a fifth); training on {p.n_train}",
        f"  images {p.image_size} px -> image tokenizer {p.vq_preset} ({p.vq_steps} steps)",
        f"  retrieval encoder: {('CLIP from ' + p.clip) if p.clip else f'in-house, {p.encoder_steps} steps'}; "
        f"{p.n_retrieved} + {p.n_retrieved} neighbours by text and image, exact duplicate captions: {p.duplicates}",
        f"  decoder: recipe {p.pretrain} {json.dumps(p.model_overrides)}, {p.n_retrieved} retrieved documents, "
        f"sequences of {p.seq_len} tokens",
        f"  pretraining {p.pretrain_steps} steps x {p.pretrain_batch} "
        f"({p.pretrain_steps * p.pretrain_batch * p.seq_len:,} tokens); "
        f"SFT (captioning + text-to-image) {p.sft_steps} steps x {p.sft_batch}",
        f"  budget: {p.budget}",
        f"  evaluation: {p.eval.n} held-out captions x {p.eval.samples} samples, {p.eval.caption_n} captions",
        "  estimated seconds per stage (throughput measured on an idle 2-core CPU"
        + (f", x {p.slowdown:.1f}: this machine is that much slower now" if p.slowdown > 1 else "")
        + "; 128 / 256 px scaled):",
        "    " + ", ".join(f"{k} {p.estimates[k]:.0f}" for k in STAGE_ORDER if k in p.estimates)
        + f"; total {sum(p.estimates.values()) / 60:.1f} min",
    ]
    return "\n".join(lines)


# ---- stages -------------------------------------------------------------------------------------
def fit_image(image: Image.Image, size: int) -> Image.Image:
    """``image`` centre-cropped to a square and resized to ``size`` px (bicubic), RGB."""
    im = image.convert("RGB")
    if im.size != (size, size):
        im = ImageOps.fit(im, (size, size), Image.BICUBIC)
    return im


def _stage_data(req: PlanRequest) -> Callable[[Path], dict[str, Any]]:
    def fn(d: Path) -> dict[str, Any]:
        from cm3leon.data.dataset import Dataset, write_dataset
        from cm3leon.data.records import DocRecord
        from cm3leon.data.sources import open_source

        src = open_source(req.source.path, kind=req.source.format)

        def fitted() -> Iterator[DocRecord]:
            for r in src:
                yield DocRecord(r.id, r.text.strip() if r.text else r.text, fit_image(r.image, req.image_size),
                                {"source": "user"})

        write_dataset(d / "all", fitted(), source=f"{req.source.format}:{req.source.path}", overwrite=True)
        stats = src.stats
        skipped = dict(stats.by_count())
        everything = Dataset(d / "all")
        n = len(everything)
        n_val = held_out(n)
        if n - n_val < MIN_TRAIN:
            raise ValueError(f"{req.source.path} has {n} good records ({sum(skipped.values())} bad rows skipped); "
                             f"the plan holds out {n_val} and needs {MIN_TRAIN} to train: at least {min_records()} "
                             "good image-caption records")
        order = np.random.default_rng(0).permutation(n)
        val_rows = set(order[:n_val].tolist())
        write_dataset(d / "train", (everything[i] for i in range(n) if i not in val_rows), overwrite=True)
        write_dataset(d / "val", (everything[i] for i in sorted(val_rows)), overwrite=True)
        chars = sorted(len(r.text or "") for r in Dataset(d / "all", columns=["id", "text"]))
        shutil.rmtree(d / "all")
        return {"train": str(d / "train"), "val": str(d / "val"), "n_good": n, "n_train": n - n_val, "n_val": n_val,
                "skipped": skipped, "caption_chars_p95": chars[min(len(chars) - 1, int(0.95 * len(chars)))]}

    return fn


def _stage_text_tokenizer(p: OwnDataPlan, data: dict[str, Any]) -> Callable[[Path], dict[str, Any]]:
    def fn(d: Path) -> dict[str, Any]:
        from cm3leon.data.dataset import read_dataset
        from cm3leon.sequence.sft_templates import TASKS
        from cm3leon.tokenize.text_bpe import TextTokenizer

        def corpus() -> Iterator[str]:
            for t in TASKS.values():
                for variant in t.variants:
                    for slot in variant:
                        if hasattr(slot, "template"):
                            yield slot.template
            for r in read_dataset(data["train"], columns=["id", "text"]):
                yield r.text or ""

        tok = TextTokenizer.train(corpus(), p.text_vocab)
        tok.save(d)
        return {"dir": str(d), "vocab_size": tok.vocab_size}

    return fn


def _stage_image_tokenizer(p: OwnDataPlan, data: dict[str, Any], device: str) -> Callable[[Path], dict[str, Any]]:
    def fn(d: Path) -> dict[str, Any]:
        from cm3leon.data.dataset import Dataset
        from cm3leon.tokenize.image_vq import VQConfig
        from cm3leon.tokenize.image_vq_train import TRAIN_PRESETS, train_image_tokenizer

        train = [r.image for r in Dataset(data["train"])]
        val = [r.image for r in Dataset(data["val"])]
        base = TRAIN_PRESETS[p.vq_preset]
        cfg = dataclasses.replace(base, steps=p.vq_steps, batch_size=p.vq_batch, checkpoint_every=p.vq_steps,
                                  sample_every=max(p.vq_steps // 2, 1))
        metrics = train_image_tokenizer(VQConfig.from_name(p.vq_preset, **p.vq_overrides), cfg, _uint8_images(train),
                                        _uint8_images(val), d, device=device)
        return {"dir": str(d), **{k: v for k, v in metrics.items() if isinstance(v, (int, float, str))}}

    return fn


def _stage_encoder(p: OwnDataPlan, data: dict[str, Any], text: dict[str, Any],
                   device: str) -> Callable[[Path], dict[str, Any]]:
    def fn(d: Path) -> dict[str, Any]:
        from cm3leon.data.dataset import Dataset
        from cm3leon.retrieval.encoder import (
            DualEncoderConfig,
            EncoderTrainConfig,
            text_to_image_recall,
            train_dual_encoder,
        )
        from cm3leon.tokenize.text_bpe import TextTokenizer

        if p.clip:
            from cm3leon.retrieval.clip_hf import CLIPEncoder

            enc: Any = CLIPEncoder.from_pretrained(p.clip, device=device)
        else:
            tok = TextTokenizer.load(text["dir"])
            recs = list(Dataset(data["train"]))
            enc = train_dual_encoder(
                [r.text or "" for r in recs], [r.image for r in recs], tokenizer=tok,
                cfg=DualEncoderConfig(vocab_size=tok.vocab_size, image_size=p.image_size),
                train_cfg=EncoderTrainConfig(steps=p.encoder_steps, batch_size=min(256, len(recs))), device=device,
                progress=True)
        enc.save(d)
        val = list(Dataset(data["val"]))
        # a hit: a top-k image carries the query's caption (repeated captions count as the same document)
        rec = text_to_image_recall(enc.embed_text([r.text for r in val]), enc.embed_image([r.image for r in val]),
                                   [r.text for r in val])
        return {"dir": str(d), "kind": "clip" if p.clip else "in-house", **rec}

    return fn


def _stage_shards(p: OwnDataPlan, data: dict[str, Any], text: dict[str, Any], image: dict[str, Any],
                  enc: dict[str, Any], index: dict[str, Any]) -> Callable[[Path], dict[str, Any]]:
    def fn(d: Path) -> dict[str, Any]:
        from cm3leon.data.dataset import Dataset
        from cm3leon.data.shards import attach_neighbors, tokenize_dataset
        from cm3leon.retrieval.encoder import load_encoder
        from cm3leon.retrieval.index import MemoryBank
        from cm3leon.retrieval.retriever import Retriever, RetrieverConfig

        text_tok, image_tok = _load_tokenizers(text, image)
        sh = tokenize_dataset(data["train"], text_tok, image_tok, d / "pretrain", overwrite=True)
        # duplicates="content": on data whose captions repeat, documents sharing the query's
        # caption stay candidates unless they are the same image (retrieval/retriever.py)
        retriever = Retriever(MemoryBank.load(index["dir"]), load_encoder(enc["dir"]),
                              RetrieverConfig(k_text=p.n_retrieved, k_image=p.n_retrieved, seed=0, overfetch=64,
                                              duplicates=p.duplicates))
        recs = list(Dataset(data["train"]))
        got = retriever.retrieve(recs, query_ids=np.arange(len(recs)), training=True)
        attach_neighbors(d / "pretrain", got.ids, rows="dataset")
        tokenize_dataset(data["val"], text_tok, image_tok, d / "pretrain_val", overwrite=True)
        return {"pretrain": str(d / "pretrain"), "pretrain_val": str(d / "pretrain_val"), "pretrain_docs": len(sh),
                "pretrain_tokens": int(sh.n_tokens), "neighbour_fill": float((got.ids >= 0).mean()),
                "policy": got.stats.as_dict()}

    return fn


def _stage_sft_shards(data: dict[str, Any], text: dict[str, Any],
                      image: dict[str, Any]) -> Callable[[Path], dict[str, Any]]:
    def fn(d: Path) -> dict[str, Any]:
        from cm3leon.data.dataset import Dataset
        from cm3leon.sequence.sft_shards import tokenize_sft
        from cm3leon.sequence.sft_sources import record_sft_examples

        text_tok, image_tok = _load_tokenizers(text, image)
        rng = random.Random(0)
        sft = tokenize_sft((ex for r in Dataset(data["train"]) for ex in record_sft_examples(r, rng)), text_tok,
                           image_tok, d / "sft", overwrite=True)
        tokenize_sft((ex for r in Dataset(data["val"]) for ex in record_sft_examples(r, rng)), text_tok, image_tok,
                     d / "sft_val", overwrite=True)
        return {"sft": str(d / "sft"), "sft_val": str(d / "sft_val"), "sft_docs": len(sft)}

    return fn


def _stage_train(stage: str, run: RunConfig, base: str | None) -> Callable[[Path], dict[str, Any]]:
    def fn(d: Path) -> dict[str, Any]:
        from cm3leon.train.run import build_datasets, run_training

        datasets = build_datasets(run)
        res = run_training(run, d, base=base, resume=_interrupted(d), datasets=datasets)
        _check_completed(stage, res, d)
        return {"dir": str(d), "tokens": res.tokens, "steps": res.step, "val": res.val or {},
                "final_loss": res.losses[max(res.losses)] if res.losses else None}

    return fn


def _stage_model(text: dict[str, Any], image: dict[str, Any], enc: dict[str, Any], index: dict[str, Any],
                 shards: dict[str, Any], trained: dict[str, Any], generation: GenerationConfig,
                 out: Path) -> Callable[[Path], dict[str, Any]]:
    def fn(d: Path) -> dict[str, Any]:
        from cm3leon.pipeline import CM3Leon

        CM3Leon.assemble(d, model_dir=trained["dir"], text_tokenizer_dir=text["dir"], image_tokenizer_dir=image["dir"],
                         encoder_dir=enc["dir"], bank_dir=index["dir"], memory_dir=shards["pretrain"],
                         generation_config=generation)
        CM3Leon.from_pretrained(d)  # the directory loads as `cm3leon generate --model` will load it
        return {"dir": str(d)}

    return fn


def _stage_eval(p: OwnDataPlan, data: dict[str, Any], model: dict[str, Any],
                device: str) -> Callable[[Path], dict[str, Any]]:
    def fn(d: Path) -> dict[str, Any]:
        from cm3leon.data.dataset import Dataset
        from cm3leon.eval.user_data import eval_user_data
        from cm3leon.pipeline import CM3Leon

        pipe = CM3Leon.from_pretrained(model["dir"], device=device)
        return eval_user_data(pipe, list(Dataset(data["val"])), p.eval, d)

    return fn


# ---- entry point ------------------------------------------------------------------------------
def run_own_data(out: str | Path, req: PlanRequest, *, device: str = "auto", force: bool = False,
                 echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Run (or resume) the whole recipe on the data ``req`` names, into ``out``; returns the
    report dict. Holds ``out``'s workspace lock like :func:`cm3leon.quickstart.run_quickstart`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with WorkspaceLock(out):
        return _run(out, req, device=device, force=force, echo=echo)


def _run(out: Path, req: PlanRequest, *, device: str, force: bool, echo: Callable[[str], None]) -> dict[str, Any]:
    device = _resolve_device(device)
    t0 = time.perf_counter()
    st = Stages(out, req, device=device, force=force)
    data = st.run("data", _stage_data(req), ("source", "image_size"),
                  inputs={"held_out": [VAL_FRACTION, VAL_MIN, VAL_MAX, 0.2]})
    planned = st.run("plan", _stage_plan(req, data), ("image_size", "clip", "minutes", "tokens", "seed", "smoke",
                                                       "inception"), after=("data",))
    p = OwnDataPlan.from_dict(planned["plan"])
    echo(format_plan(p, data))
    st.preset = p
    text = st.run("text_tokenizer", _stage_text_tokenizer(p, data), ("text_vocab",), after=("data",))
    image = st.run("image_tokenizer", _stage_image_tokenizer(p, data, device),
                   ("vq_preset", "vq_steps", "vq_batch", "vq_overrides"), after=("data",))
    enc = st.run("encoder", _stage_encoder(p, data, text, device), ("clip", "encoder_steps"),
                 after=("data", "text_tokenizer"))
    index = st.run("index", _stage_index(data, enc), after=("data", "encoder"))
    shards = st.run("shards", _stage_shards(p, data, text, image, enc, index), ("n_retrieved", "duplicates"),
                    after=("text_tokenizer", "image_tokenizer", "index"))
    pre_run = p.pretrain_run(out, device)
    pre = st.run("pretrain", _stage_train("pretraining", pre_run, None), inputs=_train_inputs(pre_run),
                 after=("shards",), complete=lambda r: r.get("steps") == pre_run.train.steps)
    final, final_stage = pre, "pretrain"
    if p.sft_steps:
        st.run("sft_shards", _stage_sft_shards(data, text, image), after=("text_tokenizer", "image_tokenizer"))
        sft_run = p.sft_run(out, device)
        final = st.run("sft", _stage_train("SFT", sft_run, pre["dir"]), inputs=_train_inputs(sft_run),
                       after=("pretrain", "sft_shards"), complete=lambda r: r.get("steps") == sft_run.train.steps)
        final_stage = "sft"
    model = st.run("model", _stage_model(text, image, enc, index, shards, final, OWN_DATA_GENERATION, out),
                   inputs={"generation": OWN_DATA_GENERATION}, after=(final_stage,))
    ev = st.run("eval", _stage_eval(p, data, model, device), ("eval",), after=("model",))
    from cm3leon.report import write_own_data_report

    return write_own_data_report(out, plan=p, data=data, generation=OWN_DATA_GENERATION, timings=st.timings,
                                 results=st.results, evaluation=ev, wall=time.perf_counter() - t0)

