"""Shared fixtures (shared helpers live in tests/helpers.py)."""

import pytest

from helpers import one_thread


@pytest.fixture(scope="module")
def one_torch_thread():  # noqa: ANN201
    """One torch thread for a whole module (restored afterwards): tiny models run fastest on
    one thread, and on a shared, busy CPU extra threads stall each other."""
    with one_thread():
        yield
