"""Eq. 4 on plaintext, the convergence test and the best-round (final model) rule."""

from __future__ import annotations

import numpy as np
import pytest

from blockdeepnet.learning.aggregation import BestRound, converged, fedavg, weighted_delta_sum


def test_eq4_equals_the_sample_weighted_mean() -> None:
    rng = np.random.default_rng(0)
    base = rng.normal(size=1000).astype(np.float32)
    samples = [2745, 100, 5000, 1]
    locals_ = [base + rng.normal(0, 0.05, 1000).astype(np.float32) for _ in samples]
    got = fedavg(base, list(zip(locals_, samples, strict=True)))
    expected = sum(s * w.astype(np.float64) for w, s in zip(locals_, samples, strict=True)) / sum(samples)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    # Not the unweighted mean.
    assert np.abs(got - np.mean(locals_, axis=0)).max() > 1e-3


def test_single_update_and_equal_weights() -> None:
    base = np.zeros(5, dtype=np.float32)
    w1 = np.arange(5, dtype=np.float32)
    assert np.array_equal(fedavg(base, [(w1, 7)]), w1)
    w2 = -np.arange(5, dtype=np.float32) + 2
    np.testing.assert_allclose(fedavg(base, [(w1, 3), (w2, 3)]), np.ones(5))


def test_weighted_delta_sum_is_eq4s_numerator() -> None:
    base = np.array([1.0, 1.0])
    total, s = weighted_delta_sum(base, [(np.array([2.0, 1.0]), 2), (np.array([1.0, 4.0]), 1)])
    assert s == 3
    assert total.dtype == np.float64
    np.testing.assert_array_equal(total, [2.0, 3.0])


@pytest.mark.parametrize(
    ("updates", "match"),
    [
        ([], "no updates"),
        ([(np.zeros(3), 1)], "expected 4"),
        ([(np.zeros(4), 0)], "positive"),
        ([(np.full(4, np.nan), 1)], "NaN"),
    ],
)
def test_aggregation_validates(updates: list[tuple[np.ndarray, int]], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        fedavg(np.zeros(4), updates)


def test_converged_uses_the_l2_norm() -> None:
    prev = np.zeros(4)
    cur = np.array([0.3, 0.4, 0.0, 0.0])  # norm 0.5 (max-abs would be 0.4, L1 0.7)
    assert converged(prev, cur, 0.5)
    assert not converged(prev, cur, 0.49)
    assert converged(cur, cur, 0.0)
    with pytest.raises(ValueError):
        converged(prev, cur, -1.0)
    with pytest.raises(ValueError, match="shape"):
        converged(prev, cur[:3], 1.0)


def test_best_round_keeps_the_lowest_loss() -> None:
    best = BestRound()
    assert best.round is None and best.weights is None
    w = np.zeros(3, dtype=np.float32)
    assert best.update(1, 0.9, w)
    w[:] = 5.0  # the tracker stored a copy
    assert best.weights is not None and np.array_equal(best.weights, np.zeros(3))
    assert best.update(2, 0.5, np.full(3, 2.0))
    assert not best.update(3, 0.7, np.full(3, 3.0))
    assert not best.update(4, 0.5, np.full(3, 4.0))  # ties keep the earlier round
    assert not best.update(5, float("nan"), np.full(3, 5.0))
    assert best.round == 2 and best.loss == 0.5
    assert np.array_equal(best.weights, np.full(3, 2.0))
