"""Static key/value cache for incremental decoding (gpt-fast style).

The cache preallocates K/V buffers for every layer, ``[n_layers, B, n_heads, max_len,
head_dim]``, and writes them by index, so every decode step has the same shapes: the new
token attends over the whole ``max_len`` buffer under a boolean key mask (``valid``).
Left padding in a batch of prompts is just ``valid == False`` on those slots; positions
count only valid tokens, so a padded row decodes exactly like the same row alone.

The cache owns all decoding state (buffers, key mask, per-row positions, next slot);
the model is never mutated. :func:`decode_one_token` keeps the slot as a tensor and
uses static shapes, so ``torch.compile(decode_one_token, fullgraph=True)`` compiles once.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from cm3leon.config import ModelConfig
from cm3leon.model.transformer import Transformer, positions_from_valid


class KVCache(nn.Module):
    """Per-layer K/V buffers plus the decoding state of a batch of ``batch`` streams.

    Buffers (registered, so ``cache.to(device)`` moves them):
    ``k``, ``v`` Float[L, B, nh, S, hd]; ``valid`` Bool[B, S] (keys that may be attended);
    ``pos`` Long[B] (each row's next position); ``slot`` Long[1] (next slot to write).
    """

    k: Tensor
    v: Tensor
    valid: Tensor
    pos: Tensor
    slot: Tensor

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
    ) -> None:
        super().__init__()
        shape = (n_layers, batch, n_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("valid", torch.zeros(batch, max_len, device=device, dtype=torch.bool), persistent=False)
        self.register_buffer("pos", torch.zeros(batch, device=device, dtype=torch.long), persistent=False)
        self.register_buffer("slot", torch.zeros(1, device=device, dtype=torch.long), persistent=False)
        self.batch = batch
        self.max_len = max_len
        # Host-side count of slots written by eager calls: bounds checks without reading the
        # device (no sync). Compiled decode steps do not update it, so it can only undercount.
        self._written = 0
        if self.k.is_cuda and not torch.compiler.is_compiling():
            # Fixed addresses let CUDA graphs (torch.compile mode="reduce-overhead") update
            # the buffers in place instead of skipping graph capture for mutated inputs.
            for buf in (self.k, self.v, self.valid, self.pos, self.slot):
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
    ) -> KVCache:
        """An empty cache for ``batch`` streams of at most ``max_len`` tokens (prompt + generated)."""
        if batch <= 0:
            raise ValueError(f"batch must be positive, got {batch}")
        if not 0 < max_len <= cfg.max_seq_len:
            raise ValueError(
                f"max_len={max_len} must be in [1, max_seq_len={cfg.max_seq_len}]; "
                "shorten the prompt or the number of tokens to generate"
            )
        return cls(cfg.n_layers, batch, cfg.n_heads, max_len, cfg.head_dim, device=device, dtype=dtype)

    def layers(self) -> list[tuple[Tensor, Tensor]]:
        """The per-layer (K, V) buffer views, each Float[B, nh, S, hd]."""
        return list(zip(self.k.unbind(0), self.v.unbind(0)))

    def reset(self) -> None:
        """Forget every stream (buffers are overwritten lazily; the key mask hides old slots)."""
        self.valid.zero_()
        self.pos.zero_()
        self.slot.zero_()
        self._written = 0

    @property
    def length(self) -> int:
        """Number of slots written so far (reads a device tensor: avoid in hot loops on GPU)."""
        return int(self.slot.item())


def prefill(model: Transformer, ids: Tensor, valid: Tensor, cache: KVCache) -> Tensor:
    """Run left-padded prompts ``ids`` Long[B, T] through the model, filling cache slots 0..T-1.

    ``valid`` Bool[B, T] is False on left padding. Positions count valid tokens only (pads
    get 0 and are never attended). The cache is reset first. Returns logits Float[B, T, V];
    the next-token logits of every row are ``logits[:, -1]``.
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
    S = cache.max_len
    q_idx = torch.arange(T, device=ids.device)
    k_idx = torch.arange(S, device=ids.device)
    causal = k_idx[None, :] <= q_idx[:, None]  # (T, S)
    # A query always sees itself so pad rows stay finite (see padded_causal_mask).
    attn_mask = (causal & cache.valid[:, None, None, :]) | (k_idx[None, :] == q_idx[:, None])  # (B, 1, T, S)
    logits = model.forward_cached(
        ids, positions_from_valid(valid), kv=cache.layers(), slots=q_idx, attn_mask=attn_mask
    )
    cache.pos.copy_(valid.sum(dim=1))
    cache.slot.fill_(T)
    cache._written = T
    return logits


def decode_one_token(model: Transformer, ids: Tensor, cache: KVCache) -> Tensor:
    """Feed one new token per row, ``ids`` Long[B, 1], at the next slot; returns logits Float[B, V].

    Each row uses its own next position (``cache.pos``). Shapes are static and the slot is a
    tensor, so the function compiles once (no recompiles as the slot advances). Bounds are
    checked on the host when running eagerly (no device sync).
    """
    if not torch.compiler.is_compiling():
        if ids.shape != (cache.batch, 1):
            raise ValueError(f"ids must be [{cache.batch}, 1], got {tuple(ids.shape)}")
        if cache._written >= cache.max_len:
            raise ValueError(f"the KV cache is full (max_len={cache.max_len}); allocate a larger cache")
        cache._written += 1
    slot = cache.slot
    cache.valid.index_fill_(1, slot, True)
    attn_mask = cache.valid[:, None, None, :]  # (B, 1, 1, S)
    logits = model.forward_cached(ids, cache.pos[:, None], kv=cache.layers(), slots=slot, attn_mask=attn_mask)
    cache.pos.add_(1)
    cache.slot.add_(1)
    return logits[:, -1]  # (B, V)
