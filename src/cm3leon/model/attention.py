"""Scaled dot-product attention over an optional KV cache, shared by both decoder families."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def attend(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None,
           kv: tuple[Tensor, Tensor] | None, slots: Tensor | int | None) -> Tensor:
    """Attention of ``q`` (B, nh, T, hd) over ``k`` / ``v`` (B, nkv, T, hd), first written into the
    cache buffers ``kv`` (B, nkv, S, hd) when given: at ``slots`` onwards (an int: the keys are the
    buffers' first ``slots + T`` positions) or at the positions in ``slots`` (a tensor: the keys are
    the whole buffers). Fewer key heads than query heads is grouped-query attention. Returns
    (B, nh, T, hd) in the cache's dtype."""
    if kv is not None:
        k_buf, v_buf = kv
        if isinstance(slots, int):
            k_buf.narrow(2, slots, k.shape[2]).copy_(k)
            v_buf.narrow(2, slots, v.shape[2]).copy_(v)
            k, v = k_buf.narrow(2, 0, slots + k.shape[2]), v_buf.narrow(2, 0, slots + v.shape[2])
        else:
            k_buf.index_copy_(2, slots, k.to(k_buf.dtype))
            v_buf.index_copy_(2, slots, v.to(v_buf.dtype))
            k, v = k_buf, v_buf
        q = q.to(k_buf.dtype)
    gqa = k.shape[1] != q.shape[1]
    if attn_mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, enable_gqa=gqa)
