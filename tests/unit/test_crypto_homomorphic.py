"""Homomorphic aggregation: weighted_sum and the incremental Accumulator."""

from __future__ import annotations

import secrets

import pytest
from gmpy2 import mpz

from blockdeepnet.crypto.homomorphic import Accumulator, weighted_sum
from blockdeepnet.crypto.paillier import CiphertextRangeError, PrivateKey, PublicKey, generate_keypair

BITS = 512
LENGTH = 4


@pytest.fixture(scope="module")
def keypair() -> tuple[PublicKey, PrivateKey]:
    return generate_keypair(BITS, allow_insecure=True)


@pytest.fixture(scope="module")
def plain_vectors() -> list[list[int]]:
    return [
        [0, 1, 2**40, 7],
        [5, 0, 123456, 2**100],
        [999, 31337, 1, 0],
        [2**200, 42, 17, 3],
    ]


@pytest.fixture(scope="module")
def enc_vectors(keypair: tuple[PublicKey, PrivateKey], plain_vectors: list[list[int]]) -> list[list[mpz]]:
    pub, _ = keypair
    return [[pub.encrypt(m) for m in vec] for vec in plain_vectors]


def decrypt_all(priv: PrivateKey, cs: list[mpz]) -> list[int]:
    return [int(priv.decrypt(c)) for c in cs]


def expected_sum(vectors: list[list[int]], multipliers: list[int], n: mpz) -> list[int]:
    return [int(sum(k * v[j] for k, v in zip(multipliers, vectors, strict=True)) % n) for j in range(LENGTH)]


def bad_values(pub: PublicKey, priv: PrivateKey) -> list[tuple[str, mpz]]:
    p = int(priv.to_dict()["p"], 16)
    return [
        ("zero", mpz(0)),
        ("n^2", pub.nsquare),
        ("above n^2", pub.nsquare + 12345),
        ("negative", mpz(-3)),
        ("shares a factor with n", mpz(p) * 1000003),
    ]


# --- weighted_sum -----------------------------------------------------------------------------------------


def test_weighted_sum_without_multipliers(
    keypair: tuple[PublicKey, PrivateKey], plain_vectors: list[list[int]], enc_vectors: list[list[mpz]]
) -> None:
    pub, priv = keypair
    out = weighted_sum(pub, enc_vectors)
    assert len(out) == LENGTH
    assert decrypt_all(priv, out) == expected_sum(plain_vectors, [1, 1, 1, 1], pub.n)
    assert decrypt_all(priv, out)[0] == 2**200 + 1004


def test_weighted_sum_with_integer_multipliers(
    keypair: tuple[PublicKey, PrivateKey], plain_vectors: list[list[int]], enc_vectors: list[list[mpz]]
) -> None:
    pub, priv = keypair
    mults = [1, 2, 3, 1000]
    out = weighted_sum(pub, enc_vectors, mults)
    assert decrypt_all(priv, out) == expected_sum(plain_vectors, mults, pub.n)
    assert decrypt_all(priv, out)[1] == 1 + 0 + 3 * 31337 + 1000 * 42


def test_weighted_sum_of_one_vector_is_that_vector(
    keypair: tuple[PublicKey, PrivateKey], plain_vectors: list[list[int]], enc_vectors: list[list[mpz]]
) -> None:
    pub, priv = keypair
    assert weighted_sum(pub, enc_vectors[:1]) == enc_vectors[0]
    assert decrypt_all(priv, weighted_sum(pub, enc_vectors[:1], [5])) == [5 * m for m in plain_vectors[0]]


def test_weighted_sum_wraps_mod_n(keypair: tuple[PublicKey, PrivateKey]) -> None:
    pub, priv = keypair
    a = [pub.encrypt(pub.n - 1)]
    b = [pub.encrypt(5)]
    assert decrypt_all(priv, weighted_sum(pub, [a, b])) == [4]


def test_weighted_sum_errors(keypair: tuple[PublicKey, PrivateKey], enc_vectors: list[list[mpz]]) -> None:
    pub, _ = keypair
    with pytest.raises(ValueError, match="no vectors"):
        weighted_sum(pub, [])
    with pytest.raises(ValueError, match="one multiplier per vector"):
        weighted_sum(pub, enc_vectors, [1, 2])
    with pytest.raises(CiphertextRangeError, match="expected 4 ciphertexts, got 3"):
        weighted_sum(pub, [enc_vectors[0], enc_vectors[1][:3]])
    with pytest.raises(ValueError, match="multiplier"):
        weighted_sum(pub, enc_vectors, [1, 0, 1, 1])
    with pytest.raises(ValueError, match="exceed 5 summands"):
        weighted_sum(pub, enc_vectors, [1, 2, 2, 1], max_summands=5)
    assert len(weighted_sum(pub, enc_vectors, [1, 2, 1, 1], max_summands=5)) == LENGTH


def test_weighted_sum_rejects_bad_ciphertext(
    keypair: tuple[PublicKey, PrivateKey], enc_vectors: list[list[mpz]]
) -> None:
    pub, priv = keypair
    for _, bad in bad_values(pub, priv):
        vec = list(enc_vectors[2])
        vec[1] = bad
        with pytest.raises(CiphertextRangeError, match="ciphertext 1 "):
            weighted_sum(pub, [enc_vectors[0], enc_vectors[1], vec])


# --- Accumulator ------------------------------------------------------------------------------------------


def test_accumulator_folds_incrementally(
    keypair: tuple[PublicKey, PrivateKey], plain_vectors: list[list[int]], enc_vectors: list[list[mpz]]
) -> None:
    pub, priv = keypair
    mults = [3, 1, 2, 1]
    acc = Accumulator(pub, LENGTH)
    assert acc.summands == 0 and acc.vectors == 0
    for i, (vec, k) in enumerate(zip(enc_vectors, mults, strict=True)):
        acc.add(vec, k)
        assert acc.vectors == i + 1
        assert acc.summands == sum(mults[: i + 1])
        assert decrypt_all(priv, acc.result()) == expected_sum(plain_vectors[: i + 1], mults[: i + 1], pub.n)
    assert acc.result() == weighted_sum(pub, enc_vectors, mults)


def test_accumulator_accepts_ints_and_does_not_alias_input(
    keypair: tuple[PublicKey, PrivateKey], plain_vectors: list[list[int]], enc_vectors: list[list[mpz]]
) -> None:
    pub, priv = keypair
    first = [int(c) for c in enc_vectors[0]]
    acc = Accumulator(pub, LENGTH)
    acc.add(first)
    acc.add(enc_vectors[1])
    assert first == [int(c) for c in enc_vectors[0]]  # input left untouched
    snapshot = acc.result()
    snapshot[0] = mpz(1)
    assert acc.result()[0] != 1  # result() returns a copy
    assert decrypt_all(priv, acc.result()) == expected_sum(plain_vectors[:2], [1, 1], pub.n)


def test_accumulator_rejects_bad_ciphertext_and_stays_unchanged(
    keypair: tuple[PublicKey, PrivateKey], plain_vectors: list[list[int]], enc_vectors: list[list[mpz]]
) -> None:
    pub, priv = keypair
    acc = Accumulator(pub, LENGTH)
    acc.add(enc_vectors[0])
    before = acc.result()
    for name, bad in bad_values(pub, priv):
        for position in (0, LENGTH - 1):
            vec = list(enc_vectors[1])
            vec[position] = bad
            with pytest.raises(CiphertextRangeError, match=f"ciphertext {position} ") as info:
                acc.add(vec)
            assert isinstance(info.value, ValueError), name
            assert acc.result() == before, name
            assert acc.summands == 1 and acc.vectors == 1, name
    acc.add(enc_vectors[1])
    assert decrypt_all(priv, acc.result()) == expected_sum(plain_vectors[:2], [1, 1], pub.n)


def test_accumulator_rejects_bad_first_vector(
    keypair: tuple[PublicKey, PrivateKey], enc_vectors: list[list[mpz]]
) -> None:
    pub, _ = keypair
    acc = Accumulator(pub, LENGTH)
    vec = list(enc_vectors[0])
    vec[2] = mpz(0)
    with pytest.raises(CiphertextRangeError):
        acc.add(vec)
    with pytest.raises(ValueError, match="no vectors"):
        acc.result()
    assert acc.summands == 0 and acc.vectors == 0


@pytest.mark.parametrize("length", [0, LENGTH - 1, LENGTH + 1])
def test_accumulator_length_mismatch(
    keypair: tuple[PublicKey, PrivateKey], enc_vectors: list[list[mpz]], length: int
) -> None:
    pub, _ = keypair
    acc = Accumulator(pub, LENGTH)
    acc.add(enc_vectors[0])
    vec = (enc_vectors[1] * 2)[:length]
    with pytest.raises(CiphertextRangeError, match=f"expected {LENGTH} ciphertexts, got {length}"):
        acc.add(vec)
    assert acc.vectors == 1
    assert acc.result() == enc_vectors[0]


def test_accumulator_max_summands(
    keypair: tuple[PublicKey, PrivateKey], plain_vectors: list[list[int]], enc_vectors: list[list[mpz]]
) -> None:
    pub, priv = keypair
    acc = Accumulator(pub, LENGTH, max_summands=3)
    acc.add(enc_vectors[0])
    acc.add(enc_vectors[1], multiplier=2)
    assert acc.summands == 3
    before = acc.result()
    with pytest.raises(ValueError, match="exceed 3 summands"):
        acc.add(enc_vectors[2])
    assert acc.summands == 3 and acc.vectors == 2
    assert acc.result() == before
    assert decrypt_all(priv, acc.result()) == expected_sum(plain_vectors[:2], [1, 2], pub.n)

    acc2 = Accumulator(pub, LENGTH, max_summands=3)
    with pytest.raises(ValueError, match="exceed 3 summands"):
        acc2.add(enc_vectors[0], multiplier=4)
    assert acc2.summands == 0


@pytest.mark.parametrize("multiplier", [0, -1])
def test_accumulator_rejects_non_positive_multiplier(
    keypair: tuple[PublicKey, PrivateKey], enc_vectors: list[list[mpz]], multiplier: int
) -> None:
    pub, _ = keypair
    acc = Accumulator(pub, LENGTH)
    with pytest.raises(ValueError, match="multiplier"):
        acc.add(enc_vectors[0], multiplier)
    assert acc.summands == 0


def test_accumulator_requires_positive_length(keypair: tuple[PublicKey, PrivateKey]) -> None:
    with pytest.raises(ValueError, match="length"):
        Accumulator(keypair[0], 0)


def test_accumulator_many_devices(keypair: tuple[PublicKey, PrivateKey]) -> None:
    pub, priv = keypair
    messages = [[secrets.randbelow(1 << 64) for _ in range(3)] for _ in range(25)]
    acc = Accumulator(pub, 3, max_summands=25)
    for vec in messages:
        acc.add([pub.encrypt(m) for m in vec])
    assert acc.summands == 25
    assert decrypt_all(priv, acc.result()) == [sum(v[j] for v in messages) for j in range(3)]
