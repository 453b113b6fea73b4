"""``bdn gateway run`` as a real process: with ``--log-format json`` every line it writes to stderr is a JSON
object (its embedded broker, chain and web server included) and the round it opens is a field; with the
default ``auto`` and a ``$JOURNAL_STREAM`` that names its stderr, as under systemd, every line is a journald
line with a priority prefix."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from blockdeepnet.ports import free_port
from provisioning.localfleet import LocalFleet
from tests.support.fleets import small_fleet

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def fleet(tmp_path: Path) -> LocalFleet:
    """Three devices, embedded broker and chain (in memory: each gateway run needs a fresh state folder)."""
    return small_fleet(tmp_path, "logs", broker_port=free_port(), http_port=free_port())


def _run_until(
    args: list[str], log: Path, env: dict[str, str], done: str, timeout: float = 60.0
) -> tuple[int, list[str]]:
    """Run the gateway with stderr in ``log`` until a line contains ``done``; SIGTERM; exit code and lines."""
    with log.open("wb") as out:
        out.flush()
        if "JOURNAL_STREAM" in env:  # the identity of this very file, as systemd would set it
            st = os.fstat(out.fileno())
            env = env | {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        proc = subprocess.Popen(
            [sys.executable, "-m", "cli.main", "gateway", "run", *args],
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            env=env,
        )
    try:
        deadline = time.monotonic() + timeout
        while done not in log.read_text(errors="replace"):
            assert proc.poll() is None, f"the gateway exited {proc.returncode}:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"no {done!r} within {timeout} s:\n{log.read_text()[-3000:]}"
            time.sleep(0.1)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
    return code, log.read_text(errors="replace").splitlines()


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("JOURNAL_STREAM", "BDN_LOG_FORMAT")}
    return env | {"OMP_NUM_THREADS": "1"} | extra


def test_json_format_every_line_is_an_object_and_the_round_is_a_field(
    fleet: LocalFleet, tmp_path: Path
) -> None:
    code, lines = _run_until(
        ["--config", str(fleet.gateway_config), "--log-format", "json"],
        tmp_path / "gateway.log",
        _env(),
        done='"round": 1',
    )
    assert code == 0, "\n".join(lines[-40:])
    entries: list[dict[str, Any]] = []
    for line in lines:
        try:
            entries.append(json.loads(line))
        except ValueError:
            pytest.fail(f"not a JSON line: {line!r}\nall output:\n" + "\n".join(lines[-40:]))
    assert all({"ts", "level", "logger", "msg"} <= set(e) for e in entries)
    opened = [e for e in entries if e.get("round") == 1 and e["msg"].startswith("round 1 open")]
    assert opened and opened[0]["logger"] == "bdn.gateway" and opened[0]["level"] == "info", entries
    assert any(e.get("fleet") == fleet.fleet.name for e in entries), entries


def test_auto_format_under_a_journal_stream_writes_priority_lines(fleet: LocalFleet, tmp_path: Path) -> None:
    code, lines = _run_until(
        ["--config", str(fleet.gateway_config)],
        tmp_path / "gateway.log",
        _env(JOURNAL_STREAM="set below"),
        done="round 1 open",
    )
    assert code == 0, "\n".join(lines[-40:])
    assert lines and all(line[:3] in {"<7>", "<6>", "<4>", "<3>", "<2>"} for line in lines), lines
    assert any(line.startswith("<6>bdn.gateway: round 1 open") for line in lines), lines
    assert not any(line[3:].startswith("20") for line in lines), "journald adds the time stamp itself"
