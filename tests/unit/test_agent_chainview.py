"""The read-only chain check of a global block, against the real contract on the in-process chain."""

from __future__ import annotations

from dataclasses import dataclass, replace

import pytest
from web3 import Web3

from blockdeepnet import eip712, merkle
from blockdeepnet.ledger import (
    Ledger,
    SignedUpdate,
    embedded_web3,
    fund_from_node_account,
    new_gateway_account,
)
from blockdeepnet.wire import GlobalBlock
from firmware_agent.chainview import ChainCheckError, ChainUnavailable, ChainView


@dataclass
class Committed:
    w3: Web3
    ledger: Ledger
    block: GlobalBlock
    ahash: bytes
    base: bytes
    devices: list[tuple[bytes, str]]


def _signed(ledger: Ledger, key: bytes, address: str, r: int, payload: bytes, samples: int) -> SignedUpdate:
    domain = eip712.Domain(ledger.chain_id(), ledger.address)
    claim = eip712.UpdateClaim(r, eip712.payload_hash(payload), samples, 10)
    return SignedUpdate(r, address, claim.payload_hash, samples, 10, eip712.sign_update(key, domain, claim))


@pytest.fixture(scope="module")
def committed() -> Committed:
    """Round 1 committed with two updates, round 2 open with one update and not committed."""
    w3 = embedded_web3()
    gateway = new_gateway_account()
    fund_from_node_account(w3, gateway.address, 10**18)
    ledger = Ledger.deploy(w3, gateway)
    devices = [eip712.new_device_key() for _ in range(3)]
    for _, address in devices:
        ledger.register_device(address)
    base = b"\x42" * 32
    ledger.open_round(1, base, ledger.block_number() + 100)
    samples = {devices[0][1]: 30, devices[1][1]: 50}
    leaves = []
    for key, address in devices[:2]:
        payload = address.encode() * 3
        u = _signed(ledger, key, address, 1, payload, samples[address])
        ledger.submit_update(u)
        leaves.append(merkle.leaf(1, address, u.payload_hash))
    aggregate = b"\x01\x02" * 64
    ahash = eip712.payload_hash(aggregate)
    root = merkle.root(leaves)
    ledger.commit_global(1, ahash, root, 2)
    ledger.open_round(2, ahash, ledger.block_number() + 100)
    ledger.submit_update(_signed(ledger, *devices[2], 2, b"late", 7))
    block = GlobalBlock(
        round=1,
        aggregate=aggregate,
        devices=[a for _, a in devices[:2]],
        total_weight_num=80,
        total_weight_den=100,
        merkle_root=root,
        commit_tx=None,
    )
    return Committed(w3, ledger, block, ahash, base, devices)


def _view(c: Committed) -> ChainView:
    return ChainView(c.w3, c.ledger.address, chain_id=c.ledger.chain_id(), commit_wait_s=0.0)


def test_an_honest_block_passes_and_names_its_base(committed: Committed) -> None:
    checked = _view(committed).check_global(committed.block, committed.ahash)
    assert checked.round == 1 and checked.base_model_hash == committed.base
    assert checked.info.count == 2 and checked.info.total_samples == 80


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"merkle_root": b"\x00" * 31 + b"\x01"}, "Merkle root differs"),
        ({"total_weight_num": 79}, "chain recorded 80"),
        ("drop_device", "chain committed 2"),
        ("swap_device", "has no update recorded"),
        ("other_hash", "aggregate hash differs"),
    ],
)
def test_a_block_that_differs_from_the_commit_is_refused(
    committed: Committed, change: object, reason: str
) -> None:
    block, ahash = committed.block, committed.ahash
    if isinstance(change, dict):
        block = replace(block, **change)
    elif change == "drop_device":
        block = replace(block, devices=block.devices[:1])
    elif change == "swap_device":
        block = replace(block, devices=[block.devices[0], committed.devices[2][1]])
    else:
        ahash = b"\x13" * 32
    with pytest.raises(ChainCheckError, match=reason) as err:
        _view(committed).check_global(block, ahash)
    assert not err.value.retryable


def test_an_uncommitted_round_is_retryable(committed: Committed) -> None:
    block = replace(committed.block, round=2, devices=[committed.devices[2][1]], total_weight_num=7)
    with pytest.raises(ChainCheckError, match="not committed") as err:
        _view(committed).check_global(block, committed.ahash)
    assert err.value.retryable


def test_wrong_chain_or_no_node_is_unavailable_not_a_verdict(committed: Committed) -> None:
    wrong = ChainView(committed.w3, committed.ledger.address, chain_id=1, commit_wait_s=0.0)
    with pytest.raises(ChainUnavailable, match="wrong chain_rpc"):
        wrong.check_global(committed.block, committed.ahash)
    nowhere = ChainView.from_url("http://127.0.0.1:9/", committed.ledger.address)
    with pytest.raises(ChainUnavailable, match="unreachable"):
        nowhere.round_info(1)
    no_contract = ChainView(committed.w3, "0x" + "77" * 20)
    with pytest.raises(ChainUnavailable, match="chain read failed"):
        no_contract.round_info(1)
