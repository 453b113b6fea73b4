"""`bdn bench round` end to end on small numbers: the JSON has the issue's keys and sane values."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]


def test_bench_round_json_has_every_key_for_both_brokers() -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "cli.main",
            "bench",
            "round",
            "--devices",
            "2,3",
            "--key-bits",
            "512",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=220,
        check=True,
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    for section in (result, result["amqtt"]):
        assert set(section["close_latency_s"]) == set(section["round_wall_s"]) == {"2", "3"}
        for n in ("2", "3"):
            assert 0 < section["close_latency_s"][n] < section["round_wall_s"][n]
        assert section["ingest_updates_s"] > 0
    assert result["key_bits"] == 512 and result["store"] == "sqlite"


def test_bench_round_refuses_bad_counts() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "cli.main", "bench", "round", "--devices", "5,x"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2 and "comma-separated integers" in out.stderr
