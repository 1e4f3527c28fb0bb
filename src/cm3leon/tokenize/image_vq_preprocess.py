"""Images in, tensors out (and back) for the image tokenizer.

Policy (documented in docs/tokenizers.md):

* Size limit: an image with more than ``max_pixels`` pixels (default 50 megapixels, e.g.
  8000x6250) is refused with a ValueError *before* its pixels are decoded (PIL opens
  files lazily and ``Image.size`` comes from the header), so a 10000x10000 PNG costs no
  memory.
* Colour: RGBA/LA/PA and palette images with transparency are composited on white;
  grayscale, palette, CMYK, YCbCr, LAB, HSV become RGB; 16-bit grayscale is scaled to
  8 bits (divided by 257).
* Geometry: the central square of side ``min(W, H)`` is cut out and resized to
  ``resolution x resolution`` with PIL's antialiased bicubic filter. This equals "resize
  the shorter side to ``resolution``, then center crop", without ever allocating the
  resized long side. Images smaller than ``resolution`` (down to 1x1) are upscaled the
  same way (a 1x1 image becomes a flat square of its colour); images whose shorter side
  is below ``min_side`` are refused.
* Values: uint8 ``v`` -> ``v / 127.5 - 1`` in [-1, 1]; the inverse rounds to nearest
  (:mod:`cm3leon.pixels`).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from cm3leon.pixels import pixels_to_unit, unit_to_pixels

MAX_IMAGE_PIXELS = 50_000_000


def open_image(path: str | Path, *, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Open and fully decode an image file, checking the pixel limit from its header first."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file {path} not found")
    try:
        with warnings.catch_warnings():
            # We enforce our own pixel limit below; PIL's bomb warning would only add noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(path)  # lazy: reads the header only
    except Image.DecompressionBombError as e:
        raise ValueError(f"{path} is above the limit of {max_pixels} pixels ({e})") from e
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{path} is not a readable image ({e}); the file is corrupt or not an image") from e
    check_pixel_limit(img, max_pixels=max_pixels, name=str(path))
    try:
        img.load()
    except (OSError, ValueError, SyntaxError) as e:
        raise ValueError(f"{path} could not be decoded ({e}); the file is corrupt or truncated") from e
    return img


def check_pixel_limit(img: Image.Image, *, max_pixels: int = MAX_IMAGE_PIXELS, name: str = "image") -> None:
    """Refuse images over ``max_pixels`` (uses the header size; decodes nothing)."""
    w, h = img.size
    if w * h > max_pixels:
        raise ValueError(
            f"{name} is {w}x{h} = {w * h} pixels, above the limit of {max_pixels} pixels; "
            "downscale it first or pass a larger max_pixels"
        )
    if w < 1 or h < 1:
        raise ValueError(f"{name} has an empty size {w}x{h}")


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB (transparency composited on white)."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        if img.mode.startswith("I;16") or (img.mode == "I" and arr.max(initial=0) > 255):
            arr = arr / 257.0
        elif img.mode == "F" and arr.max(initial=0) <= 1.0:
            arr = arr * 255.0
        g = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
        return Image.fromarray(g).convert("RGB")
    has_alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode == "P" and "transparency" in img.info)
    if has_alpha:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def resize_center_crop(img: Image.Image, resolution: int, *, min_side: int = 1) -> Image.Image:
    """Central square of ``img`` resized to ``resolution`` (bicubic, antialiased)."""
    w, h = img.size
    side = min(w, h)
    if side < min_side:
        raise ValueError(f"image is {w}x{h}; its shorter side is below min_side={min_side} pixels")
    left, top = (w - side) / 2.0, (h - side) / 2.0
    box = (left, top, left + side, top + side)
    if side == resolution and left == int(left) and top == int(top):
        return img.crop(tuple(int(v) for v in box))  # exact: no resampling at native size
    return img.resize((resolution, resolution), Image.Resampling.BICUBIC, box=box)


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> Float[3, H, W] in [-1, 1]."""
    arr = np.asarray(img, dtype=np.uint8)
    return pixels_to_unit(torch.from_numpy(arr.copy()).permute(2, 0, 1))


def images_to_tensor(
    images: list[Image.Image | str | Path],
    resolution: int,
    *,
    max_pixels: int = MAX_IMAGE_PIXELS,
    min_side: int = 1,
) -> torch.Tensor:
    """PIL images or image paths -> Float[B, 3, resolution, resolution] in [-1, 1]."""
    if isinstance(images, (Image.Image, str, Path)):
        raise ValueError("preprocess expects a list of images; wrap a single image in a list")
    out = []
    for i, item in enumerate(images):
        if isinstance(item, (str, Path)):
            img = open_image(item, max_pixels=max_pixels)
        elif isinstance(item, Image.Image):
            check_pixel_limit(item, max_pixels=max_pixels, name=f"image {i}")
            img = item
        else:
            raise ValueError(f"item {i} is a {type(item).__name__}; expected a PIL image or a path")
        try:
            rgb = resize_center_crop(to_rgb(img), resolution, min_side=min_side)
        except OSError as e:
            raise ValueError(f"image {i} could not be decoded ({e}); the data is corrupt or truncated") from e
        out.append(pil_to_tensor(rgb))
    if not out:
        return torch.empty(0, 3, resolution, resolution)
    return torch.stack(out)


def tensor_to_images(x: torch.Tensor) -> list[Image.Image]:
    """Float[B, 3, H, W] in [-1, 1] -> RGB PIL images (values clamped, rounded to nearest)."""
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"expected Float[B,3,H,W], got shape {tuple(x.shape)}")
    u8 = unit_to_pixels(x)
    return [Image.fromarray(a.permute(1, 2, 0).cpu().numpy()) for a in u8]
