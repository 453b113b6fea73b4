"""Paillier over gmpy2 with g = n + 1 and Damgard-Jurik-Nielsen short-exponent randomness.

Encryption:  c = (1 + m*n) * r_n  mod n^2,   where r_n is an n-th power mod n^2.

Plain Paillier takes r_n = r^n (a 2048-bit exponent: ~10 ms here). DJN instead publishes h_s = h^n mod n^2
with h = -x^2 mod n and takes r_n = h_s^a for a short random a (448 bits). h_s^a is still an n-th power,
so every ciphertext is an ordinary Paillier ciphertext (python-paillier decrypts it), and with a fixed-base
table (:mod:`blockdeepnet.crypto.randomness`) h_s^a costs ~56 modular multiplications instead of ~3000.

Decryption with the full key uses CRT (used by tests and single-key tools; a fleet uses
:mod:`blockdeepnet.crypto.threshold`).
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import gmpy2
from gmpy2 import mpz

from blockdeepnet.crypto.primes import random_prime

MIN_KEY_BITS = 2048
"""Production floor. Tests pass ``allow_insecure=True`` to use 512-bit keys and stay fast."""

DJN_EXPONENT_BITS = 448


class CiphertextRangeError(ValueError):
    """A ciphertext is not an element of Z*_{n^2}: outside 0 < c < n^2 or sharing a factor with n."""


class KeyMismatchError(ValueError):
    """Material made for one public key was used with another."""


def _check_key_bits(bits: int, allow_insecure: bool) -> None:
    if bits % 2:
        raise ValueError(f"key size must be even, got {bits}")
    if bits < MIN_KEY_BITS and not allow_insecure:
        raise ValueError(f"key size {bits} bits is below the {MIN_KEY_BITS}-bit minimum")
    if bits < 256:
        raise ValueError(f"key size {bits} bits is too small even for tests (minimum 256)")


def _l_function(u: mpz, n: mpz) -> mpz:
    return (u - 1) // n


@dataclass(frozen=True, eq=False)
class PublicKey:
    """Paillier public key: modulus ``n`` (g = n + 1) and the DJN base ``hs`` = h^n mod n^2."""

    n: mpz
    hs: mpz
    nsquare: mpz = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "n", mpz(self.n))
        object.__setattr__(self, "hs", mpz(self.hs))
        object.__setattr__(self, "nsquare", self.n * self.n)
        if self.n < 3 or self.n % 2 == 0:
            raise ValueError("Paillier modulus must be an odd integer > 2")
        if not 0 < self.hs < self.nsquare or gmpy2.gcd(self.hs, self.n) != 1:
            raise ValueError("DJN base hs must be a unit mod n^2")

    @classmethod
    def from_modulus(cls, n: int | mpz) -> PublicKey:
        """A public key for ``n`` with a fresh DJN base (h = -x^2 mod n for random x)."""
        n = mpz(n)
        while True:
            x = mpz(secrets.randbelow(int(n) - 2) + 2)
            if gmpy2.gcd(x, n) == 1:
                break
        h = (-x * x) % n
        return cls(n=n, hs=gmpy2.powmod(h, n, n * n))

    @property
    def bits(self) -> int:
        return int(self.n.bit_length())

    @property
    def ciphertext_bytes(self) -> int:
        """Fixed width of a serialized ciphertext (big-endian)."""
        return (int(self.nsquare.bit_length()) + 7) // 8

    @property
    def fingerprint(self) -> str:
        """Short stable identifier, safe to log (derived from public values only)."""
        return hashlib.sha256(self.to_bytes()).hexdigest()[:16]

    def to_bytes(self) -> bytes:
        nb = (self.bits + 7) // 8
        return int(self.n).to_bytes(nb, "big") + int(self.hs).to_bytes(2 * nb, "big")

    def to_dict(self) -> dict[str, Any]:
        return {"n": format(int(self.n), "x"), "hs": format(int(self.hs), "x")}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PublicKey:
        try:
            return cls(n=mpz(data["n"], 16), hs=mpz(data["hs"], 16))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"malformed Paillier public key: {exc}") from exc

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PublicKey) and self.n == other.n and self.hs == other.hs

    def __hash__(self) -> int:
        return hash((int(self.n), int(self.hs)))

    def __repr__(self) -> str:
        return f"PublicKey(bits={self.bits}, fingerprint={self.fingerprint})"

    # --- randomness and encryption -------------------------------------------------------------

    def random_exponent(self) -> mpz:
        return mpz(secrets.randbits(DJN_EXPONENT_BITS))

    def fresh_randomness(self) -> mpz:
        """One n-th power r_n = hs^a mod n^2 computed on the spot (slow path, no table)."""
        return gmpy2.powmod(self.hs, self.random_exponent(), self.nsquare)

    def encrypt_with(self, m: int | mpz, r_n: mpz) -> mpz:
        """Encrypt 0 <= m < n with a caller-supplied n-th power ``r_n`` (which must never be reused)."""
        m = mpz(m)
        if not 0 <= m < self.n:
            raise ValueError("plaintext out of range [0, n)")
        n = self.n
        return (r_n + n * (m * (r_n % n) % n)) % self.nsquare

    def encrypt(self, m: int | mpz) -> mpz:
        return self.encrypt_with(m, self.fresh_randomness())

    # --- validation and homomorphic operations --------------------------------------------------

    def check_ciphertext(self, c: int | mpz) -> mpz:
        """Return ``c`` as mpz if it is in Z*_{n^2}; raise :class:`CiphertextRangeError` otherwise."""
        c = mpz(c)
        if not 0 < c < self.nsquare:
            raise CiphertextRangeError("ciphertext outside 0 < c < n^2")
        if gmpy2.gcd(c, self.n) != 1:
            raise CiphertextRangeError("ciphertext shares a factor with n")
        return c

    def check_ciphertexts(self, cs: Sequence[int | mpz]) -> list[mpz]:
        """Range-check a whole vector. The unit test is batched: if some c_i shares a prime with n then so
        does the product of all c_i mod n, so one gcd replaces len(cs) of them."""
        out: list[mpz] = []
        prod = mpz(1)
        for i, c in enumerate(cs):
            c = mpz(c)
            if not 0 < c < self.nsquare:
                raise CiphertextRangeError(f"ciphertext {i} outside 0 < c < n^2")
            prod = prod * c % self.n
            out.append(c)
        if gmpy2.gcd(prod, self.n) != 1:
            bad = next(i for i, c in enumerate(out) if gmpy2.gcd(c, self.n) != 1)
            raise CiphertextRangeError(f"ciphertext {bad} shares a factor with n")
        return out

    def add(self, c1: mpz, c2: mpz) -> mpz:
        return c1 * c2 % self.nsquare

    def mul_const(self, c: mpz, k: int) -> mpz:
        return gmpy2.powmod(c, k, self.nsquare)

    # --- wire format ----------------------------------------------------------------------------

    def ciphertexts_to_bytes(self, cs: Iterable[mpz]) -> bytes:
        width = self.ciphertext_bytes
        return b"".join(int(c).to_bytes(width, "big") for c in cs)

    def ciphertexts_from_bytes(self, data: bytes, count: int | None = None) -> list[mpz]:
        """Parse fixed-width ciphertexts and range-check each one; never trusts the input."""
        width = self.ciphertext_bytes
        if len(data) % width:
            raise CiphertextRangeError(f"ciphertext blob length {len(data)} is not a multiple of {width}")
        if count is not None and len(data) != count * width:
            raise CiphertextRangeError(f"expected {count} ciphertexts, got {len(data) // width}")
        return self.check_ciphertexts(
            [mpz(int.from_bytes(data[i : i + width], "big")) for i in range(0, len(data), width)]
        )


class PrivateKey:
    """Full Paillier secret key (p, q). Used where no threshold sharing applies; never printed."""

    __slots__ = ("_hp", "_hq", "_p", "_psquare", "_q", "_qinv", "_qsquare", "public_key")

    def __init__(self, public_key: PublicKey, p: int | mpz, q: int | mpz) -> None:
        p, q = mpz(p), mpz(q)
        if p * q != public_key.n:
            raise KeyMismatchError("p * q does not equal the public modulus")
        if p == q or not (gmpy2.is_prime(p) and gmpy2.is_prime(q)):
            raise ValueError("p and q must be two distinct primes")
        self.public_key = public_key
        self._p, self._q = p, q
        self._psquare, self._qsquare = p * p, q * q
        self._qinv = gmpy2.invert(q, p)
        n = public_key.n
        g = n + 1
        self._hp = gmpy2.invert(_l_function(gmpy2.powmod(g, p - 1, self._psquare), p), p)
        self._hq = gmpy2.invert(_l_function(gmpy2.powmod(g, q - 1, self._qsquare), q), q)

    def decrypt(self, c: int | mpz) -> mpz:
        c = self.public_key.check_ciphertext(c)
        mp = _l_function(gmpy2.powmod(c, self._p - 1, self._psquare), self._p) * self._hp % self._p
        mq = _l_function(gmpy2.powmod(c, self._q - 1, self._qsquare), self._q) * self._hq % self._q
        u = (mp - mq) * self._qinv % self._p
        return mq + u * self._q

    def to_dict(self) -> dict[str, Any]:
        """Secret material: callers must store it encrypted or mode 0600, never log it."""
        return {
            "public": self.public_key.to_dict(),
            "p": format(int(self._p), "x"),
            "q": format(int(self._q), "x"),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PrivateKey:
        try:
            return cls(PublicKey.from_dict(data["public"]), mpz(data["p"], 16), mpz(data["q"], 16))
        except (KeyError, TypeError) as exc:
            raise ValueError(f"malformed Paillier private key: missing {exc}") from exc

    def __repr__(self) -> str:
        return f"PrivateKey(public={self.public_key!r}, <secret>)"


def generate_keypair(
    bits: int = MIN_KEY_BITS, *, allow_insecure: bool = False
) -> tuple[PublicKey, PrivateKey]:
    """A Paillier key pair with an n of exactly ``bits`` bits."""
    _check_key_bits(bits, allow_insecure)
    while True:
        p, q = random_prime(bits // 2), random_prime(bits // 2)
        n = p * q
        if p != q and n.bit_length() == bits:
            break
    pub = PublicKey.from_modulus(n)
    return pub, PrivateKey(pub, p, q)


# --- python-paillier interoperability -----------------------------------------------------------


def to_phe_public(pub: PublicKey) -> Any:
    from phe import paillier as phe_paillier

    return phe_paillier.PaillierPublicKey(int(pub.n))


def to_phe_private(priv: PrivateKey) -> Any:
    from phe import paillier as phe_paillier

    return phe_paillier.PaillierPrivateKey(to_phe_public(priv.public_key), int(priv._p), int(priv._q))


def from_phe_public(phe_pub: Any) -> PublicKey:
    """Our key for a phe key. phe has no DJN base, so a fresh one is drawn (any valid hs will do)."""
    return PublicKey.from_modulus(phe_pub.n)


def from_phe_private(phe_priv: Any) -> PrivateKey:
    pub = from_phe_public(phe_priv.public_key)
    return PrivateKey(pub, phe_priv.p, phe_priv.q)
