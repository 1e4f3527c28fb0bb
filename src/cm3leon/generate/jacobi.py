"""Speculative Jacobi decoding (SJD) of image segments (Teng et al. 2024, arXiv 2410.01699).

Sequential decoding runs one forward of every stream per image token. SJD keeps a window
of ``W`` draft tokens per sample row and, in each iteration, runs ONE forward of
``[last accepted token, W drafts]`` for all streams of the batch on the KV cache. That
gives the guided distribution ``p_j`` (the exact one of sequential decoding: CFG /
instruct-CFG / CD-K, modality mask, temperature, top-k, top-p, all from
:func:`guidance.next_token_scores`) at the W + 1 window places, each conditioned on the
tokens fed before it. Drafts are then accepted left to right:

- draft ``d_j`` was drawn from ``q_j``, the distribution of place j computed in the
  previous iteration; places no iteration reached yet draw from the row's newest ``p``
  (that of the last window place: any distribution fixed before the draw keeps the test
  exact, and on images of large uniform regions the last place predicts the next ones far
  better than the paper's uniform initialisation, also available);
  it is accepted with probability ``min(1, p_j(d_j) / q_j(d_j))``;
- at the first rejection the token is drawn from the residual ``norm(max(0, p_j - q_j))``;
  this is the speculative-sampling test (Leviathan et al. 2023, Chen et al. 2023), so
  every accepted token is distributed exactly as sequential sampling would draw it;
- the places after it get new drafts drawn from the fresh ``p`` of this iteration (which
  become their ``q``).

Each iteration accepts at least one token per row. Greedy decoding (``cfg.greedy``)
uses point masses: a draft is accepted iff it is the arg-max of ``p_j``, a rejection
takes that arg-max, so the output is token for token sequential greedy decoding.

Batches: rows accept different numbers of tokens. The static cache has one write slot
for the whole batch (``KVCache.slot``), so the batch keeps the tokens accepted by EVERY
row (the minimum) in the cache and rolls the rest back (:func:`rollback`: the slots are
hidden by the key mask and overwritten by the next window, positions and places in the
image are reset); a row that accepted more carries its lead as already-accepted tokens at
the head of its next window, where they are fed again and not re-tested. The batch thus
needs about as many iterations as its slowest row. The cache after decoding holds, on
its valid slots, what sequential decoding of the same tokens holds.

Randomness: the same seed gives the same tokens, but not the tokens of sequential
sampling with that seed (the draws are used differently); the distribution is the same.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from cm3leon.generate.guidance import next_token_scores
from cm3leon.generate.logits import SamplingConfig
from cm3leon.model.kv_cache import KVCache, prefill
from cm3leon.model.transformer import Transformer, additive_mask


@dataclass
class JacobiResult:
    """Output of :func:`jacobi_decode`: ``tokens`` Long[B, n_new] (ids of the head window, i.e.
    ``unified id - lo``), ``forwards`` (model calls, the prefill included), and the ``cache``."""

    tokens: Tensor
    forwards: int
    cache: KVCache


def window_forward(model: Transformer, ids: Tensor, cache: KVCache, head_window: tuple[int, int] | None) -> Tensor:
    """Feed ``ids`` Long[B, K] at the next K slots of an eager cache -> logits Float[B, K, V or hi - lo].

    Token t of the window attends over the row's valid history and window tokens 0..t
    (causal), at position ``cache.pos + t``; fed tokens are image ids (their places in the
    image continue ``cache.image_idx``). The cache counts all K slots as written until
    :func:`rollback` keeps a prefix of them.
    """
    if cache.static:
        raise ValueError("speculative Jacobi decoding runs on an eager KV cache (static=False)")
    B, K = ids.shape
    if B != cache.batch:
        raise ValueError(f"ids must have {cache.batch} rows, got {B}")
    s = cache._written
    if s + K > cache.max_len:
        raise ValueError(f"a window of {K} tokens at slot {s} overflows the KV cache (max_len={cache.max_len})")
    cache.valid[:, s : s + K] = True
    q_slot = s + torch.arange(K, device=ids.device)
    causal = torch.arange(s + K, device=ids.device)[None, :] <= q_slot[:, None]  # (K, s + K)
    allowed = cache.valid[:, None, None, : s + K] & causal  # (B, 1, K, s + K)
    attn_mask = additive_mask(allowed, K, s + K, cache.k)
    offsets = torch.arange(K, device=ids.device)
    positions = cache.pos[:, None] + offsets  # (B, K)
    place = None
    if model.cfg.image_tokens:
        place = (cache.image_idx[:, None] + 1 + offsets) % model.cfg.image_tokens  # (B, K)
    logits = model.forward_cached(ids, positions, kv=cache.layers(), slots=s, attn_mask=attn_mask,
                                  head_window=head_window, image_idx=place)
    cache._written = s + K
    cache.slot.fill_(s + K)
    return logits  # (B, K, V or hi - lo)


def rollback(cache: KVCache, window: int, keep: int, *, image_tokens: int = 0) -> None:
    """Keep the first ``keep`` of the last ``window`` slots written by :func:`window_forward`.

    The other slots are hidden from attention (and overwritten by the next window); each
    row's next position, next slot and place in its image become what sequential decoding
    of the kept tokens leaves (``image_tokens``: the model's ``cfg.image_tokens``).
    """
    if not 0 <= keep <= window <= cache._written:
        raise ValueError(f"cannot keep {keep} of a {window}-slot window with {cache._written} slots written")
    s = cache._written - window
    cache.valid[:, s + keep : s + window] = False
    cache.pos.add_(keep)
    if image_tokens and keep:
        cache.image_idx.copy_((cache.image_idx + keep) % image_tokens)
    cache._written = s + keep
    cache.slot.fill_(s + keep)


def _draw(probs: Tensor, gen: torch.Generator) -> Tensor:
    """One id per distribution ``probs[..., V]`` (exponential race, as :func:`logits.sample`)."""
    u = torch.rand(probs.shape, generator=gen, device=probs.device, dtype=probs.dtype)
    race = u.clamp_min_(torch.finfo(probs.dtype).tiny).log_().neg_()
    return torch.argmax(probs / race, dim=-1)


def jacobi_decode(
    model: Transformer,
    ids: Tensor,
    valid: Tensor,
    cfg: SamplingConfig,
    *,
    n_streams: int,
    n_new: int,
    window: int,
    allowed: Tensor,
    head_window: tuple[int, int],
    generator: torch.Generator,
    cd_rows: Tensor | None = None,
    callback: Callable[[int, Tensor], None] | None = None,
    callback_every: int = 64,
    unreached: str = "last",
) -> JacobiResult:
    """Decode ``n_new`` image tokens per sample row with a window of ``window`` drafts.

    ``ids``/``valid`` Long/Bool[S * B, T]: the left-padded prompts of the S streams
    (stream-major, as :func:`decode.decode_streams` lays them out). ``allowed`` Bool[V_w]
    is the modality mask inside ``head_window = (lo, hi)`` (V_w = hi - lo ids, the ids the
    LM head computes); returned tokens are in ``[0, V_w)`` (add ``lo`` for unified ids).
    ``callback(n, tokens + lo)`` sees the tokens every row has accepted, about every
    ``callback_every`` tokens and at the end. ``unreached``: what the drafts of places that no
    window reached yet are drawn from: ``"last"`` (default) the newest ``p`` of the row (the
    last window place; after the prefill, the first place's), ``"uniform"`` the allowed ids
    uniformly (the paper's random initialisation).
    """
    if window < 1:
        raise ValueError(f"jacobi window must be >= 1 draft token, got {window}")
    SB = ids.shape[0]
    if SB % n_streams:
        raise ValueError(f"{SB} prompt rows do not split into {n_streams} streams")
    B, device = SB // n_streams, ids.device
    lo = head_window[0]
    dtype = next(model.parameters()).dtype
    image_tokens = model.cfg.image_tokens
    uniform = allowed.float() / allowed.sum()  # (V_w,) q of places no iteration reached yet

    def probs_of(logits: Tensor, K: int) -> Tensor:
        """Guided next-token scores -> (B, K, V_w) probabilities (or scores when greedy)."""
        stream_logits = logits.reshape(n_streams, B, K, -1).reshape(n_streams, B * K, -1)
        rows = None if cd_rows is None else cd_rows.repeat_interleave(K)
        scores = next_token_scores(stream_logits, allowed, cfg, cd_rows=rows).view(B, K, -1)
        return scores if cfg.greedy else torch.softmax(scores.float(), dim=-1)

    def fill(dist: Tensor, start: int, stop: int) -> Tensor:
        """Drafts of places ``start..stop-1`` that no window reached yet, and their q (B, V_w)."""
        q_new = uniform.expand(B, -1) if unreached == "uniform" else dist
        if stop > start:
            if cfg.greedy and unreached != "uniform":
                tok[:, start:stop] = q_new.argmax(-1, keepdim=True)
            else:
                tok[:, start:stop] = _draw(q_new[:, None].expand(B, stop - start, -1), generator)
        return q_new

    if unreached not in ("last", "uniform"):
        raise ValueError(f"unreached must be 'last' or 'uniform', got {unreached!r}")
    cache = KVCache.allocate(model.cfg, SB, ids.shape[1] + n_new - 1, device=device, dtype=dtype)
    p0 = probs_of(prefill(model, ids, valid, cache, last_only=True, head_window=head_window)[:, -1], 1)[:, 0]
    forwards = 1
    # tok[b, j]: accepted token of place j if j < acc[b], else the current draft of place j.
    tok = torch.zeros((B, n_new), dtype=torch.long, device=device)
    tok[:, 0] = p0.argmax(-1) if cfg.greedy else _draw(p0, generator)
    q = fill(p0, 1, min(window + 2, n_new))[:, None].expand(B, window + 1, -1)  # q[:, i]: of place n + i
    acc = torch.ones(B, dtype=torch.long, device=device)
    n = 1  # every row has accepted places 0..n-1; the cache holds places 0..n-2
    reported = 0
    if callback is not None and n_new == 1:
        callback(1, tok + lo)
    while n < n_new:
        K = min(window, n_new - 1 - n) + 1  # feed places n-1 .. n+K-2; p of places n .. n+K-1
        fed = tok[:, n - 1 : n - 1 + K] + lo  # unified ids
        logits = window_forward(model, fed.repeat(n_streams, 1), cache, head_window)
        forwards += 1
        p = probs_of(logits, K)  # (B, K, V_w)
        places = n + torch.arange(K, device=device)  # (K,)
        pending = places[None, :] < acc[:, None]  # accepted earlier by this row: not tested again
        drafts = tok[:, n : n + K]
        if cfg.greedy:
            best = p.argmax(-1)  # (B, K)
            ok = pending | (drafts == best)
        else:
            qk = q[:, :K]
            p_d = p.gather(-1, drafts[..., None])[..., 0]
            q_d = qk.gather(-1, drafts[..., None])[..., 0]
            u = torch.rand(p_d.shape, generator=generator, device=device)
            ok = pending | (u * q_d < p_d)  # u < p/q, i.e. accept with probability min(1, p/q)
        rejected = ~ok
        has_reject = rejected.any(1)
        first = rejected.to(torch.uint8).argmax(1)  # (B,) first rejected place (0 if none)
        rows = torch.arange(B, device=device)
        if cfg.greedy:
            fix = best[rows, first]
            fresh = best
        else:
            p_f, q_f = p[rows, first], qk[rows, first]  # (B, V_w)
            resid = (p_f - q_f).clamp_min_(0)
            mass = resid.sum(-1, keepdim=True)
            fix = _draw(torch.where(mass > 0, resid / mass.clamp_min(1e-30), p_f), generator)
            fresh = _draw(p, generator)  # new drafts of the places after the rejection
        tok[rows, n + first] = torch.where(has_reject, fix, tok[rows, n + first])
        acc = torch.maximum(acc, torch.where(has_reject, n + first + 1, torch.full_like(acc, n + K)))
        redraft = places[None, :] >= acc[:, None]
        tok[:, n : n + K] = torch.where(redraft, fresh, tok[:, n : n + K])
        n_next = int(acc.min())
        rollback(cache, K, n_next - n, image_tokens=image_tokens)
        reach = min(n_next + window + 1, n_new)  # the next window's places end before it
        q_far = fill(p[:, K - 1], n + K, reach)
        if not cfg.greedy:
            shift, m = n_next - n, min(window + 1, n + K - n_next)
            q = torch.cat([p[:, shift : shift + m], q_far[:, None].expand(B, window + 1 - m, -1)], 1)
        n = n_next
        if callback is not None and (n // callback_every > reported or n == n_new):
            reported = n // callback_every
            callback(n, tok[:, :n] + lo)
    return JacobiResult(tok, forwards, cache)
