"""Self-guidance from one model: CFG, instruct-CFG and CD-K (paper §3.1, §4.1).

The decoder runs S streams per sample in ONE batch, stream-major
(``[cond; uncond]`` for CFG, ``[full; image_only; none]`` for instruct-CFG), and this
module turns the S rows of logits of each sample into the scores of its next token.
The token picked from those scores is then fed to every stream of that sample.

- CFG (Eq. 2): ``uncond + a * (cond - uncond)``, mixed on raw logits (a per-row shift
  of either stream, e.g. a log-softmax, gives the same distribution), then the modality
  mask is applied to the mix (masking first would make ``-inf - -inf`` NaN; since the
  mask is the same for both streams the result is identical). It is computed as
  ``torch.lerp(uncond, cond, a)``, which is exact at ``a = 0`` and ``a = 1``, so scale 1
  reproduces plain conditional decoding token for token.
- Instruct-CFG (InstructPix2Pix form, paper §4: image 1.5, text 7.5):
  ``l_none + s_img * (l_img - l_none) + s_txt * (l_full - l_img)``.
- CD-K (Eq. 3): candidates ``{t : p_cond(t) >= alpha * (k-th largest p_cond)}``, score
  ``log p_cond - log p_uncond`` on them and ``-inf`` elsewhere. Both probabilities are
  taken over the allowed ids only (modality mask first, then log-softmax). Temperature
  divides the score; top-k/top-p do not apply.

The unconditional stream of a text-to-image prompt ``<eos> caption <break>`` is
``<eos> <mask:0> <break>`` (DESIGN.md: a whole masked text segment is a normal CM3
training sequence): see :func:`unconditional_prompt`. A model with its own id table
(Chameleon) has no sentinels: its unconditional stream is the prompt with the text left
out, ``<s> <begin-image>``, as in Chameleon's own inference code.
"""

from __future__ import annotations

import torch

from cm3leon.generate.logits import NEG_INF, SamplingConfig, mask_disallowed, process
from cm3leon.vocab import Kind, Vocab


# ---- mixing ---------------------------------------------------------------------------
def cfg_mix(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance, paper Eq. 2: ``uncond + scale * (cond - uncond)``."""
    return torch.lerp(uncond, cond, float(scale))


def instruct_cfg_mix(
    full: torch.Tensor, image_only: torch.Tensor, none: torch.Tensor, *, image_scale: float, text_scale: float
) -> torch.Tensor:
    """Two-scale guidance for editing: ``none + s_img (image_only - none) + s_txt (full - image_only)``.

    Written as two lerps so that ``s_img = s_txt = 1`` gives ``full`` exactly.
    """
    return torch.lerp(image_only, full, float(text_scale)) + (
        torch.lerp(none, image_only, float(image_scale)) - image_only
    )


def cdk_candidates(cond_logits: torch.Tensor, k: int, alpha: float) -> torch.Tensor:
    """Bool[B, V]: CD-K candidate set (Eq. 3) from conditional logits (``-inf`` = disallowed).

    ``k`` is clamped to the number of allowed ids of a row, so the set is never empty.
    """
    if k <= 0 or not 0.0 < alpha <= 1.0:
        raise ValueError(f"CD-K needs k > 0 and alpha in (0, 1], got k={k}, alpha={alpha}")
    probs = torch.softmax(cond_logits.float(), dim=-1)
    allowed = torch.isfinite(cond_logits)
    k_eff = min(k, cond_logits.shape[-1])
    top = torch.topk(probs, k_eff, dim=-1).values  # [B, k_eff], descending
    n_allowed = allowed.sum(-1, keepdim=True).clamp_min(1)  # [B, 1]
    kth = top.gather(-1, (torch.clamp(n_allowed, max=k_eff) - 1))  # k-th largest among allowed
    return (probs >= alpha * kth) & allowed


def cdk_scores(cond_logits: torch.Tensor, uncond_logits: torch.Tensor, k: int, alpha: float) -> torch.Tensor:
    """CD-K score (Eq. 3): ``log p_cond - log p_uncond`` on the candidate set, ``-inf`` elsewhere.

    Inputs are logits that already carry the modality mask (``-inf`` on disallowed ids,
    the same ids in both).
    """
    logp_c = torch.log_softmax(cond_logits.float(), dim=-1)
    logp_u = torch.log_softmax(uncond_logits.float(), dim=-1)
    keep = cdk_candidates(cond_logits, k, alpha)
    return torch.where(keep, logp_c - logp_u, torch.full_like(logp_c, NEG_INF))


# ---- one decoding step ------------------------------------------------------------------
def next_token_scores(
    stream_logits: torch.Tensor,
    allowed: torch.Tensor,
    cfg: SamplingConfig,
    *,
    cd_rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """Scores to sample the next token from, Float[B, V], given ``stream_logits[S, B, V]``.

    S = 1: plain decoding; S = 2: ``[cond, uncond]`` with CFG (``cfg.guidance``) or, on
    rows where ``cd_rows`` (Bool[B]; default: all rows iff ``cfg.cd_k`` is set) is True,
    CD-K with ``cfg.cd_k``/``cfg.cd_alpha``; S = 3: ``[full, image_only, none]`` with
    instruct-CFG. ``allowed`` (Bool[V] or Bool[B, V]) is the modality mask. Temperature,
    top-k and top-p (``cfg``) are applied to the guided logits; CD-K scores are divided by
    the temperature only. The result can go straight to :func:`logits.sample`.
    """
    if stream_logits.dim() != 3:
        raise ValueError(f"stream_logits must be [S, B, V], got shape {tuple(stream_logits.shape)}")
    n_streams = stream_logits.shape[0]
    if n_streams == 1:
        return process(mask_disallowed(stream_logits[0], allowed), cfg)
    if n_streams == 3:
        if cfg.cd_k is not None or cd_rows is not None:
            raise ValueError("CD-K is defined for two streams (cond, uncond); instruct-CFG uses three")
        mixed = instruct_cfg_mix(
            stream_logits[0], stream_logits[1], stream_logits[2],
            image_scale=cfg.image_guidance, text_scale=cfg.text_guidance,
        )
        return process(mask_disallowed(mixed, allowed), cfg)
    if n_streams != 2:
        raise ValueError(f"expected 1, 2 or 3 streams, got {n_streams}")

    cond, uncond = stream_logits[0], stream_logits[1]
    if cd_rows is None and cfg.cd_k is None:
        return process(mask_disallowed(cfg_mix(cond, uncond, cfg.guidance), allowed), cfg)
    if cfg.cd_k is None:
        raise ValueError("cd_rows given but SamplingConfig.cd_k is None; set cd_k to use CD-K")
    cd = cdk_scores(mask_disallowed(cond, allowed), mask_disallowed(uncond, allowed), cfg.cd_k, cfg.cd_alpha)
    if not cfg.greedy:
        cd = cd / cfg.temperature
    if cd_rows is None:
        return cd
    guided = process(mask_disallowed(cfg_mix(cond, uncond, cfg.guidance), allowed), cfg)
    return torch.where(cd_rows[:, None], cd, guided.to(cd.dtype))


# ---- stream construction ---------------------------------------------------------------
def unconditional_prompt(
    ids: list[int], vocab: Vocab, *, mask_images: bool = False, query_only: bool = True
) -> list[int]:
    """The unconditional stream of a prompt: each text segment replaced by one sentinel.

    ``<eos> caption <break>`` becomes ``<eos> <mask:0> <break>``. Several masked segments
    get ``<mask:0>``, ``<mask:1>``, ... in order, as CM3 numbers masked spans. With
    ``mask_images`` image segments are masked too (the "neither" stream of
    instruct-CFG). With ``query_only`` (default) only the last document (after the last
    ``<eos>``) is masked, so retrieved documents stay in both streams (DESIGN.md).
    """
    if not ids:
        raise ValueError("empty prompt: a prompt needs at least '<eos> ... <break>'")
    if vocab.ids is not None:
        return _dropped_prompt(ids, vocab, mask_images=mask_images, query_only=query_only)
    start = 0
    if query_only and vocab.eos_id in ids:
        start = len(ids) - 1 - ids[::-1].index(vocab.eos_id)
    out = list(ids[:start])
    n_masked = 0
    to_mask = {Kind.TEXT, Kind.IMAGE} if mask_images else {Kind.TEXT}
    for kind, run in vocab.split_segments(ids[start:]):
        if kind in to_mask:
            out.append(vocab.mask_id(n_masked))
            n_masked += 1
        else:
            out.extend(run)
    return out


def _dropped_prompt(ids: list[int], vocab: Vocab, *, mask_images: bool, query_only: bool) -> list[int]:
    """:func:`unconditional_prompt` for an id-table vocabulary: text runs are left out (images too,
    with their markers, if ``mask_images``); the markers of kept images and a trailing
    begin-image stay."""
    start = 0
    if query_only and vocab.eos_id in ids:
        start = len(ids) - 1 - ids[::-1].index(vocab.eos_id)
    out = list(ids[:start])
    end_image = vocab.end_image_id
    skip_close = False
    for kind, run in vocab.split_segments(ids[start:]):
        if kind is Kind.TEXT:
            continue
        if kind is Kind.IMAGE and mask_images:
            if out and out[-1] == vocab.break_id:
                out.pop()  # the image's begin marker
            skip_close = True
            continue
        if skip_close and run == [end_image]:
            skip_close = False
            continue
        out.extend(run)
    return out
