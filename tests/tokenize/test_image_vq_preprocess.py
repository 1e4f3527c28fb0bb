"""Image preprocessing policy of the image tokenizer and its bad-input errors."""

import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from cm3leon.tokenize.image_vq_preprocess import (
    MAX_IMAGE_PIXELS,
    images_to_tensor,
    open_image,
    tensor_to_images,
    to_rgb,
)


def _png_header_only(path, width: int, height: int) -> None:
    """A PNG whose header claims width x height but whose pixel data is a stub."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 16)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def _u8(t: torch.Tensor) -> np.ndarray:
    return ((t + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()


def test_native_size_is_lossless():
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    x = images_to_tensor([Image.fromarray(arr)], 32)
    assert x.shape == (1, 3, 32, 32) and float(x.min()) >= -1 and float(x.max()) <= 1
    assert np.array_equal(_u8(x[0]), arr)
    assert np.array_equal(np.asarray(tensor_to_images(x)[0]), arr)


def test_resize_shorter_side_and_center_crop_matches_reference():
    rng = np.random.default_rng(1)
    arr = rng.integers(0, 256, (60, 100, 3), dtype=np.uint8)  # H=60, W=100
    img = Image.fromarray(arr)
    # Reference: resize the shorter side to 32 (long side 100*32/60), then center crop 32.
    # Away from the border (where the filter may read just outside the crop) it equals
    # cropping the central 60x60 square and resizing that.
    ref = img.crop((20, 0, 80, 60)).resize((32, 32), Image.Resampling.BICUBIC)
    got = _u8(images_to_tensor([img], 32)[0])
    diff = np.abs(got.astype(int) - np.asarray(ref).astype(int))
    assert diff[2:-2, 2:-2].max() <= 1
    # Columns well outside the central square never influence the result.
    arr2 = arr.copy()
    arr2[:, :14] = 0
    arr2[:, -14:] = 255
    got2 = _u8(images_to_tensor([Image.fromarray(arr2)], 32)[0])
    assert np.array_equal(got, got2)


def test_rgba_is_composited_on_white():
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[..., 0] = 200  # red, fully transparent on the left half, opaque on the right
    rgba[:, 4:, 3] = 255
    out = np.asarray(to_rgb(Image.fromarray(rgba, "RGBA")))
    assert (out[:, :4] == 255).all()
    assert (out[:, 4:] == [200, 0, 0]).all()


@pytest.mark.parametrize("mode", ["L", "P", "CMYK", "1", "LA", "YCbCr"])
def test_modes_become_rgb(mode):
    img = Image.new("RGB", (8, 8), (10, 120, 240)).convert(mode)
    x = images_to_tensor([img], 8)
    assert x.shape == (1, 3, 8, 8)


def test_16bit_grayscale_is_scaled():
    arr = np.full((8, 8), 65535, dtype=np.uint16)
    arr[:, :4] = 0
    img = Image.fromarray(arr)
    assert img.mode.startswith("I;16")
    out = np.asarray(to_rgb(img))
    assert (out[:, :4] == 0).all() and (out[:, 4:] == 255).all()


def test_one_pixel_image_is_upscaled_to_flat_color():
    x = images_to_tensor([Image.new("RGB", (1, 1), (10, 20, 30))], 16)
    assert x.shape == (1, 3, 16, 16)
    assert (np.abs(_u8(x[0]).astype(int) - [10, 20, 30]) <= 1).all()


def test_min_side_refusal():
    with pytest.raises(ValueError, match="min_side"):
        images_to_tensor([Image.new("RGB", (1, 1))], 16, min_side=8)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_huge_png_is_refused_before_decoding(tmp_path):
    path = tmp_path / "huge.png"
    _png_header_only(path, 10000, 10000)
    assert 10000 * 10000 > MAX_IMAGE_PIXELS
    with pytest.raises(ValueError, match="10000x10000.*above the limit"):
        open_image(path)
    with pytest.raises(ValueError, match="above the limit"):
        images_to_tensor([path], 32)
    lazy = Image.open(path)  # a lazily opened PIL image is refused from its header too
    with pytest.raises(ValueError, match="above the limit"):
        images_to_tensor([lazy], 32)


def test_corrupt_file(tmp_path):
    path = tmp_path / "bad.png"
    path.write_bytes(b"this is not an image at all" * 10)
    with pytest.raises(ValueError, match="not a readable image"):
        open_image(path)


def test_truncated_file(tmp_path):
    path = tmp_path / "trunc.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        images_to_tensor([path], 32)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        open_image(tmp_path / "nope.png")


def test_single_image_not_in_list_is_refused():
    with pytest.raises(ValueError, match="list"):
        images_to_tensor(Image.new("RGB", (4, 4)), 4)  # type: ignore[arg-type]
