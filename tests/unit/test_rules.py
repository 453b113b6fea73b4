"""Local update rules: they learn, Eq. 3's first step is a full-gradient step, and they are deterministic."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from blockdeepnet.learning.model import (
    PAPER_CNN_PARAMS,
    evaluate,
    flatten,
    init_params,
    loss_and_grad,
    unflatten,
)
from blockdeepnet.learning.rules import FedAvgSGD, LocalResult, LocalRule, VarianceReduced, steps_for

Synthetic = Callable[[int, np.random.Generator], tuple[np.ndarray, np.ndarray]]  # the synthetic_batch fixture


@pytest.fixture(scope="module")
def setup(synthetic_batch: Synthetic) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(11)
    w0 = flatten(init_params(rng))
    x, y = synthetic_batch(200, rng)
    return w0, x, y


RULES: list[LocalRule] = [
    FedAvgSGD(lr=0.1, batch_size=20, epochs=2),
    VarianceReduced(lr=0.1, batch_size=20, epochs=2),
]


@pytest.mark.parametrize("rule", RULES, ids=lambda r: type(r).__name__)
def test_rule_reduces_training_loss(
    rule: LocalRule, setup: tuple[np.ndarray, np.ndarray, np.ndarray]
) -> None:
    w0, x, y = setup
    before, _ = evaluate(unflatten(w0), x, y)
    result = rule.run(w0, x, y, np.random.default_rng(0))
    after, _ = evaluate(unflatten(result.weights), x, y)
    assert isinstance(result, LocalResult)
    assert result.weights.dtype == np.float32 and result.weights.shape == (PAPER_CNN_PARAMS,)
    assert result.samples == 200
    assert result.steps == 20  # 2 epochs x 10 batches
    assert result.base_loss == pytest.approx(before, rel=1e-5)
    assert np.isfinite(result.train_loss)
    assert after < 0.5 * before, (before, after)


@pytest.mark.parametrize("rule", RULES, ids=lambda r: type(r).__name__)
def test_rule_is_deterministic_and_leaves_input_alone(
    rule: LocalRule, setup: tuple[np.ndarray, np.ndarray, np.ndarray]
) -> None:
    w0, x, y = setup
    w0_copy = w0.copy()
    a = rule.run(w0, x, y, np.random.default_rng(3))
    b = rule.run(w0, x, y, np.random.default_rng(3))
    c = rule.run(w0, x, y, np.random.default_rng(4))
    assert np.array_equal(a.weights, b.weights)
    assert a.train_loss == b.train_loss
    assert not np.array_equal(a.weights, c.weights)  # the rng drives the minibatch order
    assert np.array_equal(w0, w0_copy)


def test_variance_reduced_first_step_is_a_full_gradient_step(
    setup: tuple[np.ndarray, np.ndarray, np.ndarray],
) -> None:
    # At step 0 the weights equal the anchor, so grad_B(w) - grad_B(anchor) vanishes and the step is
    # w0 - lr * full_local_grad(w0), whatever the batch.
    w0, x, y = setup
    lr = 0.05
    _, grads = loss_and_grad(unflatten(w0), x, y)
    expected = w0 - np.float32(lr) * flatten(grads)
    got = VarianceReduced(lr=lr, batch_size=8, iterations=1).run(w0, x, y, np.random.default_rng(0))
    assert got.steps == 1
    np.testing.assert_allclose(got.weights, expected, rtol=0, atol=1e-6)
    # With one batch covering the whole local set this is exactly plain SGD's first step.
    plain = FedAvgSGD(lr=lr, batch_size=len(y), iterations=1).run(w0, x, y, np.random.default_rng(0))
    np.testing.assert_allclose(got.weights, plain.weights, rtol=0, atol=1e-6)
    # ...whereas plain SGD on a small first batch is a different (noisier) step.
    small = FedAvgSGD(lr=lr, batch_size=8, iterations=1).run(w0, x, y, np.random.default_rng(0))
    assert np.abs(small.weights - expected).max() > 1e-4


def test_iterations_override_epochs(setup: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    w0, x, y = setup
    result = FedAvgSGD(lr=0.01, batch_size=64, epochs=5, iterations=7).run(w0, x, y, np.random.default_rng(0))
    assert result.steps == 7  # crosses an epoch boundary (4 batches per epoch)
    assert steps_for(200, 64, 2, None) == 8
    assert steps_for(200, 64, 2, 3) == 3


@pytest.mark.parametrize(
    "kwargs",
    [
        {"lr": 0.0},
        {"lr": float("nan")},
        {"batch_size": 0},
        {"epochs": 0},
        {"iterations": 0},
        {"batch_size": 2.5},
    ],
)
def test_hyperparameters_are_validated(kwargs: dict[str, object]) -> None:
    for cls in (FedAvgSGD, VarianceReduced):
        with pytest.raises(ValueError):
            cls(**kwargs)  # type: ignore[arg-type]


def test_inputs_are_validated(setup: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    w0, x, y = setup
    rule = FedAvgSGD()
    with pytest.raises(ValueError, match="flat vector"):
        rule.run(w0[:-1], x, y, np.random.default_rng(0))
    with pytest.raises(ValueError, match="y must"):
        rule.run(w0, x, y[:-1], np.random.default_rng(0))
    bad = w0.copy()
    bad[0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        rule.run(bad, x, y, np.random.default_rng(0))


def test_divergence_is_reported_not_returned(setup: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    w0, x, y = setup
    with np.errstate(all="ignore"), pytest.raises(FloatingPointError, match="diverged"):
        FedAvgSGD(lr=1e30, batch_size=20).run(w0, x, y, np.random.default_rng(0))
