"""Local data and training: the same shard and the same steps as ``bdn simulate``; npz input checked."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from blockdeepnet.config import ConfigError, DataConfig, TrainConfig, agent_config
from blockdeepnet.data import load_fashion_mnist
from blockdeepnet.learning import FedAvgSGD, flatten, init_params
from cli.simulation import SimulationConfig, _rule, _shards
from firmware_agent.errors import AgentSetupError
from firmware_agent.trainer import Trainer, load_local_data
from tests.unit.test_agent_support import synthetic_npz


def _idx(path: Path, arr: np.ndarray) -> None:
    magic = struct.pack(">BBBB", 0, 0, 0x08, arr.ndim)  # 0x08: unsigned bytes
    header = magic + b"".join(struct.pack(">I", d) for d in arr.shape)
    path.write_bytes(gzip.compress(header + arr.astype(np.uint8).tobytes()))


@pytest.fixture(scope="module")
def idx_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A miniature Fashion-MNIST in the Debian layout: 300 training and 50 test images."""
    d = tmp_path_factory.mktemp("fmnist")
    rng = np.random.default_rng(3)
    for prefix, n in (("train", 300), ("t10k", 50)):
        _idx(d / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        _idx(d / f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, 10, n))
    return d


def test_shard_and_training_match_the_simulator(idx_dir: Path) -> None:
    sim = SimulationConfig(devices=10, seed=11, data_dir=str(idx_dir), lr=0.1, batch_size=8)
    cfg = DataConfig(source="fashion-mnist-shard", shard=4, shards=10, seed=11, data_dir=idx_dir)
    data = load_local_data(cfg)
    full = load_fashion_mnist(idx_dir)
    shard = _shards(sim, full.train_y)[4]
    assert data.samples == len(shard) == 30
    assert np.array_equal(data.x, full.train_x[shard]) and np.array_equal(data.y, full.train_y[shard])

    weights = flatten(init_params(np.random.default_rng([11, 0x1417])))
    trainer = Trainer.from_config(data, cfg, TrainConfig(lr=0.1, batch_size=8))
    outcome = trainer.train(weights, 2, clip=1.0)
    reference = _rule(sim).run(weights, data.x, data.y, np.random.default_rng([11, 2, 4]))
    assert np.array_equal(outcome.delta, np.clip(reference.weights - weights, -1.0, 1.0))
    assert outcome.samples == 30 and outcome.base_loss == reference.base_loss
    assert np.array_equal(trainer.train(weights, 2, clip=1.0).delta, outcome.delta), "replayable"


def test_clipping_counts_and_bounds_the_update(idx_dir: Path) -> None:
    cfg = DataConfig(shard=0, shards=10, data_dir=idx_dir, evaluate_test=True)
    data = load_local_data(cfg)
    weights = flatten(init_params(np.random.default_rng(1)))
    outcome = Trainer.from_config(data, cfg, TrainConfig(lr=0.5, batch_size=4)).train(weights, 1, clip=1e-4)
    assert outcome.clipped > 0 and np.max(np.abs(outcome.delta)) <= 1e-4
    loss, accuracy = Trainer.from_config(data, cfg, TrainConfig()).evaluate(weights)
    assert loss > 0 and accuracy is not None and 0.0 <= accuracy <= 1.0


def test_npz_data_and_its_errors(tmp_path: Path) -> None:
    path = synthetic_npz(tmp_path / "d.npz", 20, seed=1)
    data = load_local_data(DataConfig(source="npz", path=path))
    assert data.x.shape == (20, 1, 28, 28) and data.x.dtype == np.float32 and data.x.max() <= 1.0
    assert data.test_x is None
    np.savez(
        tmp_path / "t.npz",
        x=np.zeros((4, 1, 28, 28)),
        y=np.arange(4),
        x_test=np.zeros((2, 28, 28)),
        y_test=[1, 2],
    )
    with_test = load_local_data(DataConfig(source="npz", path=tmp_path / "t.npz", evaluate_test=True))
    assert with_test.test_x is not None and with_test.test_x.shape == (2, 1, 28, 28)

    bad: list[tuple[dict[str, Any], str]] = [
        ({"x": np.zeros((3, 27, 28)), "y": np.zeros(3, int)}, "must have shape"),
        ({"x": np.zeros((3, 28, 28), np.uint8), "y": np.array([0, 1, 10])}, "lie in 0..9"),
        ({"x": np.zeros((3, 28, 28), np.uint8), "y": np.zeros(2, int)}, "3 integer labels"),
        ({"x": np.full((3, 28, 28), 2.0), "y": np.zeros(3, int)}, "scaled to"),
        ({"images": np.zeros((3, 28, 28))}, "must hold arrays 'x' and 'y'"),
    ]
    for i, (arrays, message) in enumerate(bad):
        np.savez(tmp_path / f"bad{i}.npz", **arrays)
        with pytest.raises(AgentSetupError, match=message):
            load_local_data(DataConfig(source="npz", path=tmp_path / f"bad{i}.npz"))
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(AgentSetupError, match="cannot read training data"):
        load_local_data(DataConfig(source="npz", path=tmp_path / "junk.npz"))


def test_missing_dataset_names_the_package(tmp_path: Path) -> None:
    with pytest.raises(AgentSetupError, match="dataset-fashion-mnist"):
        load_local_data(DataConfig(data_dir=tmp_path))


def test_local_iterations_run_exactly_that_many_steps_across_reshuffled_passes(idx_dir: Path) -> None:
    cfg = DataConfig(shard=1, shards=10, data_dir=idx_dir)
    data = load_local_data(cfg)
    weights = flatten(init_params(np.random.default_rng(5)))
    # 30 samples, batch 8: 4 steps per pass, so 11 steps cross two reshuffles and end mid-pass.
    trainer = Trainer.from_config(data, cfg, TrainConfig(lr=0.1, batch_size=8, local_iterations=11))
    outcome = trainer.train(weights, 3, clip=1.0)
    rng = np.random.default_rng([cfg.seed, 3, cfg.shard])
    reference = FedAvgSGD(lr=0.1, batch_size=8, iterations=11).run(weights, data.x, data.y, rng)
    assert reference.steps == 11
    assert np.array_equal(outcome.delta, np.clip(reference.weights - weights, -1.0, 1.0))
    one_epoch = Trainer.from_config(data, cfg, TrainConfig(lr=0.1, batch_size=8)).train(weights, 3, clip=1.0)
    assert not np.array_equal(one_epoch.delta, outcome.delta), "local_iterations must override local_epochs"
    eq3 = Trainer.from_config(data, cfg, TrainConfig(rule="eq3", batch_size=8, local_iterations=6))
    assert eq3.rule.iterations == 6


def test_local_iterations_in_agent_toml(tmp_path: Path) -> None:
    base = {"fleet_file": "fleet.json", "state_dir": "state", "key_file": "device.key"}
    cfg = agent_config({**base, "train": {"local_iterations": 1500}}, tmp_path)
    assert cfg.train.local_iterations == 1500 and cfg.train.local_epochs == 1
    assert agent_config(base, tmp_path).train.local_iterations == 0
    with pytest.raises(ConfigError, match="local_iterations must be >= 0"):
        agent_config({**base, "train": {"local_iterations": -1}}, tmp_path)
    with pytest.raises(ConfigError, match="must be an integer"):
        agent_config({**base, "train": {"local_iterations": 1.5}}, tmp_path)
