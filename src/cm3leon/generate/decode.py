"""Batched, KV-cached decoding of images and text (paper §3.1, §4.1).

One call decodes every prompt x sample x stream in ONE batch over a static KV cache:
rows are stream-major (``[cond rows; uncond rows; ...]``) and, inside a stream,
prompt-major (prompt p, sample j is row ``p * n + j``). Prompts of different lengths are
left-padded; positions count valid tokens only, so a row decodes as it would alone.
After the prefill, each step mixes the streams (:mod:`guidance`), picks one token per
sample and feeds it to all of that sample's streams.

Per-token host work is a handful of tensor ops: no ``.item()`` in the loop (text checks
for "all rows stopped" every ``_STOP_CHECK_EVERY`` steps), a preallocated output buffer,
and optional ``torch.compile`` of the model step. Eagerly, each step attends over the
used cache slots only (``compile`` switches to the static full-buffer cache). Guidance and
sampling run on the window of ids that the modality mask allows (e.g. the image ids
only), which changes no probability but does change which uniform draw each id
gets compared with a full-vocabulary draw.

Image segments can also decode with speculative Jacobi decoding (``jacobi_window`` > 0,
:mod:`cm3leon.generate.jacobi`): a window of drafts verified by one forward per
iteration, the same tokens when greedy and the same distribution when sampling.

Determinism: one ``torch.Generator`` seeded with ``SamplingConfig.seed`` draws the noise
of every row, so the same seed, prompts, ``n_per_prompt`` and device give the same tokens;
changing the batch (other prompts, another ``n``) changes which noise a row gets.
Prompts longer than the context are refused (no silent truncation): a prompt plus the
tokens to generate must fit in ``max_seq_len``.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence

import torch

from cm3leon.generate.guidance import next_token_scores, unconditional_prompt
from cm3leon.generate.jacobi import jacobi_decode
from cm3leon.generate.logits import (
    SamplingConfig,
    image_allowed,
    no_repeat_ngram,
    repetition_penalty,
    sample,
    text_allowed,
)
from cm3leon.model.kv_cache import KVCache, decode_one_token, prefill
from cm3leon.model.transformer import Transformer
from cm3leon.vocab import Vocab

log = logging.getLogger(__name__)

ProgressCallback = Callable[[int, torch.Tensor], None]
"""``callback(n_done, tokens)``: ``tokens`` is Long[rows, n_done], the output so far (same id space as the result)."""

_STOP_CHECK_EVERY = 8
DEFAULT_MIX_CD_K = 8  # CD-K k for sample_mix when SamplingConfig.cd_k is unset (our choice; the paper gives none)


# ---- input checks and batching --------------------------------------------------------
def _check_prompts(name: str, prompts: Sequence[Sequence[int]], vocab: Vocab) -> list[list[int]]:
    if isinstance(prompts, torch.Tensor) or not isinstance(prompts, Sequence) or not prompts:
        raise ValueError(f"{name} must be a non-empty list of id lists, got {type(prompts).__name__}")
    out = []
    for i, p in enumerate(prompts):
        p = list(p.tolist() if isinstance(p, torch.Tensor) else p)
        if not p:
            raise ValueError(f"{name}[{i}] is empty; a prompt holds at least '<eos> ... <break>'")
        lo, hi = min(p), max(p)
        if lo < 0 or hi >= vocab.size:
            raise ValueError(f"{name}[{i}] has id {lo if lo < 0 else hi} outside the vocabulary [0, {vocab.size})")
        out.append([int(t) for t in p])
    return out


def _left_pad(rows: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad id lists -> (ids Long[N, T], valid Bool[N, T])."""
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    valid = torch.zeros((len(rows), T), dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, T - len(r) :] = torch.tensor(r, dtype=torch.long)
        valid[i, T - len(r) :] = True
    return ids.to(device), valid.to(device)


@dataclasses.dataclass(frozen=True)
class _Plan:
    """What one batched decode runs: ``streams[s][b]`` is the prompt of stream s, sample row b."""

    streams: list[list[list[int]]]
    cd_rows: torch.Tensor | None  # Bool[B] or None


def _expand(prompts: list[list[int]], n: int) -> list[list[int]]:
    return [p for p in prompts for _ in range(n)]


def decode_streams(
    model: Transformer,
    vocab: Vocab,
    streams: Sequence[Sequence[Sequence[int]]],
    cfg: SamplingConfig,
    *,
    n_new: int,
    allowed: torch.Tensor,
    cd_rows: torch.Tensor | None = None,
    stop_ids: Sequence[int] = (),
    callback: ProgressCallback | None = None,
    callback_every: int = 64,
    compile: bool = False,
    text_history: bool = False,
    on_logits: Callable[[int, torch.Tensor], None] | None = None,
    jacobi_window: int = 0,
) -> torch.Tensor:
    """The decoding core: prefill every stream, then ``n_new`` guided steps -> Long[B, n_new].

    ``streams[s][b]`` is the prompt (unified ids) of stream s for sample row b; S = 1
    (plain), 2 (``[cond, uncond]``: CFG / CD-K) or 3 (instruct-CFG), see
    :func:`guidance.next_token_scores`. ``allowed`` Bool[V] is the modality mask.
    Rows that emit one of ``stop_ids`` then emit ``<pad>``. ``text_history`` turns on the
    repetition processors of ``cfg`` over the cond prompt + output. ``on_logits(i,
    logits[S, B, V])`` sees the raw model logits of every step (tests, analysis).
    ``jacobi_window`` > 0 decodes with speculative Jacobi decoding and that many drafts
    (:func:`jacobi.jacobi_decode`; no stop ids, text history, ``on_logits`` or ``compile``).
    """
    if n_new <= 0:
        raise ValueError(f"n_new must be >= 1, got {n_new}")
    if not streams or len({len(s) for s in streams}) != 1:
        raise ValueError("streams must be a non-empty list of equally long prompt lists (one per sample row)")
    streams = [_check_prompts(f"streams[{s}]", st, vocab) for s, st in enumerate(streams)]
    if model.cfg.vocab_size != vocab.size:
        raise ValueError(
            f"model vocab_size={model.cfg.vocab_size} != Vocab.size={vocab.size}; "
            "the model was built for another vocabulary"
        )
    n_streams, B = len(streams), len(streams[0])
    rows = [r for stream in streams for r in stream]
    longest = max(len(r) for r in rows)
    if longest + n_new - 1 > model.cfg.max_seq_len:
        raise ValueError(
            f"a prompt of {longest} tokens plus {n_new} new tokens exceeds the model context "
            f"max_seq_len={model.cfg.max_seq_len}; shorten the prompt (drop retrieved documents) "
            "or generate fewer tokens"
        )
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    ids, valid = _left_pad(rows, vocab.pad_id, device)
    allowed = allowed.to(device)
    if cd_rows is not None:
        if cd_rows.shape != (B,) or cd_rows.dtype != torch.bool:
            raise ValueError(
                f"cd_rows must be Bool[{B}] (one flag per sample row), got {cd_rows.dtype}{list(cd_rows.shape)}"
            )
        cd_rows = cd_rows.to(device)
    stop = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=device)
    # Guide and sample inside the window of allowed ids (ids outside it are -inf anyway): the
    # same distribution, several times less work per step than over the whole vocabulary.
    lo, hi = _allowed_window(allowed)
    allowed_win = allowed[..., lo:hi]
    step = decode_one_token
    if compile:
        mode = "reduce-overhead" if device.type == "cuda" else "default"
        step = torch.compile(decode_one_token, fullgraph=True, mode=mode)

    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    if jacobi_window:
        return _jacobi(model, ids, valid, cfg, n_streams, n_new, jacobi_window, allowed_win, (lo, hi), gen, cd_rows,
                       callback, callback_every, bool(len(stop)) or text_history or on_logits is not None, compile)
    out = torch.empty((B, n_new), dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device) if len(stop) else None
    hist = hist_valid = None
    if text_history and (cfg.repetition_penalty != 1.0 or cfg.no_repeat_ngram):
        T = ids.shape[1]
        hist = torch.cat([ids[:B], torch.full((B, n_new), vocab.pad_id, dtype=torch.long, device=device)], 1)
        hist_valid = torch.cat([valid[:B], torch.zeros((B, n_new), dtype=torch.bool, device=device)], 1)

    with torch.inference_mode():
        # The last new token is never fed back: prompt + n_new - 1 slots suffice.
        cache = KVCache.allocate(
            model.cfg, len(rows), ids.shape[1] + n_new - 1, device=device, dtype=dtype, static=compile
        )
        # The LM head computes the allowed window's logits only, unless something needs all.
        window = (lo, hi) if on_logits is None and hist is None else None
        logits = prefill(model, ids, valid, cache, last_only=True, head_window=window)[:, -1]  # (S*B, V or hi-lo)
        for i in range(n_new):
            stream_logits = logits.view(n_streams, B, -1)  # (S, B, V or hi-lo)
            if on_logits is not None:
                on_logits(i, stream_logits)
            if hist is not None:
                stream_logits = _penalize(stream_logits, hist, hist_valid, cfg, T + i)
            if window is None:
                stream_logits = stream_logits[..., lo:hi]
            scores = next_token_scores(stream_logits, allowed_win, cfg, cd_rows=cd_rows)
            tok = sample(scores, gen, greedy=cfg.greedy)  # (B,)
            if lo:
                tok = tok + lo
            if done is not None:
                tok = tok.masked_fill(done, vocab.pad_id)  # stopped rows idle on <pad>
                done = done | torch.isin(tok, stop)
            out[:, i] = tok
            if hist is not None:
                hist[:, T + i] = tok
                hist_valid[:, T + i] = True
            if callback is not None and ((i + 1) % callback_every == 0 or i + 1 == n_new):
                callback(i + 1, out[:, : i + 1].clone())
            if i + 1 == n_new:
                break
            if done is not None and (i + 1) % _STOP_CHECK_EVERY == 0 and bool(done.all()):
                out[:, i + 1 :] = vocab.pad_id
                break
            logits = step(model, tok.repeat(n_streams).unsqueeze(1), cache, window)  # (S*B, V or hi-lo)
    return out


def _jacobi(model: Transformer, ids: torch.Tensor, valid: torch.Tensor, cfg: SamplingConfig, n_streams: int,
            n_new: int, window: int, allowed_win: torch.Tensor, head_window: tuple[int, int], gen: torch.Generator,
            cd_rows: torch.Tensor | None, callback: ProgressCallback | None, callback_every: int, text_only: bool,
            compile: bool) -> torch.Tensor:
    if not isinstance(window, int) or window < 0:
        raise ValueError(f"jacobi_window must be a whole number >= 0 (0 = sequential decoding), got {window!r}")
    if text_only:
        raise ValueError("jacobi_window decodes image segments only (no stop ids, text history or on_logits); "
                         "set jacobi_window=0 for text")
    if compile:
        raise ValueError("jacobi_window runs eagerly; set compile=False or jacobi_window=0")
    if allowed_win.dim() != 1:
        raise ValueError("jacobi_window needs one modality mask for all rows (Bool[V])")
    lo = head_window[0]
    with torch.inference_mode():
        res = jacobi_decode(model, ids, valid, cfg, n_streams=n_streams, n_new=n_new, window=window,
                            allowed=allowed_win, head_window=head_window, generator=gen, cd_rows=cd_rows,
                            callback=callback, callback_every=callback_every)
    return res.tokens + lo


def _allowed_window(allowed: torch.Tensor) -> tuple[int, int]:
    """``[lo, hi)``: the smallest id range holding every id that ``allowed`` (Bool[V] or Bool[B, V]) permits."""
    ids = allowed.reshape(-1, allowed.shape[-1]).any(0).nonzero()
    if not len(ids):
        raise ValueError("the allowed-ids mask permits no id at all")
    return int(ids.min()), int(ids.max()) + 1


def _penalize(
    stream_logits: torch.Tensor, hist: torch.Tensor, hist_valid: torch.Tensor, cfg: SamplingConfig, upto: int
) -> torch.Tensor:
    """Apply the text repetition processors to every stream with the cond history."""
    S, B, V = stream_logits.shape
    flat = stream_logits.reshape(S * B, V)
    h, hv = hist[:, :upto].repeat(S, 1), hist_valid[:, :upto].repeat(S, 1)
    flat = repetition_penalty(flat, h, cfg.repetition_penalty, valid=hv)
    if cfg.no_repeat_ngram:
        seqs = [row[m].tolist() for row, m in zip(h, hv)]
        flat = no_repeat_ngram(flat, seqs, cfg.no_repeat_ngram)
    return flat.view(S, B, V)


# ---- images -----------------------------------------------------------------------------
def _image_plan(
    vocab: Vocab,
    prompts: Sequence[Sequence[int]],
    cfg: SamplingConfig,
    n: int,
    uncond_prompts: Sequence[Sequence[int]] | None,
    image_prompts_for_instruct: Sequence[Sequence[int]] | None,
    instruct: bool,
    cd_rows: torch.Tensor | None,
) -> _Plan:
    if n <= 0:
        raise ValueError(f"n_per_prompt must be >= 1, got {n}")
    cond = _check_prompts("prompts", prompts, vocab)
    for i, p in enumerate(cond):
        if p[-1] != vocab.break_id:
            raise ValueError(
                f"prompts[{i}] ends with {vocab.token_name(p[-1])}, but an image starts after "
                f"{vocab.token_name(vocab.break_id)} (layout '<eos> caption <break>'); append vocab.break_id"
            )

    def others(name: str, given: Sequence[Sequence[int]] | None, mask_images: bool) -> list[list[int]]:
        if given is None:
            return [unconditional_prompt(p, vocab, mask_images=mask_images) for p in cond]
        got = _check_prompts(name, given, vocab)
        if len(got) != len(cond):
            raise ValueError(f"{name} has {len(got)} prompts for {len(cond)} conditional prompts; give one each")
        return got

    if instruct or image_prompts_for_instruct is not None:
        if cfg.cd_k is not None or cd_rows is not None:
            raise ValueError("CD-K is not defined for instruct-CFG (three streams); set cd_k=None")
        img = others("image_prompts_for_instruct", image_prompts_for_instruct, False)
        none = others("uncond_prompts", uncond_prompts, True)
        return _Plan([_expand(cond, n), _expand(img, n), _expand(none, n)], None)
    # Guidance with scale 1 and no CD-K equals plain decoding: skip the uncond stream unless asked for.
    if cfg.guidance == 1.0 and cfg.cd_k is None and cd_rows is None and uncond_prompts is None:
        return _Plan([_expand(cond, n)], None)
    unc = others("uncond_prompts", uncond_prompts, False)
    return _Plan([_expand(cond, n), _expand(unc, n)], cd_rows)


def generate_image_tokens(
    model: Transformer,
    vocab: Vocab,
    prompts: Sequence[Sequence[int]],
    cfg: SamplingConfig,
    *,
    uncond_prompts: Sequence[Sequence[int]] | None = None,
    image_prompts_for_instruct: Sequence[Sequence[int]] | None = None,
    instruct: bool = False,
    n_per_prompt: int = 1,
    callback: ProgressCallback | None = None,
    callback_every: int = 64,
    compile: bool = False,
    jacobi_window: int = 0,
) -> torch.Tensor:
    """Decode one image (exactly L = ``vocab.image_seq_len`` tokens) per prompt x sample.

    Each prompt is unified ids ending with ``<break>`` (e.g. ``<eos> caption <break>``,
    retrieved documents first). Returns VQ **codebook indices** Long[len(prompts) *
    n_per_prompt, L] (row ``p * n + j`` = prompt p, sample j), ready for
    ``ImageTokenizer.decode``; ``vocab.codes_to_ids`` gives unified ids. The caller closes
    the image segment (appends ``<break>``/``<eos>``) if it continues the document.

    Guidance: CFG with ``cfg.guidance`` over ``[cond; uncond]`` (``uncond_prompts``
    default: :func:`guidance.unconditional_prompt` of each prompt); CD-K if ``cfg.cd_k``
    is set; instruct-CFG (``cfg.image_guidance``/``cfg.text_guidance``) if ``instruct`` or
    ``image_prompts_for_instruct`` is given (image-only stream default: the prompt with
    its text masked; "neither" default: text and image masked). ``callback(n, codes)`` is
    called every ``callback_every`` tokens and at the end with the codes so far
    (streaming partial images). ``compile`` wraps the model step in ``torch.compile``.
    ``jacobi_window`` > 0: speculative Jacobi decoding with that many drafts
    (:mod:`cm3leon.generate.jacobi`; greedy gives the same tokens, sampling the same distribution).
    """
    plan = _image_plan(vocab, prompts, cfg, n_per_prompt, uncond_prompts, image_prompts_for_instruct, instruct, None)
    return _generate_codes(model, vocab, plan, cfg, callback, callback_every, compile, jacobi_window)


def _generate_codes(
    model: Transformer,
    vocab: Vocab,
    plan: _Plan,
    cfg: SamplingConfig,
    callback: ProgressCallback | None,
    callback_every: int,
    compile: bool,
    jacobi_window: int = 0,
) -> torch.Tensor:
    if callback_every <= 0:
        raise ValueError(f"callback_every must be >= 1, got {callback_every}")
    to_codes = None if callback is None else (lambda n, t: callback(n, vocab.ids_to_codes(t)))
    ids = decode_streams(
        model, vocab, plan.streams, cfg, n_new=vocab.image_seq_len, allowed=image_allowed(vocab),
        cd_rows=plan.cd_rows, callback=to_codes, callback_every=callback_every, compile=compile,
        jacobi_window=jacobi_window,
    )
    return vocab.ids_to_codes(ids)


def sample_mix(
    model: Transformer,
    vocab: Vocab,
    prompts: Sequence[Sequence[int]],
    cfg: SamplingConfig,
    *,
    n_per_prompt: int = 8,
    uncond_prompts: Sequence[Sequence[int]] | None = None,
    callback: ProgressCallback | None = None,
    callback_every: int = 64,
    compile: bool = False,
    jacobi_window: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's sample set (§3.1, Fig. 4 right): per prompt, N images, half top-p + CFG,
    half CD-K, all in one batch. Returns (codes Long[P*N, L], is_cdk Bool[P*N]); in each
    prompt's block of N rows the first ``N - N // 2`` are top-p + CFG, the rest CD-K
    (``cfg.cd_k``, or :data:`DEFAULT_MIX_CD_K` if unset). Re-rank them with
    :func:`cm3leon.generate.rerank.rerank`. ``jacobi_window``: as :func:`generate_image_tokens`.
    """
    if n_per_prompt <= 0:
        raise ValueError(f"n_per_prompt must be >= 1, got {n_per_prompt}")
    mix_cfg = dataclasses.replace(cfg, cd_k=cfg.cd_k or DEFAULT_MIX_CD_K)
    n_cd = n_per_prompt // 2
    block = torch.tensor([False] * (n_per_prompt - n_cd) + [True] * n_cd)
    cd_rows = block.repeat(len(prompts))
    plan = _image_plan(vocab, prompts, mix_cfg, n_per_prompt, uncond_prompts, None, False, cd_rows)
    return _generate_codes(model, vocab, plan, mix_cfg, callback, callback_every, compile, jacobi_window), cd_rows


# ---- text ---------------------------------------------------------------------------------
def generate_text(
    model: Transformer,
    vocab: Vocab,
    prompts: Sequence[Sequence[int]],
    cfg: SamplingConfig,
    *,
    max_new_tokens: int,
    stop_ids: Sequence[int] | None = None,
    uncond_prompts: Sequence[Sequence[int]] | None = None,
    compile: bool = False,
) -> list[list[int]]:
    """Decode text after each prompt until a stop id (default ``<eos>``, ``<break>``) or
    ``max_new_tokens``. Output is restricted to text ids and the stop ids (paper §2.1).

    Returns one list of unified text ids per prompt, WITHOUT the stop id
    (``vocab.ids_to_text`` maps them to BPE ids). Guidance (CFG with ``cfg.guidance``, or
    CD-K if ``cfg.cd_k``) runs only when ``uncond_prompts`` is given; the repetition
    processors of ``cfg`` apply to every stream with the conditional history.
    """
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    cond = _check_prompts("prompts", prompts, vocab)
    stops = vocab.stop_ids if stop_ids is None else tuple(int(s) for s in stop_ids)
    if not stops:
        raise ValueError("stop_ids is empty; pass at least one id (default: <eos>, <break>)")
    allowed = text_allowed(vocab)
    for s in stops:
        if not 0 <= s < vocab.size:
            raise ValueError(f"stop id {s} is outside the vocabulary [0, {vocab.size})")
        allowed[s] = True
    streams = [cond]
    if uncond_prompts is not None:
        unc = _check_prompts("uncond_prompts", uncond_prompts, vocab)
        if len(unc) != len(cond):
            raise ValueError(f"uncond_prompts has {len(unc)} prompts for {len(cond)} prompts; give one each")
        streams.append(unc)
    elif cfg.cd_k is not None:
        raise ValueError("CD-K needs an unconditional stream: pass uncond_prompts or set cd_k=None")
    ids = decode_streams(
        model, vocab, streams, cfg, n_new=max_new_tokens, allowed=allowed,
        stop_ids=stops, compile=compile, text_history=True,
    )
    result = []
    stop_set = set(stops)
    for row in ids.tolist():
        cut = next((k for k, t in enumerate(row) if t in stop_set), len(row))
        result.append(row[:cut])
    return result
