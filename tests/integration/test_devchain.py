"""`bdn chain dev`'s engine: a persistent anvil chain with the contract deployed, reused across restarts."""

from __future__ import annotations

import signal
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from blockdeepnet.ledger import rpc_web3
from provisioning.anvil import AnvilError, free_port
from provisioning.devchain import start_dev_chain

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def test_deploys_once_and_survives_a_restart(tmp_path: Path) -> None:
    data = tmp_path / "chain"
    port = free_port()
    node, first = start_dev_chain(data, port)
    node.stop()
    assert stat.S_IMODE((data / "gateway.key").stat().st_mode) == 0o600
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    node, second = start_dev_chain(data, port)
    try:
        assert second == first
        w3 = rpc_web3(node.url)
        assert w3.eth.chain_id == 31337
        assert len(w3.eth.get_code(w3.to_checksum_address(first.contract))) > 0
    finally:
        node.stop()


def test_lost_state_means_a_fresh_deployment(tmp_path: Path) -> None:
    data = tmp_path / "chain"
    port = free_port()
    node, first = start_dev_chain(data, port)
    node.stop()
    (data / "anvil-state.json").unlink()
    node, second = start_dev_chain(data, port)
    try:
        w3 = rpc_web3(node.url)
        # The recorded contract is gone with the state: it must have been deployed again, by the same key.
        assert len(w3.eth.get_code(w3.to_checksum_address(second.contract))) > 0
        assert second.gateway == first.gateway
        assert w3.eth.get_transaction_count(w3.to_checksum_address(second.gateway)) == 1
    finally:
        node.stop()


def test_a_port_in_use_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        with pytest.raises(AnvilError, match="already in use"):
            start_dev_chain(tmp_path / "chain", s.getsockname()[1])


def test_bdn_chain_dev_runs_until_sigterm_and_saves_state(tmp_path: Path) -> None:
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "cli.main",
        "chain",
        "dev",
        "--data-dir",
        str(tmp_path / "c"),
        "--port",
        str(port),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        lines = [proc.stdout.readline() for _ in range(3)]
        assert lines[0].startswith(f"dev chain on http://127.0.0.1:{port}"), lines
        assert lines[1].startswith("contract  0x")
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "state saved" in out
    assert (tmp_path / "c" / "anvil-state.json").stat().st_size > 0


def test_bdn_chain_dev_on_a_taken_port_exits_2(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        cmd = [sys.executable, "-m", "cli.main", "chain", "dev", "--data-dir", str(tmp_path), "--port"]
        proc = subprocess.run([*cmd, str(s.getsockname()[1])], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "already in use" in proc.stderr
    assert "Traceback" not in proc.stderr
