"""Homomorphic aggregation of ciphertext vectors (Eq. 4 on ciphertexts).

E(a) * E(b) = E(a + b) and E(a)^k = E(k * a) mod n^2. Devices apply their Eq. 4 weight s_k / s before
encryption (see :mod:`blockdeepnet.crypto.codec`), so the gateway's weighted sum has multipliers of 1; integer
multipliers are supported for layouts that reserve the headroom for them. Every input ciphertext is
range-checked: a value outside Z*_{n^2} would otherwise poison the whole aggregate.
"""

from __future__ import annotations

from collections.abc import Sequence

from gmpy2 import mpz

from blockdeepnet.crypto.paillier import CiphertextRangeError, PublicKey


class Accumulator:
    """Folds encrypted vectors in one at a time, so closing a round costs the same for 5 or 50 devices."""

    def __init__(self, public_key: PublicKey, length: int, max_summands: int | None = None) -> None:
        if length < 1:
            raise ValueError("vector length must be >= 1")
        self.public_key = public_key
        self.length = length
        self.max_summands = max_summands
        self.summands = 0
        self.vectors = 0
        self._acc: list[mpz] | None = None

    def add(self, ciphertexts: Sequence[int | mpz], multiplier: int = 1, *, checked: bool = False) -> None:
        """Fold one vector in (after range-checking all of it: nothing is folded if any element is bad).

        ``checked=True`` skips the range check for a vector that already passed
        :meth:`PublicKey.check_ciphertexts` (the gateway checks every update once, on arrival; checking again
        here would cost a third of the fold)."""
        if len(ciphertexts) != self.length:
            raise CiphertextRangeError(f"expected {self.length} ciphertexts, got {len(ciphertexts)}")
        if multiplier < 1:
            raise ValueError("multiplier must be a positive integer")
        if self.max_summands is not None and self.summands + multiplier > self.max_summands:
            raise ValueError(f"aggregate would exceed {self.max_summands} summands, the layout's headroom")
        cs = list(ciphertexts) if checked else self.public_key.check_ciphertexts(ciphertexts)
        n2 = self.public_key.nsquare
        if multiplier != 1:
            cs = [self.public_key.mul_const(c, multiplier) for c in cs]
        if self._acc is None:
            self._acc = cs
        else:
            self._acc = [a * c % n2 for a, c in zip(self._acc, cs, strict=True)]
        self.summands += multiplier
        self.vectors += 1

    def result(self) -> list[mpz]:
        if self._acc is None:
            raise ValueError("no vectors were added")
        return list(self._acc)


def weighted_sum(
    public_key: PublicKey,
    vectors: Sequence[Sequence[int | mpz]],
    multipliers: Sequence[int] | None = None,
    max_summands: int | None = None,
) -> list[mpz]:
    """prod_k E(x_k)^{m_k} element-wise = E(sum_k m_k x_k)."""
    if not vectors:
        raise ValueError("no vectors to aggregate")
    if multipliers is not None and len(multipliers) != len(vectors):
        raise ValueError("one multiplier per vector is required")
    acc = Accumulator(public_key, len(vectors[0]), max_summands)
    for i, vec in enumerate(vectors):
        acc.add(vec, 1 if multipliers is None else multipliers[i])
    return acc.result()
