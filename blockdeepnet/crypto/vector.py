"""Encrypting and decrypting whole model updates: codec + Paillier + randomness in one place.

This is the path every device takes for every round, so it is written for the pool-warm case: one
multiplication per ciphertext once the randomness exists.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np
from gmpy2 import mpz

from blockdeepnet.crypto.codec import SlotLayout, decode, encode
from blockdeepnet.crypto.paillier import PublicKey


class RandomnessSource(Protocol):
    """Anything that hands out fresh n-th powers (a pool, or a table computing on the spot)."""

    def take_many(self, count: int) -> list[mpz]: ...


def encrypt_plaintexts(
    public_key: PublicKey, plaintexts: Sequence[mpz], randomness: RandomnessSource
) -> list[mpz]:
    factors = randomness.take_many(len(plaintexts))
    return [public_key.encrypt_with(m, r) for m, r in zip(plaintexts, factors, strict=True)]


def encrypt_update(
    layout: SlotLayout,
    public_key: PublicKey,
    randomness: RandomnessSource,
    values: np.ndarray,
    weight: float,
) -> list[mpz]:
    """Quantize, pack and encrypt one device's (weighted) update vector."""
    if layout.key_bits != public_key.bits:
        raise ValueError(
            f"layout is for {layout.key_bits}-bit keys, the fleet key has {public_key.bits} bits"
        )
    return encrypt_plaintexts(public_key, encode(layout, values, weight), randomness)


def decode_aggregate(
    layout: SlotLayout, plaintexts: Sequence[mpz], length: int, total_weight: float, count: int
) -> np.ndarray:
    """The weighted mean update from decrypted aggregate plaintexts (see :func:`codec.decode`)."""
    return decode(layout, plaintexts, length, total_weight, count)
