"""Prime and safe-prime generation."""

from __future__ import annotations

import gmpy2
import pytest

from blockdeepnet.crypto.primes import _PRIMES, random_odd, random_prime, random_safe_prime


@pytest.mark.parametrize("bits", [8, 9, 33, 64, 256])
def test_random_odd_has_exact_size_and_is_odd(bits: int) -> None:
    for _ in range(20):
        x = random_odd(bits)
        assert x.bit_length() == bits
        assert x % 2 == 1


@pytest.mark.parametrize("bits", [7, 1, 0])
def test_random_odd_rejects_tiny_sizes(bits: int) -> None:
    with pytest.raises(ValueError, match="at least 8 bits"):
        random_odd(bits)


@pytest.mark.parametrize("bits", [8, 16, 64, 256])
def test_random_prime_has_exact_size(bits: int) -> None:
    values = {random_prime(bits) for _ in range(5)}
    for p in values:
        assert p.bit_length() == bits
        assert gmpy2.is_prime(p, 50)
    if bits >= 64:
        assert len(values) == 5


@pytest.mark.parametrize("bits", [16, 24, 64, 128])
def test_random_safe_prime(bits: int) -> None:
    p = random_safe_prime(bits)
    assert p.bit_length() == bits
    assert gmpy2.is_prime(p, 50)
    assert gmpy2.is_prime((p - 1) // 2, 50)


def test_small_prime_sieve_table() -> None:
    assert _PRIMES[:6].tolist() == [3, 5, 7, 11, 13, 17]
    assert 2 not in _PRIMES
    assert all(gmpy2.is_prime(int(r)) for r in _PRIMES[-50:])
    assert int(_PRIMES[-1]) < 20_000
    assert len(_PRIMES) == 2261  # pi(20000) - 1 (2 excluded)


def test_random_safe_prime_rejects_tiny_sizes() -> None:
    with pytest.raises(ValueError, match="at least 16 bits"):
        random_safe_prime(8)
