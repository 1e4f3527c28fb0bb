"""Run a :class:`RunConfig`: open its shards, build the model config, train.

``cm3leon train`` / ``cm3leon sft`` and the quickstart's training stages all call
:func:`run_training`, so a recipe trains the same way whichever of them runs it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cm3leon.config import ModelConfig, from_json_dict, load_json
from cm3leon.train.config import RunConfig
from cm3leon.train.loop import TrainResult, train
from cm3leon.vocab import Vocab


def build_datasets(run: RunConfig) -> tuple[Any, Any, Vocab]:
    """(train, val or None, vocab) for a run config whose paths are absolute."""
    from cm3leon.data.shards import Shards

    def open_one(path: str, seed: int, *, val: bool) -> Any:
        if not Path(path).exists():
            raise FileNotFoundError(
                f"tokenized shards {path} not found; tokenize data with `cm3leon data tokenize`, "
                "or point the config at them (--workspace DIR or --override data.train=DIR)"
            )
        shards = Shards(path)
        opts = dict(run.data.options)
        if run.data.kind == "sft":
            from cm3leon.sequence.sft_mixture import SFTDataset

            return SFTDataset(shards, seq_len=run.data.seq_len, seed=seed, **opts)
        from cm3leon.sequence.build import PretrainDataset

        if val and shards.neighbors is None:
            opts["n_retrieved"] = 0  # held-out shards validate without retrieved documents
        return PretrainDataset(shards, seq_len=run.data.seq_len, seed=seed, **opts)

    train_data = open_one(run.data.train, run.train.seed, val=False)
    val_data = open_one(run.data.val, run.train.seed + 1, val=True) if run.data.val else None
    if val_data is not None and val_data.vocab != train_data.vocab:
        raise ValueError(f"validation shards {run.data.val} use another vocabulary ({val_data.vocab}) than the "
                         f"training shards ({train_data.vocab}); tokenize both with the same tokenizers")
    return train_data, val_data, train_data.vocab


def model_config(run: RunConfig, vocab: Vocab, base: Path | None = None) -> ModelConfig:
    """The decoder's config: the recipe's preset and overrides sized to ``vocab`` (the vocabulary
    size, and the image-place embedding's places and codes when the recipe uses one), or the
    shape of the ``base`` model a fine-tuning run starts from (checked against ``vocab``)."""
    from cm3leon.model.io import load_config

    if base is None:
        over = dict(run.model_overrides)
        if over.get("image_tokens"):  # the image-place embedding follows the data's image tokenizer
            over.update(image_tokens=vocab.image_seq_len, image_vocab=vocab.image_size)
        return ModelConfig.from_name(run.model, vocab_size=vocab.size, **over)
    cfg = load_config(base)
    if (base / "vocab.json").exists():
        base_vocab = from_json_dict(Vocab, load_json(base / "vocab.json"))
        if base_vocab != vocab and (base_vocab.ids is not None or vocab.ids is not None):
            raise ValueError(f"the base model {base} and the SFT shards use different id tables (vocab.json); "
                             f"tokenize the SFT data with the model's own ids: cm3leon data tokenize --model {base} "
                             "--sft ...")
        if base_vocab != vocab:
            raise ValueError(f"the base model {base} was trained with {base_vocab} but the SFT shards use {vocab}; "
                             "tokenize the SFT data with the pretraining tokenizers")
    if cfg.vocab_size != vocab.size:
        raise ValueError(f"the base model {base} has vocab_size={cfg.vocab_size} but the SFT shards' vocabulary has "
                         f"{vocab.size} ids; tokenize the SFT data with the pretraining tokenizers")
    if run.data.seq_len > cfg.max_seq_len:
        raise ValueError(f"data.seq_len={run.data.seq_len} exceeds the base model's max_seq_len={cfg.max_seq_len}")
    return cfg


def run_training(run: RunConfig, out: str | Path, *, base: str | Path | None = None, resume: bool = False,
                 until_step: int | None = None, progress: bool = True,
                 datasets: tuple[Any, Any, Vocab] | None = None, lora: Any = None) -> TrainResult:
    """Train ``run`` (absolute paths) into ``out``; ``base`` is the model directory a fine-tuning
    run starts from (its shape is the model's); ``resume`` continues from ``out``'s newest
    checkpoint. ``datasets`` are :func:`build_datasets`'s result when the caller has them.
    ``lora`` (a :class:`~cm3leon.train.lora.LoraSpec`) trains adapters on the frozen ``base``."""
    base = Path(base) if base is not None else None
    train_data, val_data, vocab = datasets or build_datasets(run)
    cfg = model_config(run, vocab, base)
    # A checkpoint in ``out`` takes precedence over ``base`` when resuming.
    return train(cfg, run.train, train_data, out, vocab=vocab, val_data=val_data, resume=resume, init_from=base,
                 until_step=until_step, progress=progress, lora=lora)
