"""The relay survives its node going away: an anvil crash mid-batch, then a restart from its state file."""

from __future__ import annotations

from pathlib import Path

import pytest

from blockdeepnet import eip712
from blockdeepnet.ledger import (
    Ledger,
    LedgerUnavailable,
    SignedUpdate,
    fund_from_node_account,
    new_gateway_account,
    rpc_web3,
)
from provisioning.anvil import AnvilProcess

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

DEVICES = 8


def test_every_update_lands_exactly_once_across_an_anvil_crash(tmp_path: Path) -> None:
    state = tmp_path / "anvil-state.json"
    node = AnvilProcess(state_file=state).start()
    try:
        w3 = rpc_web3(node.url)
        gateway = new_gateway_account()
        fund_from_node_account(w3, gateway.address, 10**18)
        ledger = Ledger.deploy(w3, gateway)
        domain = eip712.Domain(ledger.chain_id(), ledger.address)
        keys = [eip712.new_device_key() for _ in range(DEVICES)]
        for i, (_, address) in enumerate(keys):
            ledger.register_device(address, i)
        ledger.open_round(1, b"\x01" * 32, ledger.block_number() + 10_000)
        updates = []
        for key, address in keys:
            claim = eip712.UpdateClaim(1, eip712.payload_hash(address.encode()), 50, 7)
            updates.append(
                SignedUpdate(1, address, claim.payload_hash, 50, 7, eip712.sign_update(key, domain, claim))
            )
        # A clean restart first, so the deployment and registrations are in the state file.
        node.stop()
        node = AnvilProcess(port=node.port, state_file=state).start()
        # Mid-batch: half the updates sent (not awaited), then the node is killed: whatever it had not
        # dumped is gone.
        ledger = Ledger(rpc_web3(node.url), ledger.address, gateway, retries=1, backoff_s=0.05)
        for u in updates[: DEVICES // 2]:
            ledger._send(ledger._build(ledger.submit_call(u)))
        node.kill()
        with pytest.raises(LedgerUnavailable, match="unreachable"):
            ledger.submit_updates(updates)
        node = AnvilProcess(port=node.port, state_file=state).start()
        ledger = Ledger(rpc_web3(node.url), ledger.address, gateway)
        receipts = ledger.submit_updates(updates)  # resend all: what survived is recognised, the rest sent
        assert all(r is None or r["status"] == 1 for r in receipts)
        info = ledger.get_round(1)
        assert info.count == DEVICES
        assert info.total_samples == 50 * DEVICES
        assert all(ledger.is_recorded(u) for u in updates)
        assert ledger.submit_updates(updates) == [None] * DEVICES  # and a third time changes nothing
        assert ledger.get_round(1).count == DEVICES
    finally:
        node.stop()
