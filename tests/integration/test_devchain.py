"""`bdn chain dev`'s engine: a persistent anvil chain with the contract deployed, reused across restarts."""

from __future__ import annotations

import socket
import stat
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
