"""The CM3Leon decoder: an OPT-style pre-LayerNorm transformer (paper §2.3, Table 3).

Compared to OPT (Zhang et al. 2022) the paper removes every bias term, dropout and the
LayerNorm affine parameters, and initializes weights from a truncated normal (std 0.006,
cut at 3 std), the learned absolute positional embedding with std 0.0002 and the
(untied) output layer with zeros. This file holds the architecture only: no loss, no
sampling, no training infrastructure. The static KV cache used for decoding lives in
``kv_cache.py`` and drives :meth:`Transformer.forward_cached`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from cm3leon.config import ModelConfig


def image_index(ids: Tensor, first_image_id: int, image_tokens: int) -> Tensor:
    """Each token's place inside its image, Long[B, T]: the number of image ids (``>=
    first_image_id``) right before it in an unbroken run, modulo ``image_tokens``; -1 for
    non-image tokens. A sequence is assumed to start outside an image."""
    is_img = ids >= first_image_id
    t = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
    last_other = torch.where(is_img, torch.full_like(t, -1), t).cummax(dim=1).values
    return torch.where(is_img, (t - last_other - 1) % image_tokens, torch.full_like(t, -1))


def positions_from_valid(valid: Tensor) -> Tensor:
    """Per-token positions for a left-padded batch: the number of valid tokens before it.

    ``valid`` is Bool[B, T]; pads get position 0 (they are masked out anyway).
    """
    v = valid.long()
    return ((v.cumsum(dim=1) - 1) * v).clamp_(min=0)


def image_rotary(image_idx: Tensor, dims: int, base: float, pairs_only: bool = False) -> tuple[Tensor, Tensor]:
    """(cos, sin) Float[B, T, dims // 2] rotating each image token by its place in its image.
    Tokens outside images (``image_idx`` -1) get angle 0, i.e. no rotation, or with
    ``pairs_only`` cos = sin = 0, i.e. those dims zeroed, so only image pairs score on them."""
    inv_freq = base ** (-torch.arange(0, dims, 2, device=image_idx.device, dtype=torch.float32) / dims)
    is_img = (image_idx >= 0)[..., None]
    angle = image_idx.clamp_min(0).to(torch.float32)[..., None] * inv_freq * is_img  # (B, T, dims // 2)
    cos, sin = angle.cos(), angle.sin()
    if pairs_only:
        cos, sin = cos * is_img, sin * is_img
    return cos, sin


def apply_rotary(x: Tensor, rope: tuple[Tensor, Tensor]) -> Tensor:
    """Rotate the first ``2 * cos.shape[-1]`` dims of ``x`` Float[B, T, ..., hd] (halves paired);
    ``cos``/``sin`` Float[B, T, r/2] broadcast over the dims between T and hd."""
    cos, sin = rope
    shape = (*cos.shape[:2], *([1] * (x.dim() - 3)), cos.shape[-1])
    cos, sin = cos.view(shape).to(x.dtype), sin.view(shape).to(x.dtype)
    h = cos.shape[-1]
    x1, x2 = x[..., :h], x[..., h : 2 * h]
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos, x[..., 2 * h :]), dim=-1)


def copy_pairs(q_places: Tensor, k_places: Tensor) -> Tensor:
    """Float[B, 1, Tq, Tk]: 1 where the key is an image token at the place the query's next
    token takes (query place + 1, the query in an image), else 0. ``q_places`` Long[B, Tq] and
    ``k_places`` Long[B, Tk] are places in images (-1 outside, see :func:`image_index`). Keys of
    the query's own image at that place lie in its future, so the pairs link different images."""
    q = q_places[:, :, None]
    return ((q >= 0) & (k_places[:, None, :] == q + 1)).unsqueeze(1).to(torch.float32)


def additive_mask(attn_mask: Tensor | None, q_len: int, k_len: int, like: Tensor) -> Tensor:
    """``attn_mask`` as an additive float mask (0 where attended, -inf elsewhere) in ``like``'s
    dtype: a Bool mask is converted, a float mask kept, None becomes the causal mask."""
    if attn_mask is None:
        allowed = torch.ones(q_len, k_len, dtype=torch.bool, device=like.device).tril_(k_len - q_len)
    elif attn_mask.dtype == torch.bool:
        allowed = attn_mask
    else:
        return attn_mask.to(like.dtype)
    return torch.zeros(allowed.shape, dtype=like.dtype, device=like.device).masked_fill_(~allowed, float("-inf"))


def padded_causal_mask(valid: Tensor) -> Tensor:
    """Bool[B, 1, T, T] attention mask: causal, never attending to pad keys.

    A query always sees itself, so pad query rows (whose earlier keys are all pads) stay
    finite instead of producing NaN from an all-masked softmax row.
    """
    T = valid.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=valid.device).tril_()
    eye = torch.eye(T, dtype=torch.bool, device=valid.device)
    return (causal & valid[:, None, None, :]) | eye  # (B, 1, T, T)


class Attention(nn.Module):
    """Multi-head causal self-attention without biases, via ``scaled_dot_product_attention``."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.head_dim = cfg.head_dim
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)  # q, k, v stacked on dim 0
        self.out = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        # Per-head score added to the pairs of :func:`copy_pairs` (ModelConfig.image_copy_bias).
        self.copy_bias = nn.Parameter(torch.zeros(cfg.n_heads)) if cfg.image_copy_bias else None

    def copy_mask(self, attn_mask: Tensor | None, copy: Tensor, q: Tensor, k_len: int) -> Tensor:
        """The additive mask Float[B, nh, Tq, Tk]: ``attn_mask`` plus this layer's copy bias on ``copy`` pairs."""
        assert self.copy_bias is not None
        base = additive_mask(attn_mask, q.shape[2], k_len, q)
        return base + self.copy_bias.to(q.dtype).view(1, -1, 1, 1) * copy.to(q.dtype)

    def forward(
        self,
        x: Tensor,
        attn_mask: Tensor | None = None,
        kv: tuple[Tensor, Tensor] | None = None,
        slots: Tensor | int | None = None,
        rope: tuple[Tensor, Tensor] | None = None,
        copy: Tensor | None = None,
    ) -> Tensor:
        B, T, C = x.shape
        qkv = self.qkv(x)
        if rope is None:
            q, k, v = qkv.split(C, dim=2)
        else:  # rotate q and k in one pass: (B, T, 2, nh, hd)
            qk = apply_rotary(qkv[..., : 2 * C].view(B, T, 2, self.n_heads, self.head_dim), rope)
            q, k, v = qk[:, :, 0], qk[:, :, 1], qkv[..., 2 * C :]
        q = q.reshape(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = k.reshape(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        v = v.reshape(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        if kv is not None:
            k_buf, v_buf = kv  # (B, nh, S, hd)
            if isinstance(slots, int):
                # Eager: write slots [slots, slots + T), attend over the used prefix only.
                k_buf.narrow(2, slots, T).copy_(k)
                v_buf.narrow(2, slots, T).copy_(v)
                k, v = k_buf.narrow(2, 0, slots + T), v_buf.narrow(2, 0, slots + T)
            else:
                # Static shapes (torch.compile / CUDA graphs): write by a slot tensor, attend
                # over the whole buffer (the mask hides unused slots).
                k_buf.index_copy_(2, slots, k.to(k_buf.dtype))
                v_buf.index_copy_(2, slots, v.to(v_buf.dtype))
                k, v = k_buf, v_buf
            if q.dtype != k_buf.dtype:
                q = q.to(k_buf.dtype)
        if copy is not None:
            attn_mask = self.copy_mask(attn_mask, copy, q, k.shape[2])
        if attn_mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        y = y.to(x.dtype) if y.dtype != x.dtype else y
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return self.out(y)


class MLP(nn.Module):
    """Position-wise feed-forward block: Linear -> activation -> Linear, no biases."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.d_model, cfg.ffn_dim, bias=False)
        self.fc2 = nn.Linear(cfg.ffn_dim, cfg.d_model, bias=False)
        self.act = nn.ReLU() if cfg.activation == "relu" else nn.GELU()

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-LN decoder block: x + attn(ln(x)), then x + mlp(ln(x)). LayerNorms have no parameters."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model, elementwise_affine=False)
        self.attn = Attention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model, elementwise_affine=False)
        self.mlp = MLP(cfg)

    def forward(
        self,
        x: Tensor,
        attn_mask: Tensor | None = None,
        kv: tuple[Tensor, Tensor] | None = None,
        slots: Tensor | int | None = None,
        rope: tuple[Tensor, Tensor] | None = None,
        copy: Tensor | None = None,
    ) -> Tensor:
        x = x + self.attn(self.ln1(x), attn_mask, kv, slots, rope, copy)
        return x + self.mlp(self.ln2(x))


class Transformer(nn.Module):
    """Decoder-only transformer over the unified text+image vocabulary.

    Set ``model.gradient_checkpointing = True`` to recompute each block in the backward
    pass (activation checkpointing) while training.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.max_seq_len, cfg.d_model)
        if cfg.image_tokens:
            self.image_pos_emb = nn.Embedding(cfg.image_tokens, cfg.d_model)
        if cfg.image_axial:
            side = math.isqrt(cfg.image_tokens)
            self.image_row_emb = nn.Embedding(side, cfg.d_model)
            self.image_col_emb = nn.Embedding(side, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model, elementwise_affine=False)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.gradient_checkpointing = False
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Paper §2.3 init: trunc-normal(0, std, ±3 std) everywhere, pos-emb std 0.0002, LM head 0."""
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if name in ("pos_emb.weight", "image_pos_emb.weight", "image_row_emb.weight", "image_col_emb.weight"):
                ps = self.cfg.pos_init_std
                nn.init.trunc_normal_(p, mean=0.0, std=ps, a=-3 * ps, b=3 * ps)
            elif name == "lm_head.weight" or name.endswith("copy_bias"):
                nn.init.zeros_(p)
            else:
                nn.init.trunc_normal_(p, mean=0.0, std=std, a=-3 * std, b=3 * std)

    def num_params(self, *, non_embedding: bool = False) -> int:
        """Number of parameters; ``non_embedding`` leaves out the token and position tables."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.tok_emb.weight.numel() + self.pos_emb.weight.numel()
            if self.cfg.image_tokens:
                n -= self.image_pos_emb.weight.numel()
            if self.cfg.image_axial:
                n -= self.image_row_emb.weight.numel() + self.image_col_emb.weight.numel()
        return n

    @property
    def first_image_id(self) -> int:
        """Smallest image id (image ids are the last ``cfg.image_vocab`` ids); needs ``image_tokens``."""
        return self.cfg.vocab_size - self.cfg.image_vocab

    def embed(self, ids: Tensor, positions: Tensor, image_idx: Tensor | None = None) -> Tensor:
        """Input embeddings Float[B, T, C]: token + position (+ place in image, if configured).

        ``image_idx`` Long[B, T] (see :func:`image_index`) defaults to one computed from ``ids``.
        """
        x = self.tok_emb(ids) + self.pos_emb(positions)
        image_idx = self.image_places(ids, image_idx)
        if image_idx is not None:
            place = image_idx.clamp_min(0)
            emb = self.image_pos_emb(place)
            if self.cfg.image_axial:
                side = self.image_row_emb.num_embeddings
                emb = emb + self.image_row_emb(place // side) + self.image_col_emb(place % side)
            x = x + emb * (image_idx >= 0).unsqueeze(-1).to(x.dtype)
        return x

    def image_places(self, ids: Tensor, image_idx: Tensor | None) -> Tensor | None:
        """``image_idx``, else each token's place computed from ``ids`` (:func:`image_index`);
        None for models without ``image_tokens``."""
        if not self.cfg.image_tokens:
            return None  # places are ignored without the embedding
        return image_index(ids, self.first_image_id, self.cfg.image_tokens) if image_idx is None else image_idx

    def rotary(self, image_idx: Tensor | None) -> tuple[Tensor, Tensor] | None:
        """The image-place rotation of queries and keys for places ``image_idx`` (from
        :meth:`image_places`); None unless ``cfg.image_rope_dims``."""
        if not self.cfg.image_rope_dims or image_idx is None:
            return None
        return image_rotary(image_idx, self.cfg.image_rope_dims, float(self.cfg.image_tokens),
                            self.cfg.image_rope_pairs_only)

    def copy_pairs(self, q_places: Tensor | None, k_places: Tensor | None) -> Tensor | None:
        """The query/key pairs that get the copy bias (:func:`copy_pairs`); None unless
        ``cfg.image_copy_bias``."""
        if not self.cfg.image_copy_bias:
            return None
        if q_places is None or k_places is None:
            raise ValueError("a model with image_copy_bias needs the image places of queries and keys "
                             "(pass key_places to forward_cached / forward_decode; KVCache tracks them)")
        return copy_pairs(q_places, k_places)

    def _check_inputs(self, ids: Tensor, positions: Tensor | None) -> None:
        if ids.dim() != 2:
            raise ValueError(f"ids must be Long[B, T], got shape {tuple(ids.shape)}")
        if ids.dtype not in (torch.long, torch.int32):
            raise ValueError(f"ids must be an integer tensor, got {ids.dtype}")
        if positions is not None and positions.shape != ids.shape:
            raise ValueError(f"positions shape {tuple(positions.shape)} must equal ids shape {tuple(ids.shape)}")

    def forward(
        self, ids: Tensor, positions: Tensor | None = None, *, key_valid: Tensor | None = None,
        image_idx: Tensor | None = None,
    ) -> Tensor:
        """Causal forward over ``ids`` Long[B, T] -> logits Float[B, T, V].

        ``positions`` defaults to 0..T-1 (use :func:`positions_from_valid` for left-padded
        batches). ``key_valid`` Bool[B, T] is False on left padding: those keys are never
        attended; pad query rows still produce finite (meaningless) values. ``image_idx``
        (models with ``image_tokens`` only; ignored otherwise) gives each token's place in
        its image, e.g. the un-transformed places of CM3 training rows; by default it is
        computed from ``ids`` (:func:`image_index`).
        """
        self._check_inputs(ids, positions)
        B, T = ids.shape
        if T > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds max_seq_len={self.cfg.max_seq_len}")
        if positions is None:
            positions = torch.arange(T, device=ids.device).expand(B, T)
        attn_mask = None if key_valid is None else padded_causal_mask(key_valid)
        if image_idx is not None and image_idx.shape != ids.shape:
            raise ValueError(f"image_idx shape {tuple(image_idx.shape)} must equal ids shape {tuple(ids.shape)}")
        image_idx = self.image_places(ids, image_idx)
        x = self.embed(ids, positions, image_idx)  # (B, T, C); image_idx is unused without image_tokens
        rope = self.rotary(image_idx)
        copy = self.copy_pairs(image_idx, image_idx)
        for block in self.blocks:
            if self.gradient_checkpointing and self.training:
                x = checkpoint(block, x, attn_mask, None, None, rope, copy, use_reentrant=False)
            else:
                x = block(x, attn_mask, rope=rope, copy=copy)
        return self.lm_head(self.ln_f(x))  # (B, T, V)

    def forward_decode(
        self,
        ids: Tensor,
        positions: Tensor,
        *,
        kv: list[tuple[Tensor, Tensor]],
        slot: int,
        attn_mask: Tensor,
        head_window: tuple[int, int] | None = None,
        image_idx: Tensor | None = None,
        key_places: Tensor | None = None,
    ) -> Tensor:
        """One new token per row against the cache, eagerly: the decoding hot path.

        The same computation as ``forward_cached(ids, ..., slots=slot)`` with ``ids`` Long[B, 1]
        (same ops in the same order, so the same logits), written as plain functional calls
        on the weights: with a small model and 1-token steps, the per-op host overhead of
        module calls, q/k/v splits and head transposes costs as much as the arithmetic.
        ``attn_mask`` is [B, 1, 1, slot + 1]. Returns logits Float[B, V] (or ``hi - lo``).
        ``key_places`` Long[B, slot + 1]: the image place of every cached key (models with
        ``image_copy_bias``).
        """
        B = ids.shape[0]
        C, nh, hd = self.cfg.d_model, self.cfg.n_heads, self.cfg.head_dim
        act = F.relu if self.cfg.activation == "relu" else F.gelu
        image_idx = self.image_places(ids, image_idx)
        x = self.embed(ids, positions, image_idx).view(B, C)  # (B, C)
        rope = self.rotary(image_idx)
        copy = self.copy_pairs(image_idx, key_places)
        for block, (k_buf, v_buf) in zip(self.blocks, kv):
            qkv = F.linear(F.layer_norm(x, (C,)), block.attn.qkv.weight).view(B, 3, nh, hd)
            qk = qkv[:, :2] if rope is None else apply_rotary(qkv[:, None, :2], rope)[:, 0]  # (B, 2, nh, hd)
            k_buf[:, :, slot].copy_(qk[:, 1])  # (B, nh, hd) into slot
            v_buf[:, :, slot].copy_(qkv[:, 2])
            q = qk[:, 0].unsqueeze(2)  # (B, nh, 1, hd)
            if q.dtype != k_buf.dtype:
                q = q.to(k_buf.dtype)
            mask = attn_mask if copy is None else block.attn.copy_mask(attn_mask, copy, q, slot + 1)
            y = F.scaled_dot_product_attention(q, k_buf[:, :, : slot + 1], v_buf[:, :, : slot + 1], attn_mask=mask)
            x = x + F.linear(y.to(x.dtype).reshape(B, C), block.attn.out.weight)  # (B, nh, 1, hd) -> (B, C)
            h = F.layer_norm(x, (C,))
            x = x + F.linear(act(F.linear(h, block.mlp.fc1.weight)), block.mlp.fc2.weight)
        h = F.layer_norm(x, (C,))
        if head_window is not None:
            lo, hi = head_window
            return F.linear(h, self.lm_head.weight[lo:hi])  # (B, hi - lo)
        return F.linear(h, self.lm_head.weight)  # (B, V)

    def forward_cached(
        self,
        ids: Tensor,
        positions: Tensor,
        *,
        kv: list[tuple[Tensor, Tensor]],
        slots: Tensor | int,
        attn_mask: Tensor,
        last_only: bool = False,
        head_window: tuple[int, int] | None = None,
        image_idx: Tensor | None = None,
        key_places: Tensor | None = None,
    ) -> Tensor:
        """Forward of new tokens against a static KV cache (used by ``kv_cache.py``).

        Each layer writes its keys/values for ``ids`` Long[B, T] into ``kv[layer]``
        (two Float[B, nh, S, hd] buffers), then attends under ``attn_mask`` (Bool, or an
        additive float mask). ``slots`` Long[T] (static shapes, for torch.compile): write
        at those slots and attend over the whole buffer, ``attn_mask`` [B, 1, T, S].
        ``slots`` an int s (eager): write at s..s+T-1 and attend over the first s + T
        slots only, ``attn_mask`` [B, 1, T, s + T]. Returns logits Float[B, T, V], or
        Float[B, 1, V] for the last token only if ``last_only``. ``head_window=(lo, hi)``
        computes the logits of ids ``lo..hi-1`` only (Float[..., hi - lo]): decoding inside
        one modality needs no others. ``image_idx`` Long[B, T]: each new token's place in its
        image (models with ``image_tokens``; the cache tracks it across steps). ``key_places``
        Long[B, S] (or [B, s + T]): the image place of every attended key, new ones included
        (models with ``image_copy_bias``).
        """
        image_idx = self.image_places(ids, image_idx)
        x = self.embed(ids, positions, image_idx)  # (B, T, C)
        rope = self.rotary(image_idx)
        copy = self.copy_pairs(image_idx, key_places)
        for block, layer_kv in zip(self.blocks, kv):
            x = block(x, attn_mask, layer_kv, slots, rope, copy)
        if last_only:
            x = x[:, -1:]  # (B, 1, C)
        if head_window is not None:
            lo, hi = head_window
            return F.linear(self.ln_f(x), self.lm_head.weight[lo:hi])  # (B, T, hi - lo)
        return self.lm_head(self.ln_f(x))  # (B, T, V)

