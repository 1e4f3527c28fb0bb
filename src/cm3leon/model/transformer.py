"""The CM3Leon decoder: an OPT-style pre-LayerNorm transformer (paper §2.3, Table 3).

Compared to OPT (Zhang et al. 2022) the paper removes every bias term, dropout and the
LayerNorm affine parameters, and initializes weights from a truncated normal (std 0.006,
cut at 3 std), the learned absolute positional embedding with std 0.0002 and the
(untied) output layer with zeros. This file holds the architecture only: no loss, no
sampling, no training infrastructure. The static KV cache used for decoding lives in
``kv_cache.py`` and drives :meth:`Transformer.forward_cached`.

``ModelConfig.family == "chameleon"`` swaps in the Chameleon block (``chameleon.py``):
rotary positions instead of the learned table, RMSNorm, SwiGLU, query/key head norms.
Everything else here (embedding, cache protocol, head) is shared by both families.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from cm3leon.config import ModelConfig
from cm3leon.model.attention import attend
from cm3leon.model.chameleon import ChameleonBlock, RMSNorm, init_chameleon_, rope_tables


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
    """Multi-head causal self-attention without biases, via ``scaled_dot_product_attention``.

    With ``kv`` (a layer's two Float[B, nh, S, hd] cache buffers) the new keys/values are
    written at ``slots`` and the queries attend over the cache: an int s writes slots
    s..s+T-1 and attends over the first s + T; a Long[T] tensor writes those slots and
    attends over the whole buffer (static shapes, for torch.compile / CUDA graphs), the
    mask hiding unused slots.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.head_dim = cfg.head_dim
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)  # q, k, v stacked on dim 0
        self.out = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(
        self,
        x: Tensor,
        attn_mask: Tensor | None = None,
        kv: tuple[Tensor, Tensor] | None = None,
        slots: Tensor | int | None = None,
    ) -> Tensor:
        B, T, C = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.n_heads, self.head_dim)  # (B, T, 3, nh, hd)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, nh, T, hd)
        y = attend(q, k, v, attn_mask, kv, slots)
        y = y.to(x.dtype).transpose(1, 2).reshape(B, T, C)  # (B, nh, T, hd) -> (B, T, C)
        return self.out(y)


class MLP(nn.Module):
    """Position-wise feed-forward block: Linear -> activation -> Linear, no biases."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.d_model, cfg.ffn_dim, bias=False)
        self.fc2 = nn.Linear(cfg.ffn_dim, cfg.d_model, bias=False)
        self.act = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}[cfg.activation]()

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
    ) -> Tensor:
        x = x + self.attn(self.ln1(x), attn_mask, kv, slots)
        return x + self.mlp(self.ln2(x))


class Transformer(nn.Module):
    """Decoder-only transformer over the unified text+image vocabulary (paper or Chameleon blocks).

    With ``cfg.image_tokens`` (NOT in the paper, see :class:`ModelConfig`) each image token
    also gets a learned embedding of its place in its image (plus row and column ones with
    ``cfg.image_axial``). Set ``model.gradient_checkpointing = True`` to recompute each
    block in the backward pass (activation checkpointing) while training.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.rotary = cfg.family == "chameleon"  # positions enter every attention layer, not the input
        if not self.rotary:
            self.pos_emb = nn.Embedding(cfg.max_seq_len, cfg.d_model)
        if cfg.image_tokens:
            self.image_pos_emb = nn.Embedding(cfg.image_tokens, cfg.d_model)
        if cfg.image_axial:
            side = math.isqrt(cfg.image_tokens)
            self.image_row_emb = nn.Embedding(side, cfg.d_model)
            self.image_col_emb = nn.Embedding(side, cfg.d_model)
        block = ChameleonBlock if self.rotary else Block
        self.blocks = nn.ModuleList(block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = RMSNorm(cfg.d_model, cfg.rms_eps) if self.rotary else nn.LayerNorm(cfg.d_model,
                                                                                        elementwise_affine=False)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.gradient_checkpointing = False
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Paper §2.3 init: trunc-normal(0, std, ±3 std) everywhere, pos-emb std 0.0002, LM head 0
        (the chameleon family: ``transformers``' init with std ``init_std``)."""
        std = self.cfg.init_std
        if self.rotary:
            init_chameleon_(self, std)
            return
        for name, p in self.named_parameters():
            if name in ("pos_emb.weight", "image_pos_emb.weight", "image_row_emb.weight", "image_col_emb.weight"):
                ps = self.cfg.pos_init_std
                nn.init.trunc_normal_(p, mean=0.0, std=ps, a=-3 * ps, b=3 * ps)
            elif name == "lm_head.weight":
                nn.init.zeros_(p)
            else:
                nn.init.trunc_normal_(p, mean=0.0, std=std, a=-3 * std, b=3 * std)

    def num_params(self, *, non_embedding: bool = False) -> int:
        """Number of parameters; ``non_embedding`` leaves out the token and position tables."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.tok_emb.weight.numel() + (0 if self.rotary else self.pos_emb.weight.numel())
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

        ``image_idx`` Long[B, T] (see :func:`image_index`) defaults to one computed from ``ids``;
        it is ignored without ``cfg.image_tokens``.
        """
        x = self.tok_emb(ids) if self.rotary else self.tok_emb(ids) + self.pos_emb(positions)
        if not self.cfg.image_tokens:
            return x
        if image_idx is None:
            image_idx = image_index(ids, self.first_image_id, self.cfg.image_tokens)
        place = image_idx.clamp_min(0)
        emb = self.image_pos_emb(place)
        if self.cfg.image_axial:
            side = self.image_row_emb.num_embeddings
            emb = emb + self.image_row_emb(place // side) + self.image_col_emb(place % side)
        return x + emb * (image_idx >= 0).unsqueeze(-1).to(x.dtype)

    def _rope(self, positions: Tensor, dtype: torch.dtype) -> dict[str, tuple[Tensor, Tensor]]:
        """The blocks' extra keyword: the rotary tables of ``positions`` (chameleon family), else nothing."""
        if not self.rotary:
            return {}
        return {"rope": rope_tables(positions, self.cfg.head_dim, self.cfg.rope_theta, dtype)}

    def forward(
        self, ids: Tensor, positions: Tensor | None = None, *, key_valid: Tensor | None = None,
        image_idx: Tensor | None = None,
    ) -> Tensor:
        """Causal forward over ``ids`` Long[B, T] -> logits Float[B, T, V].

        ``positions`` defaults to 0..T-1 (use :func:`positions_from_valid` for left-padded
        batches). ``key_valid`` Bool[B, T] is False on left padding: those keys are never
        attended; pad query rows still produce finite (meaningless) values. ``image_idx``
        Long[B, T] gives each token's place in its image, e.g. the un-transformed places of
        CM3 training rows (default: computed from ``ids``; see :meth:`embed`).
        """
        if ids.dim() != 2:
            raise ValueError(f"ids must be Long[B, T], got shape {tuple(ids.shape)}")
        if ids.dtype not in (torch.long, torch.int32):
            raise ValueError(f"ids must be an integer tensor, got {ids.dtype}")
        for name, t in (("positions", positions), ("image_idx", image_idx)):
            if t is not None and t.shape != ids.shape:
                raise ValueError(f"{name} shape {tuple(t.shape)} must equal ids shape {tuple(ids.shape)}")
        B, T = ids.shape
        if T > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds max_seq_len={self.cfg.max_seq_len}")
        if positions is None:
            positions = torch.arange(T, device=ids.device).expand(B, T)
        attn_mask = None if key_valid is None else padded_causal_mask(key_valid)
        x = self.embed(ids, positions, image_idx)  # (B, T, C)
        pos_kw = self._rope(positions, x.dtype)
        for block in self.blocks:
            if self.gradient_checkpointing and self.training:
                x = checkpoint(block, x, attn_mask, use_reentrant=False, **pos_kw)
            else:
                x = block(x, attn_mask, **pos_kw)
        return self.lm_head(self.ln_f(x))  # (B, T, V)

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
    ) -> Tensor:
        """Forward of new tokens ``ids`` Long[B, T] against a KV cache: the prefill (T = prompt
        length) and every decoding step (T = 1) of ``kv_cache.py``.

        Each layer writes its keys/values into ``kv[layer]`` (two Float[B, nh, S, hd]
        buffers) at ``slots`` and attends under ``attn_mask`` (Bool, or an additive float
        mask): ``slots`` an int s (eager) attends over the first s + T slots, ``attn_mask``
        [B, 1, T, s + T]; ``slots`` Long[T] (static shapes, for torch.compile) attends over
        the whole buffer, ``attn_mask`` [B, 1, T, S]. Returns logits Float[B, T, V], or
        Float[B, 1, V] for the last token only if ``last_only``. ``head_window=(lo, hi)``
        computes the logits of ids ``lo..hi-1`` only (Float[..., hi - lo]): decoding inside
        one modality needs no others. ``image_idx`` Long[B, T]: each new token's place in its
        image (models with ``image_tokens``; the cache tracks it across steps).
        """
        x = self.embed(ids, positions, image_idx)  # (B, T, C)
        pos_kw = self._rope(positions, x.dtype)
        for block, layer_kv in zip(self.blocks, kv):
            x = block(x, attn_mask, layer_kv, slots, **pos_kw)
        if last_only:
            x = x[:, -1:]  # (B, 1, C)
        if head_window is not None:
            lo, hi = head_window
            return F.linear(self.ln_f(x), self.lm_head.weight[lo:hi])  # (B, T, hi - lo)
        return self.lm_head(self.ln_f(x))  # (B, T, V)
