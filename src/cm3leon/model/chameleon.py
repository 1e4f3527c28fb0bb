"""The Chameleon decoder block (Chameleon Team 2024), as ``transformers`` implements it.

A Llama-style block with Chameleon's two changes for stable mixed-modal training:
per-head LayerNorm of queries and keys (with a learned scale and bias per head) and, in
the 34B model, ``swin_norm`` (each sublayer's output is normalized before the residual
add instead of its input). RMSNorm, rotary positions (rotate-half form, ``rope_theta``),
a SwiGLU MLP, no biases, optional grouped-query attention.

The blocks plug into :class:`cm3leon.model.transformer.Transformer` (``cfg.family ==
"chameleon"``): same call as the paper block plus ``rope``, the (cos, sin) tables of the
positions, so the KV cache, ``forward_cached`` and every decoding path are shared.
Keys are cached after the rotation, as in ``transformers``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cm3leon.config import ModelConfig
from cm3leon.model.attention import attend

Rope = tuple[Tensor, Tensor]


class RMSNorm(nn.Module):
    """RMSNorm with a learned scale, computed in float32 like ``transformers``' ``ChameleonRMSNorm``."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class HeadLayerNorm(nn.Module):
    """LayerNorm over each head's ``head_dim`` values with a scale and bias per (head, dim):
    Chameleon's query/key norm (each tensor-parallel shard of the original kept its own)."""

    def __init__(self, n_heads: int, head_dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n_heads, head_dim))
        self.bias = nn.Parameter(torch.zeros(n_heads, head_dim))

    def forward(self, x: Tensor) -> Tensor:  # x: (..., nh, hd)
        return F.layer_norm(x, (x.shape[-1],), None, None, eps=1e-5) * self.weight + self.bias


def rope_tables(positions: Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> Rope:
    """(cos, sin), each Float[B, T, head_dim] in ``dtype``, of the rotary embedding at ``positions`` Long[B, T].

    The inverse frequencies are computed per call (a few values) rather than kept as a
    buffer, so a model built on the meta device and loaded with ``assign=True`` needs no
    buffer fix-up.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float, device=positions.device) / head_dim))
    freqs = positions[..., None].float() * inv_freq  # (B, T, hd / 2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, hd)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: Tensor, rope: Rope) -> Tensor:
    """Rotate ``x`` Float[B, nh, T, hd] by the (cos, sin) tables Float[B, T, hd]."""
    cos, sin = rope[0][:, None], rope[1][:, None]  # (B, 1, T, hd)
    return x * cos + _rotate_half(x) * sin


class ChameleonAttention(nn.Module):
    """Causal self-attention with query/key head norms and rotary positions; the cache protocol
    of :class:`cm3leon.model.transformer.Attention` (``kv`` buffers are Float[B, n_kv, S, hd])."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, self.n_kv * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, self.n_kv * self.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.q_norm = HeadLayerNorm(self.n_heads, self.head_dim)
        self.k_norm = HeadLayerNorm(self.n_kv, self.head_dim)

    def forward(
        self,
        x: Tensor,
        attn_mask: Tensor | None,
        kv: tuple[Tensor, Tensor] | None,
        slots: Tensor | int | None,
        rope: Rope,
    ) -> Tensor:
        B, T, C = x.shape
        q = self.q_norm(self.q_proj(x).view(B, T, self.n_heads, self.head_dim)).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k_norm(self.k_proj(x).view(B, T, self.n_kv, self.head_dim)).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        y = attend(q, k, v, attn_mask, kv, slots)
        y = y.to(x.dtype).transpose(1, 2).reshape(B, T, C)  # (B, nh, T, hd) -> (B, T, C)
        return self.o_proj(y)


class SwiGLU(nn.Module):
    """``down(silu(gate(x)) * up(x))``, no biases."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.d_model, cfg.ffn_dim, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.ffn_dim, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_dim, cfg.d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class ChameleonBlock(nn.Module):
    """One decoder layer: pre-norm (``x + attn(norm(x))``) or, with ``cfg.swin_norm``,
    post-sublayer norm (``x + norm(attn(x))``); the same for the MLP."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.swin_norm = cfg.swin_norm
        self.ln1 = RMSNorm(cfg.d_model, cfg.rms_eps)
        self.attn = ChameleonAttention(cfg)
        self.ln2 = RMSNorm(cfg.d_model, cfg.rms_eps)
        self.mlp = SwiGLU(cfg)

    def forward(
        self,
        x: Tensor,
        attn_mask: Tensor | None = None,
        kv: tuple[Tensor, Tensor] | None = None,
        slots: Tensor | int | None = None,
        *,
        rope: Rope,
    ) -> Tensor:
        if self.swin_norm:
            x = x + self.ln1(self.attn(x, attn_mask, kv, slots, rope))
            return x + self.ln2(self.mlp(x))
        x = x + self.attn(self.ln1(x), attn_mask, kv, slots, rope)
        return x + self.mlp(self.ln2(x))


@torch.no_grad()
def init_chameleon_(model: nn.Module, std: float) -> None:
    """``transformers``' init for the family: normal(0, std) linear and embedding weights, unit norm scales,
    zero norm biases."""
    for name, p in model.named_parameters():
        if name.endswith("norm.weight") or name.endswith(("ln1.weight", "ln2.weight", "ln_f.weight")):
            nn.init.ones_(p)
        elif name.endswith("norm.bias"):
            nn.init.zeros_(p)
        else:
            nn.init.normal_(p, mean=0.0, std=std)
