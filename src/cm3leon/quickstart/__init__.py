"""The main job: the whole CM3Leon recipe on the built-in Shapes world, end to end.

Stages (each writes its own folder under ``out``; a rerun reuses finished stages)::

    data -> text_tokenizer -> image_tokenizer -> encoder -> index -> shards -> pretrain
         -> sft_shards -> sft -> model dirs -> eval (pretrained and SFT) -> report.html / report.json

Presets: ``smoke`` (about 2 minutes on 2 CPU cores, used by the tests), ``default``
(about 15 minutes on 2 CPU cores), ``gpu`` (a larger run for one GPU). A preset holds sizes
and stage choices only: pretraining and SFT run the recipes it names (the same functions
as ``cm3leon train|sft --recipe``), and every model directory it assembles carries the
decoding defaults of :data:`SHAPES_GENERATION` as its ``generation_config.json``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cm3leon.config import atomic_write_text
from cm3leon.generate.generation_config import GenerationConfig, TaskDecoding
from cm3leon.generate.logits import SamplingConfig
from cm3leon.shapes.world import ShapesConfig
from cm3leon.train.config import RunConfig
from cm3leon.train.recipes import RECIPES, SFT_MIXES, get_recipe
from cm3leon.workspace import WorkspaceLock, check_replaceable, is_lock_file, list_files, replace_owned_dir

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImageTokenizerStage:
    """The image tokenizer the quickstart trains: a VQ preset (``tokenize/image_vq.py``) with
    field ``overrides``, trained with its training preset for ``steps`` (default: the
    preset's) on ``images`` images (70% scenes, the rest seg / edge / depth / edit / write maps)."""

    preset: str = "shapes-32"
    steps: int | None = None
    batch: int | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    images: int = 12000


@dataclass(frozen=True)
class EvalStage:
    """How many held-out records each evaluation judges: ``n`` text-to-image prompts per object
    count with ``samples`` images each (None: the generation config's), ``tasks_n`` records per
    instructable task (caption, VQA, edit, control, grounding), and ``ablation_samples`` images
    per prompt in each ablation run (``ablations`` on/off)."""

    n: int = 64
    samples: int | None = None
    tasks_n: int = 256
    ablation_samples: int = 4
    ablations: bool = True


@dataclass(frozen=True)
class QuickstartPreset:
    """Sizes and stage choices of one quickstart run; training settings come from the recipes
    ``pretrain`` and ``sft`` (:mod:`cm3leon.train.recipes`), decoding from :data:`SHAPES_GENERATION`."""

    name: str
    n_train: int
    n_val: int
    world: ShapesConfig
    text_vocab: int
    image_tokenizer: ImageTokenizerStage
    encoder_steps: int
    # A second dual encoder trained on detailed captions only, for re-ranking generated images
    # (the model directory's reranker/); 0: re-rank with the retrieval encoder.
    reranker_steps: int
    pretrain: str
    sft: str
    sft_steps: int | None = None  # None: the SFT recipe's
    sft_mix: str | None = None  # None: the SFT recipe's shares; else a name of SFT_MIXES
    sft_records: int = 4000  # Shapes records the SFT examples are built from (each gives 12 tasks)
    eval: EvalStage = field(default_factory=EvalStage)
    seed: int = 0  # seed of pretraining and SFT (model init, batch order, CM3 spans)

    def __post_init__(self) -> None:
        for name in ("n_train", "n_val", "text_vocab", "encoder_steps", "sft_records"):
            if getattr(self, name) < 1:
                raise ValueError(f"QuickstartPreset.{name} must be >= 1, got {getattr(self, name)}")
        if self.reranker_steps < 0:
            raise ValueError(f"QuickstartPreset.reranker_steps must be >= 0 (0: none), got {self.reranker_steps}")
        if self.sft_steps is not None and self.sft_steps < 1:
            raise ValueError(f"QuickstartPreset.sft_steps must be >= 1, got {self.sft_steps}")
        if self.sft_mix is not None and self.sft_mix not in SFT_MIXES:
            raise ValueError(f"QuickstartPreset.sft_mix must be one of {sorted(SFT_MIXES)}, got {self.sft_mix!r}")
        for name in ("pretrain", "sft"):
            if getattr(self, name) not in RECIPES:
                raise ValueError(f"QuickstartPreset.{name}: unknown recipe {getattr(self, name)!r}")

    def pretrain_run(self, workspace: Path, device: str) -> RunConfig:
        """The pretraining run: recipe ``pretrain`` plus the workspace, the seed and the device."""
        return _recipe_run(self.pretrain, None, workspace, self._run_overrides(device))

    def sft_run(self, workspace: Path, device: str) -> RunConfig:
        """The SFT run: recipe ``sft`` (for ``sft_steps``, with ``sft_mix``'s shares) plus the
        same overrides as :meth:`pretrain_run`."""
        over = self._run_overrides(device)
        if self.sft_mix is not None:
            over.append("data.options.target_shares=" + json.dumps(SFT_MIXES[self.sft_mix]))
        return _recipe_run(self.sft, self.sft_steps, workspace, over)

    def _run_overrides(self, device: str) -> list[str]:
        return [f"train.seed={self.seed}", f"train.device={device}"]


def _recipe_run(name: str, steps: int | None, workspace: Path, overrides: list[str]) -> RunConfig:
    return get_recipe(name, steps=steps).with_overrides(overrides).resolve_paths(workspace)


# Decoding settings measured best on the quickstart's models (docs/results.md), written into
# every model directory the quickstart assembles. Text-to-image: 16 CFG + top-p samples, no
# retrieved documents, re-ranked; CFG 1.5 beats 1 and 3; top-p 1.0 because with one dominant
# background code a 0.9 cut removes the rare "an object starts here" codes; CD-K (ablations)
# needs k = 1 for the same reason. Editing: the paper's 1.5 / 7.5 turn edits into noise on
# these small models, 1.25 / 1.25 is best.
_SHAPES_SAMPLING = SamplingConfig(temperature=0.5, top_p=1.0, guidance=1.5)
SHAPES_GENERATION = GenerationConfig(
    # cd_k / cd_alpha are CD-K's settings for the cd_k and mix sample sets (mode top_p ignores them)
    text_to_image=TaskDecoding(dataclasses.replace(_SHAPES_SAMPLING, cd_k=1, cd_alpha=0.3), samples=16,
                               mode="top_p", rerank=True, retrieve=0),
    edit=TaskDecoding(SamplingConfig(temperature=0.5, top_p=1.0, image_guidance=1.25, text_guidance=1.25)),
    control=TaskDecoding(_SHAPES_SAMPLING),
    grounding=TaskDecoding(_SHAPES_SAMPLING),
)

_SMOKE_VQ = ImageTokenizerStage(steps=60, batch=8, images=1200,
                                overrides={"ch": 8, "z_channels": 16, "codebook_size": 128, "num_groups": 4})
PRESETS: dict[str, QuickstartPreset] = {
    "smoke": QuickstartPreset(
        name="smoke", n_train=600, n_val=24, world=ShapesConfig(size=32, snap=4), text_vocab=384,
        image_tokenizer=_SMOKE_VQ, encoder_steps=20, reranker_steps=10, pretrain="smoke", sft="sft-smoke",
        eval=EvalStage(n=6, samples=2, ablation_samples=2),
    ),
    # The evaluated prompts have one or two objects: a world of 1-2 objects with captions in
    # reading order (the order a raster-scan decoder draws them in) trains better at the same
    # compute. SFT examples come from all 16000 records (192,000 examples): the 1440 SFT steps
    # see each about once; fewer records are seen repeatedly and overfit. A 150-step re-ranker
    # picks as well as a 250-step one (docs/results.md).
    "default": QuickstartPreset(
        name="default", n_train=16000, n_val=256, world=ShapesConfig(size=32, snap=4, max_objects=2,
                                                                     caption_order="reading"),
        text_vocab=512, image_tokenizer=ImageTokenizerStage(steps=1200), encoder_steps=120, reranker_steps=150,
        pretrain="quickstart", sft="sft-quickstart", sft_records=16000,
    ),
    "gpu": QuickstartPreset(
        name="gpu", n_train=100000, n_val=512, world=ShapesConfig(size=32, snap=4), text_vocab=512,
        image_tokenizer=ImageTokenizerStage(steps=6000, images=60000), encoder_steps=2000, reranker_steps=0,
        pretrain="quickstart-gpu", sft="sft-quickstart-gpu", eval=EvalStage(n=256, samples=8),
    ),
}
# Shares of the encoder's training pairs that use the detailed caption (the rest the short
# one, which names no positions or sizes), and of pretraining documents that do.
ENCODER_DETAILED_PROB = 0.5
PRETRAIN_DETAILED_PROB = 0.7


def get_preset(name: str, **overrides: Any) -> QuickstartPreset:
    """A named preset with optional field overrides."""
    if name not in PRESETS:
        raise ValueError(f"unknown quickstart preset {name!r}; choose one of {sorted(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **overrides)


# ---- stage bookkeeping -------------------------------------------------------------------
# Part of every stage's key: bump it when a code change makes earlier outputs stale under
# unchanged inputs (4: stage inputs are recipe configs and the generation config).
STAGE_FORMAT = 4


def _jsonable(v: Any) -> Any:
    return json.loads(json.dumps(dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v, default=float))


STAGE_MARKER = "stage.json"  # a finished stage: its result, inputs and the files it wrote
STAGE_STARTED = "stage.started.json"  # a stage that started and has not finished


class _StageOutputs:
    """Files of a stage folder that its stage wrote: those ``listed``, plus those modified
    at or after ``since`` / at or before ``until`` (seconds, file mtimes)."""

    def __init__(self, d: Path, listed: set[str], *, since: float | None = None, until: float | None = None) -> None:
        self.d, self.listed, self.since, self.until = d, listed, since, until

    def __contains__(self, rel: object) -> bool:
        if not isinstance(rel, str):
            return False
        if rel in self.listed:
            return True
        if self.since is None and self.until is None:
            return False
        try:
            mtime = os.lstat(self.d / rel).st_mtime
        except OSError:
            return False
        return (self.since is not None and mtime >= self.since) or (self.until is not None and mtime <= self.until)


def _stage_files(d: Path) -> _StageOutputs | None:
    """The owner of stage folder ``d`` for :func:`cm3leon.workspace.check_replaceable`: the
    files ``stage.json`` lists; for a stage that started and did not finish, the files
    ``stage.started.json`` lists and every file written since it; for a ``stage.json``
    without a list (from before stages listed their files), every file not modified after
    it. None (nothing is the stage's) when ``d`` has neither marker."""
    for name in (STAGE_MARKER, STAGE_STARTED):
        try:
            rec = json.loads((d / name).read_text())
            mtime = (d / name).stat().st_mtime
        except (OSError, ValueError):
            continue
        if not isinstance(rec, dict):
            continue
        listed = {STAGE_MARKER, STAGE_STARTED, *map(str, rec.get("files", []))}
        if name == STAGE_STARTED:
            return _StageOutputs(d, listed, since=mtime)
        return _StageOutputs(d, listed) if "files" in rec else _StageOutputs(d, listed, until=mtime)
    return None


def _mark_started(d: Path, files: list[str]) -> None:
    """Record in ``d`` that its stage started, unless an unfinished start is recorded already
    (its time dates the files that start wrote)."""
    if not (d / STAGE_STARTED).exists():
        atomic_write_text(d / STAGE_STARTED, json.dumps({"started": time.time(), "files": sorted(files)}) + "\n")


class StageInterrupted(Exception):
    """A training stage stopped before its last step (Ctrl-C, SIGTERM); its checkpoint is kept
    and running the same quickstart again resumes it."""


class Stages:
    """Runs named stages once: a finished stage leaves ``stage.json`` and is reused.

    A stage folder is deleted only when it holds nothing but what its stage wrote
    (``stage.json`` lists those files; ``stage.started.json`` marks a stage that started);
    a folder holding other files is refused (:class:`cm3leon.workspace.NotOwnedError`).
    ``preset`` is the dataclass whose fields stages name: a :class:`QuickstartPreset` or an
    own-data plan (:mod:`cm3leon.quickstart.own_data`).
    """

    def __init__(self, out: Path, preset: Any, *, device: str = "cpu", force: bool = False) -> None:
        self.out, self.preset, self.force = out, preset, force
        self.timings: dict[str, float] = {}
        self.results: dict[str, Any] = {}
        self._base: dict[str, Any] = {"format": STAGE_FORMAT, "device": device}
        if getattr(preset, "world", None) is not None:  # the Shapes world is an input of every Shapes stage
            self._base["world"] = _jsonable(preset.world)
        self._inputs: dict[str, dict[str, Any]] = {}

    def run(self, name: str, fn: Callable[[Path], dict[str, Any]], fields: tuple[str, ...] = (),
            after: tuple[str, ...] = (), complete: Callable[[dict[str, Any]], bool] | None = None,
            inputs: dict[str, Any] | None = None) -> dict[str, Any]:
        """Run stage ``name`` unless a finished run with the same inputs exists.

        A stage's inputs are the preset ``fields`` it reads and any other ``inputs`` (e.g. the
        resolved run config it trains with), plus those of the stages it uses (``after``, and
        theirs in turn), so changing e.g. the SFT steps redoes SFT and its evaluation but
        reuses the tokenizers, the index, pretraining and the pretrained model's evaluation. A
        finished stage whose inputs changed is deleted and redone; an interrupted training
        stage resumes from its last checkpoint. ``complete`` checks a recorded result before
        reuse: a stage whose result fails it is run again in place.
        """
        unknown = [a for a in after if a not in self._inputs]
        if unknown:
            raise ValueError(f"stage {name!r} runs after {unknown}, which have not run yet")
        key = dict(self._base)
        for a in after:
            key.update(self._inputs[a])
        key.update({f: _jsonable(getattr(self.preset, f)) for f in fields})
        key.update({k: _jsonable(v) for k, v in (inputs or {}).items()})
        self._inputs[name] = key
        d = self.out / name
        marker = d / STAGE_MARKER
        if marker.exists() and not self.force:
            rec = json.loads(marker.read_text())
            if rec.get("inputs") == key:
                if complete is None or complete(rec["result"]):
                    log.info("stage %-16s reused (%.1fs when it ran)", name, rec["seconds"])
                    self.timings[name] = rec["seconds"]
                    self.results[name] = rec["result"]
                    return rec["result"]
                log.warning("stage %s was recorded unfinished (steps: %s); running it again", name,
                            rec["result"].get("steps"))
                owned = _stage_files(d)
                _mark_started(d, [f for f in list_files(d) if owned is not None and f in owned])
                marker.unlink()
        if d.exists() and (marker.exists() or self.force):
            replace_owned_dir(d, _stage_files)  # outputs of a finished run with other inputs: stale
        elif d.exists():
            check_replaceable(d, _stage_files)  # an unfinished run's outputs are resumed; other files are refused
        d.mkdir(parents=True, exist_ok=True)
        _mark_started(d, [])
        print(f"== stage {name}", flush=True)
        t0 = time.perf_counter()
        result = fn(d)
        secs = time.perf_counter() - t0
        files = [f for f in list_files(d) if f not in (STAGE_MARKER, STAGE_STARTED) and not is_lock_file(f)]
        atomic_write_text(marker, json.dumps({"seconds": secs, "result": result, "inputs": key, "files": files},
                                             indent=2, default=float))
        (d / STAGE_STARTED).unlink(missing_ok=True)
        print(f"   {name} done in {secs:.1f}s", flush=True)
        self.timings[name] = secs
        self.results[name] = result
        return result


# ---- stage implementations ------------------------------------------------------------------
def _stage_data(p: QuickstartPreset) -> Callable[[Path], dict[str, Any]]:
    def fn(d: Path) -> dict[str, Any]:
        from cm3leon.shapes.dataset import write_shapes_dataset

        cfg = p.world
        write_shapes_dataset(d / "train", p.n_train, size=cfg.size, seed=0, cfg=cfg, overwrite=True, progress=True)
        write_shapes_dataset(d / "val", p.n_val, size=cfg.size, seed=1, cfg=cfg, overwrite=True)
        return {"train": str(d / "train"), "val": str(d / "val"), "n_train": p.n_train, "n_val": p.n_val}

    return fn


def _corpus(data_dir: Path) -> Iterator[str]:
    """Every string the model will read: captions, questions, answers, instructions, templates."""
    from cm3leon.data.dataset import read_dataset
    from cm3leon.sequence.sft_templates import TASKS

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


def _stage_image_tokenizer(p: QuickstartPreset, data: dict[str, Any], device: str) -> Callable[[Path], dict[str, Any]]:
    def fn(d: Path) -> dict[str, Any]:
        from cm3leon.data.dataset import Dataset
        from cm3leon.tokenize.image_vq import VQConfig
        from cm3leon.tokenize.image_vq_train import TRAIN_PRESETS, train_image_tokenizer

        vq = p.image_tokenizer
        ds = Dataset(data["train"])
        n_scene = min(len(ds), int(vq.images * 0.7))
        extra_names = ("seg", "edge", "depth", "edit_image", "write_image")
        n_extra = max(1, (vq.images - n_scene) // len(extra_names))
        imgs = []
        for i in range(max(n_scene, n_extra)):
            rec = ds[i]
            if i < n_scene:
                imgs.append(rec.image)
            if i < n_extra:
                imgs.extend(rec.meta["images"][k] for k in extra_names)
        val = [r.image for r in Dataset(data["val"])]
        base = TRAIN_PRESETS[vq.preset]
        steps = vq.steps or base.steps
        cfg = dataclasses.replace(base, steps=steps, batch_size=vq.batch or base.batch_size,
                                  checkpoint_every=steps, sample_every=max(steps // 2, 1))
        metrics = train_image_tokenizer(VQConfig.from_name(vq.preset, **vq.overrides), cfg, _uint8_images(imgs),
                                        _uint8_images(val), d, device=device)
        return {"dir": str(d), **{k: v for k, v in metrics.items() if isinstance(v, (int, float, str))}}

    return fn


def _train_encoder(p: QuickstartPreset, data: dict[str, Any], text: dict[str, Any], device: str, *, steps: int,
                   detailed_prob: float) -> Any:
    """A dual encoder trained on the Shapes training pairs, each with its detailed caption
    with probability ``detailed_prob`` (else the short one)."""
    from cm3leon.data.dataset import Dataset
    from cm3leon.retrieval.encoder import DualEncoderConfig, EncoderTrainConfig, train_dual_encoder
    from cm3leon.tokenize.text_bpe import TextTokenizer

    tok = TextTokenizer.load(text["dir"])
    recs = list(Dataset(data["train"], columns=["id", "image", "text", "meta"]))
    rng = random.Random(0)
    texts = [r.meta["captions"]["detailed"] if rng.random() < detailed_prob else r.text for r in recs]
    return train_dual_encoder(
        texts, [r.image for r in recs], tokenizer=tok,
        cfg=DualEncoderConfig(vocab_size=tok.vocab_size, image_size=p.world.size),
        train_cfg=EncoderTrainConfig(steps=steps), device=device, progress=True,
    )


def _stage_encoder(p: QuickstartPreset, data: dict[str, Any], text: dict[str, Any],
                   device: str) -> Callable[[Path], dict[str, Any]]:
    def fn(d: Path) -> dict[str, Any]:
        from cm3leon.data.dataset import Dataset
        from cm3leon.retrieval.encoder import text_to_image_recall

        enc = _train_encoder(p, data, text, device, steps=p.encoder_steps, detailed_prob=ENCODER_DETAILED_PROB)
        enc.save(d)
        val = list(Dataset(data["val"]))
        keys = [tuple(sorted((o["shape"], o["color"]) for o in r.meta["objects"])) for r in val]
        rec = text_to_image_recall(enc.embed_text([r.text for r in val]), enc.embed_image([r.image for r in val]), keys)
        return {"dir": str(d), **rec}

    return fn


def _stage_reranker(p: QuickstartPreset, data: dict[str, Any], text: dict[str, Any],
                    device: str) -> Callable[[Path], dict[str, Any]]:
    def fn(d: Path) -> dict[str, Any]:
        enc = _train_encoder(p, data, text, device, steps=p.reranker_steps, detailed_prob=1.0)  # detailed captions
        enc.save(d)
        return {"dir": str(d), "final_loss": enc.info["train"]["final_loss"]}

    return fn


def _stage_index(data: dict[str, Any], enc: dict[str, Any]) -> Callable[[Path], dict[str, Any]]:
    """The stage that builds the retrieval memory bank (a flat FAISS index) over the training records."""

    def fn(d: Path) -> dict[str, Any]:
        from cm3leon.data.dataset import Dataset
        from cm3leon.retrieval.encoder import load_encoder
        from cm3leon.retrieval.index import build_bank

        ds = Dataset(data["train"], columns=["id", "image", "text", "meta"])
        build_bank(iter(ds), n=len(ds), encoder=load_encoder(enc["dir"]), out=d, factory="Flat",
                   info={"data": data["train"], "encoder": enc["dir"]}, progress=True)
        return {"dir": str(d), "n": len(ds)}

    return fn


def _pretrain_view(data_dir: str) -> Iterator[Any]:
    """Caption-image documents for pretraining: the detailed caption with probability
    :data:`PRETRAIN_DETAILED_PROB`, else the short one."""
    from cm3leon.data.dataset import read_dataset
    from cm3leon.data.records import DocRecord

    rng = random.Random(1)
    for r in read_dataset(data_dir, columns=["id", "image", "text", "meta"]):
        text = r.meta["captions"]["detailed"] if rng.random() < PRETRAIN_DETAILED_PROB else r.text
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
        write_dataset(d / "pretrain_view", _pretrain_view(data["train"]), overwrite=True)
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
        write_dataset(d / "pretrain_val_view", _pretrain_view(data["val"]), overwrite=True)
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
        from cm3leon.sequence.sft_shards import tokenize_sft
        from cm3leon.sequence.sft_sources import record_sft_examples

        text_tok, image_tok = _load_tokenizers(text, image)
        rng = random.Random(0)
        train_full = Dataset(data["train"])
        sft_rows = range(min(p.sft_records, len(train_full)))
        sft = tokenize_sft((ex for i in sft_rows for ex in record_sft_examples(train_full[i], rng)), text_tok,
                           image_tok, d / "sft", overwrite=True)
        tokenize_sft((ex for r in Dataset(data["val"]) for ex in record_sft_examples(r, rng)), text_tok, image_tok,
                     d / "sft_val", overwrite=True)
        return {"sft": str(d / "sft"), "sft_val": str(d / "sft_val"), "sft_docs": len(sft),
                "sft_records": len(sft_rows)}

    return fn


def _interrupted(d: Path) -> bool:
    """True if ``d`` holds checkpoints of a training stage that was stopped before it finished."""
    return (d / "checkpoints").is_dir() and any((d / "checkpoints").iterdir())


def _check_completed(stage: str, res: Any, d: Path) -> None:
    """Raise :class:`StageInterrupted` unless training run ``res`` reached its last step."""
    if res.status != "completed":
        raise StageInterrupted(f"{stage} stopped at step {res.step} ({res.status}); its checkpoint is in "
                               f"{d / 'checkpoints'}. Run the same quickstart command again to resume it.")


def _stage_train(stage: str, run: Any, base: str | None) -> Callable[[Path], dict[str, Any]]:
    """Train ``run`` (from model directory ``base`` for SFT) into the stage directory."""
    def fn(d: Path) -> dict[str, Any]:
        from cm3leon.train.run import build_datasets, run_training

        datasets = build_datasets(run)
        mixture = datasets[0].table() if run.data.kind == "sft" else None
        if mixture:
            print(mixture, flush=True)
        res = run_training(run, d, base=base, resume=_interrupted(d), datasets=datasets)
        _check_completed(stage, res, d)
        out = {"dir": str(d), "tokens": res.tokens, "steps": res.step, "val": res.val or {}}
        if mixture:
            out["mixture"] = mixture
        else:
            out["final_loss"] = res.losses[max(res.losses)] if res.losses else None
        return out

    return fn


def _stage_assemble(which: str, text: dict[str, Any], image: dict[str, Any], enc: dict[str, Any],
                    index: dict[str, Any], shards: dict[str, Any], trained: dict[str, Any],
                    reranker: dict[str, Any] | None) -> Callable[[Path], dict[str, Any]]:
    def fn(d: Path) -> dict[str, Any]:
        from cm3leon.pipeline import CM3Leon

        CM3Leon.assemble(d, model_dir=trained["dir"], text_tokenizer_dir=text["dir"], image_tokenizer_dir=image["dir"],
                         encoder_dir=enc["dir"], bank_dir=index["dir"], memory_dir=shards["pretrain"],
                         reranker_dir=reranker["dir"] if reranker else None, generation_config=SHAPES_GENERATION)
        return {"dir": str(d), "which": which}

    return fn


def _real_features(pipe: Any, data_dir: str) -> np.ndarray:
    from cm3leon.data.dataset import Dataset
    from cm3leon.eval.metrics import image_features

    return image_features([r.image for r in Dataset(data_dir)], pipe.encoder)


def _stage_eval(p: QuickstartPreset, data: dict[str, Any], model: dict[str, Any], device: str, *, ablations: bool,
                tasks: tuple[str, ...]) -> Callable[[Path], dict[str, Any]]:
    def fn(d: Path) -> dict[str, Any]:
        from cm3leon.data.dataset import Dataset
        from cm3leon.eval.harness import EvalConfig, eval_t2i, run_eval
        from cm3leon.pipeline import CM3Leon

        pipe = CM3Leon.from_pretrained(model["dir"], device=device)
        records = list(Dataset(data["val"]))
        one = [r for r in records if len(r.meta["objects"]) == 1][: p.eval.n]
        two = [r for r in records if len(r.meta["objects"]) == 2][: p.eval.n]
        t2i_records = one + two
        cfg = EvalConfig(n=p.eval.n, grid_dir=str(d / "grids"), batch_size=32)
        real = _real_features(pipe, data["val"])
        out: dict[str, Any] = {"tasks": {}, "ablations": {}}
        main = eval_t2i(pipe, t2i_records, cfg, name="t2i", real_features=real, samples=p.eval.samples)
        out["tasks"]["t2i"] = dataclasses.asdict(main)
        others = [t for t in tasks if t != "t2i"]
        for name, res in run_eval(pipe, records, others, dataclasses.replace(cfg, n=p.eval.tasks_n)).items():
            out["tasks"][name] = dataclasses.asdict(res)
        if ablations:
            quiet = dataclasses.replace(cfg, grid_dir=None)
            t2i = pipe.generation_config.text_to_image
            done: dict[tuple[Any, ...], dict[str, float]] = {}

            # One knob at a time around the main setting, without re-ranking (one CFG + top-p
            # stream), except the sampling rows, which compare the three sample sets re-ranked.
            def ablate(guidance: float = t2i.sampling.guidance, retrieve: int = t2i.retrieve, mode: str = "top_p",
                       rerank: bool = False) -> dict[str, float]:
                key = (guidance, retrieve, mode, rerank)  # one run per distinct setting
                if key not in done:
                    done[key] = eval_t2i(pipe, t2i_records, quiet, samples=p.eval.ablation_samples, guidance=guidance,
                                         retrieve=retrieve, mode=mode, rerank=rerank).metrics
                return done[key]

            ab: dict[str, Any] = {}
            for g in sorted({1.0, t2i.sampling.guidance, 2.0, 3.0, 5.0}):
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
def run_quickstart(out: str | Path, preset: str | QuickstartPreset = "default", *, device: str = "auto",
                   force: bool = False) -> dict[str, Any]:
    """Run (or resume) the whole recipe into ``out`` on ``device`` (auto: CUDA when available);
    returns the report dict. The run holds ``out``'s workspace lock: a second quickstart on
    the same directory is refused at once (:class:`cm3leon.workspace.WorkspaceBusyError`)."""
    p = get_preset(preset) if isinstance(preset, str) else preset
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with WorkspaceLock(out):
        return _run_stages(out, p, device=device, force=force)


def _resolve_device(device: str) -> str:
    """``auto`` as CUDA when available, else the CPU; on the CPU, ``CM3LEON_THREADS`` sets torch's threads."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and os.environ.get("CM3LEON_THREADS"):
        torch.set_num_threads(int(os.environ["CM3LEON_THREADS"]))
    return device


def _run_stages(out: Path, p: QuickstartPreset, *, device: str, force: bool) -> dict[str, Any]:
    device = _resolve_device(device)
    t0 = time.perf_counter()
    st = Stages(out, p, device=device, force=force)
    data = st.run("data", _stage_data(p), ("n_train", "n_val"))
    text = st.run("text_tokenizer", _stage_text_tokenizer(p, data), ("text_vocab",), after=("data",))
    image = st.run("image_tokenizer", _stage_image_tokenizer(p, data, device), ("image_tokenizer",), after=("data",))
    enc = st.run("encoder", _stage_encoder(p, data, text, device), ("encoder_steps",),
                 inputs={"encoder_detailed_prob": ENCODER_DETAILED_PROB}, after=("data", "text_tokenizer"))
    index = st.run("index", _stage_index(data, enc), after=("data", "encoder"))
    shards = st.run("shards", _stage_shards(p, data, text, image, enc, index),
                    inputs={"pretrain_detailed_prob": PRETRAIN_DETAILED_PROB},
                    after=("text_tokenizer", "image_tokenizer", "index"))
    pre_run = p.pretrain_run(out, device)
    pre = st.run("pretrain", _stage_train("pretraining", pre_run, None), inputs=_train_inputs(pre_run),
                 after=("shards",), complete=lambda r: r.get("steps") == pre_run.train.steps)
    reranker = None
    if p.reranker_steps:
        reranker = st.run("reranker", _stage_reranker(p, data, text, device), ("reranker_steps",),
                          after=("data", "text_tokenizer"))
    with_reranker = ("reranker",) if reranker else ()
    pre_dir = st.run("model_pretrained", _stage_assemble("pretrained", text, image, enc, index, shards, pre, reranker),
                     inputs={"generation": SHAPES_GENERATION}, after=("pretrain", *with_reranker))
    # The paper's text-to-image results and ablations are of the pretrained model (§3); SFT
    # is for the instructable tasks, so the ablations run here.
    ev_pre = st.run("eval_pretrained", _stage_eval(p, data, pre_dir, device, ablations=p.eval.ablations,
                                                   tasks=("t2i", "caption", "vqa")),
                    ("eval",), after=("model_pretrained",))
    st.run("sft_shards", _stage_sft_shards(p, data, text, image), ("sft_records",),
                        after=("text_tokenizer", "image_tokenizer"))
    sft_run = p.sft_run(out, device)
    sft = st.run("sft", _stage_train("SFT", sft_run, pre["dir"]), inputs=_train_inputs(sft_run),
                 after=("pretrain", "sft_shards"), complete=lambda r: r.get("steps") == sft_run.train.steps)
    sft_dir = st.run("model", _stage_assemble("sft", text, image, enc, index, shards, sft, reranker),
                     inputs={"generation": SHAPES_GENERATION}, after=("sft", *with_reranker))
    all_tasks = ("t2i", "caption", "vqa", "edit", "control", "ground")
    ev_sft = st.run("eval", _stage_eval(p, data, sft_dir, device, ablations=False, tasks=all_tasks),
                    ("eval",), after=("model",))
    from cm3leon.report import write_report

    report = write_report(out, preset=p, generation=SHAPES_GENERATION, timings=st.timings, results=st.results,
                          eval_pre=ev_pre, eval_sft=ev_sft, wall=time.perf_counter() - t0)
    return report


def _run_key(run: RunConfig) -> dict[str, Any]:
    """A run config as a stage input: without its absolute paths (a moved workspace is reused)."""
    d = run.to_dict()
    d.pop("init_from", None)
    d["data"] = {k: v for k, v in d["data"].items() if k not in ("train", "val")}
    return d


def _train_inputs(run: RunConfig) -> dict[str, Any]:
    """A training stage's inputs: its run config and the precision that resolves to on its device
    (``auto`` trains in bf16 on some CPUs only)."""
    return {"run": _run_key(run), "bf16": run.train.uses_bf16(run.train.device)}
