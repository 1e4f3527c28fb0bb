"""Retrieval encoder backends (paper §2.1) and :func:`load_encoder`, which reads any saved one.

Every encoder implements :class:`~cm3leon.retrieval.encoder_base.Encoder`; two backends:

- ``clip``: a real CLIP model through ``transformers`` (the paper uses ViT-B-32), loaded
  from a local directory or the HF cache, never downloaded (:mod:`.clip_hf`);
- ``dual``: the small in-house CLIP-style dual encoder trained on the data set itself
  (:class:`DualEncoder`, :func:`train_dual_encoder`), the offline default, in this module.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file
from torch import nn

from cm3leon.config import from_json_dict
from cm3leon.pixels import pixels_to_unit
from cm3leon.retrieval.encoder_base import ENCODER_FILE, Encoder, write_encoder_json
from cm3leon.tokenize.text_bpe import TextTokenizer

log = logging.getLogger(__name__)


def load_encoder(directory: str | Path, *, device: str = "cpu") -> Encoder:
    """Load an encoder directory, dispatching on ``encoder.json``'s ``type``.

    A plain Hugging Face CLIP directory (``config.json`` with ``model_type`` clip, no
    ``encoder.json``) is accepted too and loaded as a ``clip`` encoder.
    """
    d = Path(directory)
    if not d.is_dir():
        raise FileNotFoundError(
            f"encoder directory {d} does not exist; train one with `cm3leon retrieval train-encoder` "
            "or point at a local CLIP model directory"
        )
    spec_path = d / ENCODER_FILE
    if not spec_path.exists():
        cfg = d / "config.json"
        if cfg.exists() and "clip" in json.loads(cfg.read_text()).get("model_type", ""):
            from cm3leon.retrieval.clip_hf import CLIPEncoder

            return CLIPEncoder.from_pretrained(d, device=device)
        raise FileNotFoundError(
            f"{spec_path} is missing: {d} is not an encoder directory (train one with "
            "`cm3leon retrieval train-encoder`, or pass a transformers CLIP model directory)"
        )
    try:
        spec = json.loads(spec_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{spec_path} is not valid JSON ({e}); re-save the encoder") from e
    kind = spec.get("type")
    if kind == "dual":
        return DualEncoder.load(d, device=device)
    if kind == "clip":
        from cm3leon.retrieval.clip_hf import CLIPEncoder

        return CLIPEncoder.load(d, device=device)
    raise ValueError(f"{spec_path}: unknown encoder type {kind!r}; expected 'dual' or 'clip'")


# ============================================================================ in-house


@dataclass(frozen=True)
class DualEncoderConfig:
    """Shape of the in-house CLIP-style dual encoder (text over BPE ids, image over pixels)."""

    vocab_size: int
    dim: int = 128
    width: int = 128
    text_layers: int = 2
    text_heads: int = 4
    max_text_len: int = 64
    image_size: int = 32
    channels: tuple[int, ...] = (16, 32, 64)
    init_temperature: float = 0.07
    # The image tower also keeps a spatial_grid x spatial_grid average-pooled map of its
    # features, so "a circle at the top left" and "... at the bottom right" embed apart
    # (global pooling alone is blind to where things are). 0: global pooling only.
    spatial_grid: int = 3
    # Initial std of the token embeddings; None: nn.Embedding's N(0, 1). Against the 0.02
    # positions, N(0, 1) tokens make the text tower nearly a bag of words: a caption and the
    # same caption with two objects' colors swapped embed at cosine 0.997, and even with
    # swapped-caption hard negatives only 58% of swaps are told apart on real images; 0.02
    # (CLIP's scale) reaches 94%. Still None by default: as the quickstart's retriever the
    # order-aware encoder gave worse training neighbours and a worse model (docs/retrieval.md).
    token_init_std: float | None = None

    def __post_init__(self) -> None:
        if self.vocab_size <= 0 or self.dim <= 0 or self.max_text_len <= 0:
            raise ValueError("vocab_size, dim and max_text_len must be positive")
        if self.width % self.text_heads:
            raise ValueError(f"width={self.width} is not divisible by text_heads={self.text_heads}")
        if self.image_size < 8 or not self.channels:
            raise ValueError("image_size must be >= 8 and channels non-empty")
        if self.token_init_std is not None and not self.token_init_std > 0:
            raise ValueError(f"token_init_std must be > 0 or None (nn.Embedding's N(0, 1)), got {self.token_init_std}")
        if self.spatial_grid < 0:
            raise ValueError(f"spatial_grid must be >= 0 (0: global pooling only), got {self.spatial_grid}")
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))


@dataclass(frozen=True)
class EncoderTrainConfig:
    """How the in-house encoder is trained (symmetric InfoNCE, in-batch negatives).

    The defaults train on Shapes in about two CPU minutes (one thread) to text->image
    recall@1 ~0.8 / recall@10 ~0.99 on held-out documents (docs/retrieval.md).
    """

    steps: int = 250
    batch_size: int = 256
    lr: float = 3e-3
    weight_decay: float = 0.01
    warmup: int = 25
    seed: int = 0


class _TextTower(nn.Module):
    def __init__(self, cfg: DualEncoderConfig) -> None:
        super().__init__()
        self.pad_id = cfg.vocab_size
        self.tok = nn.Embedding(cfg.vocab_size + 1, cfg.width, padding_idx=self.pad_id)
        if cfg.token_init_std is not None:
            with torch.no_grad():
                nn.init.normal_(self.tok.weight, std=cfg.token_init_std)
                self.tok.weight[self.pad_id].zero_()
        self.pos = nn.Parameter(torch.randn(cfg.max_text_len, cfg.width) * 0.02)
        layer = nn.TransformerEncoderLayer(
            cfg.width, cfg.text_heads, 2 * cfg.width, dropout=0.0, batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(layer, cfg.text_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(cfg.width)
        self.proj = nn.Linear(cfg.width, cfg.dim, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        valid = ids != self.pad_id  # (B, T)
        x = self.tok(ids) + self.pos[: ids.shape[1]]  # (B, T, W)
        x = self.norm(self.blocks(x, src_key_padding_mask=~valid))
        w = valid.unsqueeze(-1).float()
        pooled = (x * w).sum(1) / w.sum(1).clamp_min(1.0)  # masked mean, (B, W)
        return self.proj(pooled)


class _ImageTower(nn.Module):
    def __init__(self, cfg: DualEncoderConfig) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for i, c in enumerate(cfg.channels):
            stride = 1 if i == 0 else 2
            layers += [nn.Conv2d(c_in, c, 3, stride=stride, padding=1), nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
            c_in = c
        layers += [nn.Conv2d(c_in, c_in, 3, padding=1), nn.ReLU(inplace=True)]
        self.features = nn.Sequential(*layers)
        self.grid = cfg.spatial_grid
        n_in = (2 + self.grid**2) * c_in
        self.head = nn.Sequential(nn.Linear(n_in, 2 * c_in), nn.ReLU(inplace=True), nn.Linear(2 * c_in, cfg.dim))

    def forward(self, px: torch.Tensor) -> torch.Tensor:
        f = self.features(px)  # (B, C, h, w)
        parts = [f.mean((2, 3)), f.amax((2, 3))]  # (B, 2C): how much + whether
        if self.grid:
            parts.append(F.adaptive_avg_pool2d(f, self.grid).flatten(1))  # (B, C g^2): where
        return self.head(torch.cat(parts, dim=1))


class DualEncoderModel(nn.Module):
    """The two towers and the learnable temperature; outputs are L2-normalized."""

    def __init__(self, cfg: DualEncoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.text = _TextTower(cfg)
        self.image = _ImageTower(cfg)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / cfg.init_temperature)))

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text(ids), dim=-1)

    def encode_image(self, px: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image(px), dim=-1)


def contrastive_loss(
    text: torch.Tensor, image: torch.Tensor, logit_scale: torch.Tensor, positives: torch.Tensor | None = None,
    hard_negatives: torch.Tensor | None = None,
) -> torch.Tensor:
    """Symmetric InfoNCE over a batch of unit vectors [B, D] (CLIP's objective).

    ``positives`` [B, B] (bool) marks extra matching pairs (e.g. identical captions) so
    they are not pushed apart as negatives; the diagonal is always positive.
    ``hard_negatives`` [M, D]: extra caption embeddings that match no image of the batch
    (NegCLIP, Yuksekgonul et al. 2023): every image must also beat them (image->text
    direction only; they are no image's caption, so text->image has nothing to add).
    """
    scale = logit_scale.exp().clamp(max=100.0)
    logits = scale * text @ image.T  # (B, B)
    b = logits.shape[0]
    pos = torch.eye(b, dtype=torch.bool, device=logits.device)
    if positives is not None:
        pos = pos | positives

    def multi_positive_ce(lg: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        return (torch.logsumexp(lg, 1) - torch.logsumexp(lg.masked_fill(~p, float("-inf")), 1)).mean()

    image_to_text, pos_i2t = logits.T, pos.T  # (B, B): row = image
    if hard_negatives is not None and len(hard_negatives):
        image_to_text = torch.cat([image_to_text, scale * image @ hard_negatives.T], dim=1)  # (B, B + M)
        pos_i2t = torch.cat([pos_i2t, pos_i2t.new_zeros(b, len(hard_negatives))], dim=1)
    return 0.5 * (multi_positive_ce(logits, pos) + multi_positive_ce(image_to_text, pos_i2t))


class DualEncoder(Encoder):
    """The in-house encoder behind the :class:`Encoder` interface."""

    def __init__(self, model: DualEncoderModel, tokenizer: TextTokenizer, *, device: str = "cpu",
                 batch_size: int = 512, info: dict[str, Any] | None = None) -> None:
        if tokenizer.vocab_size != model.cfg.vocab_size:
            raise ValueError(
                f"text tokenizer has {tokenizer.vocab_size} ids but the encoder expects {model.cfg.vocab_size}; "
                "load the tokenizer saved with this encoder"
            )
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        self.device = device
        self.batch_size = batch_size
        self.info: dict[str, Any] = dict(info or {})
        self.name = f"dual-{model.cfg.dim}d"

    @property
    def cfg(self) -> DualEncoderConfig:
        return self.model.cfg

    @property
    def dim(self) -> int:
        return self.cfg.dim

    # ---- preprocessing (shared with training) --------------------------------------
    def text_ids(self, texts: Sequence[str]) -> torch.Tensor:
        """Padded BPE ids Long [N, T] (T <= max_text_len; pad = vocab_size)."""
        return _pad_ids(self.tokenizer.encode_batch(list(texts)), self.cfg)

    def pixels(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Uint8 [N, 3, S, S] of images resized to ``image_size``."""
        return _pixels(images, self.cfg.image_size)

    # ---- Encoder API ---------------------------------------------------------------
    @torch.inference_mode()
    def embed_text(self, texts: Sequence[str]) -> np.ndarray:
        texts = list(texts)
        out = [
            self.model.encode_text(self.text_ids(texts[s : s + self.batch_size]).to(self.device)).float().cpu()
            for s in range(0, len(texts), self.batch_size)
        ]
        return torch.cat(out).numpy() if out else np.zeros((0, self.dim), np.float32)

    @torch.inference_mode()
    def embed_image(self, images: Sequence[Image.Image]) -> np.ndarray:
        images = list(images)
        out = [
            self.model.encode_image(pixels_to_unit(self.pixels(images[s : s + self.batch_size]).to(self.device)))
            .float()
            .cpu()
            for s in range(0, len(images), self.batch_size)
        ]
        return torch.cat(out).numpy() if out else np.zeros((0, self.dim), np.float32)

    # ---- persistence ---------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        """``encoder.json`` + ``model.safetensors`` + ``text_tokenizer/``."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save(d / TOKENIZER_DIR)
        state = {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
        from cm3leon.safetensors_io import write_safetensors  # a failed write (disk full): one-line WriteError

        write_safetensors(state, d / WEIGHTS_FILE, what="the encoder weights")
        write_encoder_json(
            d, {"type": "dual", "name": self.name, "dim": self.dim, "config": asdict(self.cfg), "info": self.info}
        )
        return d

    @classmethod
    def load(cls, directory: str | Path, *, device: str = "cpu") -> DualEncoder:
        """Read an encoder directory written by :meth:`save` (strict weight loading)."""
        d = Path(directory)
        spec = json.loads((d / ENCODER_FILE).read_text())
        # Encoders saved before spatial_grid existed pooled globally only.
        cfg = from_json_dict(DualEncoderConfig, {"spatial_grid": 0, **spec["config"]})
        if not (d / WEIGHTS_FILE).exists():
            raise FileNotFoundError(f"{d / WEIGHTS_FILE} is missing; re-train or re-save the encoder")
        model = DualEncoderModel(cfg)
        state = load_file(str(d / WEIGHTS_FILE))
        expected = model.state_dict()
        bad = {k for k in expected if k not in state or state[k].shape != expected[k].shape}
        bad |= set(state) - set(expected)
        if bad:
            raise ValueError(f"{d / WEIGHTS_FILE} does not match the encoder config: keys {sorted(bad)[:5]}")
        model.load_state_dict(state, strict=True)
        return cls(model, TextTokenizer.load(d / TOKENIZER_DIR), device=device, info=spec.get("info"))


TOKENIZER_DIR = "text_tokenizer"
WEIGHTS_FILE = "model.safetensors"


def _pad_ids(seqs: list[list[int]], cfg: DualEncoderConfig) -> torch.Tensor:
    t = max([min(len(s), cfg.max_text_len) for s in seqs] + [1])
    out = torch.full((len(seqs), t), cfg.vocab_size, dtype=torch.long)
    for i, s in enumerate(seqs):
        s = s[: cfg.max_text_len]
        out[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    return out


def _pixels(images: Sequence[Image.Image], size: int) -> torch.Tensor:
    arr = np.stack([
        np.asarray(im.convert("RGB") if im.size == (size, size) else
                   im.convert("RGB").resize((size, size), Image.BILINEAR), dtype=np.uint8)
        for im in images
    ]) if images else np.zeros((0, size, size, 3), np.uint8)
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()  # (N, 3, S, S)


def train_dual_encoder(
    texts: Sequence[str],
    images: Sequence[Image.Image],
    *,
    tokenizer: TextTokenizer,
    cfg: DualEncoderConfig | None = None,
    train_cfg: EncoderTrainConfig | None = None,
    device: str = "cpu",
    progress: bool = False,
    negatives: Sequence[Sequence[str]] | None = None,
) -> DualEncoder:
    """Train the in-house encoder on aligned caption/image pairs (symmetric InfoNCE).

    Pairs with identical captions are treated as positives of each other, so repeated
    captions (common in small synthetic worlds) are not pushed apart as negatives.
    ``negatives[i]``: hard-negative captions of pair i (e.g. its caption with two objects'
    colors swapped, :func:`cm3leon.shapes.captions.hard_negative_captions`); each step one of
    them per pair in the batch joins the image->text softmax (:func:`contrastive_loss`),
    which teaches the text tower which attribute belongs to which object (NegCLIP).
    """
    tc = train_cfg or EncoderTrainConfig()
    if len(texts) != len(images):
        raise ValueError(f"got {len(texts)} captions for {len(images)} images")
    if negatives is not None and len(negatives) != len(texts):
        raise ValueError(
            f"got hard negatives for {len(negatives)} pairs but {len(texts)} pairs; give one list per pair"
        )
    if len(texts) < 2:
        raise ValueError("need at least 2 caption-image pairs to train the encoder")
    cfg = cfg or DualEncoderConfig(vocab_size=tokenizer.vocab_size)
    torch.manual_seed(tc.seed)
    model = DualEncoderModel(cfg).to(device)
    enc = DualEncoder(model, tokenizer, device=device)
    ids = enc.text_ids(texts)  # (N, T)
    px = enc.pixels(images)  # (N, 3, S, S) uint8
    _, caption_class = np.unique(np.asarray(texts, dtype=object).astype(str), return_inverse=True)
    caption_class = torch.from_numpy(caption_class)
    neg_ids = neg_start = neg_count = None
    if negatives is not None:
        flat = [str(t) for ns in negatives for t in ns]
        neg_count = torch.tensor([len(ns) for ns in negatives], dtype=torch.long)
        neg_start = torch.cumsum(neg_count, 0) - neg_count
        neg_ids = enc.text_ids(flat) if flat else None
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "pos" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "pos" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": tc.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=tc.lr
    )

    def lr_at(step: int) -> float:
        if step < tc.warmup:
            return tc.lr * (step + 1) / tc.warmup
        frac = (step - tc.warmup) / max(1, tc.steps - tc.warmup)
        return tc.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))

    gen = torch.Generator().manual_seed(tc.seed)
    bs = min(tc.batch_size, len(texts))
    steps = range(tc.steps)
    if progress:
        from tqdm import tqdm

        steps = tqdm(steps, desc="train encoder", unit="step")
    model.train()
    losses = []
    for step in steps:
        idx = torch.randperm(len(texts), generator=gen)[:bs]
        cls = caption_class[idx]
        t = model.encode_text(ids[idx].to(device))
        v = model.encode_image(pixels_to_unit(px[idx].to(device)))
        hard = None
        count = neg_count[idx] if neg_count is not None else None
        if neg_ids is not None and bool((count > 0).any()):
            draw = (torch.rand(len(idx), generator=gen) * count).long()
            pick = neg_start[idx] + draw.clamp_max((count - 1).clamp_min(0))
            hard = model.encode_text(neg_ids[pick[count > 0]].to(device))
        loss = contrastive_loss(t, v, model.logit_scale, (cls[:, None] == cls[None, :]).to(device), hard)
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if progress and step % 10 == 0:
            steps.set_postfix(loss=f"{losses[-1]:.3f}")  # type: ignore[union-attr]
    model.eval()
    enc.info = {
        "train": {**asdict(tc), "pairs": len(texts), "first_loss": losses[0],
                  "final_loss": float(np.mean(losses[-10:])),
                  "hard_negatives": 0 if neg_count is None else int(neg_count.sum())}
    }
    log.info("trained %s on %d pairs: loss %.3f -> %.3f", enc.name, len(texts), losses[0],
             enc.info["train"]["final_loss"])
    return enc


def text_to_image_recall(
    text_emb: np.ndarray, image_emb: np.ndarray, keys: Sequence[Any], ks: Sequence[int] = (1, 10)
) -> dict[str, float]:
    """Text->image recall@k: a hit when one of the top-k images has the query's key.

    ``keys[i]`` says what document i is about (for Shapes: the multiset of (shape, color));
    with ``keys = range(N)`` this is the usual paired recall.
    """
    if len(text_emb) != len(image_emb) or len(keys) != len(text_emb):
        raise ValueError("text_emb, image_emb and keys must have the same length")
    _, key_ids = np.unique(np.array([repr(k) for k in keys]), return_inverse=True)
    sims = np.asarray(text_emb, np.float32) @ np.asarray(image_emb, np.float32).T  # (N, N)
    order = np.argsort(-sims, axis=1, kind="stable")
    hit = key_ids[order] == key_ids[:, None]  # (N, N) relevant at rank r
    return {f"recall@{k}": float(hit[:, :k].any(1).mean()) for k in ks}
