"""Local data and local training: what the device learns from, and how one round of learning is run.

Data (``[data]`` in agent.toml):

- ``fashion-mnist-shard``: shard ``shard`` of ``shards`` of the Fashion-MNIST training set, cut exactly as
  ``bdn simulate`` cuts it (same partitioner, same seed stream, same shard size), so an agent fleet and the
  simulator given the same seed train on the same samples and can be compared number for number;
- ``npz``: arrays ``x`` (N, 28, 28) or (N, 1, 28, 28), uint8 0..255 or float in [0, 1], and ``y`` (N labels
  0..9); optionally ``x_test`` / ``y_test`` for the accuracy figure.

Training uses the core's rules (FedAvg local SGD by default, the paper's Eq. 3 as ``rule = "eq3"``) with the
minibatch order drawn from ``[seed, round, shard]``, the simulator's stream, so a round can be replayed. A round
is ``local_epochs`` passes over the local set, or exactly ``local_iterations`` minibatch steps when that is set
(the paper's 1,500), cycling through a fresh shuffle at every pass.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from blockdeepnet.config import DataConfig, TrainConfig
from blockdeepnet.data import (
    PAPER_SAMPLES_PER_DEVICE,
    DatasetError,
    load_fashion_mnist,
    load_test_split,
    load_train_subset,
    partition_iid,
)
from blockdeepnet.learning import FedAvgSGD, VarianceReduced, evaluate, unflatten
from firmware_agent.errors import AgentSetupError

SHARD_STREAM = 0xDA7A
"""The RNG stream ``bdn simulate`` draws its IID split from (``default_rng([seed, SHARD_STREAM])``)."""

_MAX_NPZ_SAMPLES = 1_000_000

Images = npt.NDArray[np.float32]
Labels = npt.NDArray[np.int64]


@dataclass(frozen=True, eq=False)
class LocalData:
    """The device's training set, and a labelled test set when accuracy is to be reported."""

    x: Images
    y: Labels
    test_x: Images | None = None
    test_y: Labels | None = None

    @property
    def samples(self) -> int:
        """s_k of Eq. 4: the weight of this device's update."""
        return int(self.x.shape[0])


def shard_of(labels_count: int, shard: int, shards: int, seed: int) -> npt.NDArray[np.int64]:
    """Indices of ``shard`` in the simulator's IID split of a training set of ``labels_count`` samples."""
    per = min(PAPER_SAMPLES_PER_DEVICE, labels_count // shards)
    return partition_iid(labels_count, shards, per, np.random.default_rng([seed, SHARD_STREAM]))[shard]


def _images(name: str, raw: npt.NDArray[Any], where: Path) -> Images:
    if raw.ndim == 3:
        raw = raw[:, None, :, :]
    if raw.ndim != 4 or raw.shape[1:] != (1, 28, 28):
        raise AgentSetupError(
            f"{where}: {name} must have shape (N, 28, 28) or (N, 1, 28, 28), got {raw.shape}"
        )
    if not 1 <= raw.shape[0] <= _MAX_NPZ_SAMPLES:
        raise AgentSetupError(f"{where}: {name} must hold 1..{_MAX_NPZ_SAMPLES} images, got {raw.shape[0]}")
    if raw.dtype == np.uint8:
        return raw.astype(np.float32) / np.float32(255.0)
    if not np.issubdtype(raw.dtype, np.floating):
        raise AgentSetupError(f"{where}: {name} must be uint8 or float images, got {raw.dtype}")
    x = raw.astype(np.float32)
    if not np.all(np.isfinite(x)) or x.min() < 0.0 or x.max() > 1.0:
        raise AgentSetupError(f"{where}: float images in {name} must be finite and scaled to [0, 1]")
    return x


def _labels(name: str, raw: npt.NDArray[Any], count: int, where: Path) -> Labels:
    if raw.shape != (count,) or not np.issubdtype(raw.dtype, np.integer):
        raise AgentSetupError(f"{where}: {name} must be {count} integer labels, got {raw.dtype} {raw.shape}")
    if raw.min() < 0 or raw.max() > 9:
        raise AgentSetupError(f"{where}: labels in {name} must lie in 0..9")
    return raw.astype(np.int64)


def _load_npz(cfg: DataConfig) -> LocalData:
    assert cfg.path is not None  # agent_config() requires it for this source
    try:
        with np.load(cfg.path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except FileNotFoundError:
        raise AgentSetupError(f"training data file {cfg.path} does not exist") from None
    except (OSError, ValueError) as exc:
        raise AgentSetupError(f"cannot read training data {cfg.path} as .npz: {exc}") from None
    if "x" not in arrays or "y" not in arrays:
        raise AgentSetupError(f"{cfg.path} must hold arrays 'x' and 'y', found {sorted(arrays)}")
    x = _images("x", arrays["x"], cfg.path)
    y = _labels("y", arrays["y"], x.shape[0], cfg.path)
    test_x: Images | None = None
    test_y: Labels | None = None
    if cfg.evaluate_test:
        if "x_test" in arrays and "y_test" in arrays:
            test_x = _images("x_test", arrays["x_test"], cfg.path)
            test_y = _labels("y_test", arrays["y_test"], test_x.shape[0], cfg.path)
        else:
            data = load_fashion_mnist(cfg.data_dir)
            test_x, test_y = data.test_x, data.test_y
    return LocalData(x, y, test_x, test_y)


REPORT_SAMPLES = 512


def load_local_data(cfg: DataConfig) -> LocalData:
    """Load the configured data; a missing or malformed dataset is an :class:`AgentSetupError`."""
    try:
        if cfg.source == "npz":
            return _load_npz(cfg)
        x, y = load_train_subset(lambda n: shard_of(n, cfg.shard, cfg.shards, cfg.seed), cfg.data_dir)
        if cfg.evaluate_test:
            return LocalData(x, y, *load_test_split(cfg.data_dir))
        return LocalData(x, y)
    except DatasetError as exc:
        raise AgentSetupError(str(exc)) from None


@dataclass(frozen=True, eq=False)
class TrainOutcome:
    """One local round: the clipped update to encrypt and what it cost."""

    delta: npt.NDArray[np.float32]
    samples: int
    train_loss: float
    base_loss: float
    clipped: int
    seconds: float


class Trainer:
    """Runs the configured local rule on the device's data; deterministic given (seed, round, shard)."""

    def __init__(self, data: LocalData, train: TrainConfig, *, seed: int, stream: int) -> None:
        rule_cls = FedAvgSGD if train.rule == "fedavg" else VarianceReduced
        self.rule = rule_cls(
            lr=train.lr,
            batch_size=train.batch_size,
            epochs=train.local_epochs,
            iterations=train.local_iterations or None,
        )
        self.data = data
        self.seed = seed
        self.stream = stream

    @classmethod
    def from_config(cls, data: LocalData, data_cfg: DataConfig, train: TrainConfig) -> Trainer:
        return cls(data, train, seed=data_cfg.seed, stream=data_cfg.shard)

    def train(self, weights: npt.NDArray[np.float32], round_no: int, clip: float) -> TrainOutcome:
        """Train from ``weights`` and return delta = new - base clipped to ±clip (the codec refuses, never
        wraps, values outside its range, so clipping here is what keeps a large step encodable)."""
        start = time.perf_counter()
        rng = np.random.default_rng([self.seed, round_no, self.stream])
        result = self.rule.run(weights, self.data.x, self.data.y, rng)
        delta = result.weights - weights
        clipped = int(np.count_nonzero(np.abs(delta) > clip))
        delta = np.clip(delta, -clip, clip).astype(np.float32)
        return TrainOutcome(
            delta=delta,
            samples=result.samples,
            train_loss=float(result.train_loss),
            base_loss=float(result.base_loss),
            clipped=clipped,
            seconds=time.perf_counter() - start,
        )

    def evaluate(self, weights: npt.NDArray[np.float32]) -> tuple[float, float | None]:
        """Loss of ``weights`` on (at most ``REPORT_SAMPLES`` evenly spaced samples of) the device's own
        training data, and test accuracy if a test set is held. The loss is a monitoring report, not a
        training input: a fixed subset estimates it well at a fraction of a full pass's CPU (issue 6)."""
        params = unflatten(weights)
        n = self.data.x.shape[0]
        pick = np.linspace(0, n - 1, min(n, REPORT_SAMPLES)).astype(np.int64)
        loss, _ = evaluate(params, self.data.x[pick], self.data.y[pick])
        accuracy: float | None = None
        if self.data.test_x is not None and self.data.test_y is not None:
            _, accuracy = evaluate(params, self.data.test_x, self.data.test_y)
        return float(loss), None if accuracy is None else float(accuracy)
