"""Build one model directory (the layout of :mod:`cm3leon.pipeline`) from separately trained parts.

:func:`check_parts` names every part that is missing or does not fit the decoder (its
vocabulary against the text tokenizer's ids, the image tokenizer's tokens per image and
codes; a retrieval memory against its index); :func:`assemble_model_dir` checks, copies the
parts into a temporary folder, loads the result with :meth:`CM3Leon.from_pretrained` and only
then moves it into place.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from cm3leon.config import load_json
from cm3leon.generate.generation_config import GENERATION_CONFIG, GenerationConfig
from cm3leon.model.io import load_config
from cm3leon.vocab import Vocab


class PartsError(ValueError):
    """Parts that cannot make one model directory; the message lists every problem."""


@dataclass(frozen=True)
class ModelParts:
    """Where each trained part lives. ``retriever``: an encoder directory (``encoder.json`` or a
    Hugging Face CLIP folder), or a folder laid out like a model directory's ``retrieval/``
    (``encoder/``, optionally ``bank/`` + ``memory/``)."""

    text_tokenizer: Path
    image_tokenizer: Path
    model: Path
    retriever: Path | None = None
    reranker: Path | None = None
    generation_config: Path | None = None


def _is_encoder_dir(d: Path) -> bool:
    if (d / "encoder.json").is_file():
        return True
    try:
        return "clip" in json.loads((d / "config.json").read_text()).get("model_type", "")
    except (OSError, ValueError, AttributeError):
        return False


def retrieval_dirs(retriever: Path) -> tuple[Path, Path | None, Path | None]:
    """``(encoder, bank, memory)`` directories of a ``--retriever`` folder (bank / memory None when absent)."""
    if _is_encoder_dir(retriever):
        return retriever, None, None
    bank, memory = retriever / "bank", retriever / "memory"
    return retriever / "encoder", bank if bank.is_dir() else None, memory if memory.is_dir() else None


def _missing(d: Path, files: tuple[str, ...]) -> list[str]:
    return [f for f in files if not (d / f).exists()]


def check_parts(parts: ModelParts) -> list[str]:
    """Every problem that keeps ``parts`` from making a working model directory (empty: none)."""
    problems: list[str] = []
    need = {"model": (parts.model, ("config.json", "model.safetensors", "vocab.json")),
            "text tokenizer": (parts.text_tokenizer, ("tokenizer.json",)),
            "image tokenizer": (parts.image_tokenizer, ("config.json", "model.safetensors"))}
    ok = {}
    for what, (d, files) in need.items():
        if not d.is_dir():
            problems.append(f"{what}: {d} is not a directory")
        elif _missing(d, files):
            problems.append(f"{what}: {d} has no {', '.join(_missing(d, files))}")
        else:
            ok[what] = d
    vocab = None
    if "model" in ok:
        try:
            vocab = Vocab.from_dict(load_json(parts.model / "vocab.json"))
            cfg = load_config(parts.model)
            if cfg.vocab_size != vocab.size:
                problems.append(f"model: config.json has vocab_size {cfg.vocab_size} but its vocab.json {vocab.size}")
        except (OSError, ValueError, KeyError, TypeError) as e:
            problems.append(f"model: {parts.model} cannot be read ({' '.join(str(e).split())})")
            vocab = None
    if vocab is not None and "text tokenizer" in ok:
        try:
            from cm3leon.tokenize.text_bpe import TextTokenizer

            n = TextTokenizer.load(parts.text_tokenizer).vocab_size
            if n > vocab.text_size:
                problems.append(f"text tokenizer: {parts.text_tokenizer} has {n} ids but the model's vocabulary only "
                                f"{vocab.text_size} text ids (train the model on this tokenizer's shards)")
        except (OSError, ValueError, KeyError) as e:
            problems.append(f"text tokenizer: {parts.text_tokenizer} cannot be read ({' '.join(str(e).split())})")
    if vocab is not None and "image tokenizer" in ok:
        try:
            from cm3leon.tokenize.image_vq import load_vq_config

            vq = load_vq_config(parts.image_tokenizer / "config.json")
            tokens = vq.tokens_per_image
            if (tokens, vq.codebook_size) != (vocab.image_seq_len, vocab.image_size):
                problems.append(f"image tokenizer: {parts.image_tokenizer} makes {tokens} tokens per image from "
                                f"{vq.codebook_size} codes but the model expects {vocab.image_seq_len} from "
                                f"{vocab.image_size}")
        except (OSError, ValueError, KeyError) as e:
            problems.append(f"image tokenizer: {parts.image_tokenizer} cannot be read ({' '.join(str(e).split())})")
    for what, d in (("retriever", parts.retriever), ("reranker", parts.reranker)):
        if d is None:
            continue
        if not d.is_dir():
            problems.append(f"{what}: {d} is not a directory")
            continue
        enc, bank, memory = retrieval_dirs(d) if what == "retriever" else (d, None, None)
        if not _is_encoder_dir(enc):
            problems.append(f"{what}: {d} holds no encoder (encoder.json, a CLIP config.json, or encoder/)")
        if (bank is None) != (memory is None):
            problems.append(f"retriever: {d} has {'bank/' if bank else 'memory/'} without "
                            f"{'memory/' if bank else 'bank/'}; give both or neither")
        elif bank is not None and memory is not None:
            problems.extend(_check_memory(bank, memory, vocab))
    if parts.generation_config is not None:
        try:
            GenerationConfig.from_dict(load_json(parts.generation_config), where=str(parts.generation_config))
        except (OSError, ValueError, KeyError, TypeError) as e:
            problems.append(f"generation config: {' '.join(str(e).split())}")
    return problems


def _check_memory(bank: Path, memory: Path, vocab: Vocab | None) -> list[str]:
    try:
        n_bank = int(load_json(bank / "meta.json")["n"])
        man = load_json(memory / "manifest.json")
        n_mem = int(man.get("n_docs", man.get("n", -1)))
    except (OSError, ValueError, KeyError, TypeError) as e:
        return [f"retriever: {bank} / {memory} cannot be read ({' '.join(str(e).split())})"]
    out = []
    if n_mem >= 0 and n_mem != n_bank:
        out.append(f"retriever: memory/ holds {n_mem} documents but bank/ {n_bank}; they come from different builds")
    if vocab is not None and "vocab" in man and Vocab.from_dict(man["vocab"]) != vocab:
        out.append("retriever: memory/ was tokenized with another vocabulary than the model's")
    return out


def assemble_model_dir(parts: ModelParts, out: str | Path, *, overwrite: bool = False) -> Path:
    """Check ``parts`` (:class:`PartsError` listing every problem), copy them into ``out`` in the
    one model-directory layout and load it once; ``out`` is replaced only when that succeeds."""
    from cm3leon.pipeline import CM3Leon

    problems = check_parts(parts)
    if problems:
        raise PartsError(f"cannot assemble a model directory: {'; '.join(problems)}")
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; choose another --out or pass --overwrite")
    tmp = out.with_name(out.name + ".assembling")
    if tmp.exists():
        shutil.rmtree(tmp)
    enc = bank = memory = None
    if parts.retriever is not None:
        enc, bank, memory = retrieval_dirs(parts.retriever)
    gen = (GenerationConfig.from_dict(load_json(parts.generation_config), where=GENERATION_CONFIG)
           if parts.generation_config else None)
    try:
        CM3Leon.assemble(tmp, model_dir=parts.model, text_tokenizer_dir=parts.text_tokenizer,
                         image_tokenizer_dir=parts.image_tokenizer, encoder_dir=enc, bank_dir=bank, memory_dir=memory,
                         reranker_dir=parts.reranker, generation_config=gen)
        CM3Leon.from_pretrained(tmp)  # the parts load together, or nothing is replaced
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out
