"""InceptionV3 pool3 features for FID, compatible with pytorch-fid's weights.

The paper reports zero-shot MS-COCO FID computed with pytorch-fid (Seitzer, 2020),
whose network is the TensorFlow FID Inception (``inception-2015-12-05``) ported to
PyTorch: torchvision's InceptionV3 layout with four changes, all reproduced here:

- the average-pool branch of the A, C and E blocks excludes the zero padding from the
  average (``count_include_pad=False``), as TensorFlow's pooling does;
- the last E block (``Mixed_7c``) max-pools instead of average-pooling in its pool branch;
- the classifier has 1008 classes (we drop it: FID reads the 2048-d pool3 vector);
- no auxiliary classifier.

torchvision cannot be installed next to our torch build, so the blocks are written here
in plain torch. Weights: the pytorch-fid checkpoint ``pt_inception-2015-12-05-6726825d.pth``
(a plain state dict, loaded with ``weights_only=True``) or the same keys as safetensors.
Nothing is ever downloaded: the user gives the local file.

Preprocessing follows pytorch-fid: RGB in [0, 1], bilinear resize to 299x299
(``align_corners=False``, no antialiasing), then scale to [-1, 1].
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

logger = logging.getLogger(__name__)

FID_INPUT_SIZE = 299
FID_FEATURE_DIM = 2048
PYTORCH_FID_WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
_IGNORED_CHECKPOINT_KEYS = ("fc.weight", "fc.bias")  # the 1008-way classifier; FID never uses it


class BasicConv2d(nn.Module):
    """Conv (no bias) -> BatchNorm (eps 1e-3) -> ReLU, the unit every Inception layer is built from."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int | tuple[int, int], **conv_kwargs: object):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, kernel_size, bias=False, **conv_kwargs)
        self.bn = nn.BatchNorm2d(out_ch, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _tf_avg_pool(x: torch.Tensor) -> torch.Tensor:
    # TensorFlow's 3x3 'SAME' average pool divides by the number of real (unpadded) inputs.
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """35x35 block (Mixed_5b/c/d): 1x1 | 5x5 | double 3x3 | TF-style avg pool + 1x1."""

    def __init__(self, in_ch: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(in_ch, 64, 1)
        self.branch5x5_1 = BasicConv2d(in_ch, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_ch, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(in_ch, pool_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(_tf_avg_pool(x))
        return torch.cat([b1, b5, b3, bp], dim=1)  # (B, 224 + pool_features, H, W)


class InceptionB(nn.Module):
    """Grid reduction 35 -> 17 (Mixed_6a): strided 3x3 | double 3x3 (strided) | max pool."""

    def __init__(self, in_ch: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(in_ch, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_ch, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3(x)
        bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([b3, bd, bp], dim=1)  # (B, 480 + in_ch, H', W')


class InceptionC(nn.Module):
    """17x17 block (Mixed_6b..e) with factorised 1x7 / 7x1 convolutions."""

    def __init__(self, in_ch: int, channels_7x7: int):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_ch, 192, 1)
        self.branch7x7_1 = BasicConv2d(in_ch, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_ch, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_ch, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            bd = layer(bd)
        bp = self.branch_pool(_tf_avg_pool(x))
        return torch.cat([b1, b7, bd, bp], dim=1)  # (B, 768, H, W)


class InceptionD(nn.Module):
    """Grid reduction 17 -> 8 (Mixed_7a)."""

    def __init__(self, in_ch: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_ch, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_ch, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        bp = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([b3, b7, bp], dim=1)  # (B, 512 + in_ch, H', W')


class InceptionE(nn.Module):
    """8x8 block (Mixed_7b/c) with split 1x3 / 3x1 heads.

    ``pool="avg"`` is the TF-style average pool (Mixed_7b); ``pool="max"`` is the FID
    network's max pool in Mixed_7c (a quirk of the TF graph that FID numbers depend on).
    """

    def __init__(self, in_ch: int, pool: str):
        super().__init__()
        if pool not in ("avg", "max"):
            raise ValueError(f"InceptionE pool must be 'avg' or 'max', got {pool!r}")
        self.pool = pool
        self.branch1x1 = BasicConv2d(in_ch, 320, 1)
        self.branch3x3_1 = BasicConv2d(in_ch, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_ch, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_ch, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], dim=1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], dim=1)
        if self.pool == "avg":
            pooled = _tf_avg_pool(x)
        else:
            pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        bp = self.branch_pool(pooled)
        return torch.cat([b1, b3, bd, bp], dim=1)  # (B, 2048, H, W)


class FIDInceptionV3(nn.Module):
    """The FID InceptionV3 up to pool3: images in [0, 1] -> 2048-d features.

    Parameter names match pytorch-fid's checkpoint (``Conv2d_1a_3x3.conv.weight``,
    ``Mixed_5b.branch1x1.bn.running_mean``, ...), minus the unused ``fc`` classifier.
    Build it with :func:`load_fid_inception`; a bare instance has random weights.
    """

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, pool="avg")
        self.Mixed_7c = InceptionE(2048, pool="max")
        self.eval()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Pool3 features of ``images`` (Float[B,3,H,W], RGB in [0,1], any H, W) -> Float[B,2048]."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape [B, 3, H, W], got {tuple(images.shape)}")
        x = F.interpolate(images, size=(FID_INPUT_SIZE, FID_INPUT_SIZE), mode="bilinear", align_corners=False)
        x = 2 * x - 1  # (B, 3, 299, 299) in [-1, 1], the range the TF graph was trained on
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # (B, 64, 73, 73)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # (B, 192, 35, 35)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b,
                      self.Mixed_6c, self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        # (B, 2048, 8, 8) -> global average pool -> (B, 2048)
        return x.mean(dim=(2, 3))

    @torch.no_grad()
    def embed_image(self, images: Sequence[Image.Image], *, batch_size: int = 50) -> np.ndarray:
        """Pool3 features of PIL images -> float32 [N, 2048] (the FID feature-extractor protocol).

        Images may differ in size: each is resized to 299x299 on its own, which equals
        pytorch-fid's batched resize of same-sized images.
        """
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        device = next(self.parameters()).device
        out = []
        for start in range(0, len(images), batch_size):
            batch = torch.cat([_to_unit_tensor(im) for im in images[start : start + batch_size]])
            out.append(self(batch.to(device)).float().cpu().numpy())
        if not out:
            return np.zeros((0, FID_FEATURE_DIM), dtype=np.float32)
        return np.concatenate(out).astype(np.float32, copy=False)


def _to_unit_tensor(image: Image.Image) -> torch.Tensor:
    # PIL -> Float[1, 3, 299, 299] in [0, 1]; resizing per image lets sizes differ across a batch.
    if not isinstance(image, Image.Image):
        raise ValueError(f"expected a PIL image, got {type(image).__name__}")
    arr = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0  # (H, W, 3)
    x = torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0)  # (1, 3, H, W)
    return F.interpolate(x, size=(FID_INPUT_SIZE, FID_INPUT_SIZE), mode="bilinear", align_corners=False)


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors come in many types; all mean "not a plain state dict"
        raise ValueError(
            f"could not read {path} as a plain PyTorch state dict ({exc}); give pytorch-fid's "
            f"{PYTORCH_FID_WEIGHTS_NAME} or a .safetensors file with the same keys"
        ) from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(
            f"{path} does not hold a flat state dict of tensors; give pytorch-fid's {PYTORCH_FID_WEIGHTS_NAME}"
        )
    return dict(state)


def load_fid_inception(path: str | Path, *, device: str | torch.device = "cpu") -> FIDInceptionV3:
    """Load pytorch-fid's Inception weights (``.pth`` state dict or ``.safetensors``) strictly.

    Every parameter and BatchNorm statistic must be present with the expected shape;
    ``fc.*`` (the classifier) and ``*.num_batches_tracked`` may be present or absent;
    any other key is an error. Returns the model in eval mode on ``device``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"Inception weights not found at {path}; download {PYTORCH_FID_WEIGHTS_NAME} from the "
            "pytorch-fid releases page on a machine with network access and pass its local path"
        )
    state = _read_state_dict(path)
    model = FIDInceptionV3()
    expected = model.state_dict()
    state = {k: v for k, v in state.items() if k not in _IGNORED_CHECKPOINT_KEYS}
    unexpected = sorted(set(state) - set(expected))
    missing = sorted(k for k in set(expected) - set(state) if not k.endswith("num_batches_tracked"))
    if unexpected or missing:
        raise ValueError(
            f"{path} is not a pytorch-fid Inception checkpoint: {len(missing)} missing keys "
            f"{missing[:5]}, {len(unexpected)} unexpected keys {unexpected[:5]}"
        )
    bad = [(k, tuple(v.shape), tuple(expected[k].shape)) for k, v in state.items() if v.shape != expected[k].shape]
    if bad:
        raise ValueError(f"{path}: shape mismatch (key, got, expected): {bad[:5]}")
    for key, value in expected.items():
        if key.endswith("num_batches_tracked") and key not in state:
            state[key] = torch.zeros_like(value)
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()}, strict=True)
    logger.info("loaded FID Inception weights from %s", path)
    return model.to(device).eval()
