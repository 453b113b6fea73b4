"""`bdn simulate` end to end on small settings: real dataset, real worker processes, real threshold crypto."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from blockdeepnet.data import DEFAULT_DATA_DIR

SMALL = ["--devices", "3", "--rounds", "2", "--samples-per-device", "600", "--seed", "3", "--workers", "2"]


def _bdn(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cli.main", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


needs_dataset = pytest.mark.skipif(
    not (DEFAULT_DATA_DIR / "train-images-idx3-ubyte.gz").exists(),
    reason="Debian package dataset-fashion-mnist is not installed (make test installs it)",
)


def test_missing_dataset_is_a_clear_error(tmp_path: Path) -> None:
    proc = _bdn("simulate", "--plaintext", "--data-dir", str(tmp_path), "--json", timeout=60)
    assert proc.returncode == 2
    assert "dataset-fashion-mnist" in proc.stderr
    assert str(tmp_path) in proc.stderr
    assert "Traceback" not in proc.stderr


def test_bad_threshold_is_refused() -> None:
    proc = _bdn("simulate", "--threshold", "4", "--holders", "3", "--json", timeout=60)
    assert proc.returncode == 2
    assert "threshold" in proc.stderr


@pytest.mark.integration
@needs_dataset
@pytest.mark.timeout(300)
def test_encrypted_matches_plaintext() -> None:
    """The same seed through the encrypted path and the clear path gives the same model up to quantization."""
    enc = _bdn("simulate", *SMALL, "--encrypted", "--key-bits", "512", "--json")
    assert enc.returncode == 0, enc.stderr
    plain = _bdn("simulate", *SMALL, "--plaintext", "--json")
    assert plain.returncode == 0, plain.stderr
    e, p = json.loads(enc.stdout), json.loads(plain.stdout)
    assert [r["round"] for r in e["rounds"]] == [1, 2]
    assert set(e) >= {"rounds", "local_accuracy_mean", "final_accuracy"}
    for re_, rp in zip(e["rounds"], p["rounds"], strict=True):
        assert set(re_) >= {"round", "global_accuracy", "global_loss", "seconds"}
        assert abs(re_["global_accuracy"] - rp["global_accuracy"]) <= 0.005
        assert abs(re_["global_loss"] - rp["global_loss"]) <= 0.01
    assert e["final_accuracy"] > 0.5  # ten classes: chance is 0.1
    assert e["crypto"]["ciphertexts_per_update"] > 0
    assert len(e["local_accuracy"]) == 3
