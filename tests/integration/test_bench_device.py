"""`bdn bench device` on small numbers: one real agent round and its plain-training baseline, every key there.

Timings are not asserted (a shared machine is noisy); the relations between the figures are.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest

from bench.device import plain_training
from blockdeepnet.config import TrainConfig
from blockdeepnet.learning import flatten, init_params
from firmware_agent.trainer import LocalData, Trainer

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

REQUIRED = (
    "peak_rss_mb",
    "baseline_peak_rss_mb",
    "cpu_s",
    "baseline_cpu_s",
    "cpu_overhead",
    "mem_overhead",
    "key_holder_extra_cpu_s",
)


def test_bench_device_json_has_every_figure_and_they_agree() -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "cli.main",
            "bench",
            "device",
            "--iterations",
            "20",
            "--key-bits",
            "512",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=220,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 1, "--json prints exactly one JSON object on stdout"
    result = json.loads(lines[0])
    for key in REQUIRED:
        assert type(result[key]) is float and math.isfinite(result[key]), key
    assert result["cpu_overhead"] == pytest.approx(result["cpu_s"] / result["baseline_cpu_s"] - 1, rel=1e-9)
    assert result["mem_overhead"] == pytest.approx(
        result["peak_rss_mb"] / result["baseline_peak_rss_mb"] - 1, rel=1e-9
    )
    for key in ("peak_rss_mb", "baseline_peak_rss_mb"):
        assert 20 < result[key] < 2048, f"{key} = {result[key]} MB is not a Python process's own peak"
    assert result["cpu_s"] > 0 and result["baseline_cpu_s"] > 0
    assert result["key_holder_extra_cpu_s"] > 0 and len(result["key_holder_extra_cpu_s_each"]) == 2
    stages = result["peak_rss_mb_by_stage"]
    assert stages["started"] <= stages["trained_and_published"] <= stages["applied"] == result["peak_rss_mb"]
    cpu = result["cpu_s_by_stage"]
    assert (
        cpu["started"]
        <= cpu["round_1_applied"]
        <= cpu["round_2_open"]
        <= cpu["trained_and_published"]
        <= cpu["applied"]
    )
    # cpu_s is the steady-state round (round 1 applied -> round 2 applied), the baseline its training alone.
    assert result["cpu_s"] == pytest.approx(cpu["applied"] - cpu["round_1_applied"], rel=1e-9)
    assert result["first_round_cpu_s"] == cpu["round_1_applied"]
    assert 0 < result["train_cpu_s"] <= cpu["trained_and_published"] - cpu["round_2_open"]
    assert 0 < result["baseline_cpu_s"] <= result["baseline_train_cpu_s"] + 0.5

    # A fair Fig. 5: the baseline loaded none of the layer, and trained the same samples in the same order.
    assert result["baseline_layer_modules"] == []
    assert result["train_loss"] == result["baseline_train_loss"]
    assert (
        result["startup_cpu_s"] < result["cpu_s"]
        and result["baseline_startup_cpu_s"] < result["baseline_cpu_s"]
    )
    assert (result["key_bits"], result["iterations"], result["samples"]) == (512, 20, 2745)
    assert result["params"] == 252_398 and result["ciphertexts"] * 2 * 512 // 8 <= result["update_bytes"]
    assert result["python"] and result["numpy"] == np.__version__
    assert set(result["wall_s"]) == {"round", "train", "baseline", "baseline_train"}


@pytest.mark.parametrize(
    "train",
    [TrainConfig(lr=0.1, batch_size=8, local_iterations=7), TrainConfig(rule="eq3", batch_size=16)],
    ids=["fedavg-iterations", "eq3-epochs"],
)
def test_baseline_trains_exactly_what_the_agent_trains(train: TrainConfig) -> None:
    rng = np.random.default_rng(4)
    x = rng.integers(0, 256, (40, 1, 28, 28)).astype(np.float32) / np.float32(255.0)
    y = rng.integers(0, 10, 40).astype(np.int64)
    weights = flatten(init_params(np.random.default_rng(2)))
    agent = Trainer(LocalData(x, y), train, seed=9, stream=3).train(weights, 2, clip=0.01)
    delta, result = plain_training(x, y, weights, train, seed=9, stream=3, round_no=2, clip=0.01)
    assert np.array_equal(delta, agent.delta) and result.train_loss == agent.train_loss
