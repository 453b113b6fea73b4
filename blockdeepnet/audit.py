"""Auditing a committed global block from public material only (DESIGN §1, point 6).

Anyone holding the archived update payloads (the ciphertext blobs devices published) and read access to the
chain can check the gateway: every payload must hash to what its device signed on chain, the homomorphic sum
of exactly those payloads must hash to the committed aggregate hash, and the Merkle root of the accepted
updates must equal the committed root. A gateway that dropped, added or altered an update fails one of these.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from eth_utils.crypto import keccak

from blockdeepnet import merkle
from blockdeepnet.crypto.homomorphic import Accumulator
from blockdeepnet.crypto.paillier import CiphertextRangeError, PublicKey

if TYPE_CHECKING:  # not at run time: devices import this module and must not load web3
    from blockdeepnet.ledger import Ledger


def aggregate_hash(public_key: PublicKey, aggregate: Sequence[int]) -> bytes:
    """What the gateway commits for an aggregate: keccak256 of its fixed-width ciphertext bytes."""
    return keccak(public_key.ciphertexts_to_bytes(aggregate))


@dataclass(frozen=True)
class RecordedUpdate:
    """One UpdateSubmitted event: the device and the payload hash it signed."""

    device: str
    payload_hash: bytes


@dataclass(frozen=True)
class CommittedBlock:
    round: int
    aggregate_hash: bytes
    merkle_root: bytes
    count: int


def chain_record(ledger: Ledger, round_no: int) -> tuple[CommittedBlock, list[RecordedUpdate]] | None:
    """What the chain holds for ``round_no``: its committed global block and the updates recorded in the round,
    or None while no global block is committed. Raises LedgerError when the node cannot be read."""
    info = ledger.get_round(round_no)
    if not info.committed:
        return None
    block = CommittedBlock(round_no, info.aggregate_hash, info.merkle_root, info.count)
    return block, [RecordedUpdate(d, h) for d, h in ledger.recorded_updates(round_no)]


@dataclass
class AuditReport:
    round: int
    honest: bool = True
    problems: list[str] = field(default_factory=list)
    checked_updates: int = 0

    def fail(self, problem: str) -> None:
        self.honest = False
        self.problems.append(problem)


def audit_round(
    public_key: PublicKey,
    block: CommittedBlock,
    recorded: Sequence[RecordedUpdate],
    payloads: Mapping[bytes, bytes],
) -> AuditReport:
    """Check ``block`` against the updates recorded on chain and the archived ``payloads`` (by payload hash)."""
    report = AuditReport(block.round)
    if block.count != len(recorded):
        report.fail(f"committed count {block.count} but {len(recorded)} updates recorded on chain")
    leaves = [merkle.leaf(block.round, u.device, u.payload_hash) for u in recorded]
    if merkle.root(leaves) != block.merkle_root:
        report.fail("Merkle root of the recorded updates differs from the committed root")
    accumulator: Accumulator | None = None
    for u in recorded:
        payload = payloads.get(u.payload_hash)
        if payload is None:
            report.fail(f"payload of {u.device} (0x{u.payload_hash.hex()}) is not in the archive")
            continue
        if keccak(payload) != u.payload_hash:
            report.fail(f"archived payload of {u.device} does not hash to what the device signed")
            continue
        try:
            cts = public_key.ciphertexts_from_bytes(payload)
            if accumulator is None:
                accumulator = Accumulator(public_key, len(cts))
            accumulator.add(cts)
        except CiphertextRangeError as exc:
            report.fail(f"payload of {u.device} is not a valid ciphertext vector: {exc}")
            continue
        report.checked_updates += 1
    if report.honest:
        if accumulator is None:
            if block.aggregate_hash != bytes(32):
                report.fail("no updates, but a non-empty aggregate hash was committed")
        elif aggregate_hash(public_key, accumulator.result()) != block.aggregate_hash:
            report.fail("the sum of the recorded payloads does not hash to the committed aggregate")
    return report
