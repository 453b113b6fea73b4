"""The device's cryptographic duties, free of MQTT and threads so each can be tested on its own.

- :func:`seal_update`: encode the clipped update with the device's Eq. 4 weight s_k / s, encrypt it under the
  fleet key, and sign ``UpdateClaim(round, keccak(payload), samples, compute_ms)`` with EIP-712, giving the
  exact ``wire.Update`` the gateway checks (and that the contract re-checks with ecrecover).
- :func:`primary_holders`: which t of the l key holders decrypt round r at once. Rotating the set with r
  spreads the ~70 s of partial decryption per round over all holders instead of burdening holders 1..t forever;
  the others stand by and step in only when t valid shares are missing after a delay.
- :func:`share_message` / :func:`partial_from_share`: a holder's partial decryptions on the wire (fixed-width
  big-endian values, like ciphertexts).
- :class:`ShareBook`: one round's shares, each verified once against its holder's verification key; any t
  valid ones are combined. A forged, corrupt or missing share costs nothing but its verification while t honest
  holders remain.
- :func:`decode_global` / :func:`apply_delta`: plaintexts to the weighted mean update, and the new model.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from gmpy2 import mpz

from blockdeepnet.crypto.codec import SlotLayout, sample_weight
from blockdeepnet.crypto.paillier import CiphertextRangeError, PublicKey
from blockdeepnet.crypto.threshold import (
    CombineResult,
    InvalidShareError,
    PartialDecryption,
    ShareProof,
    ThresholdPublicKey,
    combine,
    verify_partial,
)
from blockdeepnet.crypto.vector import RandomnessSource, decode_aggregate, encrypt_update
from blockdeepnet.eip712 import Domain, UpdateClaim, payload_hash, sign_update
from blockdeepnet.learning import PAPER_CNN_PARAMS
from blockdeepnet.wire import GlobalBlock, Share, Update
from firmware_agent.keys import DeviceKey


def seal_update(
    *,
    round_no: int,
    device: DeviceKey,
    domain: Domain,
    layout: SlotLayout,
    public_key: PublicKey,
    randomness: RandomnessSource,
    delta: npt.NDArray[np.float32],
    samples: int,
    total_samples: int,
    train_ms: int,
) -> Update:
    """Encrypt and sign one round's update. ``compute_ms`` in the claim is training plus encryption time."""
    start = time.perf_counter()
    weight = sample_weight(samples, total_samples)
    ciphertexts = encrypt_update(layout, public_key, randomness, delta, weight)
    payload = public_key.ciphertexts_to_bytes(ciphertexts)
    compute_ms = train_ms + round((time.perf_counter() - start) * 1000)
    claim = UpdateClaim(round_no, payload_hash(payload), samples, compute_ms)
    signature = sign_update(device.private_key, domain, claim)
    return Update(
        round=round_no,
        device=device.address,
        samples=samples,
        compute_ms=compute_ms,
        payload=payload,
        signature=signature,
    )


def primary_holders(round_no: int, threshold: int, holders: int) -> list[int]:
    """Holder indices (1-based) that decrypt round ``round_no`` immediately: (r + j) mod l + 1 for j < t."""
    if not 1 <= threshold <= holders:
        raise ValueError(f"need 1 <= t <= l, got t={threshold}, l={holders}")
    return [(round_no + j) % holders + 1 for j in range(threshold)]


def is_primary(round_no: int, index: int, threshold: int, holders: int) -> bool:
    return index in primary_holders(round_no, threshold, holders)


def share_message(round_no: int, partial: PartialDecryption, public_key: PublicKey) -> Share:
    """The wire form of a holder's partial decryptions: values and proof a, b at ciphertext width, z minimal."""
    z = int(partial.proof.z)
    width = public_key.ciphertext_bytes
    return Share(
        round=round_no,
        holder=partial.index,
        values=public_key.ciphertexts_to_bytes(partial.values),
        proof_a=int(partial.proof.a).to_bytes(width, "big"),
        proof_b=int(partial.proof.b).to_bytes(width, "big"),
        proof_z=z.to_bytes(max(1, (z.bit_length() + 7) // 8), "big"),
    )


def partial_from_share(share: Share, public_key: PublicKey, count: int) -> PartialDecryption:
    """Parse a Share received from the network; a malformed one raises :class:`InvalidShareError`."""
    try:
        values = public_key.ciphertexts_from_bytes(share.values, count)
    except CiphertextRangeError as exc:
        raise InvalidShareError(share.holder, f"values: {exc}") from None
    proof = ShareProof(
        a=mpz(int.from_bytes(share.proof_a, "big")),
        b=mpz(int.from_bytes(share.proof_b, "big")),
        z=mpz(int.from_bytes(share.proof_z, "big")),
    )
    return PartialDecryption(share.holder, tuple(values), proof)


@dataclass(frozen=True)
class Offer:
    """What :meth:`ShareBook.offer` made of one share: ``accepted`` (valid, now counted), or why not."""

    holder: int
    accepted: bool
    reason: str = ""


class ShareBook:
    """The partial decryptions of one round's aggregate, verified as they arrive, combined when t are valid.

    ``holders`` maps each key holder's address to its share index (from fleet.json): the broker ACL lets a
    device publish only under its own address, so a share whose index is not its sender's is refused before
    any arithmetic. A valid share is kept once per holder; a rejected one does not blacklist its holder (a
    later, genuine share from that holder is still verified).
    """

    def __init__(
        self, tpk: ThresholdPublicKey, ciphertexts: list[mpz], context: bytes, holders: Mapping[str, int]
    ) -> None:
        self.tpk = tpk
        self.ciphertexts = ciphertexts
        self.context = context
        self.holders = dict(holders)
        self.valid: dict[int, PartialDecryption] = {}
        self.rejected: dict[int, str] = {}

    @property
    def ready(self) -> bool:
        return len(self.valid) >= self.tpk.threshold

    def has(self, holder: int) -> bool:
        return holder in self.valid

    def offer(self, sender: str, share: Share) -> Offer:
        """Verify and keep ``share`` from ``sender`` (a checksummed address) unless it is not needed."""
        expected = self.holders.get(sender)
        if expected is None:
            return Offer(share.holder, False, f"{sender} is not a key holder of this fleet")
        if share.holder != expected:
            return Offer(share.holder, False, f"{sender} holds share {expected}, not {share.holder}")
        if share.holder in self.valid:
            return Offer(share.holder, True, "already have a valid share from this holder")
        try:
            partial = partial_from_share(share, self.tpk.public_key, len(self.ciphertexts))
            verify_partial(self.tpk, self.ciphertexts, partial, self.context)
        except InvalidShareError as exc:
            self.rejected[share.holder] = str(exc)
            return Offer(share.holder, False, str(exc))
        self.valid[share.holder] = partial
        self.rejected.pop(share.holder, None)
        return Offer(share.holder, True)

    def add_own(self, partial: PartialDecryption) -> None:
        """A partial this device computed itself: valid by construction, no need to verify it."""
        self.valid[partial.index] = partial

    def combine(self) -> CombineResult:
        """Plaintexts from t of the verified partials (verification is not repeated)."""
        chosen = [self.valid[i] for i in sorted(self.valid)[: self.tpk.threshold]]
        return combine(self.tpk, self.ciphertexts, chosen, self.context, verify=False)


def decode_global(layout: SlotLayout, plaintexts: list[mpz], block: GlobalBlock) -> npt.NDArray[np.float64]:
    """The weighted mean update of a global block. Raises ``SlotOverflowError`` for an out-of-range sum
    (a device encrypted values outside the codec's range); the caller must then not apply it."""
    return decode_aggregate(
        layout,
        plaintexts,
        PAPER_CNN_PARAMS,
        total_weight=block.total_weight_num / block.total_weight_den,
        count=len(block.devices),
    )


def apply_delta(
    weights: npt.NDArray[np.float32], mean_delta: npt.NDArray[np.float64]
) -> npt.NDArray[np.float32]:
    """Eq. 4's w^p = w^{p-1} + mean update, summed in float64 and stored as float32 (as the simulator does)."""
    return (weights.astype(np.float64) + mean_delta).astype(np.float32)
