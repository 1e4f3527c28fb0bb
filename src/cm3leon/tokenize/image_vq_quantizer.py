"""Vector quantizer of the image tokenizer: nearest-codebook lookup with a straight-through
gradient, in three flavours that share one parameter layout (``embedding.weight``, as in
taming-transformers, Chameleon and LlamaGen):

* ``classic``: codebook + commitment loss (VQ-VAE / taming).
* ``ema``: codebook updated by exponential moving averages of the assigned encoder
  outputs (VQ-VAE-2); only the commitment loss back-propagates. The EMA statistics are
  buffers on the embedding (``embedding.cluster_size``, ``embedding.embed_avg``), the
  same names as taming's ``EmbeddingEMA``.
* either of the above with ``l2_norm=True``: z and the codebook are L2-normalized before
  the lookup (ViT-VQGAN / LlamaGen factorized codes; pair it with a small ``embed_dim``
  such as 8 for high codebook usage).

Dead codes (rarely chosen entries) can be re-initialized from recent encoder outputs with
:meth:`VectorQuantizer.restart_dead_codes`; the trainer decides when.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

QUANTIZER_KINDS = ("classic", "ema")


@dataclass
class QuantizerOutput:
    """What one quantizer call returns (``indices`` is Long[B, h, w])."""

    z_q: torch.Tensor  # [B, D, h, w], straight-through (gradient flows to z)
    loss: torch.Tensor  # scalar: codebook (classic only) + beta * commitment
    indices: torch.Tensor  # [B, h, w]
    latents: torch.Tensor  # [B*h*w, D] detached (normalized if l2_norm): restart material
    counts: torch.Tensor  # [K] how often each code was picked in this batch


def squared_distances(z: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """``|z_i - e_j|^2`` for rows of ``z`` [N, D] and ``e`` [K, D] -> [N, K]."""
    # |z - e|^2 = |z|^2 + |e|^2 - 2 z.e ; the |z|^2 term does not change an argmin but is
    # kept so distances are true distances (and ties break like taming/HF).
    return z.pow(2).sum(1, keepdim=True) + e.pow(2).sum(1) - 2.0 * z @ e.t()


class VectorQuantizer(nn.Module):
    """Nearest-neighbour codebook over channel vectors of a ``[B, D, h, w]`` map."""

    def __init__(
        self,
        codebook_size: int,
        embed_dim: int,
        *,
        kind: str = "classic",
        beta: float = 0.25,
        l2_norm: bool = False,
        ema_decay: float = 0.99,
        usage_decay: float = 0.99,
    ) -> None:
        super().__init__()
        if kind not in QUANTIZER_KINDS:
            raise ValueError(f"quantizer kind must be one of {QUANTIZER_KINDS}, got {kind!r}")
        self.codebook_size = codebook_size
        self.embed_dim = embed_dim
        self.kind = kind
        self.beta = beta
        self.l2_norm = l2_norm
        self.ema_decay = ema_decay
        self.usage_decay = usage_decay
        self.embedding = nn.Embedding(codebook_size, embed_dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / codebook_size, 1.0 / codebook_size)
        if l2_norm:
            nn.init.normal_(self.embedding.weight)
        if kind == "ema":
            self.embedding.weight.requires_grad_(False)
            self.embedding.register_buffer("cluster_size", torch.zeros(codebook_size))
            self.embedding.register_buffer("embed_avg", self.embedding.weight.detach().clone())
        # Running usage of each code (training only; decides which codes are dead).
        self.register_buffer("usage", torch.ones(codebook_size), persistent=False)

    # ---- lookup --------------------------------------------------------------------
    def codebook(self) -> torch.Tensor:
        """The effective codebook [K, D] (unit rows when ``l2_norm``)."""
        w = self.embedding.weight
        return F.normalize(w, dim=-1) if self.l2_norm else w

    def nearest(self, z_flat: torch.Tensor) -> torch.Tensor:
        """Index of the nearest code (squared L2) for each row of ``z_flat`` [N, D]."""
        return squared_distances(z_flat, self.codebook()).argmin(dim=1)

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Code vectors for ``indices`` [B, h, w] as a map [B, D, h, w]."""
        return F.embedding(indices, self.codebook()).permute(0, 3, 1, 2).contiguous()

    # ---- forward -------------------------------------------------------------------
    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        """Quantize ``z`` [B, D, h, w]; in training mode also update EMA / usage statistics."""
        b, d, h, w = z.shape
        if d != self.embed_dim:
            raise ValueError(f"quantizer expects {self.embed_dim} channels, got {d}")
        z = z.float()
        z_bhwd = z.permute(0, 2, 3, 1)  # (B, h, w, D)
        if self.l2_norm:
            z_bhwd = F.normalize(z_bhwd, dim=-1)
        z_flat = z_bhwd.reshape(-1, d)  # (B*h*w, D)
        idx = self.nearest(z_flat.detach())
        counts = torch.bincount(idx, minlength=self.codebook_size).to(z.dtype)
        if self.training and torch.is_grad_enabled():  # not from encode() (no_grad) on a training model
            self._update_statistics(z_flat.detach(), idx, counts)
        z_q = F.embedding(idx, self.codebook()).view(b, h, w, d)
        commitment = F.mse_loss(z_bhwd, z_q.detach())
        if self.kind == "classic":
            loss = F.mse_loss(z_q, z_bhwd.detach()) + self.beta * commitment
        else:
            loss = self.beta * commitment
        z_q = z_bhwd + (z_q - z_bhwd).detach()  # straight-through estimator
        return QuantizerOutput(
            z_q=z_q.permute(0, 3, 1, 2).contiguous(),
            loss=loss,
            indices=idx.view(b, h, w),
            latents=z_flat.detach(),
            counts=counts,
        )

    @torch.no_grad()
    def _update_statistics(self, z_flat: torch.Tensor, idx: torch.Tensor, counts: torch.Tensor) -> None:
        self.usage.mul_(self.usage_decay).add_(counts, alpha=1.0 - self.usage_decay)
        if self.kind != "ema":
            return
        emb = self.embedding
        sums = torch.zeros_like(emb.embed_avg).index_add_(0, idx, z_flat)
        emb.cluster_size.mul_(self.ema_decay).add_(counts, alpha=1.0 - self.ema_decay)
        emb.embed_avg.mul_(self.ema_decay).add_(sums, alpha=1.0 - self.ema_decay)
        n = emb.cluster_size.sum()
        eps = 1e-5
        smoothed = (emb.cluster_size + eps) / (n + self.codebook_size * eps) * n  # Laplace smoothing
        emb.weight.copy_(emb.embed_avg / smoothed.unsqueeze(1))

    @torch.no_grad()
    def restart_dead_codes(self, recent: torch.Tensor, *, threshold: float, generator: torch.Generator | None = None,
                           sampling: str = "uniform") -> int:
        """Re-initialize codes whose running usage is below ``threshold`` from rows of
        ``recent`` [N, D] (recent encoder outputs); returns how many were restarted.

        ``sampling="uniform"`` picks rows uniformly (Jukebox); ``"error"`` picks them with
        probability proportional to their squared distance to the nearest live code, so dead
        codes move to where the codebook fits worst instead of piling onto the most frequent
        content (a white background would otherwise be split over many equivalent codes).
        """
        if sampling not in ("uniform", "error"):
            raise ValueError(f"restart sampling must be 'uniform' or 'error', got {sampling!r}")
        dead = (self.usage < threshold).nonzero().flatten()
        if dead.numel() == 0 or recent.numel() == 0:
            return 0
        weights = None
        if sampling == "error":
            live = self.usage >= threshold
            if live.any():
                d = squared_distances(recent, self.codebook()[live].to(recent.dtype)).amin(1)
                weights = d.clamp_min(0).cpu()
                if not float(weights.sum()) > 0:
                    weights = None
        if weights is None:
            pick = torch.randint(0, recent.shape[0], (dead.numel(),), generator=generator, device="cpu")
        else:
            pick = torch.multinomial(weights.double(), dead.numel(), replacement=True, generator=generator)
        pick = pick.to(recent.device)
        new = recent[pick].to(self.embedding.weight.dtype)
        new = new + 1e-3 * new.std() * torch.randn(new.shape, generator=generator, device="cpu").to(new.device)
        self.embedding.weight[dead] = new
        if self.kind == "ema":
            self.embedding.cluster_size[dead] = 1.0
            self.embedding.embed_avg[dead] = new
        self.usage[dead] = self.usage.mean().clamp_min(threshold)
        return int(dead.numel())


def codebook_stats(counts: torch.Tensor) -> dict[str, float]:
    """Usage fraction and perplexity of a code histogram ``counts`` [K]."""
    counts = counts.float()
    total = counts.sum().clamp_min(1.0)
    p = counts / total
    entropy = -(p * torch.log(p.clamp_min(1e-12))).sum()
    return {
        "usage": float((counts > 0).float().mean()),
        "perplexity": float(entropy.exp()),
    }
