"""Pure logits processors and the sampling config (paper §3.1).

Every processor maps ``logits: Float[B, V]`` (plus its own arguments) to a NEW tensor of
the same shape; none mutates its input. They compose in the order the decoder applies
them::

    mask_disallowed -> repetition_penalty / no_repeat_ngram (text) -> temperature -> top_k -> top_p

Disallowed ids are set to ``-inf``; every processor keeps at least one finite entry per
row as long as its input had one, so sampling never sees an all ``-inf`` row.

Sampling itself (:func:`sample`) is sync-free: it draws with the exponential-race form
of the Gumbel-max trick (``argmax(p / E)``, ``E ~ Exp(1)``) from an explicit
``torch.Generator``, so the same seed gives the same tokens without any ``.item()``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from cm3leon.vocab import Vocab

NEG_INF = float("-inf")

# Image sample sets (paper §3.1): CFG + top-p, CD-K, or half of each ("mix").
IMAGE_SAMPLE_MODES = ("top_p", "cd_k", "mix")


@dataclass(frozen=True)
class SamplingConfig:
    """How to pick the next token (paper §3.1, §4.1).

    Defaults are paper-like; where the paper gives no number the choice is ours and
    says so.

    - ``temperature``: softmax temperature (paper pairs temperature with CFG). 1.0.
    - ``top_p``: nucleus mass; ``1.0`` disables it. 0.9 (our choice; the paper pairs
      top-p with CFG but gives no value).
    - ``top_k``: keep the k most likely ids; ``None`` disables it.
    - ``greedy``: take the arg-max instead of sampling (temperature/top-k/top-p are then
      irrelevant and not validated against ``greedy``).
    - ``guidance``: CFG scale ``alpha_c`` of Eq. 2; 1.0 = plain conditional, 0.0 = plain
      unconditional. 3.0 (the value the paper reports for its single-CFG decoding, §4).
    - ``image_guidance`` / ``text_guidance``: instruct-CFG scales for editing (paper 1.5
      and 7.5, §4).
    - ``cd_k``: if set, decode with CD-K (Eq. 3) using the k-th largest conditional
      probability; ``cd_alpha`` is its ``alpha``. 0.1 (our choice, the default of Li et al.
      2022's contrastive decoding; the paper gives no value). Temperature divides the
      CD-K score before sampling; top-k/top-p do not apply (the candidate set is the
      truncation).
    - ``repetition_penalty`` (CTRL form, > 1 discourages repeats) and ``no_repeat_ngram``
      (0 = off) apply to text output only.
    - ``seed``: seeds the ``torch.Generator`` of a generate call.
    """

    temperature: float = 1.0
    top_p: float = 0.9
    top_k: int | None = None
    greedy: bool = False
    guidance: float = 3.0
    image_guidance: float = 1.5
    text_guidance: float = 7.5
    cd_k: int | None = None
    cd_alpha: float = 0.1
    repetition_penalty: float = 1.0
    no_repeat_ngram: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("temperature", "top_p", "guidance", "image_guidance", "text_guidance", "cd_alpha",
                     "repetition_penalty"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"SamplingConfig.{name} must be a finite number, got {v!r}")
        if not self.greedy and self.temperature <= 0:
            raise ValueError(
                f"SamplingConfig.temperature must be > 0, got {self.temperature}; "
                "for arg-max decoding set greedy=True instead of temperature=0"
            )
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"SamplingConfig.top_p must be in (0, 1] (1.0 disables it), got {self.top_p}")
        if self.top_k is not None and self.top_k <= 0:
            raise ValueError(f"SamplingConfig.top_k must be a positive int or None, got {self.top_k}")
        if self.cd_k is not None and self.cd_k <= 0:
            raise ValueError(f"SamplingConfig.cd_k must be a positive int or None (CD-K off), got {self.cd_k}")
        if not 0.0 < self.cd_alpha <= 1.0:
            raise ValueError(f"SamplingConfig.cd_alpha must be in (0, 1], got {self.cd_alpha}")
        if self.repetition_penalty <= 0:
            raise ValueError(
                f"SamplingConfig.repetition_penalty must be > 0 (1.0 = off), got {self.repetition_penalty}"
            )
        if self.no_repeat_ngram < 0:
            raise ValueError(f"SamplingConfig.no_repeat_ngram must be >= 0 (0 = off), got {self.no_repeat_ngram}")


# ---- modality masks ---------------------------------------------------------------------
def image_allowed(vocab: Vocab, device: torch.device | str | None = None) -> torch.Tensor:
    """Bool[V]: ids allowed inside an image segment (image ids only, paper §2.1)."""
    return vocab.image_mask(device)


def text_allowed(vocab: Vocab, device: torch.device | str | None = None) -> torch.Tensor:
    """Bool[V]: ids allowed in text output: text ids plus the terminators ``<eos>``/``<break>``."""
    return vocab.text_mask(device, with_terminators=True)


def mask_disallowed(logits: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Set logits of ids where ``allowed`` (Bool[V] or Bool[B, V]) is False to ``-inf``."""
    if allowed.shape[-1] != logits.shape[-1]:
        raise ValueError(f"allowed mask has {allowed.shape[-1]} ids but logits have {logits.shape[-1]}")
    return logits.masked_fill(~allowed, NEG_INF)


# ---- shaping --------------------------------------------------------------------------
def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Divide logits by ``temperature`` (> 0); 1.0 returns an unchanged copy."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return logits / temperature


def top_k_filter(logits: torch.Tensor, k: int | None) -> torch.Tensor:
    """Keep the ``k`` largest logits per row (ties at the k-th value are kept); None = off."""
    if k is None or k >= logits.shape[-1]:
        return logits.clone()
    if k <= 0:
        raise ValueError(f"top-k needs k > 0, got {k}")
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # [B, 1]
    return logits.masked_fill(logits < kth, NEG_INF)


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter: keep the smallest top set whose probability mass reaches ``p``.

    The most likely id is always kept, so a row never becomes all ``-inf``; ids tied with
    the last id of the set are kept as well. ``p == 1`` returns an unchanged copy.
    """
    if not 0.0 < p <= 1.0:
        raise ValueError(f"top-p must be in (0, 1], got {p}")
    if p >= 1.0:
        return logits.clone()
    sorted_logits, _ = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs  # mass strictly above each sorted id
    n_keep = (mass_before < p).sum(-1, keepdim=True).clamp_min(1)  # the best id: mass_before 0 < p
    threshold = sorted_logits.gather(-1, n_keep - 1)  # logit of the last id in the nucleus
    # Compare against the threshold logit instead of scattering the sorted mask back (cheaper);
    # ids tied with the last nucleus id are kept too.
    return logits.masked_fill(logits < threshold, NEG_INF)


def repetition_penalty(
    logits: torch.Tensor, prev_ids: torch.Tensor, penalty: float, *, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """CTRL repetition penalty: for ids in ``prev_ids[B, T]`` divide positive logits by
    ``penalty`` and multiply negative ones by it. ``valid[B, T]`` (False on padding)
    excludes positions; ``penalty == 1`` is a no-op copy."""
    if penalty <= 0:
        raise ValueError(f"repetition penalty must be > 0, got {penalty}")
    if penalty == 1.0 or prev_ids.numel() == 0:
        return logits.clone()
    src = torch.ones_like(prev_ids, dtype=torch.bool) if valid is None else valid.to(torch.bool)
    seen = _scatter_or(torch.zeros_like(logits, dtype=torch.bool), prev_ids, src)
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def _scatter_or(seen: torch.Tensor, idx: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """``seen[b, idx[b, t]] |= src[b, t]`` without in-place writes to the input."""
    counts = torch.zeros(seen.shape, dtype=torch.int32, device=seen.device)
    counts = counts.scatter_add(-1, idx, src.to(torch.int32))
    return seen | (counts > 0)


def no_repeat_ngram(logits: torch.Tensor, prev_ids: list[list[int]], n: int) -> torch.Tensor:
    """Ban every id that would complete an ``n``-gram already present in its row's
    ``prev_ids`` (host lists: this processor syncs, use it for text only)."""
    if n < 0:
        raise ValueError(f"no_repeat_ngram needs n >= 0, got {n}")
    if n == 0:
        return logits.clone()
    if len(prev_ids) != logits.shape[0]:
        raise ValueError(f"got {len(prev_ids)} histories for {logits.shape[0]} logit rows")
    banned = torch.zeros_like(logits, dtype=torch.bool)
    for b, seq in enumerate(prev_ids):
        if len(seq) < n:
            continue
        prefix = tuple(seq[len(seq) - n + 1 :]) if n > 1 else ()
        ids = [seq[i + n - 1] for i in range(len(seq) - n + 1) if tuple(seq[i : i + n - 1]) == prefix]
        if ids:
            banned[b, ids] = True
    return logits.masked_fill(banned, NEG_INF)


def process(logits: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """Temperature, top-k, then top-p, as configured (greedy: unchanged copy)."""
    if cfg.greedy:
        return logits.clone()
    out = apply_temperature(logits, cfg.temperature)
    out = top_k_filter(out, cfg.top_k)
    return top_p_filter(out, cfg.top_p)


# ---- picking ------------------------------------------------------------------------
def sample(logits: torch.Tensor, generator: torch.Generator | None, *, greedy: bool = False) -> torch.Tensor:
    """Pick one id per row of ``logits[B, V]`` -> Long[B]; sync-free.

    Sampling draws ``argmax(softmax(logits) / E)`` with ``E ~ Exp(1)`` from ``generator``
    (equivalent to sampling from the softmax); ``greedy`` takes the arg-max.
    """
    if greedy:
        return torch.argmax(logits, dim=-1)
    probs = torch.softmax(logits.float(), dim=-1)
    # E = -log(U), U ~ Uniform[0, 1): an Exp(1) draw (a few times faster than exponential_ on CPU).
    # U < 1 keeps E > 0 (no 0/0 = NaN on masked ids, which argmax would pick); clamping U keeps E finite.
    u = torch.rand(probs.shape, generator=generator, device=probs.device, dtype=probs.dtype)
    race = u.clamp_min_(torch.finfo(probs.dtype).tiny).log_().neg_()
    return torch.argmax(probs / race, dim=-1)
