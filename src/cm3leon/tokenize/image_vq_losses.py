"""Optional VQ-GAN losses: LPIPS-VGG perceptual distance and a PatchGAN discriminator.

Nothing is downloaded: LPIPS needs two local files the user supplies,

* the VGG16 ImageNet weights in torchvision's layout (``features.0.weight`` ...,
  e.g. ``vgg16-397923af.pth``), and
* the LPIPS linear heads (``lin0.model.1.weight`` ... ``lin4.model.1.weight``, the
  ``vgg.pth`` of the ``lpips`` package / taming's ``vgg_lpips``),

as ``.pth`` (read with ``torch.load(weights_only=True)``) or ``.safetensors``. When they
are not supplied and a perceptual weight is asked for, :func:`load_lpips` says so.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

# VGG16 "features" config: channel counts, "M" = max-pool. LPIPS taps relu1_2, relu2_2,
# relu3_3, relu4_3, relu5_3 (torchvision feature indices 3, 8, 15, 22, 29).
_VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
_TAPS = (3, 8, 15, 22, 29)
_TAP_CHANNELS = (64, 128, 256, 512, 512)


def _vgg16_features() -> nn.Sequential:
    layers: list[nn.Module] = []
    c_in = 3
    for v in _VGG16:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(c_in, int(v), 3, padding=1), nn.ReLU(inplace=False)]
            c_in = int(v)
    return nn.Sequential(*layers)


class _NetLin(nn.Module):
    """LPIPS head: dropout + 1x1 conv without bias (key ``model.1.weight``)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(channels, 1, 1, bias=False))


class LPIPS(nn.Module):
    """LPIPS-VGG perceptual distance (Zhang et al. 2018) between images in [-1, 1]."""

    def __init__(self) -> None:
        super().__init__()
        self.features = _vgg16_features()
        self.lins = nn.ModuleList(_NetLin(c) for c in _TAP_CHANNELS)
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def _taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        h = (x - self.shift) / self.scale
        out = []
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in _TAPS:
                out.append(h)
                if i == _TAPS[-1]:
                    break
        return out

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-image distance Float[B]."""
        d = 0.0
        for lin, fx, fy in zip(self.lins, self._taps(x), self._taps(y)):
            nx = fx / (fx.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            ny = fy / (fy.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            d = d + lin.model[1]((nx - ny).pow(2)).mean(dim=(1, 2, 3))
        return d  # type: ignore[return-value]


def _read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LPIPS weights file {path} not found")
    if path.suffix == ".safetensors":
        from cm3leon.safetensors_io import read_safetensors

        return read_safetensors(path)
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling errors come in many types
        raise ValueError(f"{path} could not be read as a weights-only torch file ({e})") from e
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise ValueError(f"{path} does not hold a state dict")
    return sd


def load_lpips(vgg_path: str | Path | None, lin_path: str | Path | None) -> LPIPS:
    """LPIPS-VGG from local files (torchvision VGG16 weights + LPIPS ``vgg.pth`` heads)."""
    if vgg_path is None or lin_path is None:
        raise ValueError(
            "perceptual loss asked for but LPIPS weights were not supplied: pass both the VGG16 weights "
            "(torchvision vgg16-397923af.pth) and the LPIPS heads (lpips vgg.pth) as local paths, or set "
            "the perceptual weight to 0; nothing is downloaded"
        )
    model = LPIPS()
    vgg = {k[len("features."):]: v for k, v in _read_weights(vgg_path).items() if k.startswith("features.")}
    lins_raw = _read_weights(lin_path)
    lins = {}
    for k, v in lins_raw.items():
        if k.startswith("lin") and k[3].isdigit():  # lin0.model.1.weight -> 0.model.1.weight
            lins[k[3:]] = v
    from cm3leon.tokenize.image_vq import load_state_dict_strict

    load_state_dict_strict(model.features, vgg, source=f"{vgg_path} (VGG16 features)")
    load_state_dict_strict(model.lins, lins, source=f"{lin_path} (LPIPS heads)")
    return model


class PatchDiscriminator(nn.Module):
    """PatchGAN discriminator (pix2pix / taming ``NLayerDiscriminator``): a logit per patch."""

    def __init__(self, in_channels: int = 3, ch: int = 64, n_layers: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ch, 4, 2, 1), nn.LeakyReLU(0.2)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < n_layers else 1
            layers += [
                nn.Conv2d(ch * prev, ch * mult, 4, stride, 1, bias=False),
                nn.BatchNorm2d(ch * mult),
                nn.LeakyReLU(0.2),
            ]
        layers.append(nn.Conv2d(ch * mult, 1, 4, 1, 1))
        self.main = nn.Sequential(*layers)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def adaptive_gan_weight(rec_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor,
                        *, max_weight: float = 1e4) -> torch.Tensor:
    """taming's balance: ||grad rec|| / ||grad gan|| at the decoder's last layer (detached)."""
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return (rec_grad.norm() / (g_grad.norm() + 1e-4)).clamp(0.0, max_weight).detach()
