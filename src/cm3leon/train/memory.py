"""Training memory plan: weights, gradients, AdamW state and activations per micro-batch, per rank.

Estimates for full fine-tuning and LoRA, with and without activation checkpointing, for
either decoder family (the paper's OPT-style block, the Chameleon block). Assumptions:

- full fine-tuning keeps float32 parameters and gradients (bf16 autocast computes in bf16);
  LoRA keeps the frozen base in its dtype (bf16 in a bf16 run) and float32 adapters;
- AdamW holds two float32 moments per trained parameter;
- FSDP2 divides weights, gradients and optimizer state by the world size (DDP does not);
- activations are what autograd saves for the backward pass (2 bytes each in bf16, 4 in
  float32), with a fused-attention kernel (no T x T scores), each norm saving its input
  (and its normalised output when its scale trains), rotary positions saving nothing; a
  frozen Linear saves no input unless an adapter or another op needs it (``saved``
  matches the bytes autograd saves within 3 % in the tests; a LoRA run whose first block's
  attention has no adapter saves less there, as nothing below it trains);
- the output head: the float32 log-softmax the cross-entropy saves, and, short-lived, the
  bf16 logits with their float32 copy (forward) or the float32 gradients of the
  log-probabilities and the logits (backward), whichever is larger;
- activation checkpointing saves each block's input and recomputes one block at a time.

Allocator fragmentation, the CUDA context (~0.5 GB) and communication buffers are not counted.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

from torch import nn

log = logging.getLogger(__name__)

GB = 1e9


@dataclass(frozen=True)
class ModelShape:
    """The sizes a memory plan needs; :meth:`from_config` reads them from a ``ModelConfig``."""

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    ffn_dim: int
    max_seq_len: int = 4096
    family: str = "cm3leon"  # cm3leon (OPT-style paper block) | chameleon
    kv_heads: int | None = None
    activation: str = "relu"
    image_tokens: int = 0
    image_axial: bool = False

    @classmethod
    def from_config(cls, cfg: Any) -> ModelShape:
        """The shape of a :class:`~cm3leon.config.ModelConfig` (either family)."""
        family = getattr(cfg, "family", "cm3leon")
        return cls(vocab_size=cfg.vocab_size, d_model=cfg.d_model, n_layers=cfg.n_layers, n_heads=cfg.n_heads,
                   ffn_dim=cfg.ffn_dim, max_seq_len=cfg.max_seq_len, family=family,
                   kv_heads=getattr(cfg, "kv_heads", cfg.n_heads), activation=cfg.activation,
                   image_tokens=cfg.image_tokens, image_axial=cfg.image_axial)

    @classmethod
    def chameleon_7b(cls) -> ModelShape:
        """Chameleon-7B / Anole-7B / Lumina-mGPT-7B (transformers' default ``ChameleonConfig``)."""
        return cls(vocab_size=65536, d_model=4096, n_layers=32, n_heads=32, ffn_dim=11008, family="chameleon",
                   kv_heads=32, activation="silu")

    @property
    def kv_dim(self) -> int:
        return (self.kv_heads or self.n_heads) * (self.d_model // self.n_heads)

    def block_linears(self) -> dict[str, tuple[int, int]]:
        """Leaf name -> (in, out) features of one block's Linear layers."""
        d, f, kv = self.d_model, self.ffn_dim, self.kv_dim
        if self.family == "chameleon":
            return {"q_proj": (d, d), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (d, d),
                    "gate_proj": (d, f), "up_proj": (d, f), "down_proj": (f, d)}
        return {"qkv": (d, 3 * d), "out": (d, d), "fc1": (d, f), "fc2": (f, d)}

    def n_params(self) -> int:
        """Number of parameters of the decoder of this shape."""
        d, V = self.d_model, self.vocab_size
        per_block = sum(i * o for i, o in self.block_linears().values())
        n = 2 * V * d  # token table + untied output head
        if self.family == "chameleon":
            per_block += 2 * d + 2 * d + 2 * self.kv_dim  # two RMSNorm scales, q/k head norms (scale + bias)
            n += d  # final RMSNorm
        else:
            n += self.max_seq_len * d + self.image_tokens * d
            if self.image_axial:
                n += 2 * math.isqrt(self.image_tokens) * d
        return n + self.n_layers * per_block

    def skeleton(self) -> nn.Module:
        """A meta-device module with this shape's Linear names (for LoRA target resolution)."""
        block = nn.ModuleDict({k: nn.Linear(i, o, bias=False, device="meta") for k, (i, o) in
                               self.block_linears().items()})
        m = nn.Module()
        m.blocks = nn.ModuleList([block])
        m.lm_head = nn.Linear(self.d_model, self.vocab_size, bias=False, device="meta")
        return m


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes per rank of one training setup; ``activations`` are per micro-batch: ``saved`` (what
    autograd keeps for the backward pass) plus the logits' short-lived copies."""

    mode: str  # full | lora
    activation_checkpointing: bool
    params: int
    trainable: int
    weights: float
    gradients: float
    optimizer: float
    activations: float
    saved: float

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations

    @property
    def label(self) -> str:
        return ("LoRA" if self.mode == "lora" else "full SFT") + (" + act. ckpt" if self.activation_checkpointing
                                                                  else "")


def _lora_targets(shape: ModelShape, lora: Any) -> dict[str, tuple[int, int]]:
    from cm3leon.train.lora import resolve_targets

    names = resolve_targets(shape.skeleton(), lora.targets)
    lin = {**shape.block_linears(), "lm_head": (shape.d_model, shape.vocab_size)}
    return {n: lin[n] for n in names}


def lora_params(shape: ModelShape, lora: Any) -> int:
    """Number of adapter parameters ``lora`` adds to a model of ``shape``."""
    targets = _lora_targets(shape, lora)
    return sum((1 if n == "lm_head" else shape.n_layers) * lora.r * (i + o) for n, (i, o) in targets.items())


def _block_activations(shape: ModelShape, trains: set[str], act: int, *, norms_train: bool,
                       lora: Any = None) -> float:
    """Bytes autograd saves for one block per token."""
    d, f, kv = shape.d_model, shape.ffn_dim, shape.kv_dim
    if shape.family == "chameleon":
        n = d + d + kv + (d + 2 * kv + d) + d + 3 * f  # ln1 in, q/k norm in, SDPA q k v out, ln2 in, SwiGLU
        n += d if trains & {"q_proj", "k_proj", "v_proj"} else 0  # ln1 out (the projections' input)
        n += d if trains & {"gate_proj", "up_proj"} else 0  # ln2 out
        n += 2 * d + d + kv if norms_train else 0  # the normalised values the four norms' scales multiply
        n += f if "down_proj" in trains else 0  # silu(gate) * up
    else:
        n = d + 3 * d + d + d + f  # ln1 in, SDPA q k v, SDPA out, ln2 in, activation out (relu) / in (gelu)
        n += d if "qkv" in trains else 0
        n += d if "fc1" in trains else 0
        n += f if shape.activation != "relu" and "fc2" in trains else 0
    b = n * act
    if lora is not None:  # A's output per target; with dropout a second input copy and its mask
        lin = shape.block_linears()
        for t in trains & set(lin):
            b += lora.r * act + (lin[t][0] * (act + 1) if lora.dropout > 0 else 0)
    return b


def memory_plan(shape: ModelShape, *, seq_len: int, micro_batch: int, lora: Any = None,
                activation_checkpointing: bool = False, bf16: bool = True, world_size: int = 1,
                fsdp: bool = False) -> MemoryPlan:
    """The per-rank memory of training a ``shape`` model on ``micro_batch`` x ``seq_len`` tokens:
    full fine-tuning (``lora`` None) or LoRA (a :class:`~cm3leon.train.lora.LoraSpec`)."""
    act = 2 if bf16 else 4
    n = shape.n_params()
    shard = world_size if fsdp else 1
    tokens = seq_len * micro_batch
    if lora is None:
        trainable = n
        trains = set(shape.block_linears()) | {"lm_head"}
        weights = 4 * n
    else:
        trainable = lora_params(shape, lora)
        trains = set(_lora_targets(shape, lora))
        base_bytes = 2 if bf16 and lora.base_dtype != "fp32" else 4
        weights = base_bytes * n + 4 * trainable
    block = _block_activations(shape, trains, act, norms_train=lora is None, lora=lora) * tokens
    # ln_f in (+ out for the head's weight, + the normalised values its scale multiplies), log-softmax
    head_n = 1 + ("lm_head" in trains) + (lora is None and shape.family == "chameleon")
    head_saved = (shape.d_model * act * head_n + shape.vocab_size * 4) * tokens
    # Short-lived: the logits and their float32 copy (forward), or the float32 gradients of the
    # log-probabilities and of the logits (backward), whichever is larger.
    logits = shape.vocab_size * max(act + (4 if act != 4 else 0), 8) * tokens
    if activation_checkpointing:
        saved = shape.n_layers * shape.d_model * act * tokens + head_saved
        acts = saved + block + logits  # one block recomputed at a time
    else:
        saved = shape.n_layers * block + head_saved
        acts = saved + logits
    return MemoryPlan("lora" if lora is not None else "full", activation_checkpointing, n, trainable,
                      weights / shard, 4 * trainable / shard, 8 * trainable / shard, acts, saved)


def memory_table(shape: ModelShape, *, seq_len: int, micro_batch: int, lora: Any, bf16: bool = True,
                 world_size: int = 1, fsdp: bool = False, mark: tuple[str, bool] | None = None) -> str:
    """A text table (GB per rank, MB for models under 1 GB) of full SFT vs LoRA, without and with
    activation checkpointing; ``mark=(mode, checkpointing)`` flags one row with ``*``."""
    rows = [memory_plan(shape, seq_len=seq_len, micro_batch=micro_batch, lora=lo, activation_checkpointing=ac,
                        bf16=bf16, world_size=world_size, fsdp=fsdp)
            for lo in (None, lora) for ac in (False, True)]
    unit, div = ("GB", GB) if max(p.total for p in rows) >= GB else ("MB", 1e6)
    lines = [f"{unit:24s} {'weights':>8s} {'grads':>8s} {'AdamW':>8s} {'activ.':>8s} {'total':>8s}  trainable"]
    for p in rows:
        star = "*" if mark == (p.mode, p.activation_checkpointing) else " "
        lines.append(f"{star}{p.label:23s} {p.weights / div:8.2f} {p.gradients / div:8.2f} {p.optimizer / div:8.2f} "
                     f"{p.activations / div:8.2f} {p.total / div:8.2f}  {p.trainable / 1e6:,.2f}M")
    return "\n".join(lines)


def log_memory_plan(model_config: Any, *, seq_len: int, micro_batch: int, train_cfg: Any, world_size: int,
                    lora: Any = None, device_type: str = "cpu") -> str:
    """Log (and return) the memory plan table of a run, its own row marked."""
    from cm3leon.train.lora import LoraSpec

    bf16 = train_cfg.uses_bf16(device_type)
    shape = ModelShape.from_config(model_config)
    fsdp = train_cfg.dist == "fsdp2" and world_size > 1
    table = memory_table(shape, seq_len=seq_len, micro_batch=micro_batch, lora=lora or LoraSpec(), bf16=bf16,
                         world_size=world_size, fsdp=fsdp, mark=("lora" if lora else "full",
                                                                 train_cfg.activation_checkpointing))
    log.info("memory plan per rank (micro-batch %d x %d tokens, %s, %d rank(s)%s; * = this run; "
             "docs/sft.md#memory-plan):\n%s", micro_batch, seq_len, "bf16" if bf16 else "fp32", world_size,
             ", FSDP2" if fsdp else "", table)
    return table
