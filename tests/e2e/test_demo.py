"""`bdn demo` on a small fleet (the command `make demo` runs, with 3 devices, one round and a 512-bit key)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(400)]


def test_small_demo_writes_results_and_plots(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "cli.main", "demo", "--devices", "3", "--rounds", "2", "--threshold", "1"]
    cmd += ["--holders", "2", "--key-bits", "512", "--no-bench", "--out", str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "120"}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=380, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "expect about" in out.stdout and "results" in out.stdout
    (run,) = tmp_path.glob("run-*")
    result = json.loads((run / "results.json").read_text())
    assert [r["round"] for r in result["rounds"]] == [1, 2]
    for r in result["rounds"]:
        assert (
            0.5 < r["global_accuracy"] <= 1 and r["updates"] == 3 and r["gas"] > 0 and r["wire_bytes"] > 3e6
        )
    assert len(result["local_accuracy"]) == 3 and len(result["local_accuracy_curve"]) == 2
    for name in ("fig3_local_vs_global.png", "accuracy_per_round.png"):
        assert (run / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (run / "fig4a_latency_vs_devices.png").exists()  # --no-bench


def test_demo_refuses_an_impossible_threshold(tmp_path: Path) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "cli.main",
            "demo",
            "--threshold",
            "4",
            "--holders",
            "3",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2 and "threshold" in out.stderr
