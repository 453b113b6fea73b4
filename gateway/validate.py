"""The update validation steps, cheapest first (docs/protocol.md, step 3), without I/O.

Each step either returns what the next one needs or raises :class:`Rejected` with the receipt's reason code.
The order is the order of cost: a flood of junk is refused by ``len()`` and a CBOR header long before anyone
recovers a signature (~0.3 ms) or range-checks 2,104 ciphertexts (~15 ms). The duplicate check sits between
signature and ciphertexts and needs the store, so :mod:`gateway.ingest` runs it.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from gmpy2 import mpz

from blockdeepnet.crypto.paillier import CiphertextRangeError
from blockdeepnet.eip712 import UpdateClaim, payload_hash, verify_update
from blockdeepnet.fleet import DeviceEntry, Fleet
from blockdeepnet.learning.model import PAPER_CNN_PARAMS
from blockdeepnet.wire import UPDATE_MAX_BYTES, ReasonCode, Update, WireError


class Rejected(Exception):
    """An update the gateway refuses; ``reason`` goes into the receipt, ``detail`` explains to a human."""

    def __init__(self, reason: ReasonCode, detail: str, round_no: int = 0) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail
        self.round = round_no


@dataclass(frozen=True)
class Checked:
    """An update that passed every stateless step: what the store and the relay need."""

    update: Update
    payload_hash: bytes
    ciphertexts: list[mpz]
    wire_bytes: int


class UpdateValidator:
    def __init__(self, fleet: Fleet, max_bytes: int = 0, params: int = PAPER_CNN_PARAMS) -> None:
        self.fleet = fleet
        self.max_bytes = max_bytes or UPDATE_MAX_BYTES
        self.public_key = fleet.public_key.public_key
        self.expected_ciphertexts = fleet.layout.ciphertexts_for(params)
        self.ciphertext_bytes = self.public_key.ciphertext_bytes
        self._devices = {d.address: d for d in fleet.devices}
        self._domain = fleet.domain

    def parse(self, topic_device: str, payload: bytes) -> Update:
        """Size limit, then the CBOR schema, then the topic's address must be the one the update names."""
        if len(payload) > self.max_bytes:
            raise Rejected(ReasonCode.TOO_LARGE, f"{len(payload)} bytes exceed the limit of {self.max_bytes}")
        try:
            update = Update.from_cbor(payload)
        except WireError as exc:
            raise Rejected(exc.reason, exc.message) from None
        if update.device != topic_device:
            raise Rejected(
                ReasonCode.MALFORMED,
                f"update names device {update.device} but came on {topic_device}'s topic",
            )
        return update

    def device(self, update: Update, revoked: Collection[str] = ()) -> DeviceEntry:
        entry = self._devices.get(update.device)
        if entry is None:
            raise Rejected(ReasonCode.UNKNOWN_DEVICE, f"{update.device} is not registered in this fleet")
        if update.device in revoked:
            raise Rejected(ReasonCode.REVOKED_DEVICE, f"{update.device} has been revoked")
        if update.samples > entry.samples:
            raise Rejected(
                ReasonCode.MALFORMED,
                f"update claims {update.samples} samples, the device declared {entry.samples}",
            )
        return entry

    @staticmethod
    def round_open(update: Update, open_round: int | None, closing: int | None = None) -> None:
        """``open_round``: the round accepting updates, or None between rounds; ``closing``: the round being
        closed then (its stragglers are late, not early)."""
        if open_round is None:
            if closing is not None and update.round <= closing:
                raise Rejected(ReasonCode.LATE, f"round {update.round} is closed")
            raise Rejected(ReasonCode.ROUND_NOT_OPEN, "no round is open (the gateway is between rounds)")
        if update.round < open_round:
            raise Rejected(ReasonCode.LATE, f"round {update.round} is closed; round {open_round} is open")
        if update.round != open_round:
            raise Rejected(
                ReasonCode.ROUND_NOT_OPEN, f"round {update.round} is not open (open: {open_round})"
            )

    def signature(self, update: Update) -> bytes:
        """The EIP-712 signature over (round, keccak(payload), samples, compute_ms); returns the payload hash."""
        digest = payload_hash(update.payload)
        claim = UpdateClaim(update.round, digest, update.samples, update.compute_ms)
        if not verify_update(self._domain, claim, update.signature, update.device):
            raise Rejected(ReasonCode.BAD_SIGNATURE, "signature does not recover to the sending device")
        return digest

    def ciphertexts(self, update: Update) -> list[mpz]:
        """Count, then 0 < c < n^2 and gcd(c, n) = 1 for every ciphertext (a batched gcd)."""
        size = len(update.payload)
        if size != self.expected_ciphertexts * self.ciphertext_bytes:
            raise Rejected(
                ReasonCode.WRONG_COUNT,
                f"payload of {size} bytes; expected {self.expected_ciphertexts} ciphertexts of "
                f"{self.ciphertext_bytes} bytes",
            )
        try:
            return self.public_key.ciphertexts_from_bytes(update.payload, self.expected_ciphertexts)
        except (CiphertextRangeError, ValueError) as exc:
            raise Rejected(ReasonCode.BAD_CIPHERTEXT, str(exc)[:200]) from None
