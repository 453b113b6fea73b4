"""Threshold Paillier (t of l): dealing, partial decryption, batch proofs, combination, serialization, end to end."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import secrets

import gmpy2
import numpy as np
import pytest
from gmpy2 import mpz

from blockdeepnet.crypto.codec import SlotLayout, decode, encode, sample_weight
from blockdeepnet.crypto.homomorphic import Accumulator
from blockdeepnet.crypto.paillier import CiphertextRangeError, PublicKey
from blockdeepnet.crypto.randomness import RandomnessPool
from blockdeepnet.crypto.threshold import (
    InvalidShareError,
    KeyShare,
    NotEnoughSharesError,
    PartialDecryption,
    ShareProof,
    ThresholdPublicKey,
    combine,
    deal,
    lagrange_coefficients,
    verify_partial,
)

T, L, BITS = 3, 5, 512
CONTEXT = b"round-7"


@pytest.fixture(scope="module")
def dealt() -> tuple[ThresholdPublicKey, list[KeyShare]]:
    return deal(T, L, BITS, allow_insecure=True)


@pytest.fixture(scope="module")
def other_dealt() -> tuple[ThresholdPublicKey, list[KeyShare]]:
    return deal(2, 3, BITS, allow_insecure=True)


@pytest.fixture(scope="module")
def tpk(dealt: tuple[ThresholdPublicKey, list[KeyShare]]) -> ThresholdPublicKey:
    return dealt[0]


@pytest.fixture(scope="module")
def shares(dealt: tuple[ThresholdPublicKey, list[KeyShare]]) -> list[KeyShare]:
    return dealt[1]


@pytest.fixture(scope="module")
def messages(tpk: ThresholdPublicKey) -> list[mpz]:
    n = tpk.public_key.n
    return [mpz(0), mpz(1), n - 1, mpz(secrets.randbelow(int(n))), mpz(2**64 + 3)]


@pytest.fixture(scope="module")
def ciphertexts(tpk: ThresholdPublicKey, messages: list[mpz]) -> list[mpz]:
    return [tpk.public_key.encrypt(m) for m in messages]


@pytest.fixture(scope="module")
def partials(shares: list[KeyShare], ciphertexts: list[mpz]) -> dict[int, PartialDecryption]:
    return {s.index: s.partial_decrypt(ciphertexts, CONTEXT) for s in shares}


def random_unit(pub: PublicKey) -> mpz:
    while True:
        u = mpz(secrets.randbelow(int(pub.nsquare) - 2) + 2)
        if gmpy2.gcd(u, pub.n) == 1:
            return u


def with_value(partial: PartialDecryption, j: int, value: mpz) -> PartialDecryption:
    values = list(partial.values)
    values[j] = value
    return dataclasses.replace(partial, values=tuple(values))


# --- dealing ----------------------------------------------------------------------------------------------


def test_deal_produces_consistent_public_material(tpk: ThresholdPublicKey, shares: list[KeyShare]) -> None:
    assert tpk.threshold == T and tpk.holders == L
    assert tpk.delta == math.factorial(L) == 120
    assert tpk.public_key.bits == BITS
    assert len(tpk.verification_keys) == L
    assert len(set(tpk.verification_keys)) == L
    assert [s.index for s in shares] == [1, 2, 3, 4, 5]
    assert all(s.public is tpk for s in shares)
    assert tpk.fingerprint == tpk.public_key.fingerprint
    n2 = tpk.public_key.nsquare
    assert 0 < tpk.v < n2
    assert gmpy2.gcd(tpk.v, tpk.public_key.n) == 1
    assert tpk.verification_key(1) == tpk.verification_keys[0]
    assert tpk.verification_key(L) == tpk.verification_keys[-1]


def test_partial_values_follow_the_formula(tpk: ThresholdPublicKey, shares: list[KeyShare]) -> None:
    pub = tpk.public_key
    c = pub.encrypt(5)
    share = shares[1]
    secret = mpz(share.to_dict()["secret"], 16)
    part = share.partial_decrypt([c])
    assert part.index == 2
    assert part.values == (gmpy2.powmod(c, 2 * tpk.delta * secret, pub.nsquare),)
    assert tpk.verification_key(2) == gmpy2.powmod(tpk.v, tpk.delta * secret, pub.nsquare)


@pytest.mark.parametrize(("t", "holders"), [(0, 5), (6, 5), (-1, 3), (3, 0), (2, 1001)])
def test_invalid_threshold_parameters_raise(t: int, holders: int) -> None:
    with pytest.raises(ValueError):
        deal(t, holders, BITS, allow_insecure=True)


def test_deal_refuses_insecure_key_sizes() -> None:
    with pytest.raises(ValueError, match="minimum"):
        deal(T, L, BITS)
    with pytest.raises(ValueError, match="even"):
        deal(T, L, 513, allow_insecure=True)


def test_threshold_public_key_validates(tpk: ThresholdPublicKey) -> None:
    vks = tpk.verification_keys
    with pytest.raises(ValueError, match="threshold"):
        ThresholdPublicKey(tpk.public_key, 0, L, tpk.v, vks)
    with pytest.raises(ValueError, match="threshold"):
        ThresholdPublicKey(tpk.public_key, L + 1, L, tpk.v, vks)
    with pytest.raises(ValueError, match="verification key"):
        ThresholdPublicKey(tpk.public_key, T, L, tpk.v, vks[:-1])
    for bad in (0, L + 1, -1):
        with pytest.raises(ValueError, match="no key holder"):
            tpk.verification_key(bad)


@pytest.mark.parametrize("index", [0, L + 1])
def test_key_share_index_validated(tpk: ThresholdPublicKey, index: int) -> None:
    with pytest.raises(ValueError, match="no key holder"):
        KeyShare(tpk, index, 12345)


# --- decryption -------------------------------------------------------------------------------------------


def test_every_t_subset_decrypts(
    tpk: ThresholdPublicKey,
    ciphertexts: list[mpz],
    messages: list[mpz],
    partials: dict[int, PartialDecryption],
) -> None:
    subsets = list(itertools.combinations(range(1, L + 1), T))
    assert len(subsets) == 10
    for subset in subsets:
        result = combine(tpk, ciphertexts, [partials[i] for i in reversed(subset)], CONTEXT)
        assert result.plaintexts == messages, subset
        assert result.used == list(subset)
        assert result.rejected == {}


def test_combine_uses_the_first_t_valid_partials(
    tpk: ThresholdPublicKey,
    ciphertexts: list[mpz],
    messages: list[mpz],
    partials: dict[int, PartialDecryption],
) -> None:
    order = [5, 2, 4, 1, 3]
    result = combine(tpk, ciphertexts, (partials[i] for i in order), CONTEXT)
    assert result.used == [2, 4, 5]
    assert result.plaintexts == messages


def test_combine_without_verification(
    tpk: ThresholdPublicKey,
    ciphertexts: list[mpz],
    messages: list[mpz],
    partials: dict[int, PartialDecryption],
) -> None:
    result = combine(tpk, ciphertexts, [partials[1], partials[4], partials[5]], b"ignored", verify=False)
    assert result.plaintexts == messages
    assert result.used == [1, 4, 5]


def test_fewer_than_t_partials_raise(
    tpk: ThresholdPublicKey, ciphertexts: list[mpz], partials: dict[int, PartialDecryption]
) -> None:
    with pytest.raises(NotEnoughSharesError) as info:
        combine(tpk, ciphertexts, [partials[2], partials[5]], CONTEXT)
    assert info.value.valid == [2, 5]
    assert info.value.invalid == []
    assert isinstance(info.value, ValueError)
    with pytest.raises(NotEnoughSharesError):
        combine(tpk, ciphertexts, [], CONTEXT)


def test_duplicate_partials_from_one_holder_count_once(
    tpk: ThresholdPublicKey, ciphertexts: list[mpz], partials: dict[int, PartialDecryption]
) -> None:
    with pytest.raises(NotEnoughSharesError) as info:
        combine(tpk, ciphertexts, [partials[1], partials[1], partials[3], partials[1]], CONTEXT)
    assert info.value.valid == [1, 3]


def test_honest_partials_verify(
    tpk: ThresholdPublicKey, ciphertexts: list[mpz], partials: dict[int, PartialDecryption]
) -> None:
    for p in partials.values():
        verify_partial(tpk, ciphertexts, p, CONTEXT)  # raises InvalidShareError on failure


def test_partial_decrypt_range_checks_ciphertexts(tpk: ThresholdPublicKey, shares: list[KeyShare]) -> None:
    pub = tpk.public_key
    for bad in (mpz(0), pub.nsquare, pub.nsquare + 5):
        with pytest.raises(CiphertextRangeError, match="ciphertext 1 "):
            shares[0].partial_decrypt([pub.encrypt(1), bad])


def test_combine_range_checks_ciphertexts(
    tpk: ThresholdPublicKey, ciphertexts: list[mpz], partials: dict[int, PartialDecryption]
) -> None:
    bad = [*ciphertexts[:-1], mpz(0)]
    with pytest.raises(CiphertextRangeError):
        combine(tpk, bad, list(partials.values()), CONTEXT)


# --- cheating holders -------------------------------------------------------------------------------------


@pytest.mark.parametrize("j", [0, 3, 4])
def test_partial_with_one_value_times_random_unit_is_caught(
    tpk: ThresholdPublicKey,
    ciphertexts: list[mpz],
    messages: list[mpz],
    partials: dict[int, PartialDecryption],
    j: int,
) -> None:
    pub = tpk.public_key
    bad = with_value(partials[2], j, partials[2].values[j] * random_unit(pub) % pub.nsquare)
    with pytest.raises(InvalidShareError) as info:
        verify_partial(tpk, ciphertexts, bad, CONTEXT)
    assert info.value.holder == 2
    assert "key holder 2" in str(info.value)

    # Without verification the tampered value really corrupts that plaintext (so the check above matters).
    unchecked = combine(tpk, ciphertexts, [bad, partials[1], partials[3]], CONTEXT, verify=False)
    assert unchecked.plaintexts[j] != messages[j]

    result = combine(tpk, ciphertexts, [bad, partials[1], partials[3], partials[4]], CONTEXT)
    assert result.plaintexts == messages
    assert result.used == [1, 3, 4]
    assert list(result.rejected) == [2]
    assert "key holder 2" in result.rejected[2]

    with pytest.raises(NotEnoughSharesError) as info2:
        combine(tpk, ciphertexts, [partials[1], bad, partials[3]], CONTEXT)
    assert info2.value.valid == [1, 3]
    assert info2.value.invalid == [2]


def test_partial_with_value_copied_from_another_holder_is_caught(
    tpk: ThresholdPublicKey,
    ciphertexts: list[mpz],
    messages: list[mpz],
    partials: dict[int, PartialDecryption],
) -> None:
    bad = with_value(partials[4], 1, partials[1].values[1])
    assert bad.values != partials[4].values
    with pytest.raises(InvalidShareError) as info:
        verify_partial(tpk, ciphertexts, bad, CONTEXT)
    assert info.value.holder == 4
    result = combine(tpk, ciphertexts, [partials[5], bad, partials[3], partials[2]], CONTEXT)
    assert result.plaintexts == messages
    assert result.used == [2, 3, 5]
    assert set(result.rejected) == {4}


def test_swapped_values_within_a_partial_are_caught(
    tpk: ThresholdPublicKey, ciphertexts: list[mpz], partials: dict[int, PartialDecryption]
) -> None:
    vals = list(partials[3].values)
    vals[0], vals[3] = vals[3], vals[0]
    bad = dataclasses.replace(partials[3], values=tuple(vals))
    with pytest.raises(InvalidShareError) as info:
        verify_partial(tpk, ciphertexts, bad, CONTEXT)
    assert info.value.holder == 3


def test_proof_for_another_context_fails(
    tpk: ThresholdPublicKey, ciphertexts: list[mpz], partials: dict[int, PartialDecryption]
) -> None:
    for other in (b"round-8", b"", b"round-7\x00"):
        with pytest.raises(InvalidShareError) as info:
            verify_partial(tpk, ciphertexts, partials[1], other)
        assert info.value.holder == 1
    with pytest.raises(NotEnoughSharesError) as info2:
        combine(tpk, ciphertexts, list(partials.values()), b"round-8")
    assert info2.value.valid == []
    assert info2.value.invalid == [1, 2, 3, 4, 5]


def test_proof_for_other_ciphertexts_fails(
    tpk: ThresholdPublicKey, ciphertexts: list[mpz], partials: dict[int, PartialDecryption]
) -> None:
    other = list(ciphertexts)
    other[2] = tpk.public_key.encrypt(9)
    with pytest.raises(InvalidShareError):
        verify_partial(tpk, other, partials[5], CONTEXT)


def test_share_from_a_different_dealing_fails(
    tpk: ThresholdPublicKey,
    ciphertexts: list[mpz],
    other_dealt: tuple[ThresholdPublicKey, list[KeyShare]],
) -> None:
    other_tpk, other_shares = other_dealt
    assert other_tpk.public_key.n != tpk.public_key.n
    foreign_secret = mpz(other_shares[1].to_dict()["secret"], 16)
    impostor = KeyShare(tpk, 2, foreign_secret)
    bad = impostor.partial_decrypt(ciphertexts, CONTEXT)
    with pytest.raises(InvalidShareError, match="verification key") as info:
        verify_partial(tpk, ciphertexts, bad, CONTEXT)
    assert info.value.holder == 2


def test_other_dealing_decrypts_with_any_two(other_dealt: tuple[ThresholdPublicKey, list[KeyShare]]) -> None:
    otpk, oshares = other_dealt
    ms = [mpz(7), otpk.public_key.n - 2]
    cs = [otpk.public_key.encrypt(m) for m in ms]
    parts = [s.partial_decrypt(cs) for s in oshares]
    for a, b in itertools.combinations(parts, 2):
        assert combine(otpk, cs, [a, b]).plaintexts == ms
    with pytest.raises(NotEnoughSharesError):
        combine(otpk, cs, parts[:1])


@pytest.mark.parametrize("claimed", [1, 3, 5])
def test_partial_claiming_another_holders_index_fails(
    tpk: ThresholdPublicKey, ciphertexts: list[mpz], partials: dict[int, PartialDecryption], claimed: int
) -> None:
    forged = dataclasses.replace(partials[2], index=claimed)
    with pytest.raises(InvalidShareError) as info:
        verify_partial(tpk, ciphertexts, forged, CONTEXT)
    assert info.value.holder == claimed


def test_forged_partial_under_a_holders_index_does_not_block_the_genuine_one(
    tpk: ThresholdPublicKey, ciphertexts: list[mpz], partials: dict[int, PartialDecryption]
) -> None:
    """Partials may arrive unauthenticated: a forgery sent first under holder 1's index must not make
    holder 1's genuine partial, arriving later, be ignored."""
    forged = dataclasses.replace(partials[2], index=1)
    result = combine(tpk, ciphertexts, [forged, partials[1], partials[3], partials[4]], CONTEXT)
    assert result.used == [1, 3, 4]
    assert set(result.rejected) == {1}


@pytest.mark.parametrize("claimed", [0, L + 1, -3])
def test_partial_claiming_unknown_holder_fails(
    tpk: ThresholdPublicKey, ciphertexts: list[mpz], partials: dict[int, PartialDecryption], claimed: int
) -> None:
    forged = dataclasses.replace(partials[2], index=claimed)
    with pytest.raises(InvalidShareError, match="no key holder") as info:
        verify_partial(tpk, ciphertexts, forged, CONTEXT)
    assert info.value.holder == claimed


def test_proof_values_out_of_range_fail(
    tpk: ThresholdPublicKey, ciphertexts: list[mpz], partials: dict[int, PartialDecryption]
) -> None:
    n2 = tpk.public_key.nsquare
    honest = partials[3]
    pr = honest.proof
    for proof in (
        ShareProof(mpz(0), pr.b, pr.z),
        ShareProof(n2, pr.b, pr.z),
        ShareProof(pr.a, mpz(0), pr.z),
        ShareProof(pr.a, n2 + 1, pr.z),
        ShareProof(pr.a, pr.b, mpz(-1)),
        ShareProof(-pr.a, pr.b, pr.z),
    ):
        with pytest.raises(InvalidShareError, match="out of range") as info:
            verify_partial(tpk, ciphertexts, dataclasses.replace(honest, proof=proof), CONTEXT)
        assert info.value.holder == 3


def test_altered_proof_fails(
    tpk: ThresholdPublicKey, ciphertexts: list[mpz], partials: dict[int, PartialDecryption]
) -> None:
    n2 = tpk.public_key.nsquare
    honest = partials[4]
    pr = honest.proof
    for proof in (
        ShareProof(pr.a, pr.b, pr.z + 1),
        ShareProof(pr.a * 4 % n2, pr.b, pr.z),
        ShareProof(pr.a, pr.b * 4 % n2, pr.z),
        partials[5].proof,
    ):
        with pytest.raises(InvalidShareError, match="does not match") as info:
            verify_partial(tpk, ciphertexts, dataclasses.replace(honest, proof=proof), CONTEXT)
        assert info.value.holder == 4


def test_wrong_number_of_values_fails(
    tpk: ThresholdPublicKey, ciphertexts: list[mpz], partials: dict[int, PartialDecryption]
) -> None:
    short = dataclasses.replace(partials[1], values=partials[1].values[:-1])
    with pytest.raises(InvalidShareError, match="4 values for 5 ciphertexts"):
        verify_partial(tpk, ciphertexts, short, CONTEXT)


def test_partial_values_out_of_range_fail(
    tpk: ThresholdPublicKey, ciphertexts: list[mpz], partials: dict[int, PartialDecryption]
) -> None:
    n2 = tpk.public_key.nsquare
    for bad_value in (mpz(0), n2, n2 + 7):
        with pytest.raises(InvalidShareError, match="ciphertext 2 ") as info:
            verify_partial(tpk, ciphertexts, with_value(partials[5], 2, bad_value), CONTEXT)
        assert info.value.holder == 5


# --- serialization ----------------------------------------------------------------------------------------


def test_threshold_public_key_dict_round_trip(tpk: ThresholdPublicKey) -> None:
    d = json.loads(json.dumps(tpk.to_dict()))
    back = ThresholdPublicKey.from_dict(d)
    assert back.public_key == tpk.public_key
    assert (back.threshold, back.holders) == (T, L)
    assert back.v == tpk.v
    assert back.verification_keys == tpk.verification_keys
    assert back.to_dict() == tpk.to_dict()
    assert repr(back) == repr(tpk) == f"ThresholdPublicKey(t={T}, l={L}, key={tpk.public_key!r})"


def test_key_share_dict_round_trip(
    tpk: ThresholdPublicKey,
    shares: list[KeyShare],
    ciphertexts: list[mpz],
    partials: dict[int, PartialDecryption],
) -> None:
    d = json.loads(json.dumps(shares[2].to_dict()))
    back = KeyShare.from_dict(d)
    assert back.index == 3
    assert back.public.to_dict() == tpk.to_dict()
    assert back.to_dict() == shares[2].to_dict()
    part = back.partial_decrypt(ciphertexts, CONTEXT)
    assert part.values == partials[3].values
    verify_partial(tpk, ciphertexts, part, CONTEXT)


def test_partial_decryption_dict_round_trip(
    tpk: ThresholdPublicKey, ciphertexts: list[mpz], partials: dict[int, PartialDecryption]
) -> None:
    d = json.loads(json.dumps(partials[5].to_dict()))
    back = PartialDecryption.from_dict(d)
    assert back == partials[5]
    assert back.index == 5
    verify_partial(tpk, ciphertexts, back, CONTEXT)


def test_malformed_dicts_raise_value_error(
    tpk: ThresholdPublicKey, shares: list[KeyShare], partials: dict[int, PartialDecryption]
) -> None:
    tpd = tpk.to_dict()
    for bad in (
        None,
        {},
        {k: v for k, v in tpd.items() if k != "v"},
        dict(tpd, v=123),
        dict(tpd, verification_keys=tpd["verification_keys"][:-1]),
        dict(tpd, verification_keys=[*tpd["verification_keys"][:-1], 5]),
        dict(tpd, threshold="three"),
        dict(tpd, threshold=L + 1),
        dict(tpd, public_key={"n": "zz"}),
    ):
        with pytest.raises(ValueError):
            ThresholdPublicKey.from_dict(bad)  # type: ignore[arg-type]

    ksd = shares[0].to_dict()
    for bad in (
        None,
        {},
        {"public": tpd, "index": 1},
        dict(ksd, secret=12345),
        dict(ksd, secret="not-hex"),
        dict(ksd, index=L + 1),
        dict(ksd, index="one"),
        dict(ksd, public={}),
    ):
        with pytest.raises(ValueError):
            KeyShare.from_dict(bad)  # type: ignore[arg-type]

    pdd = partials[1].to_dict()
    for bad in (
        None,
        {},
        {k: v for k, v in pdd.items() if k != "proof"},
        dict(pdd, values=[1, 2]),
        dict(pdd, values=5),
        dict(pdd, proof={"a": "1", "b": "2"}),
        dict(pdd, proof={"a": "1", "b": "2", "z": 3}),
        dict(pdd, index="x"),
    ):
        with pytest.raises(ValueError):
            PartialDecryption.from_dict(bad)  # type: ignore[arg-type]


def test_key_share_repr_hides_the_secret(shares: list[KeyShare]) -> None:
    share = shares[3]
    secret = int(share.to_dict()["secret"], 16)
    for text in (repr(share), str(share), f"{share!s}", repr([share])):
        assert f"KeyShare(index=4, key={share.public.fingerprint}" in text
        assert format(secret, "x") not in text
        assert format(secret, "x")[:20] not in text
        assert format(secret, "X")[:20] not in text
        assert str(secret)[:20] not in text


# --- Lagrange coefficients --------------------------------------------------------------------------------


def test_lagrange_known_values() -> None:
    assert lagrange_coefficients([1, 2, 3], 6) == {1: 18, 2: -18, 3: 6}
    assert lagrange_coefficients([1], 1) == {1: 1}
    assert lagrange_coefficients([2, 5], 120) == {2: 200, 5: -80}


@pytest.mark.parametrize(("t", "holders"), [(1, 1), (2, 3), (3, 5), (4, 7), (5, 5), (6, 10)])
def test_lagrange_reconstructs_delta_times_secret(t: int, holders: int) -> None:
    delta = math.factorial(holders)
    coeffs = [secrets.randbits(300) for _ in range(t)]

    def f(x: int) -> int:
        return sum(a * x**k for k, a in enumerate(coeffs))

    subsets = list(itertools.combinations(range(1, holders + 1), t))
    for subset in subsets[:15]:
        lam = lagrange_coefficients(subset, delta)
        assert sorted(lam) == list(subset)
        assert all(isinstance(v, int) for v in lam.values())
        assert sum(lam[i] * f(i) for i in subset) == delta * coeffs[0]
        assert sum(lam.values()) == delta  # f = 1


def test_lagrange_without_delta_is_not_integral() -> None:
    with pytest.raises(ArithmeticError):
        lagrange_coefficients([1, 3], 1)


# --- end to end -------------------------------------------------------------------------------------------


def test_end_to_end_weighted_federated_average(tpk: ThresholdPublicKey, shares: list[KeyShare]) -> None:
    rng = np.random.default_rng(314)
    pub = tpk.public_key
    layout = SlotLayout(pub.bits, value_bits=18, clip=2.0, max_devices=10)
    length = 40  # two ciphertexts per device at 26 slots each
    samples = np.array([120, 15, 600, 48, 217])
    total = int(samples.sum())
    updates = rng.uniform(-1.9, 1.9, (5, length))
    pool = RandomnessPool.for_key(pub)
    pool.fill(5 * layout.ciphertexts_for(length))

    acc = Accumulator(pub, layout.ciphertexts_for(length), max_summands=layout.max_devices)
    weights = []
    for k in range(5):
        w = sample_weight(int(samples[k]), total)
        weights.append(w)
        plaintexts = encode(layout, updates[k], w)
        acc.add([pub.encrypt_with(m, pool.take()) for m in plaintexts])
    assert pool.misses == 0 and acc.vectors == 5

    aggregate = acc.result()
    round_id = b"round-42"
    parts = [shares[i - 1].partial_decrypt(aggregate, round_id) for i in (5, 1, 3)]
    result = combine(tpk, aggregate, parts, round_id)
    assert result.used == [1, 3, 5]
    assert result.rejected == {}

    w_total = math.fsum(weights)
    mean = decode(layout, result.plaintexts, length, w_total, 5)
    expected = np.average(updates, axis=0, weights=samples)
    bound = layout.error_bound(w_total, 5)
    assert np.max(np.abs(mean - expected)) <= bound + 1e-12
    assert np.max(np.abs(updates.mean(axis=0) - expected)) > 100 * bound  # weighting is really applied
