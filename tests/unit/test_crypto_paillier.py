"""Paillier with g = n + 1 and DJN randomness: keys, encryption, homomorphism, validation, wire format, phe interop."""

from __future__ import annotations

import secrets
from typing import Any

import gmpy2
import pytest
from gmpy2 import mpz
from phe import paillier as phe_paillier

from blockdeepnet.crypto.paillier import (
    MIN_KEY_BITS,
    CiphertextRangeError,
    KeyMismatchError,
    PrivateKey,
    PublicKey,
    from_phe_private,
    from_phe_public,
    generate_keypair,
    to_phe_private,
    to_phe_public,
)
from blockdeepnet.crypto.primes import random_prime

BITS = 512


@pytest.fixture(scope="module")
def keypair() -> tuple[PublicKey, PrivateKey]:
    return generate_keypair(BITS, allow_insecure=True)


@pytest.fixture(scope="module")
def other_keypair() -> tuple[PublicKey, PrivateKey]:
    return generate_keypair(BITS, allow_insecure=True)


@pytest.fixture(scope="module")
def phe_keypair() -> tuple[Any, Any]:
    phe_pub, phe_priv = phe_paillier.generate_paillier_keypair(n_length=BITS)
    return phe_pub, phe_priv


def factors(priv: PrivateKey) -> tuple[int, int]:
    d = priv.to_dict()
    return int(d["p"], 16), int(d["q"], 16)


def sample_messages(n: mpz) -> list[mpz]:
    return [mpz(0), mpz(1), mpz(2), n - 1, n // 2, mpz(secrets.randbelow(int(n)))]


# --- key generation ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [256, 512, 520, 768])
def test_generated_modulus_has_exactly_the_requested_size(bits: int) -> None:
    pub, priv = generate_keypair(bits, allow_insecure=True)
    assert pub.n.bit_length() == bits
    assert pub.bits == bits
    p, q = factors(priv)
    assert p * q == pub.n
    assert p != q
    assert gmpy2.is_prime(p) and gmpy2.is_prime(q)
    assert p.bit_length() == q.bit_length() == bits // 2


def test_fixture_key_is_512_bits(keypair: tuple[PublicKey, PrivateKey]) -> None:
    pub, _ = keypair
    assert pub.bits == BITS
    assert pub.nsquare == pub.n * pub.n
    assert pub.ciphertext_bytes == (int((pub.n * pub.n).bit_length()) + 7) // 8


def test_minimum_key_size_is_2048() -> None:
    assert MIN_KEY_BITS == 2048


@pytest.mark.parametrize("bits", [512, 1024, 2046])
def test_keys_below_2048_bits_refused_without_allow_insecure(bits: int) -> None:
    with pytest.raises(ValueError, match="below the 2048-bit minimum"):
        generate_keypair(bits)


@pytest.mark.parametrize("bits", [511, 513])
def test_odd_key_size_refused(bits: int) -> None:
    with pytest.raises(ValueError, match="even"):
        generate_keypair(bits, allow_insecure=True)


def test_tiny_key_refused_even_when_insecure_allowed() -> None:
    with pytest.raises(ValueError, match="too small"):
        generate_keypair(254, allow_insecure=True)


# --- encryption / decryption ------------------------------------------------------------------------------


def test_encrypt_decrypt_round_trip(keypair: tuple[PublicKey, PrivateKey]) -> None:
    pub, priv = keypair
    for m in sample_messages(pub.n):
        c = pub.encrypt(m)
        assert 0 < c < pub.nsquare
        assert priv.decrypt(c) == m


def test_encryption_is_randomised(keypair: tuple[PublicKey, PrivateKey]) -> None:
    pub, priv = keypair
    c1, c2 = pub.encrypt(42), pub.encrypt(42)
    assert c1 != c2
    assert priv.decrypt(c1) == priv.decrypt(c2) == 42


def test_fresh_randomness_is_an_nth_power(keypair: tuple[PublicKey, PrivateKey]) -> None:
    pub, priv = keypair
    r = pub.fresh_randomness()
    # E(0) with r_n is r_n itself: it decrypts to 0 exactly when r_n is an n-th power.
    assert priv.decrypt(pub.encrypt_with(0, r)) == 0
    assert pub.encrypt_with(0, r) == r
    assert priv.decrypt(pub.encrypt_with(77, r)) == 77
    assert pub.random_exponent().bit_length() <= 448


def test_non_nth_power_randomness_breaks_decryption(keypair: tuple[PublicKey, PrivateKey]) -> None:
    """Sanity check that the decryption test above can fail: g = n + 1 is not an n-th power."""
    pub, priv = keypair
    assert priv.decrypt(pub.encrypt_with(5, pub.n + 1)) == 6


@pytest.mark.parametrize("offset", [0, 1, 10])
def test_plaintext_out_of_range_refused(keypair: tuple[PublicKey, PrivateKey], offset: int) -> None:
    pub, _ = keypair
    with pytest.raises(ValueError, match="plaintext out of range"):
        pub.encrypt(pub.n + offset)


def test_negative_plaintext_refused(keypair: tuple[PublicKey, PrivateKey]) -> None:
    pub, _ = keypair
    with pytest.raises(ValueError, match="plaintext out of range"):
        pub.encrypt(-1)


# --- homomorphic operations -------------------------------------------------------------------------------


def test_homomorphic_add(keypair: tuple[PublicKey, PrivateKey]) -> None:
    pub, priv = keypair
    a, b = secrets.randbelow(int(pub.n)), secrets.randbelow(int(pub.n))
    assert priv.decrypt(pub.add(pub.encrypt(a), pub.encrypt(b))) == (a + b) % pub.n
    assert priv.decrypt(pub.add(pub.encrypt(123), pub.encrypt(456))) == 579


def test_homomorphic_add_wraps_mod_n(keypair: tuple[PublicKey, PrivateKey]) -> None:
    pub, priv = keypair
    assert priv.decrypt(pub.add(pub.encrypt(pub.n - 1), pub.encrypt(3))) == 2


@pytest.mark.parametrize("k", [0, 1, 2, 7, 1 << 40])
def test_homomorphic_mul_const(keypair: tuple[PublicKey, PrivateKey], k: int) -> None:
    pub, priv = keypair
    m = 987654321
    assert priv.decrypt(pub.mul_const(pub.encrypt(m), k)) == k * m % pub.n


def test_mul_const_large_random_scalar(keypair: tuple[PublicKey, PrivateKey]) -> None:
    pub, priv = keypair
    m, k = secrets.randbelow(int(pub.n)), secrets.randbelow(int(pub.n))
    assert priv.decrypt(pub.mul_const(pub.encrypt(m), k)) == m * k % pub.n


# --- python-paillier interoperability ---------------------------------------------------------------------


def test_our_ciphertext_decrypts_with_phe(keypair: tuple[PublicKey, PrivateKey]) -> None:
    pub, priv = keypair
    phe_priv = to_phe_private(priv)
    assert phe_priv.public_key.n == pub.n
    for m in sample_messages(pub.n):
        assert phe_priv.raw_decrypt(int(pub.encrypt(m))) == m


def test_phe_raw_encrypt_decrypts_with_ours(keypair: tuple[PublicKey, PrivateKey]) -> None:
    pub, priv = keypair
    phe_pub = to_phe_public(pub)
    assert phe_pub.n == pub.n
    for m in sample_messages(pub.n):
        assert priv.decrypt(phe_pub.raw_encrypt(int(m))) == m


def test_phe_encrypted_number_decrypts_with_ours(keypair: tuple[PublicKey, PrivateKey]) -> None:
    pub, priv = keypair
    phe_pub = to_phe_public(pub)
    positive, negative = phe_pub.encrypt(12345), phe_pub.encrypt(-7)
    assert positive.exponent == 0 and negative.exponent == 0
    assert priv.decrypt(positive.ciphertext()) == 12345
    assert priv.decrypt(negative.ciphertext()) == pub.n - 7  # phe encodes negatives as n + x
    assert priv.decrypt((positive + negative).ciphertext()) == 12338


def test_homomorphic_sum_interoperates(keypair: tuple[PublicKey, PrivateKey]) -> None:
    pub, priv = keypair
    phe_pub, phe_priv = to_phe_public(pub), to_phe_private(priv)
    mixed = pub.add(pub.encrypt(1000), mpz(phe_pub.raw_encrypt(234)))
    assert phe_priv.raw_decrypt(int(mixed)) == 1234
    assert priv.decrypt(mixed) == 1234


def test_keys_from_phe_keypair(phe_keypair: tuple[Any, Any]) -> None:
    phe_pub, phe_priv = phe_keypair
    pub = from_phe_public(phe_pub)
    priv = from_phe_private(phe_priv)
    assert pub.n == phe_pub.n
    assert priv.public_key.n == phe_pub.n
    assert factors(priv) == (phe_priv.p, phe_priv.q)
    m = secrets.randbelow(phe_pub.n)
    # ours -> phe
    assert phe_priv.raw_decrypt(int(pub.encrypt(m))) == m
    assert phe_priv.raw_decrypt(int(priv.public_key.encrypt(m))) == m
    # phe -> ours
    assert priv.decrypt(phe_pub.raw_encrypt(m)) == m
    assert priv.decrypt(phe_pub.encrypt(31337).ciphertext()) == 31337


def test_from_phe_public_draws_a_valid_djn_base(phe_keypair: tuple[Any, Any]) -> None:
    phe_pub, phe_priv = phe_keypair
    pub = from_phe_public(phe_pub)
    assert 0 < pub.hs < pub.nsquare
    assert gmpy2.gcd(pub.hs, pub.n) == 1
    # hs must be an n-th power: E(0) with hs as randomness decrypts to 0.
    assert phe_priv.raw_decrypt(int(pub.hs)) == 0


# --- serialization ----------------------------------------------------------------------------------------


def test_public_key_dict_round_trip(keypair: tuple[PublicKey, PrivateKey]) -> None:
    pub, priv = keypair
    d = pub.to_dict()
    assert set(d) == {"n", "hs"}
    assert int(d["n"], 16) == pub.n
    back = PublicKey.from_dict(d)
    assert back == pub
    assert hash(back) == hash(pub)
    assert back.hs == pub.hs
    assert back.fingerprint == pub.fingerprint
    assert priv.decrypt(back.encrypt(99)) == 99


def test_public_keys_with_different_base_differ(keypair: tuple[PublicKey, PrivateKey]) -> None:
    pub, _ = keypair
    other = PublicKey.from_modulus(pub.n)
    assert other.n == pub.n
    assert other != pub
    assert other.fingerprint != pub.fingerprint


def test_private_key_dict_round_trip(keypair: tuple[PublicKey, PrivateKey]) -> None:
    pub, priv = keypair
    back = PrivateKey.from_dict(priv.to_dict())
    assert back.public_key == pub
    assert factors(back) == factors(priv)
    c = pub.encrypt(2024)
    assert back.decrypt(c) == 2024


def _public_dict_cases(pub: PublicKey) -> list[object]:
    d = pub.to_dict()
    return [
        None,
        "not a dict",
        [],
        {},
        {"n": d["n"]},
        {"hs": d["hs"]},
        {"n": int(pub.n), "hs": int(pub.hs)},  # not hex strings
        {"n": "zz", "hs": d["hs"]},
        {"n": d["n"], "hs": "0"},  # hs not a unit
        {"n": d["n"], "hs": format(int(pub.nsquare), "x")},  # hs out of range
        {"n": format(int(pub.n) + 1, "x"), "hs": d["hs"]},  # even modulus
        {"n": "1", "hs": "1"},
    ]


def test_malformed_public_key_dicts_raise_value_error(keypair: tuple[PublicKey, PrivateKey]) -> None:
    pub, _ = keypair
    for case in _public_dict_cases(pub):
        with pytest.raises(ValueError):
            PublicKey.from_dict(case)  # type: ignore[arg-type]


def test_malformed_private_key_dicts_raise_value_error(
    keypair: tuple[PublicKey, PrivateKey], other_keypair: tuple[PublicKey, PrivateKey]
) -> None:
    _, priv = keypair
    d = priv.to_dict()
    p, q = factors(priv)
    op, oq = factors(other_keypair[1])
    cases: list[object] = [
        None,
        "x",
        {},
        {"public": d["public"]},
        {"public": d["public"], "p": d["p"]},
        {"p": d["p"], "q": d["q"]},
        {"public": d["public"], "p": p, "q": q},  # ints, not hex
        {"public": d["public"], "p": "xyz", "q": d["q"]},
        {"public": d["public"], "p": format(p + 2, "x"), "q": d["q"]},
        {"public": d["public"], "p": format(op, "x"), "q": format(oq, "x")},
        {"public": {"n": d["public"]["n"]}, "p": d["p"], "q": d["q"]},
    ]
    for case in cases:
        with pytest.raises(ValueError):
            PrivateKey.from_dict(case)  # type: ignore[arg-type]


def test_trivial_factorisation_refused(keypair: tuple[PublicKey, PrivateKey]) -> None:
    pub, priv = keypair
    d = dict(priv.to_dict(), p="1", q=format(int(pub.n), "x"))
    with pytest.raises(ValueError):
        PrivateKey.from_dict(d)


def test_private_key_repr_hides_factors(keypair: tuple[PublicKey, PrivateKey]) -> None:
    pub, priv = keypair
    p, q = factors(priv)
    for text in (repr(priv), str(priv), f"{priv}", repr([priv])):
        assert "PrivateKey(" in text
        assert pub.fingerprint in text
        for secret in (p, q):
            assert str(secret) not in text
            assert format(secret, "x") not in text
            assert format(secret, "X") not in text
            # Even a short chunk of either factor must not leak.
            assert str(secret)[:24] not in text
            assert format(secret, "x")[:24] not in text


def test_public_key_repr_is_short(keypair: tuple[PublicKey, PrivateKey]) -> None:
    pub, _ = keypair
    assert repr(pub) == f"PublicKey(bits={BITS}, fingerprint={pub.fingerprint})"
    assert len(pub.fingerprint) == 16


# --- key mismatch -----------------------------------------------------------------------------------------


def test_wrong_key_decrypts_to_a_different_value(
    keypair: tuple[PublicKey, PrivateKey], other_keypair: tuple[PublicKey, PrivateKey]
) -> None:
    # Encrypt under the smaller modulus so the ciphertext is in range for the larger one.
    (small_pub, _), (_, large_priv) = sorted([keypair, other_keypair], key=lambda kp: kp[0].n)
    assert small_pub.n != large_priv.public_key.n
    for m in (0, 1, 123456789):
        c = small_pub.encrypt(m)
        assert large_priv.decrypt(c) != m


def test_private_key_with_foreign_factors_raises_key_mismatch(
    keypair: tuple[PublicKey, PrivateKey], other_keypair: tuple[PublicKey, PrivateKey]
) -> None:
    pub, priv = keypair
    op, oq = factors(other_keypair[1])
    with pytest.raises(KeyMismatchError):
        PrivateKey(pub, op, oq)
    p, q = factors(priv)
    with pytest.raises(KeyMismatchError):
        PrivateKey(pub, p, q + 2)
    with pytest.raises(KeyMismatchError):
        PrivateKey(other_keypair[0], p, q)
    assert issubclass(KeyMismatchError, ValueError)
    assert PrivateKey(pub, q, p).decrypt(pub.encrypt(5)) == 5  # order of factors does not matter


def test_private_key_with_equal_factors_refused() -> None:
    p = random_prime(128)
    pub = PublicKey.from_modulus(p * p)
    with pytest.raises(ValueError, match="distinct primes"):
        PrivateKey(pub, p, p)


def test_public_key_constructor_validates() -> None:
    with pytest.raises(ValueError, match="odd"):
        PublicKey(n=mpz(100), hs=mpz(3))
    with pytest.raises(ValueError, match="unit"):
        PublicKey(n=mpz(15), hs=mpz(5))
    with pytest.raises(ValueError, match="unit"):
        PublicKey(n=mpz(15), hs=mpz(225))
    assert PublicKey(n=mpz(15), hs=mpz(4)).nsquare == 225


# --- ciphertext validation --------------------------------------------------------------------------------


def _bad_ciphertexts(pub: PublicKey, priv: PrivateKey) -> list[mpz]:
    p, q = factors(priv)
    return [mpz(0), pub.nsquare, pub.nsquare + 5, mpz(p) * 12345, mpz(q), mpz(-1)]


def test_check_ciphertext_accepts_valid(keypair: tuple[PublicKey, PrivateKey]) -> None:
    pub, _ = keypair
    c = pub.encrypt(3)
    out = pub.check_ciphertext(int(c))
    assert out == c
    assert isinstance(out, type(mpz(0)))
    assert pub.check_ciphertext(1) == 1
    assert pub.check_ciphertext(pub.nsquare - 1) == pub.nsquare - 1


def test_check_ciphertext_rejects_bad_values(keypair: tuple[PublicKey, PrivateKey]) -> None:
    pub, priv = keypair
    for bad in _bad_ciphertexts(pub, priv):
        with pytest.raises(CiphertextRangeError):
            pub.check_ciphertext(bad)
    p, _ = factors(priv)
    with pytest.raises(CiphertextRangeError, match="factor"):
        pub.check_ciphertext(mpz(p) * 7)
    with pytest.raises(CiphertextRangeError, match="outside"):
        pub.check_ciphertext(pub.nsquare)


def test_check_ciphertexts_names_the_bad_index(keypair: tuple[PublicKey, PrivateKey]) -> None:
    pub, priv = keypair
    good = [pub.encrypt(i) for i in range(5)]
    assert pub.check_ciphertexts(good) == good
    assert pub.check_ciphertexts([]) == []
    for bad in _bad_ciphertexts(pub, priv):
        for index in (0, 3, 5):
            vec = list(good)
            vec.insert(index, bad)
            with pytest.raises(CiphertextRangeError, match=rf"ciphertext {index} "):
                pub.check_ciphertexts(vec)


def test_check_ciphertexts_names_first_of_several_factor_sharers(
    keypair: tuple[PublicKey, PrivateKey],
) -> None:
    pub, priv = keypair
    p, q = factors(priv)
    vec = [pub.encrypt(1), pub.encrypt(2), mpz(q) * 3, pub.encrypt(4), mpz(p) * 5]
    with pytest.raises(CiphertextRangeError, match=r"ciphertext 2 shares a factor"):
        pub.check_ciphertexts(vec)


def test_decrypt_range_checks(keypair: tuple[PublicKey, PrivateKey]) -> None:
    pub, priv = keypair
    for bad in _bad_ciphertexts(pub, priv):
        with pytest.raises(CiphertextRangeError):
            priv.decrypt(bad)


# --- wire format ------------------------------------------------------------------------------------------


def test_ciphertext_bytes_round_trip(keypair: tuple[PublicKey, PrivateKey]) -> None:
    pub, priv = keypair
    ms = [0, 1, 2**64, int(pub.n) - 1]
    cs = [pub.encrypt(m) for m in ms]
    blob = pub.ciphertexts_to_bytes(cs)
    assert len(blob) == len(cs) * pub.ciphertext_bytes
    back = pub.ciphertexts_from_bytes(blob, count=len(cs))
    assert back == cs
    assert [priv.decrypt(c) for c in back] == ms
    assert pub.ciphertexts_from_bytes(blob) == cs
    assert pub.ciphertexts_from_bytes(b"") == []


def test_ciphertexts_to_bytes_is_fixed_width_big_endian(keypair: tuple[PublicKey, PrivateKey]) -> None:
    pub, _ = keypair
    blob = pub.ciphertexts_to_bytes([mpz(1), mpz(258)])
    w = pub.ciphertext_bytes
    assert blob == (1).to_bytes(w, "big") + (258).to_bytes(w, "big")


@pytest.mark.parametrize("delta", [-1, 1, 17])
def test_ciphertexts_from_bytes_rejects_bad_length(keypair: tuple[PublicKey, PrivateKey], delta: int) -> None:
    pub, _ = keypair
    blob = pub.ciphertexts_to_bytes([pub.encrypt(1), pub.encrypt(2)])
    with pytest.raises(CiphertextRangeError, match="not a multiple"):
        pub.ciphertexts_from_bytes(blob + b"\x01" * delta if delta > 0 else blob[:delta])


@pytest.mark.parametrize("count", [0, 1, 3, 10])
def test_ciphertexts_from_bytes_rejects_count_mismatch(
    keypair: tuple[PublicKey, PrivateKey], count: int
) -> None:
    pub, _ = keypair
    blob = pub.ciphertexts_to_bytes([pub.encrypt(1), pub.encrypt(2)])
    with pytest.raises(CiphertextRangeError, match="expected"):
        pub.ciphertexts_from_bytes(blob, count=count)


def test_ciphertexts_from_bytes_range_checks_each(keypair: tuple[PublicKey, PrivateKey]) -> None:
    pub, priv = keypair
    w = pub.ciphertext_bytes
    good = pub.ciphertexts_to_bytes([pub.encrypt(1), pub.encrypt(2)])
    p, _ = factors(priv)
    for bad, what in [
        (b"\x00" * w, "outside 0 < c < n^2"),
        (b"\xff" * w, "outside 0 < c < n^2"),
        ((p * 3).to_bytes(w, "big"), "shares a factor"),
    ]:
        with pytest.raises(CiphertextRangeError, match=r"ciphertext 2 ") as info:
            pub.ciphertexts_from_bytes(good + bad, count=3)
        assert what in str(info.value)
