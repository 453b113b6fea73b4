"""Local update rules: what one device does with the global weights w^{p-1} in round p.

Both rules take and return flat float32 weight vectors (the order of ``model.flatten``), because the flat
vector is what gets quantized, encrypted and aggregated. Both are deterministic given the ``rng`` (it only
drives the minibatch order), so a round can be replayed exactly.

- ``FedAvgSGD``: plain minibatch SGD, the FedAvg local step. The default.
- ``VarianceReduced``: the paper's Eq. 3, an SVRG-style step anchored at the received global weights::

      w <- w - lr * (grad_B(w) - grad_B(w_anchor) + full_local_grad(w_anchor)),   w_anchor = w^{p-1}

  The full local gradient is computed once at round start from the device's own data, so it needs no extra
  communication; it costs one extra pass over the data plus a second minibatch gradient per step (~2x).
  The correction term pulls each device towards the direction of its whole local objective at w^{p-1}
  instead of the noisy minibatch direction, which reduces client drift between aggregations.

The paper counts local work in iterations (1,500 local iterations), so both rules accept ``iterations``
(number of minibatch steps, cycling through freshly shuffled epochs) which overrides ``epochs``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from blockdeepnet.learning.model import (
    EVAL_BATCH,
    IMAGE_SHAPE,
    PAPER_CNN_PARAMS,
    Params,
    as_params,
    evaluate,
    flatten,
    loss_and_grad,
)

__all__ = ["FedAvgSGD", "LocalResult", "LocalRule", "VarianceReduced"]

Float32Array = npt.NDArray[np.float32]

# Measured on the paper split (10 IID shards x 2,745, batch 32, 1 local epoch): lr 0.2 reaches 84-86% test
# accuracy after 3-5 FedAvg rounds; 0.05 and 0.1 learn visibly slower; the paper's literal 0.5 works at batch 32
# but makes round-1 updates ~4x larger (a wider codec clip range) and does not train at all with batch 4.
DEFAULT_LR = 0.2
DEFAULT_BATCH = 32

# Batch size for passes over the whole local set (full gradient, base loss): bounds im2col memory.
_FULL_PASS_CHUNK = EVAL_BATCH  # see learning.model.EVAL_BATCH: bounds the memory of a full pass


@dataclass(frozen=True, eq=False)
class LocalResult:
    """Outcome of one device's round.

    ``samples`` is s_k, the weight of this update in Eq. 4. ``train_loss`` is the mean of the minibatch losses
    seen while training (cheap, but measured on moving weights). ``base_loss`` is the loss of the *received*
    global weights on the whole local set; its sample-weighted mean over devices is the global training loss
    of w^{p-1}, the quantity the "keep the round with the lowest loss" rule needs.
    """

    weights: Float32Array
    samples: int
    train_loss: float
    steps: int
    base_loss: float


class LocalRule(Protocol):
    """A local update rule: global weights + local data -> new local weights."""

    def run(
        self,
        weights: npt.ArrayLike,
        x: npt.NDArray[np.floating[Any]],
        y: npt.NDArray[np.integer[Any]],
        rng: np.random.Generator,
    ) -> LocalResult: ...


def _validate_hyper(lr: float, batch_size: int, epochs: int, iterations: int | None) -> None:
    if not (isinstance(lr, int | float) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive finite number, got {lr!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs <= 0:
        raise ValueError(f"epochs must be a positive int, got {epochs!r}")
    if iterations is not None and (
        isinstance(iterations, bool) or not isinstance(iterations, int) or iterations <= 0
    ):
        raise ValueError(f"iterations must be None or a positive int, got {iterations!r}")


def _prepare(
    weights: npt.ArrayLike, x: npt.NDArray[np.floating[Any]], y: npt.NDArray[np.integer[Any]]
) -> tuple[Float32Array, npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    buf = np.array(weights, dtype=np.float32)  # our own copy: the caller's global weights stay untouched
    if buf.shape != (PAPER_CNN_PARAMS,):
        raise ValueError(f"weights must be a flat vector of {PAPER_CNN_PARAMS}, got shape {buf.shape}")
    if not np.all(np.isfinite(buf)):
        raise ValueError("weights contain NaN or inf")
    xs = np.asarray(x, dtype=np.float32)
    ys = np.asarray(y, dtype=np.int64)
    if xs.ndim != 4 or xs.shape[1:] != IMAGE_SHAPE:
        raise ValueError(f"x must have shape (N, 1, 28, 28), got {xs.shape}")
    if xs.shape[0] == 0:
        raise ValueError("no local samples")
    if ys.shape != (xs.shape[0],):
        raise ValueError(f"y must have shape ({xs.shape[0]},), got {ys.shape}")
    return buf, xs, ys


def steps_for(n: int, batch_size: int, epochs: int, iterations: int | None) -> int:
    """Number of minibatch steps a rule takes on ``n`` samples (a partial last batch counts as a step)."""
    return iterations if iterations is not None else epochs * math.ceil(n / batch_size)


def _batches(
    n: int, batch_size: int, steps: int, rng: np.random.Generator
) -> Iterator[npt.NDArray[np.int64]]:
    """Minibatch index arrays: reshuffle at every epoch boundary, stop after ``steps`` batches."""
    done = 0
    while done < steps:
        perm = rng.permutation(n)
        for start in range(0, n, batch_size):
            if done == steps:
                return
            yield perm[start : start + batch_size]
            done += 1


def _check_finite(buf: Float32Array, rule: str) -> None:
    # A diverged update must never reach the encoder: NaN/inf would poison the whole aggregate.
    if not np.all(np.isfinite(buf)):
        raise FloatingPointError(f"{rule}: local training diverged (non-finite weights); lower lr")


def _full_gradient(
    params: Params, x: npt.NDArray[np.float32], y: npt.NDArray[np.int64]
) -> tuple[Float32Array, float]:
    """Mean gradient and mean loss over the whole local set, in chunks (exactly the full-batch values)."""
    n = x.shape[0]
    total = np.zeros(PAPER_CNN_PARAMS, dtype=np.float64)
    loss_sum = 0.0
    for start in range(0, n, _FULL_PASS_CHUNK):
        xb, yb = x[start : start + _FULL_PASS_CHUNK], y[start : start + _FULL_PASS_CHUNK]
        loss, grads = loss_and_grad(params, xb, yb)
        total += flatten(grads) * xb.shape[0]
        loss_sum += loss * xb.shape[0]
    return (total / n).astype(np.float32), loss_sum / n


# A rule's per-minibatch step direction: (params, x_batch, y_batch) -> (minibatch loss, flat direction).
_Direction = Callable[[Params, npt.NDArray[np.float32], npt.NDArray[np.int64]], tuple[float, Float32Array]]


@dataclass(frozen=True)
class _MinibatchRule:
    """Shared body of the rules: hyperparameters, their validation and the minibatch loop of ``run``.

    Each step is ``w <- w - lr * direction``; a subclass only says, through ``_start``, what the direction of a
    minibatch is and what the base loss (received weights, whole local set) is.
    """

    lr: float = DEFAULT_LR
    batch_size: int = DEFAULT_BATCH
    epochs: int = 1
    iterations: int | None = None

    def __post_init__(self) -> None:
        _validate_hyper(self.lr, self.batch_size, self.epochs, self.iterations)

    def _start(
        self, buf: Float32Array, x: npt.NDArray[np.float32], y: npt.NDArray[np.int64]
    ) -> tuple[float, _Direction]:
        """Called once per round with the received weights ``buf`` (not yet stepped; it must not be modified
        here) and the local set: return the base loss and the minibatch step direction."""
        raise NotImplementedError

    def run(
        self,
        weights: npt.ArrayLike,
        x: npt.NDArray[np.floating[Any]],
        y: npt.NDArray[np.integer[Any]],
        rng: np.random.Generator,
    ) -> LocalResult:
        buf, xs, ys = _prepare(weights, x, y)
        base_loss, direction = self._start(buf, xs, ys)
        params = as_params(buf)  # views: stepping buf in place updates params
        steps = steps_for(xs.shape[0], self.batch_size, self.epochs, self.iterations)
        lr = np.float32(self.lr)
        loss_sum = 0.0
        for idx in _batches(xs.shape[0], self.batch_size, steps, rng):
            loss, step = direction(params, xs[idx], ys[idx])
            loss_sum += loss
            buf -= lr * step
        _check_finite(buf, type(self).__name__)
        return LocalResult(buf, int(xs.shape[0]), loss_sum / steps, steps, base_loss)


@dataclass(frozen=True)
class FedAvgSGD(_MinibatchRule):
    """Plain minibatch SGD for ``epochs`` epochs (or exactly ``iterations`` steps)."""

    def _start(
        self, buf: Float32Array, x: npt.NDArray[np.float32], y: npt.NDArray[np.int64]
    ) -> tuple[float, _Direction]:
        base_loss, _ = evaluate(as_params(buf), x, y, batch=_FULL_PASS_CHUNK)

        def direction(
            params: Params, xb: npt.NDArray[np.float32], yb: npt.NDArray[np.int64]
        ) -> tuple[float, Float32Array]:
            loss, grads = loss_and_grad(params, xb, yb)
            return loss, flatten(grads)

        return base_loss, direction


@dataclass(frozen=True)
class VarianceReduced(_MinibatchRule):
    """The paper's Eq. 3: SVRG-style local steps anchored at the received global weights."""

    def _start(
        self, buf: Float32Array, x: npt.NDArray[np.float32], y: npt.NDArray[np.int64]
    ) -> tuple[float, _Direction]:
        anchor = as_params(buf.copy())  # w^{p-1}, fixed while buf is stepped
        full_grad, base_loss = _full_gradient(anchor, x, y)

        def direction(
            params: Params, xb: npt.NDArray[np.float32], yb: npt.NDArray[np.int64]
        ) -> tuple[float, Float32Array]:
            loss, grads = loss_and_grad(params, xb, yb)
            _, anchor_grads = loss_and_grad(anchor, xb, yb)
            return loss, flatten(grads) - flatten(anchor_grads) + full_grad

        return base_loss, direction
