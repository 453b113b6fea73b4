"""Fixtures shared by the unit tests."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest


def _synthetic(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Learnable toy images: class c lights up row band c plus noise."""
    y = rng.integers(0, 10, n)
    x = rng.uniform(0.0, 0.3, (n, 1, 28, 28)).astype(np.float32)
    for i, c in enumerate(y):
        x[i, 0, 2 + 2 * c : 4 + 2 * c, :] += 0.7
    return x, y.astype(np.int64)


@pytest.fixture(scope="session")
def synthetic_batch() -> Callable[[int, np.random.Generator], tuple[np.ndarray, np.ndarray]]:
    """``synthetic_batch(n, rng) -> (x, y)``: n learnable toy images (N, 1, 28, 28) float32 and int64 labels."""
    return _synthetic
