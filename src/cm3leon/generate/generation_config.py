"""Decoding defaults that travel with a model: ``generation_config.json`` in its directory.

One :class:`TaskDecoding` per task says how that task decodes by default: the
:class:`SamplingConfig` of its token picks (temperature, top-p/top-k, CFG scale, the
instruct-CFG scales of editing, CD-K) plus what the pipeline does around the sampler
(images per prompt, the sample set, CLIP re-ranking, retrieved documents, text length).
The pipeline, the CLI, the server and the evaluation harness read these; an explicit
argument overrides one field. A model directory without the file decodes with
:data:`PAPER_DEFAULTS` (paper §3.1 / §4.1 values where the paper gives one).

The file is flat per task::

    {"text_to_image": {"guidance": 1.5, "temperature": 0.5, "top_p": 1.0, "samples": 16,
                       "mode": "top_p", "rerank": true, "retrieve": 0}, "edit": {...}, ...}

Fields a task leaves out keep the paper defaults.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cm3leon.config import atomic_write_text, load_json
from cm3leon.generate.logits import IMAGE_SAMPLE_MODES, SamplingConfig

GENERATION_CONFIG = "generation_config.json"
TASKS = ("text_to_image", "caption", "vqa", "edit", "control", "grounding")
_SAMPLING_FIELDS = tuple(f.name for f in dataclasses.fields(SamplingConfig) if f.name != "seed")
_TASK_FIELDS = ("samples", "mode", "rerank", "retrieve", "max_new_tokens", "jacobi_window")


@dataclass(frozen=True)
class TaskDecoding:
    """How one task decodes by default.

    - ``sampling``: the token picks (its ``seed`` is set per call, not stored).
    - ``samples``: images per prompt (image tasks).
    - ``mode``: the text-to-image sample set: ``top_p`` (CFG + nucleus), ``cd_k`` (CD-K) or
      ``mix`` (half each, paper §3.1); ``sampling.cd_k`` / ``cd_alpha`` are CD-K's settings.
    - ``rerank``: order each prompt's samples by CLIP score (needs an encoder in the model
      directory; ignored when it has none).
    - ``retrieve``: retrieved documents prepended to the prompt (0, 1 or 2, paper §3.2).
    - ``max_new_tokens``: length limit of text answers.
    - ``jacobi_window``: draft tokens of speculative Jacobi decoding for text-to-image
      (:mod:`cm3leon.generate.jacobi`: same greedy tokens, same sampling distribution);
      0 = sequential decoding.
    """

    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    samples: int = 1
    mode: str = "top_p"
    rerank: bool = False
    retrieve: int = 0
    max_new_tokens: int = 64
    jacobi_window: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.samples, int) or self.samples < 1:
            raise ValueError(f"samples must be a whole number >= 1, got {self.samples!r}")
        if self.mode not in IMAGE_SAMPLE_MODES:
            raise ValueError(f"mode must be one of {IMAGE_SAMPLE_MODES}, got {self.mode!r}")
        if self.retrieve not in (0, 1, 2):
            raise ValueError(f"retrieve must be 0, 1 or 2 documents (paper §3.2), got {self.retrieve!r}")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a whole number >= 1, got {self.max_new_tokens!r}")
        if not isinstance(self.jacobi_window, int) or isinstance(self.jacobi_window, bool) or self.jacobi_window < 0:
            raise ValueError(f"jacobi_window must be a whole number >= 0 (0 = sequential), got {self.jacobi_window!r}")

    def replace(self, **overrides: Any) -> TaskDecoding:
        """A copy with the given fields changed (sampling fields by name too); ``None`` keeps a field."""
        given = {k: v for k, v in overrides.items() if v is not None}
        unknown = set(given) - set(_SAMPLING_FIELDS) - set(_TASK_FIELDS) - {"seed"}
        if unknown:
            raise ValueError(f"unknown decoding settings {sorted(unknown)}; "
                             f"known: {sorted((*_SAMPLING_FIELDS, *_TASK_FIELDS, 'seed'))}")
        sampling = {k: v for k, v in given.items() if k in _SAMPLING_FIELDS or k == "seed"}
        own = {k: v for k, v in given.items() if k in _TASK_FIELDS}
        return dataclasses.replace(self, sampling=dataclasses.replace(self.sampling, **sampling), **own)

    def to_dict(self) -> dict[str, Any]:
        s = self.sampling
        return {**{k: getattr(s, k) for k in _SAMPLING_FIELDS}, **{k: getattr(self, k) for k in _TASK_FIELDS}}

    @classmethod
    def from_dict(cls, d: dict[str, Any], base: TaskDecoding | None = None, *, where: str = "task") -> TaskDecoding:
        """Fields of ``d`` over ``base`` (default: plain defaults); unknown keys are refused."""
        if not isinstance(d, dict):
            raise ValueError(f"{where}: expected an object of decoding settings, got {type(d).__name__}")
        unknown = set(d) - set(_SAMPLING_FIELDS) - set(_TASK_FIELDS)
        if unknown:
            raise ValueError(f"{where}: unknown decoding settings {sorted(unknown)}; "
                             f"known: {sorted((*_SAMPLING_FIELDS, *_TASK_FIELDS))}")
        base = base or cls()
        try:
            sampling = dataclasses.replace(base.sampling, **{k: v for k, v in d.items() if k in _SAMPLING_FIELDS})
            return dataclasses.replace(base, sampling=sampling, **{k: v for k, v in d.items() if k in _TASK_FIELDS})
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}: {e}") from None


@dataclass(frozen=True)
class GenerationConfig:
    """The decoding defaults of every task of one model."""

    text_to_image: TaskDecoding = field(default_factory=TaskDecoding)
    caption: TaskDecoding = field(default_factory=lambda: TaskDecoding(SamplingConfig(greedy=True)))
    vqa: TaskDecoding = field(default_factory=lambda: TaskDecoding(SamplingConfig(greedy=True), max_new_tokens=16))
    edit: TaskDecoding = field(default_factory=TaskDecoding)
    control: TaskDecoding = field(default_factory=TaskDecoding)
    grounding: TaskDecoding = field(default_factory=TaskDecoding)

    def task(self, name: str) -> TaskDecoding:
        """The defaults of task ``name`` (one of :data:`TASKS`)."""
        if name not in TASKS:
            raise ValueError(f"unknown task {name!r}; choose one of {TASKS}")
        return getattr(self, name)

    def to_dict(self) -> dict[str, Any]:
        return {t: self.task(t).to_dict() for t in TASKS}

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, where: str = GENERATION_CONFIG) -> GenerationConfig:
        """Tasks of ``d`` over the paper defaults; unknown tasks or settings are refused."""
        if not isinstance(d, dict):
            raise ValueError(f"{where}: expected an object with one entry per task, got {type(d).__name__}")
        unknown = set(d) - set(TASKS)
        if unknown:
            raise ValueError(f"{where}: unknown tasks {sorted(unknown)}; known: {list(TASKS)}")
        base = cls()
        return cls(**{t: TaskDecoding.from_dict(d[t], base.task(t), where=f"{where}: {t}") if t in d else base.task(t)
                      for t in TASKS})

    def save(self, model_dir: str | Path) -> Path:
        """Write ``model_dir/generation_config.json`` atomically."""
        path = Path(model_dir) / GENERATION_CONFIG
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, model_dir: str | Path) -> GenerationConfig:
        """The model directory's defaults, or :data:`PAPER_DEFAULTS` when it has no file."""
        path = Path(model_dir) / GENERATION_CONFIG
        if not path.exists():
            return PAPER_DEFAULTS
        return cls.from_dict(load_json(path), where=str(path))


# Paper-like defaults (SamplingConfig's): CFG 3, temperature 1, top-p 0.9, edits 1.5 / 7.5,
# greedy text. They suit large models; small models store their own measured values.
PAPER_DEFAULTS = GenerationConfig()
