"""Prime generation for Paillier moduli.

Threshold Paillier (Shoup / Damgard-Jurik) needs *safe* primes p = 2p' + 1: the group of squares mod n^2
then has order n*p'*q' with no small factors, which is what makes the share-correctness proofs sound.
A safe prime is rare (density ~ 1/ln(x)^2), so candidates are sieved against small primes for both p' and
2p'+1 incrementally in NumPy before any Miller-Rabin test is spent on them.
"""

from __future__ import annotations

import secrets

import gmpy2
import numpy as np
from gmpy2 import mpz

_SIEVE_LIMIT = 20_000


def _small_primes(limit: int) -> np.ndarray:
    flags = np.ones(limit, dtype=bool)
    flags[:2] = False
    for i in range(2, int(limit**0.5) + 1):
        if flags[i]:
            flags[i * i :: i] = False
    return np.flatnonzero(flags)[1:].astype(np.int64)  # odd primes only


_PRIMES = _small_primes(_SIEVE_LIMIT)


def random_odd(bits: int) -> mpz:
    """A uniformly random odd integer of exactly ``bits`` bits (top bit set)."""
    if bits < 8:
        raise ValueError(f"prime size must be at least 8 bits, got {bits}")
    return mpz(secrets.randbits(bits)) | (mpz(1) << (bits - 1)) | 1


def random_prime(bits: int) -> mpz:
    """A random prime of exactly ``bits`` bits."""
    while True:
        p = gmpy2.next_prime(random_odd(bits))
        if p.bit_length() == bits:
            return mpz(p)


def random_safe_prime(bits: int) -> mpz:
    """A random safe prime p = 2p' + 1 of exactly ``bits`` bits (p' prime too)."""
    if bits < 16:
        raise ValueError(f"safe prime size must be at least 16 bits, got {bits}")
    half_bits = bits - 1
    limit = 1 << max(half_bits - 1, 2)
    primes = _PRIMES[_PRIMES < limit]
    bad_for_p = (primes - 1) // 2  # p' = (r-1)/2 mod r  <=>  r divides 2p'+1
    while True:
        start = random_odd(half_bits)
        residues = np.array([int(start % int(r)) for r in primes], dtype=np.int64)
        for step in range(0, 1 << 16, 2):
            res = (residues + step) % primes
            if np.any(res == 0) or np.any(res == bad_for_p):
                continue
            q = start + step
            if q.bit_length() != half_bits:
                break
            p = 2 * q + 1
            # Fermat base 2 on p first: far cheaper than Miller-Rabin on both and rejects almost all.
            if gmpy2.powmod(2, p - 1, p) != 1:
                continue
            if gmpy2.is_prime(q, 30) and gmpy2.is_prime(p, 30):
                return mpz(p)
