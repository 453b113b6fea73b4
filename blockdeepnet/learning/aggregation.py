"""Plaintext aggregation maths (Eq. 4), the stopping rule and the final-model rule.

Eq. 4:  w^p = w^{p-1} + (1/s) * sum_k s_k (w_k - w^{p-1}),  s = sum_k s_k.

Written as a base plus a weighted sum of *deltas* because that is what the encrypted pipeline computes: each
device encrypts its (scaled) delta, the gateway adds ciphertexts, and the fleet adds the decrypted sum to the
base it already has. Algebraically it equals the sample-weighted mean of the local weights; the delta form
keeps the values small (good for the fixed-point codec) and tolerates dropouts (s is the sum over the
devices actually included). This module is the reference the encrypted path is tested against.
Sums are accumulated in float64 so the reference is not itself a source of rounding noise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["BestRound", "converged", "fedavg", "weighted_delta_sum"]

Update = tuple[npt.ArrayLike, int]


def _check_vector(name: str, vec: npt.NDArray[Any], size: int | None = None) -> None:
    if vec.ndim != 1:
        raise ValueError(f"{name} must be a flat vector, got shape {vec.shape}")
    if size is not None and vec.size != size:
        raise ValueError(f"{name} has {vec.size} entries, expected {size}")
    if not np.all(np.isfinite(vec)):
        raise ValueError(f"{name} contains NaN or inf")


def weighted_delta_sum(base: npt.ArrayLike, updates: Sequence[Update]) -> tuple[npt.NDArray[np.float64], int]:
    """Return (sum_k s_k (w_k - base), s) in float64: the numerator and denominator of Eq. 4's correction."""
    b = np.asarray(base, dtype=np.float64)
    _check_vector("base", b)
    if not updates:
        raise ValueError("no updates to aggregate")
    total = np.zeros_like(b)
    s = 0
    for i, (weights, samples) in enumerate(updates):
        if isinstance(samples, bool) or not isinstance(samples, int | np.integer) or samples <= 0:
            raise ValueError(f"update {i}: sample count must be a positive int, got {samples!r}")
        w = np.asarray(weights, dtype=np.float64)
        _check_vector(f"update {i}", w, b.size)
        total += int(samples) * (w - b)
        s += int(samples)
    return total, s


def fedavg(base: npt.ArrayLike, updates: Sequence[Update]) -> npt.NDArray[np.float32]:
    """Eq. 4: the new global weights (float32) from w^{p-1} and [(w_k, s_k), ...]."""
    delta_sum, s = weighted_delta_sum(base, updates)
    return (np.asarray(base, dtype=np.float64) + delta_sum / s).astype(np.float32)


def converged(prev: npt.ArrayLike, cur: npt.ArrayLike, eps: float) -> bool:
    """The paper's stopping rule: ||w^p - w^{p-1}||_2 <= eps."""
    if not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be a finite non-negative number, got {eps!r}")
    a = np.asarray(prev, dtype=np.float64)
    b = np.asarray(cur, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: {a.shape} vs {b.shape}")
    return float(np.linalg.norm(b - a)) <= eps


@dataclass
class BestRound:
    """Keeps the round whose global loss is lowest: the paper's final model.

    Ties keep the earlier round (a later round is only taken when strictly better). Non-finite losses are
    ignored, so one broken round cannot become the final model. The stored weights are a copy.
    """

    round: int | None = None
    loss: float = math.inf
    weights: npt.NDArray[np.float32] | None = field(default=None, repr=False)

    def update(self, round_no: int, global_loss: float, weights: npt.ArrayLike) -> bool:
        """Offer one round; return True if it became the best so far."""
        if not math.isfinite(global_loss) or global_loss >= self.loss:
            return False
        self.round = round_no
        self.loss = float(global_loss)
        self.weights = np.array(weights, dtype=np.float32)
        return True
