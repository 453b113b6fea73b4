"""The relay against a real contract (embedded chain): what is already on chain is found, not sent again."""

from __future__ import annotations

import pytest
from eth_account import Account

from blockdeepnet import eip712
from blockdeepnet.ledger import Ledger, SignedUpdate, embedded_web3
from gateway.relay import Recorded, Refused, send_batch

pytestmark = pytest.mark.timeout(120)


def _signed(ledger: Ledger, domain: eip712.Domain, payload: bytes) -> SignedUpdate:
    key, address = eip712.new_device_key()
    ledger.register_device(address, 0)
    claim = eip712.UpdateClaim(1, eip712.payload_hash(payload), 10, 5)
    return SignedUpdate(1, address, claim.payload_hash, 10, 5, eip712.sign_update(key, domain, claim))


def test_reconcile_finds_mined_updates_and_sends_only_the_rest() -> None:
    w3 = embedded_web3()
    ledger = Ledger.deploy(w3, Account.create())
    domain = eip712.Domain(ledger.chain_id(), ledger.address)
    ledger.open_round(1, b"\x01" * 32, ledger.block_number() + 1000)
    mined, fresh = _signed(ledger, domain, b"a"), _signed(ledger, domain, b"b")
    original = ledger.submit_update(mined)  # sent "before a crash": the relay never saw its receipt
    assert original is not None
    nonce = w3.eth.get_transaction_count(ledger.account.address)
    out = send_batch(ledger, [mined, fresh], reconcile=True)
    assert isinstance(out[0], Recorded) and out[0].tx_hash == bytes(original["transactionHash"])
    assert isinstance(out[1], Recorded) and out[1].device == fresh.device
    assert w3.eth.get_transaction_count(ledger.account.address) == nonce + 1  # one tx: only the missing one
    assert ledger.get_round(1).count == 2


def test_without_reconcile_a_resend_is_recognised_from_the_revert() -> None:
    w3 = embedded_web3()
    ledger = Ledger.deploy(w3, Account.create())
    domain = eip712.Domain(ledger.chain_id(), ledger.address)
    ledger.open_round(1, b"\x01" * 32, ledger.block_number() + 1000)
    mined = _signed(ledger, domain, b"a")
    ledger.submit_update(mined)
    (outcome,) = send_batch(ledger, [mined])
    assert isinstance(outcome, Recorded)
    other = SignedUpdate(1, mined.device, eip712.payload_hash(b"x"), 10, 5, mined.signature)
    (refused,) = send_batch(ledger, [other])
    assert isinstance(
        refused, Refused
    )  # a different update for the same (round, device) is not "already there"
