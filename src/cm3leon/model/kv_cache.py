"""Static key/value cache for incremental decoding (gpt-fast style).

The cache preallocates K/V buffers for every layer, ``[n_layers, B, n_heads, max_len,
head_dim]``. Left padding in a batch of prompts is just ``valid == False`` on those
slots; positions count only valid tokens, so a padded row decodes exactly like the same
row alone. Two ways to attend, same results:

- eager (default): the slot is a host int and the new tokens attend over the used
  prefix ``[:slot + 1]`` only (what is cheap on CPU);
- static (``static=True``, and always under ``torch.compile``): the slot is a tensor and
  every step attends over the whole ``max_len`` buffer under the key mask, so shapes
  never change and ``torch.compile(decode_one_token, fullgraph=True)`` compiles once
  (CUDA graphs need this too).

The cache owns all decoding state (buffers, key mask, per-row positions and places in
images, next slot); the model is never mutated. Both paths keep the device-side state
(``valid``, ``pos``, ``slot``, ``image_idx``) up to date; only eager calls advance the
host-side slot count, so a cache stepped by a compiled :func:`decode_one_token` must be
allocated with ``static=True`` if eager steps follow.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from cm3leon.config import ModelConfig
from cm3leon.model.transformer import (
    Transformer,
    additive_mask,
    image_index,
    padded_causal_mask,
    positions_from_valid,
)


class KVCache(nn.Module):
    """Per-layer K/V buffers plus the decoding state of a batch of ``batch`` streams.

    Buffers (registered, so ``cache.to(device)`` moves them):
    ``k``, ``v`` Float[L, B, n_kv_heads, S, hd]; ``valid`` Bool[B, S] (keys that may be attended);
    ``pos`` Long[B] (each row's next position); ``slot`` Long[1] (next slot to write);
    ``image_idx`` Long[B] (place in its image of each row's last token, -1 outside images;
    for models with ``image_tokens``).
    """

    k: Tensor
    v: Tensor
    valid: Tensor
    pos: Tensor
    slot: Tensor
    image_idx: Tensor

    def __init__(
        self,
        n_layers: int,
        batch: int,
        n_heads: int,
        max_len: int,
        head_dim: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        static: bool = False,
    ) -> None:
        super().__init__()
        shape = (n_layers, batch, n_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("valid", torch.zeros(batch, max_len, device=device, dtype=torch.bool), persistent=False)
        self.register_buffer("pos", torch.zeros(batch, device=device, dtype=torch.long), persistent=False)
        self.register_buffer("slot", torch.zeros(1, device=device, dtype=torch.long), persistent=False)
        self.register_buffer("image_idx", torch.full((batch,), -1, device=device, dtype=torch.long), persistent=False)
        self.batch = batch
        self.max_len = max_len
        self.static = static
        # Host-side count of slots written by eager calls: bounds checks without reading the
        # device (no sync). Compiled decode steps do not update it, so it can only undercount.
        self._written = 0
        if self.k.is_cuda and not torch.compiler.is_compiling():
            # Fixed addresses let CUDA graphs (torch.compile mode="reduce-overhead") update
            # the buffers in place instead of skipping graph capture for mutated inputs.
            for buf in (self.k, self.v, self.valid, self.pos, self.slot, self.image_idx):
                torch._dynamo.mark_static_address(buf)

    @classmethod
    def allocate(
        cls,
        cfg: ModelConfig,
        batch: int,
        max_len: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        static: bool = False,
    ) -> KVCache:
        """An empty cache for ``batch`` streams of at most ``max_len`` tokens (prompt + generated).

        ``static=True`` makes eager steps attend over the whole buffer too (fixed shapes,
        as compiled steps always do); the default attends over the used slots only.
        """
        if batch <= 0:
            raise ValueError(f"batch must be positive, got {batch}")
        if not 0 < max_len <= cfg.max_seq_len:
            raise ValueError(
                f"max_len={max_len} must be in [1, max_seq_len={cfg.max_seq_len}]; "
                "shorten the prompt or the number of tokens to generate"
            )
        return cls(cfg.n_layers, batch, cfg.kv_heads, max_len, cfg.head_dim, device=device, dtype=dtype, static=static)

    def layers(self) -> list[tuple[Tensor, Tensor]]:
        """The per-layer (K, V) buffer views, each Float[B, nh, S, hd]."""
        return list(zip(self.k.unbind(0), self.v.unbind(0)))

    def reset(self) -> None:
        """Forget every stream (buffers are overwritten lazily; the key mask hides old slots)."""
        self.valid.zero_()
        self.pos.zero_()
        self.slot.zero_()
        self.image_idx.fill_(-1)
        self._written = 0

    @property
    def length(self) -> int:
        """Number of slots written so far (reads a device tensor: avoid in hot loops on GPU)."""
        return int(self.slot.item())


def prefill(model: Transformer, ids: Tensor, valid: Tensor, cache: KVCache, *, last_only: bool = False,
            head_window: tuple[int, int] | None = None) -> Tensor:
    """Run left-padded prompts ``ids`` Long[B, T] through the model, filling cache slots 0..T-1.

    ``valid`` Bool[B, T] is False on left padding. Positions count valid tokens only (pads
    get 0 and are never attended). The cache is reset first. Returns logits Float[B, T, V]
    (Float[B, 1, V] if ``last_only``); the next-token logits of every row are ``logits[:, -1]``.
    ``head_window=(lo, hi)``: logits of ids ``lo..hi-1`` only (see ``Transformer.forward_cached``).
    """
    if ids.dim() != 2 or valid.shape != ids.shape:
        raise ValueError(
            f"ids and valid must both be [B, T]; got ids {tuple(ids.shape)}, valid {tuple(valid.shape)}"
        )
    if valid.dtype != torch.bool:
        raise ValueError(f"valid must be a Bool tensor, got {valid.dtype}")
    B, T = ids.shape
    if B != cache.batch:
        raise ValueError(f"batch of {B} prompts but the cache was allocated for {cache.batch}")
    if T > cache.max_len:
        raise ValueError(f"prompt length {T} exceeds the cache's max_len={cache.max_len}; allocate a larger cache")
    cache.reset()
    cache.valid[:, :T] = valid
    q_idx = torch.arange(T, device=ids.device)
    slots: Tensor | int = 0
    if cache.static or torch.compiler.is_compiling():
        k_idx = torch.arange(cache.max_len, device=ids.device)
        causal = k_idx[None, :] <= q_idx[:, None]  # (T, S)
        # A query always sees itself so pad rows stay finite (see padded_causal_mask).
        attn_mask = (causal & cache.valid[:, None, None, :]) | (k_idx[None, :] == q_idx[:, None])  # (B, 1, T, S)
        slots = q_idx
    else:
        attn_mask = padded_causal_mask(valid)  # (B, 1, T, T): the used slots only
    img_idx = None
    if model.cfg.image_tokens:
        img_idx = image_index(ids, model.first_image_id, model.cfg.image_tokens)
        cache.image_idx.copy_(img_idx[:, -1])
    logits = model.forward_cached(
        ids, positions_from_valid(valid), kv=cache.layers(), slots=slots, attn_mask=attn_mask, last_only=last_only,
        head_window=head_window, image_idx=img_idx,
    )
    cache.pos.copy_(valid.sum(dim=1))
    cache.slot.fill_(T)
    cache._written = T
    return logits


def decode_one_token(model: Transformer, ids: Tensor, cache: KVCache,
                     head_window: tuple[int, int] | None = None) -> Tensor:
    """Feed one new token per row, ``ids`` Long[B, 1], at the next slot; returns logits Float[B, V].

    Each row uses its own next position (``cache.pos``). Eagerly (default cache) the token
    attends over the used slots only; under ``torch.compile`` or with a ``static`` cache,
    shapes are static and the slot is a tensor, so the function compiles once (no
    recompiles as the slot advances). Bounds are checked on the host when running eagerly
    (no device sync). ``head_window=(lo, hi)``: logits of ids ``lo..hi-1`` only, Float[B, hi - lo].
    """
    if torch.compiler.is_compiling():
        return _decode_static(model, ids, cache, head_window)
    if ids.shape != (cache.batch, 1):
        raise ValueError(f"ids must be [{cache.batch}, 1], got {tuple(ids.shape)}")
    slot = cache._written
    if slot >= cache.max_len:
        raise ValueError(f"the KV cache is full (max_len={cache.max_len}); allocate a larger cache")
    cache._written += 1
    if cache.static:
        return _decode_static(model, ids, cache, head_window)
    cache.valid[:, slot] = True
    # One additive mask for all layers (a Bool mask is converted to this in every layer).
    valid = cache.valid[:, None, None, : slot + 1]  # (B, 1, 1, slot + 1)
    attn_mask = additive_mask(valid, 1, slot + 1, cache.k)
    logits = model.forward_cached(ids, cache.pos[:, None], kv=cache.layers(), slots=slot, attn_mask=attn_mask,
                                  head_window=head_window, image_idx=_next_image_idx(model, ids, cache))
    cache.pos.add_(1)
    cache.slot.add_(1)
    return logits[:, -1]  # (B, V)


def _next_image_idx(model: Transformer, ids: Tensor, cache: KVCache) -> Tensor | None:
    """Place in its image of each fed token ``ids`` Long[B, 1] (recorded in the cache); None
    for models without ``image_tokens``."""
    if not model.cfg.image_tokens:
        return None
    is_img = ids[:, 0] >= model.first_image_id
    nxt = torch.where(is_img, (cache.image_idx + 1) % model.cfg.image_tokens, torch.full_like(cache.image_idx, -1))
    cache.image_idx.copy_(nxt)
    return nxt[:, None]  # (B, 1)


def _decode_static(
    model: Transformer, ids: Tensor, cache: KVCache, head_window: tuple[int, int] | None = None
) -> Tensor:
    """:func:`decode_one_token` with static shapes: the slot is a tensor, the whole buffer is attended."""
    slot = cache.slot
    cache.valid.index_fill_(1, slot, True)
    attn_mask = cache.valid[:, None, None, :]  # (B, 1, 1, S)
    logits = model.forward_cached(ids, cache.pos[:, None], kv=cache.layers(), slots=slot, attn_mask=attn_mask,
                                  head_window=head_window, image_idx=_next_image_idx(model, ids, cache))
    cache.pos.add_(1)
    cache.slot.add_(1)
    return logits[:, -1]  # (B, V)
