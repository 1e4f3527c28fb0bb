"""Hold-out sizes: a fraction with a floor, a cap and a largest share."""

from __future__ import annotations

import pytest

from cm3leon.data.split import holdout_size


def test_fraction_floor_cap_and_share():
    assert holdout_size(1797) == 90  # 5%
    assert holdout_size(100_000) == 1000  # capped
    assert holdout_size(400) == 32  # floored
    assert holdout_size(100) == 20  # the floor never takes more than 20%
    assert holdout_size(3) == 0
    assert holdout_size(1797, fraction=0.5) == 359  # at most 20%
    assert holdout_size(1797, fraction=0.0, floor=0) == 0


def test_bad_arguments():
    with pytest.raises(ValueError, match="fraction"):
        holdout_size(10, fraction=1.5)
    with pytest.raises(ValueError, match="floor"):
        holdout_size(10, floor=50, cap=10)
