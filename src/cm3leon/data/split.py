"""How many records to hold out of a data set for evaluation."""

from __future__ import annotations


def holdout_size(n: int, *, fraction: float = 0.05, floor: int = 32, cap: int = 1000, max_share: float = 0.2) -> int:
    """Records to hold out of ``n``: ``fraction`` of them, at least ``floor`` and at most ``cap``,
    and never more than ``max_share`` of ``n`` (so a small data set keeps most of its records)."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not 0.0 <= fraction < 1.0 or not 0.0 <= max_share < 1.0:
        raise ValueError(f"fraction and max_share must be in [0, 1), got {fraction} and {max_share}")
    if floor < 0 or cap < floor:
        raise ValueError(f"need 0 <= floor <= cap, got floor={floor}, cap={cap}")
    want = min(max(round(fraction * n), floor), cap)
    return min(want, int(max_share * n))
