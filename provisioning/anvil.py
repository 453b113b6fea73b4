"""A local anvil node (npm ``@foundry-rs/anvil``) run the way the appliance needs it (DESIGN §5).

``--hardfork london --gas-price 0 --base-fee 0 --order fifo``: the same rules as a permissioned QBFT chain
(no PUSH0, zero-priced legacy transactions) and transactions mined in the order they were sent, which the
gateway's pipelined relay relies on. With ``state_file`` the chain is loaded at start and dumped at exit,
so a dev chain survives restarts.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType

from blockdeepnet.ports import free_port, port_in_use

NODE_MODULES = Path(__file__).resolve().parent.parent / "contracts" / "node_modules"


class AnvilError(RuntimeError):
    """anvil is missing, could not start, or its port is taken."""


def find_anvil() -> Path:
    """``$BDN_ANVIL``, the native binary of the repository's npm install, or ``anvil`` on PATH.

    npm's ``.bin/anvil`` is a Node shim that spawns the native binary as a child: signalling the shim would
    orphan the node, so the native binary from the platform package is run directly.
    """
    native = sorted(NODE_MODULES.glob("@foundry-rs/anvil-*/bin/anvil"))
    for candidate in (os.environ.get("BDN_ANVIL"), *(str(p) for p in native), shutil.which("anvil")):
        if candidate and Path(candidate).exists():
            return Path(candidate)
    raise AnvilError(
        f"anvil not found (looked at $BDN_ANVIL, {NODE_MODULES}/@foundry-rs/anvil-*/bin and PATH): run "
        "`npm ci --prefix contracts` (make test does) or install @foundry-rs/anvil"
    )


def _die_with_parent() -> None:
    """Linux: the node gets SIGTERM when the process that started it dies, so a crash leaves no orphan."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class AnvilProcess:
    """Start with :meth:`start` (or as a context manager); :meth:`stop` ends it gracefully (state dumped)."""

    def __init__(
        self, port: int | None = None, state_file: Path | None = None, chain_id: int | None = None
    ) -> None:
        self.port = port if port is not None else free_port()
        self.state_file = state_file
        self.chain_id = chain_id
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 20.0) -> AnvilProcess:
        if port_in_use("127.0.0.1", self.port):
            raise AnvilError(f"port {self.port} is already in use; choose another with --port")
        args = [str(find_anvil()), "--host", "127.0.0.1", "--port", str(self.port), "--hardfork", "london"]
        args += ["--gas-price", "0", "--base-fee", "0", "--order", "fifo", "--silent"]
        if self.chain_id is not None:
            args += ["--chain-id", str(self.chain_id)]
        if self.state_file is not None:
            self.state_file.parent.mkdir(parents=True, exist_ok=True)
            args += ["--state", str(self.state_file)]
        self.proc = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, preexec_fn=_die_with_parent
        )
        self._wait_ready(timeout)
        return self

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                raise AnvilError(f"anvil exited with code {self.proc.returncode}: {err.strip()}")
            if self.rpc("eth_chainId") is not None:
                return
            time.sleep(0.1)
        self.stop()
        raise AnvilError(f"anvil did not answer on {self.url} within {timeout:.0f} s")

    def rpc(self, method: str, params: list[object] | None = None) -> object | None:
        """One raw JSON-RPC call; None when the node does not answer (yet)."""
        body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": params or []}).encode()
        req = urllib.request.Request(self.url, body, {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=2) as resp:
                result: object | None = json.loads(resp.read()).get("result")
                return result
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return None

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (anvil dumps ``--state`` on a clean exit), SIGKILL if it hangs."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def kill(self) -> None:
        """SIGKILL: a crash, for tests of what survives one."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> AnvilProcess:
        return self.start() if self.proc is None else self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
