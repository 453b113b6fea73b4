"""A real anvil node from npm (contracts/node_modules), for tests that need a JSON-RPC chain."""

from __future__ import annotations

import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

ANVIL = Path(__file__).resolve().parents[2] / "contracts" / "node_modules" / ".bin" / "anvil"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Anvil:
    """A real anvil process on a free loopback port, with the flags the appliance uses (DESIGN §5)."""

    def __init__(self, port: int, state_file: Path | None = None) -> None:
        if not ANVIL.exists():
            raise RuntimeError(f"anvil not found at {ANVIL}: run `make test` (npm ci in contracts/) first")
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        args = [str(ANVIL), "--port", str(port), "--host", "127.0.0.1", "--hardfork", "london"]
        args += ["--gas-price", "0", "--base-fee", "0", "--order", "fifo", "--silent"]
        if state_file is not None:
            args += ["--state", str(state_file)]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self._wait_ready(20.0)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        body = b'{"jsonrpc":"2.0","id":1,"method":"eth_chainId","params":[]}'
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                raise RuntimeError(f"anvil exited with {self.proc.returncode}: {err}")
            try:
                req = urllib.request.Request(self.url, body, {"Content-Type": "application/json"})
                with urllib.request.urlopen(req, timeout=1):
                    return
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"anvil did not answer on {self.url} within {timeout} s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
