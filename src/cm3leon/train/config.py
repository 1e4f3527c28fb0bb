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

from cm3leon.config import (
    MODEL_PRESETS,
    ConfigError,
    ModelConfig,
    bool_problem,
    choice_problem,
    from_json_dict,
    int_problem,
    json_type,
    number_problem,
    str_problem,
)

DECAYS = ("linear", "cosine", "constant")
PRECISIONS = ("auto", "fp32", "bf16")
STRATEGIES = ("none", "ddp", "fsdp2")
DEVICES = ("auto", "cpu", "cuda")
DATA_KINDS = ("pretrain", "sft")


def _betas_problem(betas: Any) -> str | None:
    ok = isinstance(betas, tuple) and len(betas) == 2 and all(
        number_problem("beta", b, low=0.0, high=1.0, high_open=True) is None for b in betas)
    return None if ok else f"betas must be two numbers in [0, 1) (got {betas!r})"


def _run_problems(name: Any, model: Any, overrides: Any, init_from: Any) -> list[str]:
    """The run-level fields: name, model preset, model_overrides (field names and value types), init_from."""
    problems = [m for m in (str_problem("name", name), str_problem("init_from", init_from, optional=True)) if m]
    if not isinstance(model, str) or model not in MODEL_PRESETS:
        problems.append(f"unknown model preset {model!r}; choose one of {sorted(MODEL_PRESETS)}")
    if not isinstance(overrides, dict):
        problems.append(f"model_overrides must be an object of ModelConfig fields (got {json_type(overrides)})")
        return problems
    known = {f.name for f in dataclasses.fields(ModelConfig)} - {"vocab_size"}
    unknown = sorted(set(overrides) - known, key=str)
    if "vocab_size" in overrides:
        problems.append("model_overrides.vocab_size cannot be set: it is the data's vocabulary size")
        unknown.remove("vocab_size")
    if unknown:
        problems.append(f"model_overrides: unknown fields {unknown} (known: {sorted(known)})")
    problems += [f"model_overrides.{m}" for m in ModelConfig.field_problems(overrides)]
    return problems


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
    precision: str = "auto"  # auto = bf16 autocast on CUDA and on CPUs with native bf16 matmul, else fp32
    device: str = "auto"
    compile: bool = False
    activation_checkpointing: bool = False
    dist: str = "none"  # none | ddp | fsdp2
    num_workers: int = 0
    unigram_samples: int = 256  # training sequences read for the image-token unigram baseline

    def __post_init__(self) -> None:
        if isinstance(self.betas, list):
            object.__setattr__(self, "betas", tuple(self.betas))
        problems = [m for m in (
            int_problem("steps", self.steps, low=1),
            int_problem("batch_size", self.batch_size, low=1, optional=True),
            int_problem("global_batch_tokens", self.global_batch_tokens, low=1, optional=True),
            int_problem("micro_batch_size", self.micro_batch_size, low=1, optional=True),
            number_problem("lr", self.lr, low=0.0, low_open=True)
            and f"lr must be a positive finite number (got {self.lr!r})",
            number_problem("min_lr_ratio", self.min_lr_ratio, low=0.0, high=1.0),
            int_problem("warmup_steps", self.warmup_steps, low=0),
            choice_problem("decay", self.decay, DECAYS),
            _betas_problem(self.betas),
            number_problem("eps", self.eps, low=0.0),
            number_problem("weight_decay", self.weight_decay, low=0.0),
            number_problem("grad_clip", self.grad_clip, low=0.0),
            int_problem("seed", self.seed, low=0, high=2**32 - 1),
            int_problem("log_every", self.log_every, low=1),
            int_problem("eval_every", self.eval_every, low=0),
            int_problem("eval_batches", self.eval_batches, low=1),
            int_problem("eval_batch_size", self.eval_batch_size, low=1, optional=True),
            int_problem("ckpt_every", self.ckpt_every, low=0),
            int_problem("keep_last", self.keep_last, low=1),
            choice_problem("precision", self.precision, PRECISIONS),
            choice_problem("device", self.device, DEVICES),
            bool_problem("compile", self.compile),
            bool_problem("activation_checkpointing", self.activation_checkpointing),
            choice_problem("dist", self.dist, STRATEGIES),
            int_problem("num_workers", self.num_workers, low=0),
            int_problem("unigram_samples", self.unigram_samples, low=0),
        ) if m]
        if (self.batch_size is None) == (self.global_batch_tokens is None):
            problems.append(
                "give exactly one of batch_size (sequences) and global_batch_tokens "
                f"(got batch_size={self.batch_size}, global_batch_tokens={self.global_batch_tokens})"
            )
        if problems:
            raise ConfigError("TrainConfig", problems)

    def uses_bf16(self, device_type: str) -> bool:
        """Whether the run trains under bf16 autocast on ``device_type``: ``precision`` bf16, or
        ``auto`` on CUDA or on a CPU with native bf16 matrix products (AVX512-BF16 or AMX), where
        the quickstart's training steps run 1.4-1.8x faster than in fp32 (benchmarks/
        bench_train_step.py); other CPUs emulate bf16 and stay in fp32."""
        if self.precision != "auto":
            return self.precision == "bf16"
        if device_type == "cuda":
            return True
        return device_type == "cpu" and cpu_has_bf16_matmul()

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
class LRTail:
    """The decay of an extended run: re-planned at step ``start`` from the learning rate the run
    had there (``start_lr``, so no jump and no second warmup) to ``end_lr`` at step ``end``,
    with the run's ``decay`` shape (``constant`` stays at ``start_lr``)."""

    start: int
    start_lr: float
    end: int
    end_lr: float
    decay: str

    def lr_at(self, step: int) -> float:
        """Learning rate for optimizer step ``step`` (0-based; ``start`` <= step)."""
        if self.decay == "constant":
            return self.start_lr
        t = min(1.0, max(0.0, (step - self.start) / max(1, self.end - self.start)))
        if self.decay == "linear":
            return self.start_lr - (self.start_lr - self.end_lr) * t
        return self.end_lr + 0.5 * (self.start_lr - self.end_lr) * (1 + math.cos(math.pi * t))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LRTail:
        return from_json_dict(cls, d)


@dataclass(frozen=True)
class LRSchedule:
    """A run's learning rate per step: ``cfg``'s warmup and decay, then ``tail`` from its start
    step when the run was extended past the end it was planned for."""

    cfg: TrainConfig
    tail: LRTail | None = None

    def lr_at(self, step: int) -> float:
        """Learning rate for optimizer step ``step`` (0-based)."""
        if self.tail is not None and step >= self.tail.start:
            return self.tail.lr_at(step)
        return self.cfg.lr_at(step)

    @property
    def end(self) -> int:
        """The step the schedule is planned to end at."""
        return self.tail.end if self.tail is not None else self.cfg.steps

    def extended_to(self, cfg: TrainConfig, step: int) -> LRSchedule:
        """The schedule of a run resumed at ``step`` with ``cfg``: this one while ``cfg.steps`` is
        not past its end; past it, a :class:`LRTail` from this schedule's rate at ``step`` down to
        ``cfg``'s final rate (``lr * min_lr_ratio``) at ``cfg.steps`` (a run that had finished
        its decay goes on at its final rate: a constant tail)."""
        if cfg.steps <= self.end:
            return self
        tail = LRTail(start=step, start_lr=self.lr_at(step), end=cfg.steps, end_lr=cfg.lr * cfg.min_lr_ratio,
                      decay=cfg.decay)
        return LRSchedule(self.cfg, tail)


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
        problems = [m for m in (
            str_problem("data.train", self.train),
            str_problem("data.val", self.val, optional=True),
            choice_problem("data.kind", self.kind, DATA_KINDS),
            int_problem("data.seq_len", self.seq_len, low=1),
            None if isinstance(self.options, dict)
            else f"data.options must be an object of dataset options (got {self.options!r})",
        ) if m]
        if problems:
            raise ConfigError("DataConfig", problems)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DataConfig:
        return from_json_dict(cls, d)


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
        problems = _run_problems(self.name, self.model, self.model_overrides, self.init_from)
        if problems:
            raise ConfigError("run config", problems)

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
        # every problem of every section in one error
        problems = _run_problems(d["name"], d["model"], d.get("model_overrides") or {}, d.get("init_from"))
        parts: dict[str, Any] = {}
        for section, build in (("train", TrainConfig.from_dict), ("data", DataConfig.from_dict)):
            try:
                parts[section] = build(d[section])
            except ConfigError as e:
                problems += [m if m.startswith(f"{section}.") else f"{section}.{m}" for m in e.problems]
            except ValueError as e:
                problems.append(f"{section}: {e}")
        if problems:
            raise ConfigError("run config", problems)
        return cls(
            name=d["name"],
            model=d["model"],
            model_overrides=dict(d.get("model_overrides") or {}),
            init_from=d.get("init_from"),
            train=parts["train"],
            data=parts["data"],
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


def cpu_has_bf16_matmul() -> bool:
    """True on an x86 CPU with AVX512-BF16 or AMX tiles."""
    import torch

    cpu = torch.cpu
    return any(bool(getattr(cpu, name, lambda: False)()) for name in ("_is_avx512_bf16_supported",
                                                                        "_is_amx_tile_supported"))
