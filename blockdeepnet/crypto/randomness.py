"""Encryption randomness: a fixed-base table for DJN's h_s^a and a pool of precomputed factors.

Paillier's cost is the randomness, not the plaintext: c = (1 + m*n) * r_n mod n^2 is one multiplication once
r_n is known. So r_n = h_s^a is computed ahead of time (while a device idles) into a :class:`RandomnessPool`.

Fixed-base windowing: with a split into w-bit digits a = sum_i d_i 2^(w*i), h_s^a = prod_i T[i][d_i] where
T[i][d] = h_s^(d * 2^(w*i)). For a 448-bit a and w = 8 that is 56 multiplications (table: 56 x 256 entries of
|n^2| bits, ~7 MB at 2048-bit n) instead of ~670 for square-and-multiply.

Reuse of r_n would leak m1 - m2 from two ciphertexts, so the pool hands every entry out exactly once and, when
empty, computes a fresh one instead of recycling.
"""

from __future__ import annotations

import secrets
import threading
from collections import deque
from collections.abc import Callable

from gmpy2 import mpz

from blockdeepnet.crypto.paillier import DJN_EXPONENT_BITS, PublicKey


class FixedBaseTable:
    """Precomputed powers of the public key's DJN base ``hs`` for fast h_s^a."""

    def __init__(
        self, public_key: PublicKey, exponent_bits: int = DJN_EXPONENT_BITS, window: int = 8
    ) -> None:
        if not 1 <= window <= 12:
            raise ValueError(f"window must be 1..12 bits, got {window}")
        self.public_key = public_key
        self.exponent_bits = exponent_bits
        self.window = window
        self._mask = (1 << window) - 1
        n2 = public_key.nsquare
        self._rows: list[list[mpz]] = []
        base = public_key.hs
        for _ in range((exponent_bits + window - 1) // window):
            row = [mpz(1), base]
            for _ in range(2, 1 << window):
                row.append(row[-1] * base % n2)
            self._rows.append(row)
            base = row[-1] * base % n2  # base^(2^window)

    def power(self, a: int) -> mpz:
        """h_s^a mod n^2 for 0 <= a < 2^exponent_bits."""
        if not 0 <= a < (1 << self.exponent_bits):
            raise ValueError("exponent outside the table's range")
        n2 = self.public_key.nsquare
        acc = mpz(1)
        for row in self._rows:
            digit = a & self._mask
            if digit:
                acc = acc * row[digit] % n2
            a >>= self.window
        return acc

    def random_factor(self) -> mpz:
        """A fresh n-th power r_n = h_s^a with a uniformly random short exponent a."""
        return self.power(secrets.randbits(self.exponent_bits))


class RandomnessPool:
    """Single-use precomputed n-th powers for encryption.

    ``fill`` computes ahead of time; ``start_background_refill`` keeps the pool topped up from a daemon thread;
    ``take`` pops one entry, or computes a fresh one when the pool is empty (counted as a miss), never reuses.
    """

    def __init__(self, table: FixedBaseTable) -> None:
        self.table = table
        self.public_key = table.public_key
        self._entries: deque[mpz] = deque()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.hits = 0
        self.misses = 0

    @classmethod
    def for_key(cls, public_key: PublicKey) -> RandomnessPool:
        return cls(FixedBaseTable(public_key))

    def __len__(self) -> int:
        return len(self._entries)

    def fill(self, count: int, progress: Callable[[int], None] | None = None) -> None:
        """Add ``count`` fresh entries (``progress`` is called with the number added so far)."""
        if count < 0:
            raise ValueError("count must be >= 0")
        for i in range(count):
            value = self.table.random_factor()
            with self._lock:
                self._entries.append(value)
            if progress is not None and (i + 1) % 256 == 0:
                progress(i + 1)
        if progress is not None:
            progress(count)

    def take(self) -> mpz:
        with self._lock:
            if self._entries:
                self.hits += 1
                return self._entries.popleft()
            self.misses += 1
        return self.table.random_factor()

    def take_many(self, count: int) -> list[mpz]:
        return [self.take() for _ in range(count)]

    def start_background_refill(self, target: int) -> None:
        """Keep at least ``target`` entries ready, computed on a daemon thread while the owner idles."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()

        def run() -> None:
            while not self._stop.is_set():
                if len(self._entries) >= target:
                    self._stop.wait(0.05)
                    continue
                value = self.table.random_factor()
                with self._lock:
                    self._entries.append(value)

        self._thread = threading.Thread(target=run, name="bdn-randomness-pool", daemon=True)
        self._thread.start()

    def stop_background_refill(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None


class OnTheSpot:
    """A randomness source with no precomputation: every factor is computed when asked (cold encryption)."""

    def __init__(self, table: FixedBaseTable) -> None:
        self.table = table

    def take_many(self, count: int) -> list[mpz]:
        return [self.table.random_factor() for _ in range(count)]
