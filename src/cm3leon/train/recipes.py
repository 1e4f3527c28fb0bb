"""Named run configs (*recipes*): the one source of run configuration.

A recipe is a function of an optional step budget that returns a complete
:class:`RunConfig`; ``cm3leon train|sft --recipe NAME`` and the quickstart call the same
functions (the quickstart adds only workspace paths, the seed and the device). A recipe
whose model has the image-place embedding gets its sizes from the data's image tokenizer. Each
``recipes/NAME.json`` file is the recipe's default config, written by
``cm3leon train --recipe NAME --print-config``.

Data paths follow the quickstart's workspace layout (``cm3leon quickstart --out WS``):
``WS/shards/pretrain`` and ``WS/sft_shards/sft`` hold the tokenized shards, ``WS/pretrain``
the pretrained model.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from cm3leon.train.config import DataConfig, RunConfig, TrainConfig

Recipe = Callable[..., RunConfig]
RECIPES: dict[str, Recipe] = {}


def recipe(name: str) -> Callable[[Recipe], Recipe]:
    """Register a recipe function under ``name``."""

    def deco(fn: Recipe) -> Recipe:
        RECIPES[name] = fn
        return fn

    return deco


def get_recipe(name: str, *, steps: int | None = None) -> RunConfig:
    """The run config of recipe ``name``, for ``steps`` optimizer steps if given (the recipe
    scales its schedule to them); unknown names raise with the list of known ones."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; choose one of {sorted(RECIPES)} or pass --config FILE")
    if steps is not None and (not isinstance(steps, int) or steps <= 0):
        raise ValueError(f"steps must be a positive whole number, got {steps!r}")
    return RECIPES[name](steps=steps)


# ---- SFT mixtures of the Shapes tasks --------------------------------------------------
# SFT shares after the paper's mixture (Table 5 sizes): VQA (VQA2 1.3M + VizWiz + OKVQA) far
# above ScienceQA-style reasoning (6k) and Image Paragraph-style detailed captions (14k). With
# equal shares the Shapes model answers VQA questions with reasoning text ("The image shows").
SHAPES_SFT_SHARES: dict[str, float] = {
    "vqa": 3.0, "caption": 2.0, "edit": 1.5, "text_to_image": 1.0, "edge_to_image": 1.0, "seg_to_image": 1.0,
    "depth_to_image": 1.0, "grounding": 1.0, "write": 0.5, "narration": 0.5, "detailed_caption": 0.5,
    "reasoning": 0.3,
}
# Shares shifted toward the tasks that output an image conditioned on another image (edit,
# edge / seg / depth-to-image, grounding): they trade VQA for those tasks (docs/results.md).
SHAPES_SFT_SHARES_COPY: dict[str, float] = {
    "vqa": 1.5, "caption": 1.0, "edit": 3.0, "text_to_image": 1.0, "edge_to_image": 2.0, "seg_to_image": 2.0,
    "depth_to_image": 2.0, "grounding": 2.0, "write": 0.5, "narration": 0.3, "detailed_caption": 0.3,
    "reasoning": 0.3,
}
# Named SFT mixtures (`cm3leon quickstart --sft-mix NAME`).
SFT_MIXES: dict[str, dict[str, float]] = {"default": SHAPES_SFT_SHARES, "copy": SHAPES_SFT_SHARES_COPY}


# ---- the quickstart family: small models on 32 px Shapes --------------------------------
def _short_run(steps: int, *, batch: int, lr: float, **extra: Any) -> TrainConfig:
    """The quickstart's schedule for ``steps``: 5% warmup, cosine decay, about 50 log points,
    a checkpoint halfway and at the end, validation at the end."""
    return TrainConfig(steps=steps, batch_size=batch, lr=lr, warmup_steps=max(1, steps // 20), decay="cosine",
                       weight_decay=0.1, log_every=max(1, steps // 50), ckpt_every=max(steps // 2, 1),
                       eval_batches=4, eval_batch_size=16, **extra)


# The quickstart model: 4 layers, d 128 (at this compute a smaller model that sees more tokens
# wins); 64 tokens per image and 512 codes are what the `shapes-32` image tokenizer gives. The
# place-in-image embedding and its row/column factorisation are not in the paper: at this
# budget they are what lets the model draw whole objects (docs/results.md).
_QUICKSTART_MODEL = {"d_model": 128, "n_layers": 4, "n_heads": 4, "max_seq_len": 320, "image_axial": True,
                     "image_tokens": 64, "image_vocab": 512}
# seq 320: two retrieved documents + a detailed caption + 64 image tokens fit.
_QUICKSTART_SEQ = 320


@recipe("smoke")
def smoke(steps: int | None = None) -> RunConfig:
    """Seconds on a CPU: the tiny model for a few steps (the quickstart's `smoke` preset)."""
    return RunConfig(
        name="smoke",
        model="tiny",
        model_overrides={"max_seq_len": 384, "image_tokens": 64, "image_vocab": 128},
        train=_short_run(steps or 24, batch=4, lr=2e-3),
        data=DataConfig(train="shards/pretrain", val="shards/pretrain_val", seq_len=320, options={"n_retrieved": 2}),
    )


@recipe("sft-smoke")
def sft_smoke(steps: int | None = None) -> RunConfig:
    """Seconds on a CPU: SFT of the `smoke` model on the Shapes task mixture (equal shares)."""
    return RunConfig(
        name="sft-smoke",
        model="tiny",
        model_overrides={"max_seq_len": 384, "image_tokens": 64, "image_vocab": 128},
        init_from="pretrain",
        train=_short_run(steps or 12, batch=4, lr=1e-3),
        data=DataConfig(train="sft_shards/sft", val="sft_shards/sft_val", kind="sft", seq_len=320,
                        options={"target_infill_prob": 0.5, "target_shares": None}),
    )


@recipe("quickstart")
def quickstart(steps: int | None = None) -> RunConfig:
    """About 5 minutes on 2 CPU cores: the quickstart's pretraining (a 4-layer d=128 model on
    32 px Shapes, 64 tokens per image, 512 codes, with the place-in-image and row/column
    embeddings; not in the paper). Batch 4 x 3400 steps: at this budget more, noisier steps
    beat fewer larger ones by far (docs/results.md)."""
    return RunConfig(
        name="quickstart",
        model="shapes",
        model_overrides=dict(_QUICKSTART_MODEL),
        train=_short_run(steps or 3400, batch=4, lr=2e-3),
        data=DataConfig(train="shards/pretrain", val="shards/pretrain_val", seq_len=_QUICKSTART_SEQ,
                        options={"n_retrieved": 2}),
    )


def _sft_quickstart(name: str, steps: int, shares: dict[str, float]) -> RunConfig:
    return RunConfig(
        name=name,
        model="shapes",
        model_overrides=dict(_QUICKSTART_MODEL),
        init_from="pretrain",
        train=_short_run(steps, batch=16, lr=2e-3),
        data=DataConfig(train="sft_shards/sft", val="sft_shards/sft_val", kind="sft", seq_len=_QUICKSTART_SEQ,
                        options={"target_infill_prob": 0.8, "target_shares": dict(shares),
                                 "ignore_absent_shares": True}),
    )


@recipe("sft-quickstart")
def sft_quickstart(steps: int | None = None) -> RunConfig:
    """About 4.5 minutes on 2 CPU cores with bf16 matrix products (8 in fp32): SFT of the
    quickstart model for 1440 steps on the Shapes task mixture (``SHAPES_SFT_SHARES``; 80% of
    examples in their inference layout), built for examples from all 16000 records."""
    return _sft_quickstart("sft-quickstart", steps or 1440, SHAPES_SFT_SHARES)


@recipe("sft-quickstart-copy")
def sft_quickstart_copy(steps: int | None = None) -> RunConfig:
    """3840 SFT steps of the quickstart model with the shares shifted to editing, control and
    grounding (``SHAPES_SFT_SHARES_COPY``; about 14-20 minutes on 2 CPU cores). Built for SFT
    examples from all 16000 records (``cm3leon quickstart --sft-records 16000``)."""
    return _sft_quickstart("sft-quickstart-copy", steps or 3840, SHAPES_SFT_SHARES_COPY)


_GPU_MODEL = {"d_model": 512, "n_layers": 8, "n_heads": 8, "max_seq_len": 512, "image_tokens": 64,
              "image_vocab": 512}


@recipe("quickstart-gpu")
def quickstart_gpu(steps: int | None = None) -> RunConfig:
    """One GPU: the quickstart's `gpu` preset pretraining (d 512, 8 layers, batch 64, seq 512)."""
    return RunConfig(
        name="quickstart-gpu",
        model="shapes",
        model_overrides=dict(_GPU_MODEL),
        train=_short_run(steps or 6000, batch=64, lr=1e-3),
        data=DataConfig(train="shards/pretrain", val="shards/pretrain_val", seq_len=512, options={"n_retrieved": 3}),
    )


@recipe("sft-quickstart-gpu")
def sft_quickstart_gpu(steps: int | None = None) -> RunConfig:
    """One GPU: SFT of the `quickstart-gpu` model (2000 steps, batch 64, equal task shares)."""
    return RunConfig(
        name="sft-quickstart-gpu",
        model="shapes",
        model_overrides=dict(_GPU_MODEL),
        init_from="pretrain",
        train=_short_run(steps or 2000, batch=64, lr=5e-4),
        data=DataConfig(train="sft_shards/sft", val="sft_shards/sft_val", kind="sft", seq_len=512,
                        options={"target_infill_prob": 0.5, "target_shares": None}),
    )


@recipe("shapes-64")
def shapes_64(steps: int | None = None) -> RunConfig:
    """One GPU, about an hour: 64 px Shapes with 3 retrieved documents. The image length is the
    data's (its image tokenizer's): 64 tokens with the ``shapes-64`` preset, 256 with
    ``shapes-128``; seq 1280 fits three retrieved documents and the query at 256 tokens each."""
    return RunConfig(
        name="shapes-64",
        model="shapes",
        model_overrides={"d_model": 512, "n_layers": 8, "n_heads": 8, "max_seq_len": 1280},
        train=TrainConfig(
            steps=steps or 20000, batch_size=64, lr=6e-4, warmup_steps=500, decay="cosine", log_every=50,
            eval_every=1000, eval_batches=16, ckpt_every=1000, compile=True, num_workers=4,
        ),
        data=DataConfig(train="shards/pretrain", seq_len=1280, options={"n_retrieved": 3}),
    )


# ---- paper scale (Table 3 / Table 4) ----------------------------------------------------
# Tokens consumed per paper model (Table 3) at 8M-token batches (8 * 2**20 = 2048 x 4096).
_PAPER_BATCH_TOKENS = 8 * 2**20


def _paper(name: str, preset: str, lr: float, tokens: float, *, micro: int, steps: int | None) -> RunConfig:
    return RunConfig(
        name=name,
        model=preset,
        train=TrainConfig(
            steps=steps or int(math.ceil(tokens / _PAPER_BATCH_TOKENS)), batch_size=None,
            global_batch_tokens=_PAPER_BATCH_TOKENS, micro_batch_size=micro, lr=lr, warmup_steps=1500,
            decay="linear", min_lr_ratio=0.1, log_every=10, eval_every=2000, eval_batches=32, ckpt_every=1000,
            keep_last=3, precision="bf16", device="cuda", compile=True, activation_checkpointing=True,
            dist="fsdp2", num_workers=8,
        ),
        data=DataConfig(train="shards/pretrain", val="shards/val", seq_len=4096, options={"n_retrieved": 3}),
    )


@recipe("paper-350m")
def paper_350m(steps: int | None = None) -> RunConfig:
    """Paper Table 3: 350M, seq 4096, 8M-token batches, peak LR 6e-4, 1500 warmup, 1.4T tokens."""
    return _paper("paper-350m", "350m", 6e-4, 1.4e12, micro=8, steps=steps)


@recipe("paper-760m")
def paper_760m(steps: int | None = None) -> RunConfig:
    """Paper Table 3: 760M, seq 4096, 8M-token batches, peak LR 5e-4, 1500 warmup, 1.9T tokens."""
    return _paper("paper-760m", "760m", 5e-4, 1.9e12, micro=4, steps=steps)


@recipe("paper-7b")
def paper_7b(steps: int | None = None) -> RunConfig:
    """Paper Table 3: 7B, seq 4096, 8M-token batches, peak LR 1.2e-4, 1500 warmup, 2.4T tokens."""
    return _paper("paper-7b", "7b", 1.2e-4, 2.4e12, micro=2, steps=steps)


@recipe("sft-paper-7b")
def sft_paper_7b(steps: int | None = None) -> RunConfig:
    """Paper Table 4: SFT of 7B, seq 4096, 2M-token batches, LR 5e-5, 150 warmup, 30B tokens."""
    batch_tokens = 2 * 2**20
    return RunConfig(
        name="sft-paper-7b",
        model="7b",
        init_from="pretrain",
        train=TrainConfig(
            steps=steps or int(math.ceil(30e9 / batch_tokens)), batch_size=None, global_batch_tokens=batch_tokens,
            micro_batch_size=2, lr=5e-5, warmup_steps=150, decay="linear", log_every=10,
            eval_every=1000, eval_batches=32, ckpt_every=1000, precision="bf16", device="cuda",
            compile=True, activation_checkpointing=True, dist="fsdp2", num_workers=8,
        ),
        data=DataConfig(train="shards/sft", val="shards/sft-val", kind="sft", seq_len=4096),
    )
