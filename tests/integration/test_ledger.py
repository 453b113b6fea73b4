"""The ledger client against the real contract on both backends: eth-tester in process and a real anvil node."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import pytest
from eth_account import Account
from web3 import Web3

from blockdeepnet import eip712
from blockdeepnet.ledger import (
    ContractRejected,
    Ledger,
    LedgerError,
    SignedUpdate,
    embedded_web3,
    fund_from_node_account,
    new_gateway_account,
    rpc_web3,
)
from provisioning.anvil import AnvilProcess

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

DATA_REWARD = 3  # wei per sample
PROCESSING_REWARD = 1_000


@pytest.fixture(params=["eth-tester", "anvil"])
def w3(request: pytest.FixtureRequest) -> Web3:
    if request.param == "eth-tester":
        return embedded_web3()
    node: AnvilProcess = request.getfixturevalue("anvil")
    return rpc_web3(node.url)


def mine(w3: Web3, blocks: int) -> None:
    for _ in range(blocks):
        w3.provider.make_request("evm_mine", [])  # type: ignore[arg-type]


class Fleet:
    """A deployed contract, its gateway and a few registered devices with their keys."""

    def __init__(self, w3: Web3) -> None:
        self.w3 = w3
        gateway = new_gateway_account()
        fund_from_node_account(w3, gateway.address, 10**18)
        self.ledger = Ledger.deploy(
            w3, gateway, data_reward_per_sample=DATA_REWARD, processing_reward=PROCESSING_REWARD
        )
        self.domain = eip712.Domain(self.ledger.chain_id(), self.ledger.address)
        self.devices = [eip712.new_device_key() for _ in range(4)]
        for i, (_, address) in enumerate(self.devices):
            self.ledger.register_device(address, i)

    def update(self, device: int, round_no: int, samples: int = 100, payload: bytes = b"ct") -> SignedUpdate:
        key, address = self.devices[device]
        claim = eip712.UpdateClaim(round_no, eip712.payload_hash(payload + address.encode()), samples, 42)
        signature = eip712.sign_update(key, self.domain, claim)
        return SignedUpdate(round_no, address, claim.payload_hash, samples, 42, signature)

    def open(self, round_no: int, blocks: int = 1_000) -> None:
        self.ledger.open_round(round_no, b"\x01" * 32, self.ledger.block_number() + blocks)


@pytest.fixture
def fleet(w3: Web3) -> Fleet:
    return Fleet(w3)


def test_digest_is_the_same_bytes_in_python_and_in_the_contract(fleet: Fleet) -> None:
    fns = fleet.ledger.contract.functions
    assert bytes(fns.domainSeparator().call()) == eip712.domain_separator(fleet.domain)
    claim = eip712.UpdateClaim(9, b"\xab" * 32, 2_745, 1_500)
    assert bytes(fns.updateDigest(9, b"\xab" * 32, 2_745, 1_500).call()) == eip712.update_digest(
        fleet.domain, claim
    )


def test_a_round_end_to_end_with_rewards(fleet: Fleet) -> None:
    led = fleet.ledger
    fleet.open(1)
    receipts = [led.submit_update(fleet.update(d, 1, samples=100 + d)) for d in range(3)]
    assert all(r is not None and r["status"] == 1 for r in receipts)
    led.commit_global(1, b"\x22" * 32, b"\x33" * 32, 3)
    info = led.get_round(1)
    assert (info.count, info.total_samples, info.committed) == (3, 303, True)
    assert (info.aggregate_hash, info.merkle_root) == (b"\x22" * 32, b"\x33" * 32)
    for d in range(3):
        update = fleet.update(d, 1, samples=100 + d)
        assert led.is_recorded(update)
        assert led.balance_of(update.device) == DATA_REWARD * (100 + d)
    assert led.balance_of(led.account.address) == PROCESSING_REWARD
    assert led.device_info(fleet.devices[2][1]) == (True, False, 2)


def test_resending_an_update_already_on_chain_is_done_not_an_error(fleet: Fleet) -> None:
    fleet.open(1)
    update = fleet.update(0, 1)
    assert fleet.ledger.submit_update(update) is not None
    assert fleet.ledger.submit_update(update) is None
    assert fleet.ledger.submit_updates([update, fleet.update(1, 1)])[0] is None
    assert fleet.ledger.get_round(1).count == 2


def test_pipelined_batch_lands_every_update_once(fleet: Fleet) -> None:
    fleet.open(1)
    updates = [fleet.update(d, 1) for d in range(4)]
    receipts = fleet.ledger.submit_updates(updates)
    assert [r["status"] for r in receipts if r is not None] == [1, 1, 1, 1]
    assert len({r["transactionHash"] for r in receipts if r is not None}) == 4
    assert fleet.ledger.get_round(1).count == 4


def _expect(error: str, action: Callable[[], object]) -> ContractRejected:
    with pytest.raises(ContractRejected) as info:
        action()
    assert info.value.error == error, str(info.value)
    return info.value


def test_forged_signature(fleet: Fleet) -> None:
    fleet.open(1)
    genuine = fleet.update(0, 1)
    other_key, _ = eip712.new_device_key()
    claim = eip712.UpdateClaim(1, genuine.payload_hash, genuine.samples, genuine.compute_ms)
    forged = replace(genuine, signature=eip712.sign_update(other_key, fleet.domain, claim))
    _expect("BadSignature", lambda: fleet.ledger.submit_update(forged))
    tampered = replace(genuine, samples=genuine.samples * 10)  # signature no longer matches the claim
    _expect("BadSignature", lambda: fleet.ledger.submit_update(tampered))


def test_signature_over_another_round(fleet: Fleet) -> None:
    fleet.open(1)
    for_round_2 = fleet.update(0, 2)
    _expect("RoundNotOpen", lambda: fleet.ledger.submit_update(for_round_2))
    relabelled = replace(for_round_2, round=1)
    _expect("BadSignature", lambda: fleet.ledger.submit_update(relabelled))


def test_unregistered_device(fleet: Fleet) -> None:
    fleet.open(1)
    key, address = eip712.new_device_key()
    claim = eip712.UpdateClaim(1, b"\x05" * 32, 10, 1)
    update = SignedUpdate(1, address, claim.payload_hash, 10, 1, eip712.sign_update(key, fleet.domain, claim))
    rejected = _expect("UnknownDevice", lambda: fleet.ledger.submit_update(update))
    assert rejected.args_[0].lower() == address.lower()


def test_revoked_device(fleet: Fleet) -> None:
    fleet.open(1)
    fleet.ledger.revoke_device(fleet.devices[1][1])
    _expect("DeviceIsRevoked", lambda: fleet.ledger.submit_update(fleet.update(1, 1)))
    assert fleet.ledger.device_info(fleet.devices[1][1])[1] is True


def test_duplicate_submission(fleet: Fleet) -> None:
    fleet.open(1)
    fleet.ledger.submit_update(fleet.update(0, 1))
    second = fleet.update(0, 1, payload=b"another payload")
    _expect("DuplicateSubmission", lambda: fleet.ledger.submit_update(second))


def test_late_submission(fleet: Fleet) -> None:
    fleet.open(1, blocks=2)
    mine(fleet.w3, 3)
    _expect("LateSubmission", lambda: fleet.ledger.submit_update(fleet.update(0, 1)))


def test_second_commit(fleet: Fleet) -> None:
    fleet.open(1)
    fleet.ledger.commit_global(1, b"\x22" * 32, b"\x33" * 32, 0)
    _expect("GlobalAlreadyCommitted", lambda: fleet.ledger.commit_global(1, b"\x22" * 32, b"\x33" * 32, 0))
    _expect("RoundAlreadyCommitted", lambda: fleet.ledger.submit_update(fleet.update(0, 1)))


def test_commit_by_anyone_but_the_gateway(fleet: Fleet) -> None:
    fleet.open(1)
    intruder = Account.create()
    fund_from_node_account(fleet.w3, intruder.address, 10**17)
    other = Ledger(fleet.w3, fleet.ledger.address, intruder)
    _expect("NotGateway", lambda: other.commit_global(1, b"\x22" * 32, b"\x33" * 32, 0))
    _expect("NotGateway", lambda: other.register_device(intruder.address, 0))


def test_commit_with_a_wrong_count(fleet: Fleet) -> None:
    fleet.open(1)
    fleet.ledger.submit_update(fleet.update(0, 1))
    rejected = _expect("CountMismatch", lambda: fleet.ledger.commit_global(1, b"\x22" * 32, b"\x33" * 32, 2))
    assert rejected.args_ == (1, 2)


def test_gas_of_submit_and_commit(fleet: Fleet) -> None:
    """Gas is deterministic, so it is asserted: submit within budget, commit independent of the count."""
    led = fleet.ledger
    commit_gas = []
    for round_no, devices in ((1, 0), (2, 1), (3, 4)):
        fleet.open(round_no)
        for d in range(devices):
            receipt = led.submit_update(fleet.update(d, round_no))
            assert receipt is not None and receipt["gasUsed"] <= 65_000
        commit_gas.append(led.commit_global(round_no, b"\x22" * 32, b"\x33" * 32, devices)["gasUsed"])
    # The first commit creates the gateway's balance slot; later ones must not depend on the count.
    assert commit_gas[1] == commit_gas[2]


def test_anvil_node_really_is_london_with_zero_base_fee(anvil: AnvilProcess) -> None:
    w3 = rpc_web3(anvil.url)
    assert w3.eth.get_block("latest")["baseFeePerGas"] == 0


def test_a_rejected_update_in_a_pipelined_batch_is_named_and_the_rest_land(fleet: Fleet) -> None:
    fleet.open(1)
    good = [fleet.update(d, 1) for d in range(3)]
    forged = replace(fleet.update(3, 1), samples=7)  # signature no longer matches
    rejected = _expect(
        "BadSignature", lambda: fleet.ledger.submit_updates([good[0], forged, good[1], good[2]])
    )
    assert rejected.tx_hash is not None
    assert fleet.ledger.get_round(1).count == 3
    assert all(fleet.ledger.is_recorded(u) for u in good)


def test_rewards_are_withdrawn_by_their_owner_from_the_pool(fleet: Fleet) -> None:
    fleet.open(1)
    update = fleet.update(0, 1, samples=500)
    fleet.ledger.submit_update(update)
    device_key, device_address = fleet.devices[0]
    as_device = Ledger(fleet.w3, fleet.ledger.address, Account.from_key(device_key))
    owed = DATA_REWARD * 500
    assert as_device.balance_of(device_address) == owed
    _expect("InsufficientPool", lambda: as_device.withdraw())  # nobody funded the pool yet
    fleet.ledger.transact(fleet.ledger.contract.functions.fund(), value=owed)
    before = fleet.w3.eth.get_balance(device_address)
    as_device.withdraw()  # gas price 0: a device needs no ether to claim
    assert fleet.w3.eth.get_balance(device_address) == before + owed
    assert as_device.balance_of(device_address) == 0
    _expect("NothingToWithdraw", lambda: as_device.withdraw())


def test_a_node_on_another_chain_is_refused(fleet: Fleet) -> None:
    own = fleet.ledger.chain_id()
    assert Ledger(fleet.w3, fleet.ledger.address, fleet.ledger.account, chain_id=own).chain_id() == own
    with pytest.raises(LedgerError, match=f"on chain {own}, but the fleet is configured for chain {own + 1}"):
        Ledger(fleet.w3, fleet.ledger.address, fleet.ledger.account, chain_id=own + 1)
