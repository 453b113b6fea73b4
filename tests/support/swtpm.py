"""A private software TPM 2.0 per test: Debian's ``swtpm`` on free loopback ports with its own state folder.

A fresh state folder makes a new TPM with new random primary seeds, so two instances are two different TPMs:
what one seals the other cannot unseal (the property the TPM vault relies on). ``--flags
not-need-init,startup-clear`` lets a client talk to it at once, without the control-channel INIT and
TPM2_Startup a firmware would send. The TCTI (libtss2-tcti-swtpm) reaches the command port P and the control
port P+1, so both are picked together.

Register with ``pytest_plugins = ["tests.support.swtpm"]``; the fixtures are ``swtpm`` (one running TPM)
and ``swtpm_factory`` (``make() -> Swtpm``, for a second TPM).
"""

from __future__ import annotations

import ctypes
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType

import pytest

from blockdeepnet.ports import free_port_pair

HOST = "127.0.0.1"


def swtpm_binary() -> str:
    """``swtpm`` on PATH or in /usr/bin (Debian package ``swtpm``)."""
    for candidate in (shutil.which("swtpm"), "/usr/bin/swtpm"):
        if candidate and Path(candidate).exists():
            return candidate
    raise RuntimeError("swtpm not found: install the Debian packages swtpm and swtpm-tools (make test does)")


def _die_with_parent() -> None:
    """Linux: swtpm gets SIGTERM when the thread that started it dies, so a crashed pytest leaves no orphan."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class Swtpm:
    """``swtpm socket --tpm2`` serving commands on ``127.0.0.1:port`` and control on ``port + 1``.

    :meth:`start` waits until the command port accepts connections (retrying on new ports if another process
    took the chosen ones in between); :meth:`stop` terminates it, then kills it after ``timeout``.
    """

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.state_dir / "swtpm.log"
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def tcti(self) -> str:
        """The TCTI string tpm2-tss (and secrets.tcti in agent.toml) uses to reach this TPM."""
        return f"swtpm:host={HOST},port={self.port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 10.0) -> Swtpm:
        for _ in range(3):
            self.port = free_port_pair(HOST)
            self.proc = subprocess.Popen(
                [
                    swtpm_binary(),
                    "socket",
                    "--tpm2",
                    "--server",
                    f"type=tcp,port={self.port},bindaddr={HOST}",
                    "--ctrl",
                    f"type=tcp,port={self.port + 1},bindaddr={HOST}",
                    "--tpmstate",
                    f"dir={self.state_dir}",
                    "--flags",
                    "not-need-init,startup-clear",
                    "--log",
                    f"file={self.log_path}",
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                preexec_fn=_die_with_parent,
            )
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and self.proc.poll() is None:
                try:
                    with socket.create_connection((HOST, self.port), timeout=0.5):
                        return self
                except OSError:
                    time.sleep(0.05)
            if self.proc.poll() is None:  # alive but never listening: not a port race
                self.stop()
                break
        log = self.log_path.read_text(errors="replace")[-2000:] if self.log_path.exists() else ""
        raise RuntimeError(f"swtpm did not start listening on {HOST}:{self.port}; log tail:\n{log}")

    def stop(self, timeout: float = 5.0) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
        self.proc = None

    def __enter__(self) -> Swtpm:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


@pytest.fixture
def swtpm_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[], Swtpm]]:
    """``make() -> Swtpm``: a started software TPM with a state folder (and so seeds) of its own."""
    started: list[Swtpm] = []

    def make() -> Swtpm:
        tpm = Swtpm(tmp_path_factory.mktemp("swtpm"))
        started.append(tpm)
        return tpm.start()

    yield make
    for tpm in reversed(started):
        tpm.stop()


@pytest.fixture
def swtpm(swtpm_factory: Callable[[], Swtpm]) -> str:
    """The TCTI string of a running software TPM of this test's own (``swtpm:host=127.0.0.1,port=P``)."""
    return swtpm_factory().tcti
