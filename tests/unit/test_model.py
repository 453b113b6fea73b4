"""The paper CNN: size, flat layout, and a backward pass checked against numerical gradients."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from blockdeepnet.learning.model import (
    PAPER_CNN_PARAMS,
    PARAM_SHAPES,
    as_params,
    evaluate,
    flatten,
    forward,
    init_params,
    loss_and_grad,
    num_params,
    predict,
    unflatten,
)

Synthetic = Callable[[int, np.random.Generator], tuple[np.ndarray, np.ndarray]]  # the synthetic_batch fixture


def test_parameter_count_is_the_papers() -> None:
    assert PAPER_CNN_PARAMS == 252_398
    assert num_params() == 252_398
    params = init_params(np.random.default_rng(0))
    assert list(params) == [name for name, _ in PARAM_SHAPES]
    assert sum(p.size for p in params.values()) == 252_398
    assert params["conv.w"].shape == (10, 1, 3, 3)
    assert params["fc1.w"].shape == (1960, 128)
    assert params["fc2.w"].shape == (128, 10)
    assert all(p.dtype == np.float32 for p in params.values())


def test_init_is_deterministic_and_scaled() -> None:
    a = flatten(init_params(np.random.default_rng(5)))
    b = flatten(init_params(np.random.default_rng(5)))
    c = flatten(init_params(np.random.default_rng(6)))
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    fc1 = init_params(np.random.default_rng(5))["fc1.w"]
    assert abs(float(fc1.std()) - np.sqrt(2 / 1960)) < 0.002  # He init


def test_flatten_unflatten_round_trip() -> None:
    params = init_params(np.random.default_rng(1))
    vec = flatten(params)
    assert vec.dtype == np.float32 and vec.shape == (PAPER_CNN_PARAMS,)
    # Fixed order: conv.w first, fc2.b last.
    assert np.array_equal(vec[:90], params["conv.w"].ravel())
    assert np.array_equal(vec[-10:], params["fc2.b"])
    back = unflatten(vec)
    assert list(back) == list(params)
    for name in params:
        assert np.array_equal(back[name], params[name])
    assert np.array_equal(flatten(back), vec)
    vec[0] += 1.0  # unflatten copied: the caller's vector is not shared
    assert back["conv.w"].flat[0] != vec[0]


def test_unflatten_and_flatten_validate() -> None:
    with pytest.raises(ValueError, match="252398"):
        unflatten(np.zeros(PAPER_CNN_PARAMS - 1, dtype=np.float32))
    with pytest.raises(ValueError, match="1-D"):
        unflatten(np.zeros((2, PAPER_CNN_PARAMS)))
    params = init_params(np.random.default_rng(1))
    del params["fc2.b"]
    with pytest.raises(ValueError, match="names"):
        flatten(params)
    params = init_params(np.random.default_rng(1))
    params["fc1.b"] = np.zeros(127, dtype=np.float32)
    with pytest.raises(ValueError, match=r"fc1\.b"):
        flatten(params)


def test_as_params_are_views() -> None:
    vec = flatten(init_params(np.random.default_rng(2)))
    params = as_params(vec)
    vec[-1] = 42.0
    assert params["fc2.b"][-1] == 42.0
    with pytest.raises(ValueError):
        as_params(vec.astype(np.float64))


def _f64(params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: v.astype(np.float64) for k, v in params.items()}


def test_backward_matches_central_differences() -> None:
    rng = np.random.default_rng(3)
    params = _f64(init_params(rng))
    # Non-zero biases so every bias gradient is exercised away from the ReLU kink at 0.
    for name in ("fc1.b", "fc2.b"):
        params[name] = rng.normal(0.0, 0.1, params[name].shape)
    params["conv.b"] = rng.uniform(0.05, 0.15, 10)
    x = rng.uniform(0.0, 1.0, (4, 1, 28, 28))
    # Two images get Fashion-MNIST-like empty background: there every pooling window holds four equal values
    # (the positive conv bias), and the gradient must go to exactly one of them.
    x[2:, :, :, 14:] = 0.0
    y = np.array([0, 3, 7, 9])
    _, grads = loss_and_grad(params, x, y)
    assert all(grads[name].dtype == np.float64 for name in grads)
    h = 1e-6
    for name, shape in PARAM_SHAPES:
        assert grads[name].shape == shape
        size = int(np.prod(shape))
        coords = rng.choice(size, size=min(size, 10), replace=False)
        for flat_i in coords:
            i = np.unravel_index(flat_i, shape)
            orig = params[name][i]
            params[name][i] = orig + h
            plus, _ = loss_and_grad(params, x, y)
            params[name][i] = orig - h
            minus, _ = loss_and_grad(params, x, y)
            params[name][i] = orig
            numeric = (plus - minus) / (2 * h)
            analytic = grads[name][i]
            assert abs(numeric - analytic) <= 1e-6 + 1e-4 * abs(numeric), (name, i, numeric, analytic)


def test_float32_gradient_agrees_with_float64(synthetic_batch: Synthetic) -> None:
    rng = np.random.default_rng(4)
    params = init_params(rng)
    x, y = synthetic_batch(16, rng)
    loss32, g32 = loss_and_grad(params, x, y)
    loss64, g64 = loss_and_grad(_f64(params), x.astype(np.float64), y)
    assert abs(loss32 - loss64) < 1e-5
    for name in g32:
        assert g32[name].dtype == np.float32
        np.testing.assert_allclose(g32[name], g64[name], rtol=1e-3, atol=1e-6)


def test_forward_evaluate_predict_are_consistent(synthetic_batch: Synthetic) -> None:
    rng = np.random.default_rng(5)
    params = init_params(rng)
    x, y = synthetic_batch(50, rng)
    logits = forward(params, x)
    assert logits.shape == (50, 10) and logits.dtype == np.float32
    loss, _ = loss_and_grad(params, x, y)
    ev_loss, acc = evaluate(params, x, y, batch=7)  # batching must not change the result
    assert abs(ev_loss - loss) < 1e-5
    pred = predict(params, x, batch=7)
    assert np.array_equal(pred, logits.argmax(axis=1))
    assert acc == pytest.approx(float((pred == y).mean()))


def test_input_validation() -> None:
    params = init_params(np.random.default_rng(0))
    with pytest.raises(ValueError, match="shape"):
        forward(params, np.zeros((2, 28, 28)))
    with pytest.raises(ValueError, match="labels"):
        loss_and_grad(params, np.zeros((2, 1, 28, 28)), np.array([0, 10]))
    with pytest.raises(ValueError, match="labels"):
        loss_and_grad(params, np.zeros((2, 1, 28, 28)), np.array([0]))


def test_sgd_steps_reduce_the_loss(synthetic_batch: Synthetic) -> None:
    rng = np.random.default_rng(6)
    params = init_params(rng)
    x, y = synthetic_batch(64, rng)
    first, _ = loss_and_grad(params, x, y)
    for _ in range(20):
        _, grads = loss_and_grad(params, x, y)
        for name in params:
            params[name] -= np.float32(0.1) * grads[name]
    last, _ = loss_and_grad(params, x, y)
    assert all(p.dtype == np.float32 for p in params.values())
    assert last < 0.5 * first, (first, last)
