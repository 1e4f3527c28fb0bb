"""LoRA fine-tuning (Hu et al. 2021) with ``peft``: low-rank adapters on a frozen base.

Each targeted ``nn.Linear`` W (d_out x d_in) gains ``B @ A`` (B: d_out x r, zero-initialised;
A: r x d_in) scaled by ``alpha / r``; only A and B train. Targets are ``nn.Linear`` leaf
names, so one spec serves every decoder family: the paper block's ``qkv, out, fc1, fc2``
and the Chameleon block's ``q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj,
down_proj``. A name the model does not have is mapped to its counterpart in the other
family (``q_proj,k_proj,v_proj`` -> the fused ``qkv``; ``o_proj`` <-> ``out``; ``gate_proj``
/ ``up_proj`` <-> ``fc1``; ``down_proj`` <-> ``fc2``). Groups: ``all-linear`` (every Linear
inside the blocks; the output head only when named), ``attn``, ``mlp``.

On disk an adapter directory holds ``adapter_model.safetensors`` (peft's key names:
``base_model.model.<module>.lora_A.weight``), peft's ``adapter_config.json`` (its
``base_model_name_or_path`` is the base model directory) and the base's ``config.json`` and
``vocab.json``. :func:`merge_adapter` writes ``W + alpha / r * B @ A`` into a copy of the
base model directory that every command loads like any other model.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from cm3leon.config import (
    ConfigError,
    choice_problem,
    int_problem,
    load_json,
    number_problem,
    save_json,
)
from cm3leon.safetensors_io import read_safetensors, reporting_write_errors, write_safetensors

log = logging.getLogger(__name__)

ADAPTER_DIR = "adapter"  # inside a LoRA run's --out
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_NAME = "default"  # peft's adapter name inside the training model
PEFT_PREFIX = "base_model.model."  # peft's key prefix in adapter files (PeftModel wraps the model twice)
BASE_DTYPES = ("auto", "fp32", "bf16")

GROUPS = {
    "attn": ("qkv", "out", "q_proj", "k_proj", "v_proj", "o_proj"),
    "mlp": ("fc1", "fc2", "gate_proj", "up_proj", "down_proj"),
}
# name asked for -> the names that stand for it in the other family
ALIASES = {
    "q_proj": ("qkv",), "k_proj": ("qkv",), "v_proj": ("qkv",), "o_proj": ("out",),
    "gate_proj": ("fc1",), "up_proj": ("fc1",), "down_proj": ("fc2",),
    "qkv": ("q_proj", "k_proj", "v_proj"), "out": ("o_proj",), "fc1": ("gate_proj", "up_proj"), "fc2": ("down_proj",),
}
_FUSED_QKV = ("q_proj", "k_proj", "v_proj")
# Training-run files a merged model directory does not inherit from a base that is a run's --out.
_RUN_FILES = {"model.safetensors", "checkpoints", "metrics.jsonl", "loss.png", "train_config.json", ADAPTER_DIR}


@dataclass(frozen=True)
class LoraSpec:
    """Rank ``r``, scale ``alpha / r``, target Linear names or groups, dropout on the adapter input,
    and the frozen base's dtype (``auto``: bf16 when the run trains in bf16, else float32)."""

    r: int = 16
    alpha: float = 32.0
    targets: tuple[str, ...] = ("all-linear",)
    dropout: float = 0.0
    base_dtype: str = "auto"

    def __post_init__(self) -> None:
        if isinstance(self.targets, (list, str)):
            names = self.targets.split(",") if isinstance(self.targets, str) else self.targets
            object.__setattr__(self, "targets", tuple(n.strip() for n in names if n.strip()))
        problems = [m for m in (
            int_problem("r", self.r, low=1),
            number_problem("alpha", self.alpha, low=0.0, low_open=True),
            number_problem("dropout", self.dropout, low=0.0, high=1.0, high_open=True),
            choice_problem("base_dtype", self.base_dtype, BASE_DTYPES),
            None if self.targets and all(isinstance(t, str) for t in self.targets)
            else f"targets must name at least one Linear module or group (got {self.targets!r})",
        ) if m]
        if problems:
            raise ConfigError("LoRA spec", problems)

    @property
    def scale(self) -> float:
        return self.alpha / self.r

    @classmethod
    def parse(cls, text: str) -> LoraSpec:
        """``r=16,alpha=32,targets=q_proj,k_proj,v_proj,o_proj,dropout=0.05,base=bf16``: a comma
        list of key=value; bare names after ``targets=`` are more targets (``+`` also separates them)."""
        kw: dict[str, Any] = {}
        targets: list[str] = []
        key = None
        for item in (x.strip() for x in text.split(",")):
            if not item:
                continue
            if "=" not in item:
                if key != "targets":
                    raise ValueError(f"--lora {text!r}: {item!r} is not key=value (keys: r, alpha, targets, dropout, "
                                     "base); e.g. --lora r=16,alpha=32,targets=qkv,out")
                targets += item.split("+")
                continue
            key, value = (s.strip() for s in item.split("=", 1))
            if key == "targets":
                targets += [t for t in value.split("+") if t]
            elif key in ("r", "alpha", "dropout"):
                try:
                    kw[key] = int(value) if key == "r" else float(value)
                except ValueError:
                    raise ValueError(f"--lora {text!r}: {key}={value!r} is not a number") from None
            elif key in ("base", "base_dtype"):
                kw["base_dtype"] = value
            else:
                raise ValueError(f"--lora {text!r}: unknown key {key!r} (keys: r, alpha, targets, dropout, base)")
        if targets:
            kw["targets"] = tuple(targets)
        return cls(**kw)

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "targets": list(self.targets)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LoraSpec:
        return cls(**{**d, "targets": tuple(d.get("targets", ("all-linear",)))})


# ---- targets ------------------------------------------------------------------------------

def _block_lists(model: nn.Module) -> list[str]:
    """Names of the model's ModuleLists (its repeated blocks), at any depth."""
    return [n for n, m in model.named_modules() if n and isinstance(m, nn.ModuleList)]


def linear_modules(model: nn.Module) -> dict[str, list[str]]:
    """Leaf name -> full names of the model's ``nn.Linear`` modules (``lm_head`` etc. included)."""
    out: dict[str, list[str]] = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            out.setdefault(name.rsplit(".", 1)[-1], []).append(name)
    return out


def resolve_targets(model: nn.Module, targets: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """The model's Linear leaf names that ``targets`` (names, groups, other-family names) stand for."""
    linears = linear_modules(model)
    blocks = tuple(f"{b}." for b in _block_lists(model))
    in_blocks = sorted(k for k, names in linears.items() if any(n.startswith(blocks) for n in names))
    have = ", ".join(sorted(linears))
    asked = set(targets)
    picked: set[str] = set()
    for t in targets:
        if t == "all-linear":
            picked.update(in_blocks)
        elif t in GROUPS:
            found = [n for n in GROUPS[t] if n in in_blocks]
            if not found:
                raise ValueError(f"LoRA target group {t!r} matches no Linear module of this model (it has: {have})")
            picked.update(found)
        elif t in linears:
            picked.add(t)
        elif any(a in linears for a in ALIASES.get(t, ())):
            if ALIASES[t] == ("qkv",) and not set(_FUSED_QKV) <= asked:
                raise ValueError(f"LoRA target {t!r}: this model projects q, k and v with one fused Linear 'qkv'; "
                                 "target all of q_proj,k_proj,v_proj (or qkv)")
            picked.update(a for a in ALIASES[t] if a in linears)
        else:
            raise ValueError(f"LoRA target {t!r} is no Linear module of this model; it has: {have} "
                             "(groups: all-linear, attn, mlp)")
    return tuple(sorted(picked))


# ---- attaching adapters -------------------------------------------------------------------

def resolve_base_dtype(spec: LoraSpec, bf16_training: bool) -> torch.dtype:
    """The frozen base's dtype: bf16 in a bf16 (autocast) run unless ``base=fp32``, else float32."""
    if spec.base_dtype == "bf16" and not bf16_training:
        raise ValueError("LoRA base=bf16 needs bf16 training: set train.precision=bf16 (--override precision=bf16) "
                         "or drop base=bf16")
    if spec.base_dtype == "bf16" or (spec.base_dtype == "auto" and bf16_training):
        return torch.bfloat16
    return torch.float32


def attach_lora(model: nn.Module, spec: LoraSpec, *, base_dtype: torch.dtype | None = None) -> nn.Module:
    """Inject ``spec``'s adapters into ``model`` in place (peft), freeze every other parameter and
    cast the frozen floating ones to ``base_dtype`` (adapters stay float32). Returns ``model``."""
    from peft import LoraConfig, inject_adapter_in_model

    targets = resolve_targets(model, spec.targets)
    cfg = LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout, target_modules=list(targets),
                     bias="none")
    model = inject_adapter_in_model(cfg, model, adapter_name=ADAPTER_NAME)
    for name, p in model.named_parameters():
        p.requires_grad_(is_adapter_key(name))
        if not p.requires_grad and base_dtype is not None and p.is_floating_point():
            p.data = p.data.to(base_dtype)
    n_layers = sum(1 for n, _ in model.named_parameters() if n.endswith(f"lora_A.{ADAPTER_NAME}.weight"))
    log.info("LoRA r=%d alpha=%g on %s: %d adapted Linear layers, %.3fM trainable of %.2fM parameters",
             spec.r, spec.alpha, ",".join(targets), n_layers, count_trainable(model) / 1e6,
             sum(p.numel() for p in model.parameters()) / 1e6)
    return model


def is_adapter_key(name: str) -> bool:
    """Whether a parameter / state-dict key belongs to a LoRA adapter."""
    return ".lora_A." in name or ".lora_B." in name


def count_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def adapter_file_state(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A training model's adapter tensors (``...qkv.lora_A.default.weight``) under peft's file
    names (``base_model.model....qkv.lora_A.weight``), on the CPU, float32."""
    out = {}
    for k, v in state.items():
        if is_adapter_key(k):
            out[PEFT_PREFIX + k.replace(f".{ADAPTER_NAME}.", ".")] = v.detach().float().contiguous().cpu()
    return out


def load_adapter_state(model: nn.Module, file_state: dict[str, Tensor], *, source: str) -> None:
    """Copy adapter tensors in peft's file names into ``model`` (adapters attached), strictly."""
    own = {k: p for k, p in model.named_parameters() if is_adapter_key(k)}
    got = {k.removeprefix(PEFT_PREFIX).replace(".lora_A.", f".lora_A.{ADAPTER_NAME}.")
           .replace(".lora_B.", f".lora_B.{ADAPTER_NAME}."): v for k, v in file_state.items()}
    missing, unexpected = sorted(set(own) - set(got)), sorted(set(got) - set(own))
    bad = [k for k in set(own) & set(got) if own[k].shape != got[k].shape]
    if missing or unexpected or bad:
        raise ValueError(f"{source} does not fit this model's adapters (missing {missing[:4]}, unexpected "
                         f"{unexpected[:4]}, shape mismatch {bad[:4]}); was it trained with another --lora r / targets "
                         "or another base?")
    with torch.no_grad():
        for k, p in own.items():
            p.copy_(got[k])


# ---- adapter directory ------------------------------------------------------------------

def peft_config_dict(spec: LoraSpec, targets: tuple[str, ...], base_dir: str | Path | None) -> dict[str, Any]:
    """peft's ``adapter_config.json`` for ``spec`` (readable by ``peft.PeftConfig.from_pretrained``)."""
    from peft import LoraConfig

    cfg = LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout, target_modules=list(targets),
                     bias="none", base_model_name_or_path=str(base_dir) if base_dir is not None else None)
    d = cfg.to_dict()
    d["peft_type"] = str(getattr(d["peft_type"], "value", d["peft_type"]))
    d["target_modules"] = sorted(d["target_modules"])
    return {k: (sorted(v) if isinstance(v, set) else v) for k, v in d.items()}


def save_adapter(out_dir: str | Path, file_state: dict[str, Tensor], spec: LoraSpec, targets: tuple[str, ...], *,
                 model_config: Any, vocab: Any = None, base_dir: str | Path | None = None) -> Path:
    """Write an adapter directory: adapter_model.safetensors, adapter_config.json, config.json
    (the base's shape) and vocab.json; each file atomically."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_safetensors(file_state, out / ADAPTER_WEIGHTS, what=f"the LoRA adapter ({ADAPTER_WEIGHTS})",
                      metadata={"format": "pt", "producer": "cm3leon"})
    with reporting_write_errors("the adapter config", out, 16384):
        cfg = peft_config_dict(spec, targets, Path(base_dir).resolve() if base_dir is not None else None)
        save_json(cfg, out / ADAPTER_CONFIG)
        save_json(model_config, out / "config.json")
        if vocab is not None:
            save_json(vocab.to_dict(), out / "vocab.json")
    return out


def read_adapter(adapter_dir: str | Path) -> tuple[LoraSpec, tuple[str, ...], dict[str, Tensor], dict[str, Any]]:
    """(spec, target names, adapter tensors in peft's names, adapter_config.json) of an adapter directory."""
    d = Path(adapter_dir)
    if not (d / ADAPTER_CONFIG).exists():
        raise FileNotFoundError(f"{d} holds no {ADAPTER_CONFIG}; point at the adapter directory of a "
                                f"`cm3leon sft --lora` run (its --out/{ADAPTER_DIR})")
    cfg = load_json(d / ADAPTER_CONFIG)
    if cfg.get("peft_type") != "LORA":
        raise ValueError(f"{d / ADAPTER_CONFIG} is a {cfg.get('peft_type')!r} adapter; only LoRA adapters merge")
    targets = tuple(sorted(cfg["target_modules"]))
    spec = LoraSpec(r=int(cfg["r"]), alpha=float(cfg["lora_alpha"]), targets=targets,
                    dropout=float(cfg.get("lora_dropout") or 0.0))
    if cfg.get("use_rslora") or cfg.get("use_dora") or cfg.get("fan_in_fan_out"):
        raise ValueError(f"{d / ADAPTER_CONFIG} uses rsLoRA / DoRA / fan_in_fan_out, which this merge does not do")
    return spec, targets, read_safetensors(d / ADAPTER_WEIGHTS), cfg


# ---- merging ----------------------------------------------------------------------------

def adapted_modules(adapter: dict[str, Tensor]) -> list[str]:
    """The module names an adapter file adapts (``blocks.0.attn.qkv``...)."""
    return sorted({k.removeprefix(PEFT_PREFIX).rsplit(".lora_", 1)[0] for k in adapter})


def merged_state(base: dict[str, Tensor], adapter: dict[str, Tensor], scale: float, *,
                 partial: bool = False) -> dict[str, Tensor]:
    """``base`` with each adapted weight W replaced by ``W + scale * B @ A`` (computed in float32,
    stored in W's dtype). ``adapter`` holds peft file names; every pair must match a base weight
    (``partial``: base is one shard of the weights, and adapters of weights it lacks are skipped)."""
    out = dict(base)
    for m in adapted_modules(adapter):
        a, b = adapter.get(f"{PEFT_PREFIX}{m}.lora_A.weight"), adapter.get(f"{PEFT_PREFIX}{m}.lora_B.weight")
        w = base.get(f"{m}.weight")
        if w is None and partial:
            continue
        if a is None or b is None or w is None:
            raise ValueError(f"adapter for {m!r} is incomplete or names no base weight {m}.weight")
        if (b.shape[0], a.shape[1]) != tuple(w.shape) or b.shape[1] != a.shape[0]:
            raise ValueError(f"adapter for {m!r}: B {tuple(b.shape)} @ A {tuple(a.shape)} does not fit the base "
                             f"weight {tuple(w.shape)}; was it trained on another base?")
        out[f"{m}.weight"] = (w.float() + scale * (b.float() @ a.float())).to(w.dtype)
    return out


def merge_adapter(adapter_dir: str | Path, out_dir: str | Path, *, base_dir: str | Path | None = None) -> Path:
    """Write a model directory with the adapter merged into the base weights: a copy of the base
    directory (tokenizers, vocab, generation defaults, weights index...; not its training-run
    files) whose weight file(s) hold ``W + alpha / r * B @ A``, one shard in memory at a time.
    ``base_dir`` defaults to the adapter's ``base_model_name_or_path``. The directory appears
    whole (temp + rename) or not at all."""
    from cm3leon.model.io import weight_files

    spec, _, adapter, cfg = read_adapter(adapter_dir)
    base = Path(base_dir or cfg.get("base_model_name_or_path") or "")
    files = weight_files(base) if base.is_dir() else []
    if not files or not all(f.exists() for f in files):
        raise FileNotFoundError(f"the base model {base} holds no model.safetensors; give the base with --base DIR")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} already exists and is not empty; choose a new directory for the merged model")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    skip = _RUN_FILES | {f.name for f in files}
    try:
        with reporting_write_errors(f"the merged model {out.name}", out.parent, sum(f.stat().st_size for f in files)):
            tmp.mkdir()
            for p in base.iterdir():
                if p.name in skip or p.name.startswith("."):
                    continue
                (shutil.copytree if p.is_dir() else shutil.copy2)(p, tmp / p.name)
        done: set[str] = set()
        for f in files:
            shard = read_safetensors(f)
            done |= {m for m in adapted_modules(adapter) if f"{m}.weight" in shard}
            write_safetensors(merged_state(shard, adapter, spec.scale, partial=True), tmp / f.name,
                              what=f"the merged model weights ({f.name})",
                              metadata={"format": "pt", "producer": "cm3leon"})
            del shard
        missing = sorted(set(adapted_modules(adapter)) - done)
        if missing:
            raise ValueError(f"the adapter names weights the base {base} does not have ({missing[:4]}); "
                             "was it trained on another base?")
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("merged %s into %s -> %s", adapter_dir, base, out)
    return out


# ---- the training loop's two calls ------------------------------------------------------

def attach_lora_for_run(model: nn.Module, spec: LoraSpec, train_cfg: Any, ctx: Any, model_config: Any,
                        ckpt: Any = None) -> nn.Module:
    """Attach ``spec``'s adapters to a run's loaded base (bf16 base when the run trains in bf16
    and ``spec`` allows it); on resume, check the checkpoint's spec and load its adapters."""
    bf16 = train_cfg.uses_bf16(ctx.device.type)
    model = attach_lora(model, spec, base_dtype=resolve_base_dtype(spec, bf16))
    if ckpt is not None:
        saved = ckpt.state.get("lora")
        if saved is None:
            raise ValueError(f"checkpoint {ckpt.path} is from a full fine-tuning run; resume it without --lora")
        if LoraSpec.from_dict(saved) != spec:
            raise ValueError(f"checkpoint {ckpt.path} trained adapters with --lora {saved} but this run asks for "
                             f"{spec.to_dict()}; resume with the same --lora")
        from cm3leon.config import to_json_dict
        from cm3leon.train.checkpoint import check_model_compat

        check_model_compat(ckpt, to_json_dict(model_config), ckpt.model)  # the base's shape; adapters below
        load_adapter_state(model, adapter_file_state(ckpt.model), source=str(ckpt.path / "model.safetensors"))
    return model


def save_run_adapter(state: dict[str, Tensor], spec: LoraSpec, model_config: Any, vocab: Any, out: Path, *,
                     base_dir: str | Path | None) -> Path:
    """Write a finished LoRA run's adapter directory ``out/adapter`` from its trainable state."""
    file_state = adapter_file_state(state)
    targets = tuple(sorted({k.removeprefix(PEFT_PREFIX).rsplit(".lora_", 1)[0].rsplit(".", 1)[-1]
                            for k in file_state}))
    return save_adapter(Path(out) / ADAPTER_DIR, file_state, spec, targets, model_config=model_config, vocab=vocab,
                        base_dir=base_dir)
