"""Auditing a committed round from the chain and the archived payloads: honest and dishonest gateways."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from web3 import Web3

from blockdeepnet import eip712, merkle
from blockdeepnet.audit import CommittedBlock, RecordedUpdate, aggregate_hash, audit_round
from blockdeepnet.crypto.codec import SlotLayout
from blockdeepnet.crypto.homomorphic import Accumulator
from blockdeepnet.crypto.paillier import PublicKey, generate_keypair
from blockdeepnet.crypto.randomness import FixedBaseTable, OnTheSpot
from blockdeepnet.crypto.vector import encrypt_update
from blockdeepnet.ledger import (
    Ledger,
    SignedUpdate,
    embedded_web3,
    fund_from_node_account,
    new_gateway_account,
    rpc_web3,
)
from provisioning.anvil import AnvilProcess

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

DEVICES = 3


@pytest.fixture(scope="module")
def pub() -> PublicKey:
    return generate_keypair(512, allow_insecure=True)[0]


def _round(pub: PublicKey, w3: Web3 | None = None) -> tuple[Ledger, dict[bytes, bytes], list[list[int]]]:
    """A real round on chain: devices encrypt, sign and are relayed; returns payload archive and ciphertexts."""
    w3 = w3 or embedded_web3()
    gateway = new_gateway_account()
    fund_from_node_account(w3, gateway.address, 10**18)
    ledger = Ledger.deploy(w3, gateway)
    domain = eip712.Domain(ledger.chain_id(), ledger.address)
    layout = SlotLayout(512, max_devices=10)
    table = FixedBaseTable(pub)
    ledger.open_round(1, b"\x01" * 32, ledger.block_number() + 100)
    archive: dict[bytes, bytes] = {}
    vectors = []
    for d in range(DEVICES):
        key, address = eip712.new_device_key()
        ledger.register_device(address, 0)
        cts = encrypt_update(layout, pub, OnTheSpot(table), np.full(40, 0.1 * d), 1 / DEVICES)
        payload = pub.ciphertexts_to_bytes(cts)
        claim = eip712.UpdateClaim(1, eip712.payload_hash(payload), 10, 1)
        ledger.submit_update(
            SignedUpdate(1, address, claim.payload_hash, 10, 1, eip712.sign_update(key, domain, claim))
        )
        archive[claim.payload_hash] = payload
        vectors.append(cts)
    return ledger, archive, vectors


def _audit(ledger: Ledger, pub: PublicKey, archive: dict[bytes, bytes]) -> list[str]:
    info = ledger.get_round(1)
    block = CommittedBlock(1, info.aggregate_hash, info.merkle_root, info.count)
    recorded = [RecordedUpdate(d, h) for d, h in ledger.recorded_updates(1)]
    report = audit_round(pub, block, recorded, archive)
    assert report.honest == (not report.problems)
    return report.problems


def _commit(ledger: Ledger, pub: PublicKey, vectors: list[list[int]], root: bytes | None = None) -> None:
    acc = Accumulator(pub, len(vectors[0]))
    for v in vectors:
        acc.add(v)
    leaves = [merkle.leaf(1, d, h) for d, h in ledger.recorded_updates(1)]
    ledger.commit_global(1, aggregate_hash(pub, acc.result()), root or merkle.root(leaves), DEVICES)


def test_an_honest_block_passes(pub: PublicKey) -> None:
    ledger, archive, vectors = _round(pub)
    _commit(ledger, pub, vectors)
    assert _audit(ledger, pub, archive) == []


def test_a_dropped_update_is_caught(pub: PublicKey) -> None:
    ledger, archive, vectors = _round(pub)
    _commit(ledger, pub, vectors[:-1])
    assert _audit(ledger, pub, archive) == [
        "the sum of the recorded payloads does not hash to the committed aggregate"
    ]


def test_a_wrong_merkle_root_is_caught(pub: PublicKey) -> None:
    ledger, archive, vectors = _round(pub)
    _commit(ledger, pub, vectors, root=b"\x09" * 32)
    assert any("Merkle root" in p for p in _audit(ledger, pub, archive))


def test_a_tampered_or_missing_archive_is_caught(pub: PublicKey) -> None:
    ledger, archive, vectors = _round(pub)
    _commit(ledger, pub, vectors)
    first = next(iter(archive))
    tampered = dict(archive)
    tampered[first] = archive[first][:-1] + bytes([archive[first][-1] ^ 1])
    assert any("does not hash" in p for p in _audit(ledger, pub, tampered))
    missing = {k: v for k, v in archive.items() if k != first}
    assert any("not in the archive" in p for p in _audit(ledger, pub, missing))


def test_bdn_audit_round_on_a_real_node(pub: PublicKey, anvil: AnvilProcess, tmp_path: Path) -> None:
    ledger, archive, vectors = _round(pub, rpc_web3(anvil.url))
    _commit(ledger, pub, vectors)
    (tmp_path / "key.json").write_text(json.dumps(pub.to_dict()))
    store = tmp_path / "archive"
    store.mkdir()
    for h, payload in archive.items():
        (store / f"{h.hex()}.bin").write_bytes(payload)
    cmd = [sys.executable, "-m", "cli.main", "audit", "round", "1", "--rpc", anvil.url, "--contract"]
    cmd += [ledger.address, "--public-key", str(tmp_path / "key.json"), "--archive", str(store), "--json"]
    honest = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert honest.returncode == 0, honest.stderr
    assert json.loads(honest.stdout) == {"round": 1, "honest": True, "updates": DEVICES, "problems": []}
    victim = next(store.iterdir())
    victim.write_bytes(victim.read_bytes()[::-1])
    caught = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert caught.returncode == 1
    assert json.loads(caught.stdout)["honest"] is False
    missing_round = subprocess.run([*cmd[:5], "2", *cmd[6:]], capture_output=True, text=True, timeout=60)
    assert missing_round.returncode == 2
    assert "no committed global block" in missing_round.stderr
