"""`bdn bench chain`: gas of every contract operation and relay throughput on eth-tester and on anvil.

Everything is measured in one run, against the committed contract artifact, through :class:`Ledger`:

- **gas** (``gasUsed`` of the receipts; deterministic, measured on the embedded eth-tester chain and again on
  anvil as ``gas_anvil``): ``deploy``; ``register`` (one ``registerDevice``); ``submit_first`` (a device's
  first-ever ``submitUpdate``, the first of its round); ``submit`` (the same device in a later round, again
  the first of its round); ``commit_10`` / ``commit_100`` (``commitGlobal`` after ``updates_small`` /
  ``updates_large`` accepted updates). The first ``commitGlobal`` of a deployment also creates the gateway's
  reward-balance slot (a zero -> non-zero SSTORE: 17,100 gas more here), so a **throwaway commit** (the round of
  ``submit_first``) is made first and reported as ``commit_first``; ``commit_10`` and ``commit_100`` are both
  measured after it and so compare like with like. Both commits send identical hashes (a fixed aggregate hash
  and Merkle root) so that calldata costs the same and any difference would come from the count alone.
- **throughput**, on a fresh deployment per backend: ``tx_count`` updates from distinct, already registered
  devices, signed beforehand (registration and signing are not timed), relayed one by one with each receipt
  awaited (:meth:`Ledger.submit_update`: ``sequential_tx_s``) and then another ``tx_count`` as one pipelined
  batch (:meth:`Ledger.submit_updates`: ``pipelined_tx_s``). One untimed submit warms the chain up first.

anvil is the real binary from npm ``@foundry-rs/anvil`` (:class:`provisioning.anvil.AnvilProcess`: the native
binary, not the Node shim, with the appliance's flags ``--hardfork london --gas-price 0 --base-fee 0 --order
fifo``), started on a free loopback port and stopped at the end, also on error.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from web3 import Web3

from blockdeepnet import eip712
from blockdeepnet.ledger import (
    Ledger,
    LedgerError,
    SignedUpdate,
    embedded_web3,
    fund_from_node_account,
    new_gateway_account,
    rpc_web3,
)
from provisioning.anvil import AnvilProcess

DATA_REWARD = 3  # wei per sample: non-zero, so every submit credits a balance as in production
PROCESSING_REWARD = 1_000  # wei per commit: non-zero, so every commit credits the gateway
SAMPLES, COMPUTE_MS = 2_745, 1_500
BASE_MODEL = b"\x01" * 32
AGGREGATE_HASH = b"\x22" * 32  # fixed, without zero bytes: every commit pays the same calldata
MERKLE_ROOT = b"\x33" * 32
DEADLINE_BLOCKS = 1_000_000


class _Fleet:
    """A fresh deployment on ``w3`` with ``devices`` registered device keys (registration pipelined)."""

    def __init__(self, w3: Web3, devices: int) -> None:
        gateway = new_gateway_account()
        fund_from_node_account(w3, gateway.address, 10**18)
        self.ledger = Ledger.deploy(
            w3, gateway, data_reward_per_sample=DATA_REWARD, processing_reward=PROCESSING_REWARD
        )
        self.domain = eip712.Domain(self.ledger.chain_id(), self.ledger.address)
        self.keys = [eip712.new_device_key() for _ in range(devices)]
        fns = self.ledger.contract.functions
        receipts = self.ledger.send_many([fns.registerDevice(address, 0) for _, address in self.keys])
        self.register_gas = int(receipts[0]["gasUsed"]) if receipts else 0
        self._round = 0

    def open_round(self) -> int:
        self._round += 1
        self.ledger.open_round(self._round, BASE_MODEL, self.ledger.block_number() + DEADLINE_BLOCKS)
        return self._round

    def update(self, device: int, round_no: int) -> SignedUpdate:
        key, address = self.keys[device]
        payload = eip712.payload_hash(f"update {round_no} {address}".encode())
        claim = eip712.UpdateClaim(round_no, payload, SAMPLES, COMPUTE_MS)
        return SignedUpdate(
            round_no, address, payload, SAMPLES, COMPUTE_MS, eip712.sign_update(key, self.domain, claim)
        )

    def submit_one(self, device: int, round_no: int) -> int:
        receipt = self.ledger.submit_update(self.update(device, round_no))
        if receipt is None:
            raise LedgerError("bench update was unexpectedly already on chain")
        return int(receipt["gasUsed"])

    def submit_many(self, devices: Sequence[int], round_no: int) -> None:
        receipts = self.ledger.submit_updates([self.update(d, round_no) for d in devices])
        if any(r is None for r in receipts):
            raise LedgerError("bench update was unexpectedly already on chain")

    def commit(self, round_no: int, count: int) -> int:
        return int(self.ledger.commit_global(round_no, AGGREGATE_HASH, MERKLE_ROOT, count)["gasUsed"])


def _gas(w3: Web3, updates_small: int, updates_large: int) -> dict[str, int]:
    fleet = _Fleet(w3, max(updates_small, updates_large, 1))
    assert fleet.ledger.deploy_gas is not None
    first = fleet.open_round()
    submit_first = fleet.submit_one(0, first)
    commit_first = fleet.commit(first, 1)  # throwaway: creates the gateway's balance slot
    small = fleet.open_round()
    submit = fleet.submit_one(0, small)
    fleet.submit_many(range(1, updates_small), small)
    commit_small = fleet.commit(small, updates_small)
    large = fleet.open_round()
    fleet.submit_many(range(updates_large), large)
    commit_large = fleet.commit(large, updates_large)
    return {
        "deploy": fleet.ledger.deploy_gas,
        "register": fleet.register_gas,
        "submit_first": submit_first,
        "submit": submit,
        "commit_10": commit_small,
        "commit_100": commit_large,
        "commit_first": commit_first,
    }


def _throughput(w3: Web3, tx_count: int) -> dict[str, float]:
    fleet = _Fleet(w3, 2 * tx_count + 1)
    round_no = fleet.open_round()
    updates = [fleet.update(d, round_no) for d in range(2 * tx_count + 1)]
    led = fleet.ledger
    if led.submit_update(updates[0]) is None:  # warm-up, untimed
        raise LedgerError("bench update was unexpectedly already on chain")
    sequential, pipelined = updates[1 : tx_count + 1], updates[tx_count + 1 :]

    t0 = time.perf_counter()
    for u in sequential:
        led.submit_update(u)
    sequential_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    receipts = led.submit_updates(pipelined)
    pipelined_s = time.perf_counter() - t0

    landed = led.get_round(round_no).count
    if landed != 2 * tx_count + 1 or any(r is None or r["status"] != 1 for r in receipts):
        raise LedgerError(f"expected {2 * tx_count + 1} updates on chain, found {landed}")
    sequential_tx_s, pipelined_tx_s = tx_count / sequential_s, tx_count / pipelined_s
    return {
        "sequential_tx_s": sequential_tx_s,
        "pipelined_tx_s": pipelined_tx_s,
        "pipelined_speedup": pipelined_tx_s / sequential_tx_s,
    }


def run(
    updates_small: int = 10,
    updates_large: int = 100,
    tx_count: int = 60,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Gas and sequential vs pipelined throughput on eth-tester and anvil, in one run (see the module doc)."""
    if not 1 <= updates_small <= updates_large or tx_count < 1:
        raise ValueError("need 1 <= updates_small <= updates_large and tx_count >= 1")
    say = log or (lambda _msg: None)

    say(f"gas on eth-tester ({updates_small} and {updates_large} updates per round)...")
    gas = _gas(embedded_web3(), updates_small, updates_large)
    say(f"throughput on eth-tester ({tx_count} sequential, {tx_count} pipelined)...")
    eth_tester = _throughput(embedded_web3(), tx_count)

    say("starting anvil...")
    with AnvilProcess() as node:
        say(f"gas and throughput on anvil at {node.url}...")
        gas_anvil = _gas(rpc_web3(node.url), updates_small, updates_large)
        anvil = _throughput(rpc_web3(node.url), tx_count)

    return {
        "gas": gas,
        "gas_anvil": gas_anvil,
        "eth_tester": eth_tester,
        "anvil": anvil,
        "tx_count": tx_count,
        "updates_small": updates_small,
        "updates_large": updates_large,
        "note": (
            "gas from eth-tester (gas_anvil: the same run on anvil); commit_10/commit_100 are for "
            "updates_small/updates_large accepted updates, both measured after a throwaway first commit "
            "(commit_first) that creates the gateway's balance slot; submit_first is a device's first-ever "
            "submit, submit the same device in a later round; tx/s over tx_count fresh signed updates from "
            "distinct registered devices, registration and signing untimed"
        ),
    }
