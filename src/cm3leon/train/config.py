"""Training configuration: :class:`TrainConfig` and the whole-run :class:`RunConfig`.

A run config holds the model preset, the optimizer/schedule/batch/parallelism settings
and the data paths; the named ones (*recipes*) are in :mod:`cm3leon.train.recipes`. Data
paths are relative to a *workspace* directory (the folder that holds the tokenized
shards, e.g. the quickstart's output folder) and are resolved by
:meth:`RunConfig.resolve_paths`.

Paper defaults (Table 3 / Table 4, OPT recipe): AdamW betas (0.9, 0.95), eps 1e-8,
weight decay 0.1 on weight matrices only, gradient clipping 1.0, linear warmup then
linear decay to 10% of the peak learning rate.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cm3leon.config import MODEL_PRESETS, from_json_dict

DECAYS = ("linear", "cosine", "constant")
PRECISIONS = ("auto", "fp32", "bf16")
STRATEGIES = ("none", "ddp", "fsdp2")
DEVICES = ("auto", "cpu", "cuda")
DATA_KINDS = ("pretrain", "sft")


@dataclass(frozen=True)
class BatchPlan:
    """How one optimizer step's global batch is split: ``global_batch = micro * grad_accum * world``."""

    global_batch: int  # sequences per optimizer step, all ranks together
    micro_batch: int  # sequences per forward/backward on one rank
    grad_accum: int  # forward/backward passes per rank per optimizer step
    world_size: int
    seq_len: int

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch * self.seq_len

    @property
    def per_rank(self) -> int:
        return self.micro_batch * self.grad_accum


@dataclass(frozen=True)
class TrainConfig:
    """Optimizer, schedule, batch, logging, checkpointing and parallelism of one run.

    Batch size is given either in sequences (``batch_size``) or in tokens
    (``global_batch_tokens``, rounded up to whole sequences); ``micro_batch_size`` is the
    per-device forward size (default: the whole per-rank share, i.e. no accumulation).
    """

    steps: int = 1000
    batch_size: int | None = 8
    global_batch_tokens: int | None = None
    micro_batch_size: int | None = None
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    decay: str = "linear"
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0  # 0 disables clipping (the norm is still logged)
    seed: int = 0
    log_every: int = 10
    eval_every: int = 0  # 0: evaluate only at the end
    eval_batches: int = 8
    eval_batch_size: int | None = None  # default: micro_batch
    ckpt_every: int = 500  # 0: only at exit
    keep_last: int = 2
    precision: str = "auto"  # auto = bf16 autocast on CUDA, fp32 on CPU
    device: str = "auto"
    compile: bool = False
    activation_checkpointing: bool = False
    dist: str = "none"  # none | ddp | fsdp2
    num_workers: int = 0
    unigram_samples: int = 256  # training sequences read for the image-token unigram baseline

    def __post_init__(self) -> None:
        if isinstance(self.betas, list):
            object.__setattr__(self, "betas", tuple(self.betas))
        problems = []
        if self.steps <= 0:
            problems.append(f"steps must be positive (got {self.steps})")
        if (self.batch_size is None) == (self.global_batch_tokens is None):
            problems.append(
                "give exactly one of batch_size (sequences) and global_batch_tokens "
                f"(got batch_size={self.batch_size}, global_batch_tokens={self.global_batch_tokens})"
            )
        for name in ("batch_size", "global_batch_tokens", "micro_batch_size", "eval_batch_size"):
            v = getattr(self, name)
            if v is not None and v <= 0:
                problems.append(f"{name} must be positive (got {v})")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            problems.append(f"lr must be a positive finite number (got {self.lr})")
        if not 0 <= self.min_lr_ratio <= 1:
            problems.append(f"min_lr_ratio must be in [0, 1] (got {self.min_lr_ratio})")
        if self.warmup_steps < 0:
            problems.append(f"warmup_steps must be >= 0 (got {self.warmup_steps})")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            problems.append(f"betas must be two numbers in [0, 1) (got {self.betas})")
        for name in ("eps", "weight_decay", "grad_clip"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must be >= 0 (got {getattr(self, name)})")
        for name in ("log_every", "eval_batches", "keep_last"):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be positive (got {getattr(self, name)})")
        for name in ("eval_every", "ckpt_every", "num_workers", "unigram_samples"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must be >= 0 (got {getattr(self, name)})")
        for name, allowed in (
            ("decay", DECAYS), ("precision", PRECISIONS), ("dist", STRATEGIES), ("device", DEVICES)
        ):
            if getattr(self, name) not in allowed:
                problems.append(f"{name} must be one of {list(allowed)} (got {getattr(self, name)!r})")
        if problems:
            raise ValueError("invalid TrainConfig: " + "; ".join(problems))

    def lr_at(self, step: int) -> float:
        """Learning rate for optimizer step ``step`` (0-based): linear warmup, then decay to ``min_lr``."""
        if self.warmup_steps and step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        min_lr = self.lr * self.min_lr_ratio
        if self.decay == "constant":
            return self.lr
        span = max(1, self.steps - self.warmup_steps)
        t = min(1.0, (step - self.warmup_steps) / span)
        if self.decay == "linear":
            return self.lr - (self.lr - min_lr) * t
        return min_lr + 0.5 * (self.lr - min_lr) * (1 + math.cos(math.pi * t))

    def batch_plan(self, seq_len: int, world_size: int = 1) -> BatchPlan:
        """Resolve the global batch, micro batch and accumulation for ``seq_len`` and ``world_size``."""
        if seq_len <= 0 or world_size <= 0:
            raise ValueError(f"seq_len and world_size must be positive (got {seq_len}, {world_size})")
        if self.batch_size is not None:
            global_batch = self.batch_size
        else:
            global_batch = -(-self.global_batch_tokens // seq_len)  # type: ignore[operator]
        if global_batch % world_size:
            raise ValueError(
                f"the global batch of {global_batch} sequences does not split over {world_size} ranks; "
                f"use a batch size divisible by {world_size}"
            )
        per_rank = global_batch // world_size
        micro = self.micro_batch_size or per_rank
        if per_rank % micro:
            raise ValueError(
                f"each of the {world_size} ranks gets {per_rank} sequences per step, which is not a "
                f"multiple of micro_batch_size={micro}; choose micro_batch_size dividing {per_rank}"
            )
        return BatchPlan(global_batch, micro, per_rank // micro, world_size, seq_len)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        return from_json_dict(cls, d)


@dataclass(frozen=True)
class DataConfig:
    """Where a run's data is. Relative paths resolve against the workspace directory.

    ``train``/``val`` are tokenized shard directories (``cm3leon data tokenize``);
    ``kind`` picks the dataset class (``pretrain``: retrieval-augmented CM3 examples,
    ``sft``: the task mixture). ``options`` go to the dataset constructor unchanged.
    """

    train: str
    val: str | None = None
    kind: str = "pretrain"
    seq_len: int = 512
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in DATA_KINDS:
            raise ValueError(f"data.kind must be one of {list(DATA_KINDS)} (got {self.kind!r})")
        if self.seq_len <= 0:
            raise ValueError(f"data.seq_len must be positive (got {self.seq_len})")


@dataclass(frozen=True)
class RunConfig:
    """A complete run: model preset (+ overrides), training settings and data.

    ``init_from`` names a model directory to start from (SFT starts from a pretrained
    model); ``None`` trains from scratch.
    """

    name: str
    model: str
    train: TrainConfig
    data: DataConfig
    model_overrides: dict[str, Any] = field(default_factory=dict)
    init_from: str | None = None

    def __post_init__(self) -> None:
        if self.model not in MODEL_PRESETS:
            raise ValueError(f"unknown model preset {self.model!r}; choose one of {sorted(MODEL_PRESETS)}")

    # ---- JSON ------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "model": self.model,
            "model_overrides": dict(self.model_overrides),
            "init_from": self.init_from,
            "train": self.train.to_dict(),
            "data": dataclasses.asdict(self.data),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        """Build from a dict, refusing unknown fields at every level with a clear message."""
        known = {"name", "model", "model_overrides", "init_from", "train", "data"}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"run config: unknown fields {sorted(unknown)} (known: {sorted(known)})")
        for req in ("name", "model", "train", "data"):
            if req not in d:
                raise ValueError(f"run config: missing field {req!r}")
        return cls(
            name=d["name"],
            model=d["model"],
            model_overrides=dict(d.get("model_overrides") or {}),
            init_from=d.get("init_from"),
            train=TrainConfig.from_dict(d["train"]),
            data=from_json_dict(DataConfig, d["data"]),
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json_file(cls, path: str | Path) -> RunConfig:
        from cm3leon.config import load_json

        return cls.from_dict(load_json(path))

    # ---- edits -----------------------------------------------------------------------
    def with_overrides(self, overrides: list[str]) -> RunConfig:
        """Apply ``key=value`` edits: ``train.lr=1e-4``, ``lr=1e-4`` (train fields may drop the
        prefix), ``data.train=DIR``, ``model=shapes``, ``model_overrides.d_model=128``.
        Values are parsed as JSON when possible, else kept as strings."""
        d = self.to_dict()
        train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
        for item in overrides:
            if "=" not in item:
                raise ValueError(f"override {item!r} must look like key=value (e.g. train.lr=1e-4)")
            key, raw = item.split("=", 1)
            try:
                value = json.loads(raw)
            except json.JSONDecodeError:
                value = raw
            parts = key.strip().split(".")
            if len(parts) == 1 and parts[0] in train_fields:
                parts = ["train", parts[0]]
            target = d
            for p in parts[:-1]:
                if p not in target or not isinstance(target[p], dict):
                    raise ValueError(f"override {key!r}: {p!r} is not a config section")
                target = target[p]
            leaf = parts[-1]
            if target is not d.get("model_overrides") and target is not d["data"].get("options"):
                if leaf not in target:
                    raise ValueError(f"override {key!r}: unknown field {leaf!r} (known: {sorted(target)})")
            target[leaf] = value
        return RunConfig.from_dict(d)

    def resolve_paths(self, workspace: str | Path) -> RunConfig:
        """Return a copy whose relative data/init paths are made absolute against ``workspace``."""
        ws = Path(workspace)

        def res(p: str | None) -> str | None:
            if p is None:
                return None
            return str(Path(p) if Path(p).is_absolute() else (ws / p).resolve())

        data = dataclasses.replace(self.data, train=res(self.data.train), val=res(self.data.val))
        return dataclasses.replace(self, data=data, init_from=res(self.init_from))
