"""The paper's CNN in pure NumPy.

Architecture (Rathore et al. 2019): Conv 10x1x3x3 (padding 1, stride 1) -> ReLU -> MaxPool 2 -> FC 1960x128
-> ReLU -> FC 128x10, softmax cross-entropy; 252,398 parameters.

Parameters are a dict of named arrays in the fixed order of ``PARAM_SHAPES``; that order defines the flat
vector which is what devices encrypt and the gateway aggregates, so it must never change silently.
Layouts: ``conv.w`` OIHW, ``fc1.w`` (in, out) with the input flattened in (c, h, w) order.

Everything runs in float32 by default. The arithmetic follows the dtype of the parameters, so the same code
in float64 is used to check the backward pass against numerical gradients.

Speed: the convolution uses im2col (9 shifted views of the padded input stacked, one batched GEMM), and
ReLU is applied *after* the max-pool: relu(max(z)) == max(relu(z)) since ReLU is monotone, so doing it on the
pooled map is 4x cheaper and gives the same function and gradients. The input gradient of the conv is never
needed (it is the first layer), so there is no col2im.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

import numpy as np
import numpy.typing as npt

__all__ = [
    "PAPER_CNN_PARAMS",
    "PARAM_SHAPES",
    "FloatArray",
    "Params",
    "as_params",
    "evaluate",
    "flatten",
    "forward",
    "init_params",
    "loss_and_grad",
    "num_params",
    "predict",
    "unflatten",
]

FloatArray = npt.NDArray[np.floating[Any]]
Params = dict[str, FloatArray]

IMAGE_SHAPE: Final = (1, 28, 28)
NUM_CLASSES: Final = 10
CONV_OUT: Final = 10
KERNEL: Final = 3
HIDDEN: Final = 128
POOLED_SIDE: Final = 14
FC1_IN: Final = CONV_OUT * POOLED_SIDE * POOLED_SIDE  # 1960
_POOL_OFFSETS: Final = ((0, 0), (0, 1), (1, 0), (1, 1))  # (row, col) of the members of a 2x2 pooling window

PARAM_SHAPES: Final[tuple[tuple[str, tuple[int, ...]], ...]] = (
    ("conv.w", (CONV_OUT, 1, KERNEL, KERNEL)),
    ("conv.b", (CONV_OUT,)),
    ("fc1.w", (FC1_IN, HIDDEN)),
    ("fc1.b", (HIDDEN,)),
    ("fc2.w", (HIDDEN, NUM_CLASSES)),
    ("fc2.b", (NUM_CLASSES,)),
)
PAPER_CNN_PARAMS: Final = 252_398


def num_params() -> int:
    """Total parameter count implied by ``PARAM_SHAPES`` (equals ``PAPER_CNN_PARAMS``)."""
    return sum(int(np.prod(shape)) for _, shape in PARAM_SHAPES)


# --- parameters <-> flat vector ---


def init_params(rng: np.random.Generator) -> Params:
    """He-normal init for the ReLU layers, Glorot-uniform for the softmax layer, zero biases (float32)."""
    conv_fan_in = 1 * KERNEL * KERNEL
    glorot = float(np.sqrt(6.0 / (HIDDEN + NUM_CLASSES)))
    values: dict[str, npt.NDArray[Any]] = {
        "conv.w": rng.normal(0.0, np.sqrt(2.0 / conv_fan_in), (CONV_OUT, 1, KERNEL, KERNEL)),
        "conv.b": np.zeros(CONV_OUT),
        "fc1.w": rng.normal(0.0, np.sqrt(2.0 / FC1_IN), (FC1_IN, HIDDEN)),
        "fc1.b": np.zeros(HIDDEN),
        "fc2.w": rng.uniform(-glorot, glorot, (HIDDEN, NUM_CLASSES)),
        "fc2.b": np.zeros(NUM_CLASSES),
    }
    return {name: values[name].astype(np.float32) for name, _ in PARAM_SHAPES}


def _check_params(params: Mapping[str, npt.NDArray[Any]]) -> None:
    expected = [name for name, _ in PARAM_SHAPES]
    if sorted(params) != sorted(expected):
        raise ValueError(f"parameter names {sorted(params)} != expected {sorted(expected)}")
    for name, shape in PARAM_SHAPES:
        if params[name].shape != shape:
            raise ValueError(f"parameter {name} has shape {params[name].shape}, expected {shape}")


def flatten(params: Mapping[str, npt.NDArray[Any]]) -> npt.NDArray[np.float32]:
    """Concatenate the parameters in ``PARAM_SHAPES`` order into a new 1-D float32 vector."""
    _check_params(params)
    return np.concatenate([np.asarray(params[name], dtype=np.float32).ravel() for name, _ in PARAM_SHAPES])


def unflatten(vec: npt.ArrayLike) -> Params:
    """Inverse of ``flatten``: float32 views into one fresh copy of ``vec`` (not the caller's array).

    Because the arrays are views of a single buffer, code that updates a flat vector in place can keep a
    params dict over it without re-splitting every step.
    """
    flat = np.array(vec, dtype=np.float32)  # always a copy
    if flat.ndim != 1:
        raise ValueError(f"expected a 1-D parameter vector, got shape {flat.shape}")
    if flat.size != PAPER_CNN_PARAMS:
        raise ValueError(f"parameter vector has {flat.size} entries, the CNN needs {PAPER_CNN_PARAMS}")
    return as_params(flat)


def as_params(flat: npt.NDArray[np.float32]) -> Params:
    """Split a flat float32 vector into named parameter *views* (no copy): updating ``flat`` in place updates
    the returned arrays, which is how the local rules step without re-splitting every minibatch."""
    if flat.dtype != np.float32 or flat.ndim != 1 or flat.size != PAPER_CNN_PARAMS:
        raise ValueError(
            f"expected a 1-D float32 vector of {PAPER_CNN_PARAMS} entries, got {flat.dtype} {flat.shape}"
        )
    params: Params = {}
    offset = 0
    for name, shape in PARAM_SHAPES:
        size = int(np.prod(shape))
        params[name] = flat[offset : offset + size].reshape(shape)
        offset += size
    return params


# --- forward pass ---


def _im2col(x: FloatArray) -> FloatArray:
    """(N, C, H, W) -> (N, C*9, H*W) patches for a 3x3, padding 1, stride 1 convolution.

    Row index c*9 + i*3 + j matches ``conv.w.reshape(O, C*9)`` (OIHW).
    """
    n, c, h, w = x.shape
    padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    cols = np.empty((n, c, KERNEL * KERNEL, h, w), dtype=x.dtype)
    for i in range(KERNEL):
        for j in range(KERNEL):
            cols[:, :, i * KERNEL + j] = padded[:, :, i : i + h, j : j + w]
    return cols.reshape(n, c * KERNEL * KERNEL, h * w)


def _as_input(params: Mapping[str, FloatArray], x: npt.ArrayLike) -> FloatArray:
    dtype = params["conv.w"].dtype
    arr = np.asarray(x, dtype=dtype)
    if arr.ndim != 4 or arr.shape[1:] != IMAGE_SHAPE:
        raise ValueError(f"expected images of shape (N, 1, 28, 28), got {arr.shape}")
    return arr


class _Cache:
    """Intermediate values of one forward pass that the backward pass needs."""

    __slots__ = ("a1", "argmax", "cols", "flat", "pooled", "r1")

    def __init__(
        self,
        cols: FloatArray,
        argmax: npt.NDArray[np.intp],
        pooled: FloatArray,
        flat: FloatArray,
        a1: FloatArray,
        r1: FloatArray,
    ) -> None:
        self.cols = cols
        self.argmax = argmax
        self.pooled = pooled
        self.flat = flat
        self.a1 = a1
        self.r1 = r1


EVAL_BATCH = 128
"""Images per forward pass when evaluating: the activations of one pass take ~0.2 MB per image (im2col is 9x
the input), so 128 keep a device's evaluation at ~25 MB where 1,000 took ~200 MB (measured, issue 6: the agent's
peak RSS must stay under 150 MB on a Raspberry Pi 3); the matrix products stay large enough to run at speed."""


def _forward(params: Mapping[str, FloatArray], x: FloatArray) -> tuple[FloatArray, _Cache]:
    n = x.shape[0]
    cols = _im2col(x)
    w_conv = params["conv.w"].reshape(CONV_OUT, -1)
    z = np.matmul(w_conv, cols) + params["conv.b"][None, :, None]  # (N, O, H*W)
    # The four members of every 2x2 window, stacked on a leading axis (offsets in _POOL_OFFSETS order), so that
    # max/argmax run over long contiguous rows. argmax picks exactly one winner per window, ties included: blank
    # background gives four equal values, and routing the gradient to all of them would be wrong.
    z4 = z.reshape(n, CONV_OUT, IMAGE_SHAPE[1], IMAGE_SHAPE[2])
    windows = np.stack([z4[:, :, i::2, j::2] for i, j in _POOL_OFFSETS])
    argmax = windows.argmax(axis=0)
    pooled = windows.max(axis=0)
    relu_pooled = np.maximum(pooled, 0)
    flat = relu_pooled.reshape(n, FC1_IN)  # (c, h, w) order
    a1 = flat @ params["fc1.w"] + params["fc1.b"]
    r1 = np.maximum(a1, 0)
    logits = r1 @ params["fc2.w"] + params["fc2.b"]
    return logits, _Cache(cols, argmax, pooled, flat, a1, r1)


def _xent(logits: FloatArray, y: npt.NDArray[np.intp]) -> float:
    """Mean cross-entropy, numerically stable via log-sum-exp (accumulated in float64)."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return -float(log_probs[np.arange(logits.shape[0]), y].mean(dtype=np.float64))


def _softmax_xent(logits: FloatArray, y: npt.NDArray[np.intp]) -> tuple[float, FloatArray]:
    """Mean cross-entropy and its gradient w.r.t. the logits: (softmax - onehot) / N."""
    n = logits.shape[0]
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    total = exp.sum(axis=1, keepdims=True)
    loss = -float((shifted[np.arange(n), y] - np.log(total[:, 0])).mean(dtype=np.float64))
    dlogits = exp / total
    dlogits[np.arange(n), y] -= 1
    dlogits /= n
    return loss, dlogits


def _as_labels(y: npt.ArrayLike, n: int) -> npt.NDArray[np.intp]:
    labels = np.asarray(y)
    if labels.shape != (n,):
        raise ValueError(f"expected {n} labels, got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers, got {labels.dtype}")
    if n and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise ValueError(f"labels must lie in 0..{NUM_CLASSES - 1}")
    return labels.astype(np.intp, copy=False)


def forward(params: Mapping[str, FloatArray], x: npt.ArrayLike) -> FloatArray:
    """Logits ``(N, 10)`` for images ``(N, 1, 28, 28)``, in the parameters' dtype."""
    logits, _ = _forward(params, _as_input(params, x))
    return logits


def loss_and_grad(
    params: Mapping[str, FloatArray], x: npt.ArrayLike, y: npt.ArrayLike
) -> tuple[float, Params]:
    """Mean softmax cross-entropy over the batch and its gradient for every parameter (same names/dtypes)."""
    xs = _as_input(params, x)
    n = xs.shape[0]
    if n == 0:
        raise ValueError("empty batch")
    labels = _as_labels(y, n)
    logits, c = _forward(params, xs)
    loss, dlogits = _softmax_xent(logits, labels)

    grads: Params = {}
    grads["fc2.w"] = c.r1.T @ dlogits
    grads["fc2.b"] = dlogits.sum(axis=0)
    da1 = (dlogits @ params["fc2.w"].T) * (c.a1 > 0)
    grads["fc1.w"] = c.flat.T @ da1
    grads["fc1.b"] = da1.sum(axis=0)
    dpooled = (da1 @ params["fc1.w"].T).reshape(c.pooled.shape) * (c.pooled > 0)
    # Route each pooled gradient back to the single argmax position of its 2x2 window.
    dz4 = np.empty((n, CONV_OUT, IMAGE_SHAPE[1], IMAGE_SHAPE[2]), dtype=dpooled.dtype)
    for q, (i, j) in enumerate(_POOL_OFFSETS):
        dz4[:, :, i::2, j::2] = np.where(c.argmax == q, dpooled, 0)
    dz = dz4.reshape(n, CONV_OUT, -1)
    grads["conv.w"] = np.tensordot(dz, c.cols, axes=([0, 2], [0, 2])).reshape(params["conv.w"].shape)
    grads["conv.b"] = dz.sum(axis=(0, 2))
    dtype = params["conv.w"].dtype
    ordered = {name: grads[name].astype(dtype, copy=False) for name, _ in PARAM_SHAPES}
    return loss, ordered


def evaluate(
    params: Mapping[str, FloatArray], x: npt.ArrayLike, y: npt.ArrayLike, batch: int = EVAL_BATCH
) -> tuple[float, float]:
    """Mean cross-entropy and accuracy over a dataset, in batches to bound memory (im2col is 9x the input)."""
    if batch <= 0:
        raise ValueError(f"batch must be positive, got {batch}")
    xs = _as_input(params, x)
    n = xs.shape[0]
    if n == 0:
        raise ValueError("empty dataset")
    labels = _as_labels(y, n)
    total_loss = 0.0
    correct = 0
    for start in range(0, n, batch):
        xb, yb = xs[start : start + batch], labels[start : start + batch]
        logits = _forward(params, xb)[
            0
        ]  # the activation cache is dropped now, not when the next chunk is done
        loss = _xent(logits, yb)
        total_loss += loss * xb.shape[0]
        correct += int((logits.argmax(axis=1) == yb).sum())
    return total_loss / n, correct / n


def predict(
    params: Mapping[str, FloatArray], x: npt.ArrayLike, batch: int = EVAL_BATCH
) -> npt.NDArray[np.int64]:
    """Predicted class per image."""
    if batch <= 0:
        raise ValueError(f"batch must be positive, got {batch}")
    xs = _as_input(params, x)
    out = np.empty(xs.shape[0], dtype=np.int64)
    for start in range(0, xs.shape[0], batch):
        out[start : start + batch] = _forward(params, xs[start : start + batch])[0].argmax(axis=1)
    return out
