"""Image tokenizer: a VQ-GAN of the taming-transformers family (paper §2.1: 256 px ->
32x32 = 1024 codes from a codebook of 8192, the Make-a-Scene tokenizer of Gafni et al.).

``ImageTokenizer`` turns images ``Float[B,3,H,W]`` in [-1, 1] into codes ``Long[B, L]``
(L = (H/f)^2, row-major over the latent grid) and back. Parameter names follow taming's
``VQModel`` (``encoder.conv_in``, ``encoder.down.0.block.0.norm1``, ...,
``quantize.embedding.weight``, ``quant_conv``, ``post_quant_conv``, ``decoder.up...``) so a
taming-format state dict loads without renaming; the adapters for other layouts live in
:mod:`cm3leon.tokenize.image_vq_convert`. Training lives in
:mod:`cm3leon.tokenize.image_vq_train`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from cm3leon.config import atomic_write_text
from cm3leon.safetensors_io import read_safetensors, reporting_write_errors, write_safetensors
from cm3leon.tokenize.image_vq_preprocess import MAX_IMAGE_PIXELS, images_to_tensor, tensor_to_images
from cm3leon.tokenize.image_vq_quantizer import QUANTIZER_KINDS, QuantizerOutput, VectorQuantizer

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
KIND = "cm3leon-image-vq"
FORMAT_VERSION = 1


# ---- config ------------------------------------------------------------------------
@dataclass(frozen=True)
class VQConfig:
    """Shape of the VQ-GAN (taming's ``ddconfig`` + quantizer settings).

    The downsampling factor is ``f = 2 ** (len(ch_mult) - 1)``; an image of
    ``resolution`` px becomes a ``(resolution/f)^2`` grid of codes.
    """

    resolution: int = 256
    in_channels: int = 3
    out_channels: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (32,)
    mid_attn: bool = True  # taming and Chameleon always have encoder/decoder.mid.attn_1
    z_channels: int = 256
    embed_dim: int = 256  # code dimension (8 for LlamaGen-style factorized codes)
    codebook_size: int = 8192
    quantizer: str = "classic"  # "classic" | "ema"
    l2_norm_codes: bool = False  # ViT-VQGAN / LlamaGen: l2-normalize z and codebook
    beta: float = 0.25  # commitment weight
    ema_decay: float = 0.99
    num_groups: int = 32  # GroupNorm groups (taming: 32)
    # "group": taming's GroupNorm (statistics over the whole image, so a background patch's
    # code depends on everything else in the picture); "channel": LayerNorm over channels at
    # each position (local: identical content gets identical codes, which an LM can predict).
    norm: str = "group"
    # The encoder sees each f x f patch alone (its receptive field is the patch), so identical
    # patches always get identical codes: a uniform background is one code, not dozens of
    # synonyms an LM must guess between. The decoder still sees the whole grid.
    patch_local: bool = False
    dropout: float = 0.0

    def __post_init__(self) -> None:
        # JSON gives lists; keep the dataclass hashable and comparable.
        object.__setattr__(self, "ch_mult", tuple(int(m) for m in self.ch_mult))
        object.__setattr__(self, "attn_resolutions", tuple(int(r) for r in self.attn_resolutions))
        if not self.ch_mult:
            raise ValueError("VQConfig.ch_mult must have at least one level")
        for name in ("resolution", "in_channels", "out_channels", "ch", "num_res_blocks", "z_channels",
                     "embed_dim", "codebook_size", "num_groups"):
            if getattr(self, name) <= 0:
                raise ValueError(f"VQConfig.{name} must be positive, got {getattr(self, name)}")
        if self.resolution % self.downsample_factor:
            raise ValueError(
                f"VQConfig.resolution={self.resolution} is not divisible by the downsampling factor "
                f"{self.downsample_factor} = 2**(len(ch_mult)-1)"
            )
        for m in self.ch_mult:
            if (self.ch * m) % self.num_groups:
                raise ValueError(f"channels ch*{m}={self.ch * m} are not divisible by num_groups={self.num_groups}")
        if self.norm not in ("group", "channel"):
            raise ValueError(f"VQConfig.norm must be 'group' or 'channel', got {self.norm!r}")
        if self.quantizer not in QUANTIZER_KINDS:
            raise ValueError(f"VQConfig.quantizer must be one of {QUANTIZER_KINDS}, got {self.quantizer!r}")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def grid_size(self) -> int:
        """Side of the latent grid (resolution / f)."""
        return self.resolution // self.downsample_factor

    @property
    def tokens_per_image(self) -> int:
        return self.grid_size**2

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> VQConfig:
        """A named preset (see :data:`VQ_PRESETS`) with optional overrides."""
        if name not in VQ_PRESETS:
            raise ValueError(f"unknown image tokenizer preset {name!r}; choose one of {sorted(VQ_PRESETS)}")
        return dataclasses.replace(VQ_PRESETS[name], **overrides)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["ch_mult"], d["attn_resolutions"] = list(self.ch_mult), list(self.attn_resolutions)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VQConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"VQConfig: unknown fields {sorted(unknown)} (known: {sorted(names)})")
        return cls(**d)


VQ_PRESETS: dict[str, VQConfig] = {
    # 32 px -> 8x8 = 64 tokens (f=4); small enough to train on one CPU core in minutes
    # (channels 16/32/64: the cheap low-resolution levels get the width). Patch-local
    # encoder: the white background is exactly one code (a global encoder spread it over
    # ~100 synonyms, 4 nats of noise per background token for the LM).
    "shapes-32": VQConfig(
        resolution=32, ch=16, ch_mult=(1, 2, 4), num_res_blocks=1, attn_resolutions=(), mid_attn=False,
        z_channels=64, embed_dim=8, codebook_size=512, l2_norm_codes=True, num_groups=8, patch_local=True,
    ),
    # 64 px -> 8x8 = 64 tokens (f=8): the LM sees as many tokens per image as at 32 px.
    # Patch-local for the reason given at shapes-32.
    "shapes-64": VQConfig(
        resolution=64, ch=16, ch_mult=(1, 2, 4, 4), num_res_blocks=1, attn_resolutions=(), mid_attn=False,
        z_channels=64, embed_dim=8, codebook_size=1024, l2_norm_codes=True, num_groups=8, patch_local=True,
    ),
    # 128 px -> 16x16 = 256 tokens (f=8); width 8 at full resolution keeps a CPU step near 0.5 s.
    "shapes-128": VQConfig(
        resolution=128, ch=8, ch_mult=(1, 2, 4, 8), num_res_blocks=1, attn_resolutions=(), mid_attn=False,
        z_channels=64, embed_dim=8, codebook_size=1024, l2_norm_codes=True, num_groups=8, patch_local=True,
    ),
    # 256 px -> 16x16 = 256 tokens (f=16): CPU-sized; paper-256 is the paper's f=8, 1024 tokens.
    "shapes-256": VQConfig(
        resolution=256, ch=8, ch_mult=(1, 1, 2, 4, 8), num_res_blocks=1, attn_resolutions=(), mid_attn=False,
        z_channels=64, embed_dim=8, codebook_size=1024, l2_norm_codes=True, num_groups=8, patch_local=True,
    ),
    # Paper scale: 256 px -> 32x32 = 1024 tokens, 8192 codes, f=8, taming-like channels.
    "paper-256": VQConfig(
        resolution=256, ch=128, ch_mult=(1, 1, 2, 4), num_res_blocks=2, attn_resolutions=(32,),
        z_channels=256, embed_dim=256, codebook_size=8192,
    ),
    # Chameleon's released tokenizer (HF ChameleonVQVAEConfig defaults): 512 px -> 32x32, f=16.
    "chameleon-512": VQConfig(
        resolution=512, ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, attn_resolutions=(),
        z_channels=256, embed_dim=256, codebook_size=8192,
    ),
}


# ---- building blocks (taming layout) -------------------------------------------------
class ChannelNorm(nn.Module):
    """LayerNorm over the channels of each position of ``[B,C,H,W]`` (same parameter names as GroupNorm)."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), self.weight, self.bias, self.eps)
        return y.permute(0, 3, 1, 2)


def _norm(channels: int, groups: int) -> nn.Module:
    """GroupNorm with ``groups`` groups, or :class:`ChannelNorm` when ``groups == 0``."""
    if groups == 0:
        return ChannelNorm(channels)
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """GroupNorm -> swish -> conv, twice, plus a (1x1 ``nin_shortcut``) residual."""

    def __init__(self, in_channels: int, out_channels: int, *, groups: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = _norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        skip = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return skip + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the pixels of a feature map (1x1 q/k/v/proj_out)."""

    def __init__(self, channels: int, *, groups: int) -> None:
        super().__init__()
        self.norm = _norm(channels, groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        hn = self.norm(x)

        def tokens(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(b, 1, c, h * w).transpose(2, 3)  # (B, 1, hw, C)

        a = F.scaled_dot_product_attention(tokens(self.q(hn)), tokens(self.k(hn)), tokens(self.v(hn)))
        a = a.transpose(2, 3).reshape(b, c, h, w)  # (B, C, h, w)
        return x + self.proj_out(a)


class Downsample(nn.Module):
    """Stride-2 3x3 conv with taming's asymmetric (right/bottom) zero padding."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest x2 upsampling followed by a 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _level(blocks: list[nn.Module], attns: list[nn.Module]) -> nn.Module:
    m = nn.Module()
    m.block = nn.ModuleList(blocks)
    m.attn = nn.ModuleList(attns)
    return m


def _groups(cfg: VQConfig) -> int:
    return cfg.num_groups if cfg.norm == "group" else 0


def _mid(channels: int, cfg: VQConfig) -> nn.Module:
    m = nn.Module()
    m.block_1 = ResnetBlock(channels, channels, groups=_groups(cfg), dropout=cfg.dropout)
    m.attn_1 = AttnBlock(channels, groups=_groups(cfg)) if cfg.mid_attn else nn.Identity()
    m.block_2 = ResnetBlock(channels, channels, groups=_groups(cfg), dropout=cfg.dropout)
    return m


class Encoder(nn.Module):
    """Image [B, C_in, H, W] -> latent [B, z_channels, H/f, W/f]."""

    def __init__(self, cfg: VQConfig) -> None:
        super().__init__()
        g, n = _groups(cfg), len(cfg.ch_mult)
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        in_mult = (1,) + cfg.ch_mult
        res = cfg.resolution
        self.down = nn.ModuleList()
        for i in range(n):
            c_in, c_out = cfg.ch * in_mult[i], cfg.ch * cfg.ch_mult[i]
            blocks, attns = [], []
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResnetBlock(c_in, c_out, groups=g, dropout=cfg.dropout))
                c_in = c_out
                if res in cfg.attn_resolutions:
                    attns.append(AttnBlock(c_in, groups=g))
            level = _level(blocks, attns)
            if i != n - 1:
                level.downsample = Downsample(c_in)
                res //= 2
            self.down.append(level)
        self.mid = _mid(c_in, cfg)
        self.norm_out = _norm(c_in, g)
        self.conv_out = nn.Conv2d(c_in, cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for i, level in enumerate(self.down):
            for j, block in enumerate(level.block):
                h = block(h)
                if len(level.attn):
                    h = level.attn[j](h)
            if i != len(self.down) - 1:
                h = level.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent [B, z_channels, h, w] -> image [B, C_out, h*f, w*f]."""

    def __init__(self, cfg: VQConfig) -> None:
        super().__init__()
        g, n = _groups(cfg), len(cfg.ch_mult)
        c_in = cfg.ch * cfg.ch_mult[-1]
        res = cfg.grid_size
        self.conv_in = nn.Conv2d(cfg.z_channels, c_in, 3, padding=1)
        self.mid = _mid(c_in, cfg)
        up: list[nn.Module] = []
        for i in reversed(range(n)):
            c_out = cfg.ch * cfg.ch_mult[i]
            blocks, attns = [], []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResnetBlock(c_in, c_out, groups=g, dropout=cfg.dropout))
                c_in = c_out
                if res in cfg.attn_resolutions:
                    attns.append(AttnBlock(c_in, groups=g))
            level = _level(blocks, attns)
            if i != 0:
                level.upsample = Upsample(c_in)
                res *= 2
            up.insert(0, level)  # taming stores levels in resolution order: up.0 is full size
        self.up = nn.ModuleList(up)
        self.norm_out = _norm(c_in, g)
        self.conv_out = nn.Conv2d(c_in, cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for i in reversed(range(len(self.up))):
            level = self.up[i]
            for j, block in enumerate(level.block):
                h = block(h)
                if len(level.attn):
                    h = level.attn[j](h)
            if i != 0:
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


# ---- the tokenizer -----------------------------------------------------------------
@dataclass
class VQOutput:
    """Result of a training forward pass."""

    recon: torch.Tensor  # [B, 3, H, W] (not clamped)
    quant: QuantizerOutput


class ImageTokenizer(nn.Module):
    """VQ-GAN image tokenizer: ``encode`` images to codes, ``decode`` codes to images.

    Codes are row-major over the ``grid_size x grid_size`` latent grid. The quantizer and
    the decoder always run in float32 (autocast is switched off around them), so codes do
    not depend on the encoder's autocast dtype more than its rounding does.
    """

    def __init__(self, cfg: VQConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.embed_dim, 1)
        self.quantize = VectorQuantizer(
            cfg.codebook_size, cfg.embed_dim, kind=cfg.quantizer, beta=cfg.beta,
            l2_norm=cfg.l2_norm_codes, ema_decay=cfg.ema_decay,
        )
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)
        self.decoder = Decoder(cfg)
        self._zero_init_residual_branches()

    def _zero_init_residual_branches(self) -> None:
        # Every residual block starts as the identity (last conv of each branch at zero):
        # training from scratch gets past the "flat grey image" phase much sooner. Loaded
        # weights overwrite this.
        for m in self.modules():
            last = m.conv2 if isinstance(m, ResnetBlock) else m.proj_out if isinstance(m, AttnBlock) else None
            if last is not None:
                nn.init.zeros_(last.weight)
                nn.init.zeros_(last.bias)

    # ---- shape facts ---------------------------------------------------------------
    @property
    def tokens_per_image(self) -> int:
        """L: codes per image."""
        return self.cfg.tokens_per_image

    @property
    def codebook_size(self) -> int:
        return self.cfg.codebook_size

    @property
    def resolution(self) -> int:
        return self.cfg.resolution

    @property
    def grid_size(self) -> int:
        return self.cfg.grid_size

    # ---- pieces --------------------------------------------------------------------
    def _check_images(self, x: torch.Tensor) -> None:
        r = self.cfg.resolution
        if x.ndim != 4 or x.shape[1] != self.cfg.in_channels or x.shape[2] != r or x.shape[3] != r:
            raise ValueError(
                f"expected images Float[B,{self.cfg.in_channels},{r},{r}] in [-1,1], got {tuple(x.shape)}; "
                "use ImageTokenizer.preprocess to resize/crop PIL images"
            )
        if not x.is_floating_point():
            raise ValueError(f"expected a float tensor in [-1,1], got dtype {x.dtype} (use preprocess)")

    def _encode_patches(self, x: torch.Tensor) -> torch.Tensor:
        f = self.cfg.downsample_factor
        b, c, hh, ww = x.shape
        patches = x.unfold(2, f, f).unfold(3, f, f)  # (B, C, h, w, f, f)
        gh, gw = patches.shape[2], patches.shape[3]
        h = self.encoder(patches.permute(0, 2, 3, 1, 4, 5).reshape(b * gh * gw, c, f, f))  # (B*h*w, z, 1, 1)
        return h.reshape(b, gh, gw, -1).permute(0, 3, 1, 2).contiguous()

    def quantize_latents(self, x: torch.Tensor) -> tuple[torch.Tensor, QuantizerOutput]:
        """Encoder output [B, z, h, w] and its quantization (quant_conv + quantizer in fp32)."""
        h = self._encode_patches(x) if self.cfg.patch_local else self.encoder(x)
        with torch.autocast(device_type=h.device.type, enabled=False):
            q = self.quantize(self.quant_conv(h.float()))
        return h, q

    def decode_latents(self, z_q: torch.Tensor) -> torch.Tensor:
        """Quantized map [B, D, h, w] -> image [B, 3, H, W] (fp32, not clamped)."""
        with torch.autocast(device_type=z_q.device.type, enabled=False):
            return self.decoder(self.post_quant_conv(z_q.float()))

    def forward(self, x: torch.Tensor) -> VQOutput:
        """Training pass: reconstruct ``x`` through the codebook."""
        self._check_images(x)
        _, q = self.quantize_latents(x)
        return VQOutput(recon=self.decode_latents(q.z_q), quant=q)

    # ---- public API ----------------------------------------------------------------
    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images Float[B,3,H,W] in [-1,1] (H = W = resolution) -> codes Long[B, L]."""
        self._check_images(x)
        if self.cfg.patch_local and not (self.training and self.cfg.dropout > 0):
            return self._encode_unique_patches(x)
        _, q = self.quantize_latents(x)
        return q.indices.flatten(1)

    def _encode_unique_patches(self, x: torch.Tensor) -> torch.Tensor:
        """Codes of a patch-local tokenizer, computing each distinct patch once.

        A patch's code depends on its pixels only (per-sample norms, pointwise quantizer),
        and synthetic or flat images repeat patches a lot (a Shapes batch has ~10x fewer
        distinct 4x4 patches than patches), so this is exact and several times faster.
        """
        f = self.cfg.downsample_factor
        b, c = x.shape[:2]
        patches = x.unfold(2, f, f).unfold(3, f, f)  # (B, C, h, w, f, f)
        gh, gw = patches.shape[2], patches.shape[3]
        flat = patches.permute(0, 2, 3, 1, 4, 5).reshape(b * gh * gw, c * f * f)
        uniq, inverse = _unique_rows(flat)
        h = self.encoder(uniq.view(-1, c, f, f))  # (U, z, 1, 1)
        with torch.autocast(device_type=h.device.type, enabled=False):
            q = self.quantize(self.quant_conv(h.float()))
        return q.indices.view(-1)[inverse].view(b, gh * gw)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes Long[B, L] -> images Float[B,3,H,W] clamped to [-1,1]."""
        if codes.ndim != 2 or codes.shape[1] != self.tokens_per_image:
            raise ValueError(
                f"expected codes Long[B, {self.tokens_per_image}] ({self.grid_size}x{self.grid_size} grid), "
                f"got shape {tuple(codes.shape)}"
            )
        if codes.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"codes must be an integer tensor, got {codes.dtype}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.codebook_size):
            raise ValueError(
                f"codes must lie in [0, {self.codebook_size}), got [{int(codes.min())}, {int(codes.max())}]; "
                "convert unified ids with Vocab.ids_to_codes first"
            )
        g = self.grid_size
        z_q = self.quantize.lookup(codes.long().view(-1, g, g))
        return self.decode_latents(z_q).clamp(-1.0, 1.0)

    def preprocess(self, images: list[Image.Image | str | Path], *, max_pixels: int = MAX_IMAGE_PIXELS) -> torch.Tensor:
        """PIL images (or paths) -> Float[B,3,R,R] in [-1,1]; policy in
        :mod:`cm3leon.tokenize.image_vq_preprocess` (shorter side resize + center crop)."""
        return images_to_tensor(images, self.cfg.resolution, max_pixels=max_pixels)

    @staticmethod
    def postprocess(x: torch.Tensor) -> list[Image.Image]:
        """Float[B,3,H,W] in [-1,1] -> RGB PIL images."""
        return tensor_to_images(x)

    # ---- persistence ---------------------------------------------------------------
    def save_pretrained(self, directory: str | Path) -> None:
        """Write ``config.json`` and ``model.safetensors`` (each atomically)."""

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        write_safetensors(tensors, d / WEIGHTS_FILE, what=f"the image tokenizer ({WEIGHTS_FILE})",
                          metadata={"format": "pt", "kind": KIND})
        cfg = {"kind": KIND, "format_version": FORMAT_VERSION, **self.cfg.to_dict()}
        with reporting_write_errors(f"the image tokenizer config ({CONFIG_FILE})", d, 4096):
            atomic_write_text(d / CONFIG_FILE, json.dumps(cfg, indent=2, sort_keys=True) + "\n")

    @classmethod
    def from_pretrained(cls, directory: str | Path, *, map_location: str | torch.device = "cpu") -> ImageTokenizer:
        """Load a directory written by :meth:`save_pretrained` (strict: every key, every shape)."""
        d = Path(directory)
        cfg = load_vq_config(d / CONFIG_FILE)
        model = cls(cfg)
        sd = read_safetensors(d / WEIGHTS_FILE)
        load_state_dict_strict(model, sd, source=str(d / WEIGHTS_FILE))
        return model.to(map_location).eval()


def load_vq_config(path: str | Path) -> VQConfig:
    """Read an image tokenizer ``config.json`` with a clear error when missing or wrong."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: not an image tokenizer directory (train one with "
            "`cm3leon tokenizer train-image` or convert weights with `cm3leon tokenizer convert`)"
        )
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); the file is corrupt or truncated") from e
    if not isinstance(raw, dict) or raw.pop("kind", None) != KIND:
        raise ValueError(f"{path} is not a {KIND} config (missing or wrong 'kind')")
    version = raw.pop("format_version", None)
    if version != FORMAT_VERSION:
        raise ValueError(f"{path}: unsupported format_version {version!r} (expected {FORMAT_VERSION})")
    return VQConfig.from_dict(raw)


def load_state_dict_strict(model: nn.Module, sd: dict[str, torch.Tensor], *, source: str) -> None:
    """Copy ``sd`` into ``model`` requiring the exact key set and every shape to match."""
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    if missing or unexpected:
        raise ValueError(
            f"{source}: state dict does not match the model config: "
            f"missing keys {missing[:8]}{' ...' if len(missing) > 8 else ''} ({len(missing)}), "
            f"unexpected keys {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''} ({len(unexpected)}); "
            "check that config.json belongs to these weights"
        )
    for k, v in sd.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise ValueError(
                f"{source}: shape mismatch for {k}: checkpoint has {tuple(v.shape)}, model expects "
                f"{tuple(own[k].shape)}; the config does not match these weights"
            )
    model.load_state_dict(sd, strict=True)


def _unique_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct rows of float32 ``x`` [N, D] and each row's index among them
    (``torch.unique(dim=0)``'s result up to row order). Rows are grouped by an integer hash
    of their bits (exact, so equal rows always share a key), several times cheaper than
    sorting whole rows; the grouping is verified, with a fallback on a hash collision."""
    g = torch.Generator(device="cpu").manual_seed(0)
    mult = (torch.randint(1, 2**62, (x.shape[1],), generator=g) * 2 + 1).to(x.device)
    bits = x.float().contiguous().view(torch.int32).long()
    key = (bits * mult).sum(1)  # int64 arithmetic wraps around: exact and order-independent
    _, inverse = torch.unique(key, return_inverse=True)
    rep = torch.empty(int(inverse.max()) + 1 if len(inverse) else 0, dtype=torch.long, device=x.device)
    rep.scatter_(0, inverse, torch.arange(len(x), device=x.device))
    uniq = x[rep]
    if torch.equal(uniq[inverse], x):
        return uniq, inverse
    return torch.unique(x, dim=0, return_inverse=True)  # a projection collision (never seen)
