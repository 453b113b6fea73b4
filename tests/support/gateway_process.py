"""The gateway as a separate process (``python -m cli.main gateway run``), for tests that crash it for real.

``kill()`` is ``kill -9``: no ``finally``, no clean MQTT DISCONNECT (the broker fires the gateway's last will),
no flush of anything the process held in memory. What survives is what the store, the broker and the chain
hold, which is exactly what a crash test has to exercise.
"""

from __future__ import annotations

import ctypes
import json
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any

REPO = Path(__file__).resolve().parents[2]


def _die_with_parent() -> None:
    """Linux: the gateway gets SIGKILL when the thread that started it dies (no orphan after a pytest crash)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class GatewayProcess:
    """``bdn gateway run --config <config>`` with stdout+stderr appended to ``log_path``.

    ``http_port`` must be the port the config's ``[http]`` table names (a fixed free port, not 0): the test
    finds the process's ``/healthz`` there. :meth:`start` may be called again after :meth:`kill` /
    :meth:`stop` (a restart: same config, same state directory, the log is appended to).
    """

    def __init__(self, config: Path, log_path: Path, http_port: int, *, log_level: str = "info") -> None:
        self.config = config
        self.log_path = log_path
        self.http_port = http_port
        self.log_level = log_level
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 60.0) -> GatewayProcess:
        """Start and wait until ``/healthz`` answers (any status: the broker or chain may be down on purpose)."""
        if self.running:
            return self
        self.starts += 1
        cmd = [
            sys.executable,
            "-m",
            "cli.main",
            "gateway",
            "run",
            "--config",
            str(self.config),
            "--log-level",
            self.log_level,
        ]
        with self.log_path.open("ab") as log:
            log.write(f"\n===== gateway start #{self.starts} at {time.strftime('%H:%M:%S')} =====\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                cmd,
                cwd=REPO,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"the gateway exited with code {self.proc.returncode} while starting:\n{self.log_tail()}"
                )
            if self.healthz() is not None:
                return self
            time.sleep(0.1)
        self.kill()
        raise RuntimeError(f"the gateway did not serve /healthz within {timeout:.0f} s:\n{self.log_tail()}")

    def healthz(self, timeout: float = 2.0) -> dict[str, Any] | None:
        """The ``/healthz`` JSON (also for a 503), or None when nothing answers within ``timeout``."""
        url = f"http://127.0.0.1:{self.http_port}/healthz"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp:
                data: dict[str, Any] = json.loads(resp.read())
                return data
        except urllib.error.HTTPError as exc:
            try:
                data = json.loads(exc.read())
                return data
            except ValueError:
                return None
        except (urllib.error.URLError, ConnectionError, TimeoutError, ValueError):
            return None

    def kill(self) -> None:
        """``kill -9``."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM (a clean shutdown), SIGKILL if it hangs; returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = 80) -> str:
        text = self.log_text().splitlines()[-lines:]
        return f"--- {self.log_path}\n" + "\n".join(text) if text else "(no gateway output)"

    def __enter__(self) -> GatewayProcess:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
