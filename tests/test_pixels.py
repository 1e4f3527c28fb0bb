"""uint8 pixels <-> [-1, 1] floats."""

from __future__ import annotations

import torch

from cm3leon.pixels import pixels_to_unit, unit_to_pixels


def test_every_uint8_value_maps_to_v_over_127_5_minus_1_and_back() -> None:
    u8 = torch.arange(256, dtype=torch.uint8)
    x = pixels_to_unit(u8)
    assert x.dtype == torch.float32
    assert torch.equal(x, u8.float().div_(127.5).sub_(1.0))
    assert x[0] == -1.0 and x[255] == 1.0
    assert torch.equal(unit_to_pixels(x), u8)


def test_inverse_clamps_and_rounds_to_nearest() -> None:
    x = torch.tensor([-3.0, -1.0, 1.0, 2.5, 0.5 / 127.5 - 1.0 + 1e-4, 1.4 / 127.5 - 1.0])
    assert unit_to_pixels(x).tolist() == [0, 0, 255, 255, 1, 1]
    assert unit_to_pixels(x).dtype == torch.uint8


def test_input_is_not_modified() -> None:
    u8 = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    before = u8.clone()
    pixels_to_unit(u8)
    assert torch.equal(u8, before)
