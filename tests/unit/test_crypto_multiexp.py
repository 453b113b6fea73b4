"""multi_pow: the bucket method must equal the naive product of powers."""

from __future__ import annotations

import secrets

import gmpy2
import pytest
from gmpy2 import mpz

from blockdeepnet.crypto.multiexp import multi_pow
from blockdeepnet.crypto.primes import random_prime


@pytest.fixture(scope="module")
def modulus() -> mpz:
    n = random_prime(256) * random_prime(256)
    return n * n


def naive(bases: list[mpz], exponents: list[int], modulus: mpz) -> mpz:
    acc = mpz(1)
    for b, e in zip(bases, exponents, strict=True):
        acc = acc * gmpy2.powmod(b, e, modulus) % modulus
    return acc


def random_bases(count: int, modulus: mpz) -> list[mpz]:
    return [mpz(secrets.randbelow(int(modulus) - 2) + 2) for _ in range(count)]


@pytest.mark.parametrize("count", [1, 2, 5, 50])
@pytest.mark.parametrize("bits", [1, 8, 9, 128, 300])
def test_matches_naive_for_random_inputs(modulus: mpz, count: int, bits: int) -> None:
    bases = random_bases(count, modulus)
    exponents = [secrets.randbits(bits) | (1 << (bits - 1)) for _ in range(count)]
    result = multi_pow(bases, exponents, modulus)
    assert result == naive(bases, exponents, modulus)
    assert 0 <= result < modulus


@pytest.mark.parametrize("window", [1, 2, 3, 5, 8, 11])
def test_window_sizes(modulus: mpz, window: int) -> None:
    bases = random_bases(12, modulus)
    exponents = [secrets.randbits(100) for _ in range(12)]
    assert multi_pow(bases, exponents, modulus, window=window) == naive(bases, exponents, modulus)


def test_mixed_exponent_lengths(modulus: mpz) -> None:
    bases = random_bases(9, modulus)
    exponents = [0, 1, 2, 255, 256, (1 << 128) - 1, 1 << 200, secrets.randbits(64), secrets.randbits(513)]
    assert multi_pow(bases, exponents, modulus) == naive(bases, exponents, modulus)


def test_zero_exponents(modulus: mpz) -> None:
    bases = random_bases(4, modulus)
    assert multi_pow(bases, [0, 0, 0, 0], modulus) == 1
    assert multi_pow(bases, [0, 5, 0, 0], modulus) == gmpy2.powmod(bases[1], 5, modulus)
    assert multi_pow([], [], modulus) == 1


def test_repeated_bases_and_digits(modulus: mpz) -> None:
    b = random_bases(1, modulus)[0]
    bases = [b, b, b, b]
    exponents = [7, 7, 7 << 8, 1]
    assert multi_pow(bases, exponents, modulus) == gmpy2.powmod(b, 7 + 7 + (7 << 8) + 1, modulus)


def test_small_known_values() -> None:
    m = mpz(1000003)
    assert multi_pow([mpz(2), mpz(3)], [10, 4], m) == 1024 * 81 % m
    assert multi_pow([mpz(5)], [1], m) == 5
    assert multi_pow([mpz(m + 2)], [3], m) == 8  # unreduced base


def test_accepts_mpz_and_python_int_exponents(modulus: mpz) -> None:
    bases = random_bases(3, modulus)
    exps = [secrets.randbits(90) for _ in range(3)]
    assert multi_pow(bases, [mpz(e) for e in exps], modulus) == multi_pow(bases, exps, modulus)


def test_length_mismatch_raises(modulus: mpz) -> None:
    with pytest.raises(ValueError, match="one exponent per base"):
        multi_pow(random_bases(3, modulus), [1, 2], modulus)
    with pytest.raises(ValueError, match="one exponent per base"):
        multi_pow([], [1], modulus)


def test_negative_exponent_raises(modulus: mpz) -> None:
    with pytest.raises(ValueError, match="non-negative"):
        multi_pow(random_bases(3, modulus), [1, -1, 2], modulus)
