"""The device's crypto duties with a real 512-bit threshold key: what the gateway and other devices check.

One module-scoped aggregate of two sealed updates (a third device dropped out) and the partial decryptions of
two honest holders are computed once (~7 s); every test reuses them.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, replace

import numpy as np
import pytest
from gmpy2 import mpz

from blockdeepnet import merkle
from blockdeepnet.audit import aggregate_hash
from blockdeepnet.crypto.codec import SlotLayout, SlotOverflowError, pack
from blockdeepnet.crypto.homomorphic import Accumulator
from blockdeepnet.crypto.randomness import FixedBaseTable, OnTheSpot
from blockdeepnet.crypto.threshold import KeyShare, NotEnoughSharesError, ThresholdPublicKey, deal
from blockdeepnet.eip712 import Domain, UpdateClaim, new_device_key, payload_hash, recover_signer
from blockdeepnet.learning import PAPER_CNN_PARAMS
from blockdeepnet.wire import GlobalBlock, Share, Update
from firmware_agent.crypto_duty import (
    ShareBook,
    apply_delta,
    decode_global,
    is_primary,
    partial_from_share,
    primary_holders,
    seal_update,
    share_message,
)
from firmware_agent.keys import DeviceKey

DOMAIN = Domain(1337, "0x" + "11" * 20)
SAMPLES = (30, 50)
TOTAL = 100  # a third device declared 20 samples and dropped out: W = 0.8
CONTEXT = b"bdn/test/round/4"


@dataclass
class Round:
    tpk: ThresholdPublicKey
    shares: list[KeyShare]
    layout: SlotLayout
    devices: list[DeviceKey]
    deltas: list[np.ndarray]
    updates: list[Update]
    aggregate: list[mpz]
    block: GlobalBlock
    holders: dict[str, int]  # holder address -> index
    wire_shares: dict[int, Share]  # honest holders 3 and 4, as received from the network


@pytest.fixture(scope="module")
def rnd() -> Round:
    tpk, shares = deal(2, 4, 512, allow_insecure=True)
    layout = SlotLayout(512)
    pub = tpk.public_key
    rng = np.random.default_rng(5)
    devices = [DeviceKey(address=a, private_key=k) for k, a in (new_device_key() for _ in range(2))]
    deltas = [rng.uniform(-0.05, 0.05, PAPER_CNN_PARAMS).astype(np.float32) for _ in devices]
    source = OnTheSpot(FixedBaseTable(pub))
    updates = [
        seal_update(
            round_no=4,
            device=d,
            domain=DOMAIN,
            layout=layout,
            public_key=pub,
            randomness=source,
            delta=delta,
            samples=s,
            total_samples=TOTAL,
            train_ms=1200,
        )
        for d, delta, s in zip(devices, deltas, SAMPLES, strict=True)
    ]
    acc = Accumulator(pub, layout.ciphertexts_for(PAPER_CNN_PARAMS))
    for u in updates:
        acc.add(pub.ciphertexts_from_bytes(u.payload))
    aggregate = acc.result()
    leaves = [merkle.leaf(4, u.device, payload_hash(u.payload)) for u in updates]
    block = GlobalBlock(
        round=4,
        aggregate=pub.ciphertexts_to_bytes(aggregate),
        devices=[u.device for u in updates],
        total_weight_num=sum(SAMPLES),
        total_weight_den=TOTAL,
        merkle_root=merkle.root(leaves),
        commit_tx=None,
    )
    holders = {new_device_key()[1]: i for i in range(1, 5)}
    wire = {
        i: Share.from_cbor(share_message(4, shares[i - 1].partial_decrypt(aggregate, CONTEXT), pub).to_cbor())
        for i in (3, 4)
    }
    return Round(tpk, shares, layout, devices, deltas, updates, aggregate, block, holders, wire)


def _addr(r: Round, index: int) -> str:
    return next(a for a, i in r.holders.items() if i == index)


# --- holder rotation ----------------------------------------------------------------------------------------


def test_primary_holders_rotate_and_share_the_load_evenly() -> None:
    assert primary_holders(1, 2, 3) == [2, 3]
    assert primary_holders(2, 2, 3) == [3, 1]
    assert primary_holders(3, 2, 3) == [1, 2]
    load: Counter[int] = Counter()
    for r in range(1, 5 * 7 + 1):
        chosen = primary_holders(r, 3, 7)
        assert len(set(chosen)) == 3 and all(1 <= i <= 7 for i in chosen)
        load.update(chosen)
    assert set(load.values()) == {15}
    assert is_primary(1, 2, 2, 3) and not is_primary(1, 1, 2, 3)
    with pytest.raises(ValueError):
        primary_holders(1, 4, 3)


# --- sealing an update --------------------------------------------------------------------------------------


def test_a_sealed_update_passes_the_gateways_checks(rnd: Round) -> None:
    pub = rnd.tpk.public_key
    for device, update, samples in zip(rnd.devices, rnd.updates, SAMPLES, strict=True):
        assert Update.from_cbor(update.to_cbor()) == update  # what goes on the wire decodes to the same
        assert (update.round, update.device, update.samples) == (4, device.address, samples)
        claim = UpdateClaim(update.round, payload_hash(update.payload), update.samples, update.compute_ms)
        assert recover_signer(DOMAIN, claim, update.signature) == device.address
        assert update.compute_ms >= 1200
        cts = pub.ciphertexts_from_bytes(update.payload)  # range and gcd checks, like the gateway's
        assert len(cts) == rnd.layout.ciphertexts_for(252_398) == 8414
    # Fresh randomness every time: sealing the same delta twice gives different payloads.
    assert (
        rnd.updates[0].payload
        != seal_update(
            round_no=4,
            device=rnd.devices[0],
            domain=DOMAIN,
            layout=rnd.layout,
            public_key=pub,
            randomness=OnTheSpot(FixedBaseTable(pub)),
            delta=rnd.deltas[0],
            samples=SAMPLES[0],
            total_samples=TOTAL,
            train_ms=1200,
        ).payload
    )


# --- shares: verify, skip the bad, combine --------------------------------------------------------------------


def _book(r: Round) -> ShareBook:
    return ShareBook(r.tpk, r.aggregate, CONTEXT, r.holders)


def test_share_wire_form_round_trips(rnd: Round) -> None:
    partial = partial_from_share(rnd.wire_shares[3], rnd.tpk.public_key, len(rnd.aggregate))
    assert partial.index == 3 and len(partial.values) == len(rnd.aggregate)
    assert share_message(4, partial, rnd.tpk.public_key) == rnd.wire_shares[3]


def test_a_forged_and_a_missing_share_do_not_stop_the_round(rnd: Round) -> None:
    """Holder 1's share is forged (holder 3's values under index 1), holder 2 never answers: 3 and 4 suffice."""
    book = _book(rnd)
    forged = replace(rnd.wire_shares[3], holder=1)
    offer = book.offer(_addr(rnd, 1), forged)
    assert not offer.accepted and "key holder 1 is invalid" in offer.reason
    assert not book.ready
    with pytest.raises(NotEnoughSharesError):
        book.combine()
    assert book.offer(_addr(rnd, 3), rnd.wire_shares[3]).accepted
    assert not book.ready
    assert book.offer(_addr(rnd, 4), rnd.wire_shares[4]).accepted
    assert book.ready and sorted(book.valid) == [3, 4] and set(book.rejected) == {1}
    result = book.combine()
    assert result.used == [3, 4]
    _check_decodes_to_the_weighted_mean(rnd, result.plaintexts)


def test_shares_under_the_wrong_address_or_tampered_are_rejected(rnd: Round) -> None:
    book = _book(rnd)
    offer = book.offer(_addr(rnd, 4), rnd.wire_shares[3])  # holder 4's address, holder 3's index
    assert not offer.accepted and "holds share 4, not 3" in offer.reason
    assert not book.offer(new_device_key()[1], rnd.wire_shares[3]).accepted  # not a holder at all
    values = bytearray(rnd.wire_shares[3].values)
    values[-1] ^= 1
    tampered = replace(rnd.wire_shares[3], values=bytes(values))
    offer = book.offer(_addr(rnd, 3), tampered)
    assert not offer.accepted and "invalid" in offer.reason
    # A rejection does not blacklist the holder: its genuine share, arriving later, counts.
    assert book.offer(_addr(rnd, 3), rnd.wire_shares[3]).accepted and book.has(3)
    other_round = ShareBook(rnd.tpk, rnd.aggregate, b"bdn/test/round/5", rnd.holders)
    assert not other_round.offer(_addr(rnd, 3), rnd.wire_shares[3]).accepted  # no replay across rounds


# --- decoding and applying ------------------------------------------------------------------------------------


def _check_decodes_to_the_weighted_mean(r: Round, plaintexts: list[mpz]) -> None:
    mean = decode_global(r.layout, plaintexts, r.block)
    expected = sum(s * d.astype(np.float64) for s, d in zip(SAMPLES, r.deltas, strict=True)) / sum(SAMPLES)
    bound = r.layout.error_bound(sum(SAMPLES) / TOTAL, len(SAMPLES))
    assert np.max(np.abs(mean - expected)) <= bound
    base = np.random.default_rng(9).normal(size=PAPER_CNN_PARAMS).astype(np.float32)
    new = apply_delta(base, mean)
    assert new.dtype == np.float32
    assert np.max(np.abs(new - (base + expected))) <= bound + 1e-6
    assert aggregate_hash(r.tpk.public_key, r.aggregate) == payload_hash(r.block.aggregate)


def test_an_overflowing_aggregate_is_detected_not_applied(rnd: Round) -> None:
    slots = np.zeros(PAPER_CNN_PARAMS, dtype=np.uint64)
    slots[123] = (1 << rnd.layout.value_bits) - 1  # above any honest two-device sum
    with pytest.raises(SlotOverflowError) as err:
        decode_global(rnd.layout, pack(rnd.layout, slots), rnd.block)
    assert err.value.indices == [123]
