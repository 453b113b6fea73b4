"""Threshold Paillier, t of l, trusted dealer (Shoup / Damgard-Jurik with s = 1).

Dealing (then the dealer forgets p, q, m, d):
    n = p q with safe primes p = 2p'+1, q = 2q'+1;  m = p'q';  d = 0 mod m, d = 1 mod n
    f(X) = d + a_1 X + ... + a_{t-1} X^{t-1}  over Z_{n m};   share s_i = f(i)
    v a random square mod n^2;  verification key v_i = v^(Delta s_i),  Delta = l!

Partial decryption by holder i:        c_i = c^(2 Delta s_i) mod n^2
Combination over any set S of t holders:
    c' = prod_{i in S} c_i^(2 lambda_i),  lambda_i = Delta prod_{j in S, j != i} j / (j - i)   (integers)
    c' = c^(4 Delta^2 d) = 1 + 4 Delta^2 M n  =>  M = L(c') * (4 Delta^2)^-1 mod n

Correctness proof, batched: a proof per ciphertext would cost more than the decryption itself. Instead the
holder's partials are bound into a hash that yields 128-bit coefficients rho_j, and the holder proves (Chaum-
Pedersen, Fiat-Shamir) that log_{C^4}(D^2) = log_v(v_i) for C = prod c_j^rho_j and D = prod c_{i,j}^rho_j.
A single wrong c_{i,j} changes D by a factor of large order raised to an unpredictable rho_j, so the proof
fails except with probability ~2^-128, and the holder is named.
"""

from __future__ import annotations

import hashlib
import math
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import gmpy2
from gmpy2 import mpz

from blockdeepnet.crypto.multiexp import multi_pow
from blockdeepnet.crypto.paillier import MIN_KEY_BITS, CiphertextRangeError, PublicKey, _check_key_bits
from blockdeepnet.crypto.primes import random_safe_prime

CHALLENGE_BITS = 256
RHO_BITS = 128
ZK_SLACK_BITS = 128


class InvalidShareError(ValueError):
    """A partial decryption failed its proof; ``holder`` names the key holder who sent it."""

    def __init__(self, holder: int, reason: str) -> None:
        super().__init__(f"partial decryption from key holder {holder} is invalid: {reason}")
        self.holder = holder


class NotEnoughSharesError(ValueError):
    """Fewer than t valid partial decryptions are available."""

    def __init__(self, needed: int, valid: Sequence[int], invalid: Sequence[int]) -> None:
        super().__init__(
            f"need {needed} valid partial decryptions, have {len(valid)} (valid holders {list(valid)}, "
            f"rejected holders {list(invalid)})"
        )
        self.valid = list(valid)
        self.invalid = list(invalid)


def _hex(x: int | mpz) -> str:
    return format(int(x), "x")


def _unhex(s: Any) -> mpz:
    if not isinstance(s, str):
        raise ValueError("expected a hex string")
    return mpz(s, 16)


@dataclass(frozen=True, eq=False)
class ThresholdPublicKey:
    """Everything public about a dealt key: the Paillier key, t, l, and the holders' verification keys."""

    public_key: PublicKey
    threshold: int
    holders: int
    v: mpz
    verification_keys: tuple[mpz, ...]

    def __post_init__(self) -> None:
        if not 1 <= self.threshold <= self.holders:
            raise ValueError(f"threshold must satisfy 1 <= t <= l, got t={self.threshold}, l={self.holders}")
        if len(self.verification_keys) != self.holders:
            raise ValueError("one verification key per holder is required")

    @property
    def delta(self) -> int:
        return math.factorial(self.holders)

    @property
    def fingerprint(self) -> str:
        return self.public_key.fingerprint

    def verification_key(self, holder: int) -> mpz:
        if not 1 <= holder <= self.holders:
            raise ValueError(f"no key holder {holder} (holders are 1..{self.holders})")
        return self.verification_keys[holder - 1]

    def to_dict(self) -> dict[str, Any]:
        return {
            "public_key": self.public_key.to_dict(),
            "threshold": self.threshold,
            "holders": self.holders,
            "v": _hex(self.v),
            "verification_keys": [_hex(x) for x in self.verification_keys],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ThresholdPublicKey:
        try:
            return cls(
                public_key=PublicKey.from_dict(data["public_key"]),
                threshold=int(data["threshold"]),
                holders=int(data["holders"]),
                v=_unhex(data["v"]),
                verification_keys=tuple(_unhex(x) for x in data["verification_keys"]),
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"malformed threshold public key: {exc}") from exc

    def __repr__(self) -> str:
        return f"ThresholdPublicKey(t={self.threshold}, l={self.holders}, key={self.public_key!r})"


@dataclass(frozen=True)
class ShareProof:
    """Fiat-Shamir proof that a vector of partials used the holder's share (see module docstring)."""

    a: mpz
    b: mpz
    z: mpz


@dataclass(frozen=True)
class PartialDecryption:
    """Holder ``index``'s partial decryptions of a ciphertext vector, with one batch proof."""

    index: int
    values: tuple[mpz, ...]
    proof: ShareProof

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "values": [_hex(x) for x in self.values],
            "proof": {"a": _hex(self.proof.a), "b": _hex(self.proof.b), "z": _hex(self.proof.z)},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PartialDecryption:
        try:
            p = data["proof"]
            return cls(
                index=int(data["index"]),
                values=tuple(_unhex(x) for x in data["values"]),
                proof=ShareProof(_unhex(p["a"]), _unhex(p["b"]), _unhex(p["z"])),
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"malformed partial decryption: {exc}") from exc


def _transcript(
    tpk: ThresholdPublicKey, holder: int, context: bytes, ciphertexts: Sequence[mpz], partials: Sequence[mpz]
) -> bytes:
    pub = tpk.public_key
    h = hashlib.sha256()
    h.update(b"bdn/threshold-batch/v1")
    h.update(pub.to_bytes())
    h.update(holder.to_bytes(4, "big"))
    h.update(len(context).to_bytes(4, "big") + context)
    h.update(len(ciphertexts).to_bytes(4, "big"))
    h.update(pub.ciphertexts_to_bytes(ciphertexts))
    h.update(pub.ciphertexts_to_bytes(partials))
    return h.digest()


def _coefficients(transcript: bytes, count: int) -> list[int]:
    stream = hashlib.shake_256(b"rho" + transcript).digest(count * RHO_BITS // 8)
    width = RHO_BITS // 8
    return [int.from_bytes(stream[i * width : (i + 1) * width], "big") | 1 for i in range(count)]


def _challenge(transcript: bytes, *values: mpz) -> int:
    h = hashlib.sha256(b"challenge" + transcript)
    for x in values:
        raw = int(x).to_bytes((int(x).bit_length() + 7) // 8 or 1, "big")
        h.update(len(raw).to_bytes(4, "big") + raw)
    return int.from_bytes(h.digest(), "big")


def _combined(
    tpk: ThresholdPublicKey, holder: int, context: bytes, cs: Sequence[mpz], partials: Sequence[mpz]
) -> tuple[bytes, mpz, mpz]:
    transcript = _transcript(tpk, holder, context, cs, partials)
    rho = _coefficients(transcript, len(cs))
    n2 = tpk.public_key.nsquare
    big_c = multi_pow(cs, rho, n2)
    big_d = multi_pow(partials, rho, n2)
    return transcript, gmpy2.powmod(big_c, 4, n2), gmpy2.powmod(big_d, 2, n2)


class KeyShare:
    """Secret share s_i of key holder ``index``. Never printed; serialize only into sealed storage."""

    __slots__ = ("_secret", "index", "public")

    def __init__(self, public: ThresholdPublicKey, index: int, secret: int | mpz) -> None:
        public.verification_key(index)  # validates the index
        self.public = public
        self.index = index
        self._secret = mpz(secret)

    def partial_decrypt(self, ciphertexts: Sequence[int | mpz], context: bytes = b"") -> PartialDecryption:
        """c_j^(2 Delta s_i) for every ciphertext, plus the batch proof bound to ``context`` (e.g. round id)."""
        pub = self.public.public_key
        cs = pub.check_ciphertexts(ciphertexts)
        n2 = pub.nsquare
        exponent = 2 * self.public.delta * self._secret
        values = [gmpy2.powmod(c, exponent, n2) for c in cs]
        return PartialDecryption(self.index, tuple(values), self._prove(cs, values, context))

    def _prove(self, cs: Sequence[mpz], values: Sequence[mpz], context: bytes) -> ShareProof:
        tpk = self.public
        n2 = tpk.public_key.nsquare
        transcript, base_c, base_d = _combined(tpk, self.index, context, cs, values)
        witness = tpk.delta * self._secret
        r = mpz(secrets.randbits(int(witness.bit_length()) + CHALLENGE_BITS + ZK_SLACK_BITS))
        a = gmpy2.powmod(base_c, r, n2)
        b = gmpy2.powmod(tpk.v, r, n2)
        e = _challenge(transcript, base_c, base_d, a, b, tpk.v, tpk.verification_key(self.index))
        return ShareProof(a=a, b=b, z=r + e * witness)

    def to_dict(self) -> dict[str, Any]:
        """Secret material: callers seal it (TPM or encrypted keystore) and never log it."""
        return {"public": self.public.to_dict(), "index": self.index, "secret": _hex(self._secret)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> KeyShare:
        try:
            return cls(
                ThresholdPublicKey.from_dict(data["public"]), int(data["index"]), _unhex(data["secret"])
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"malformed key share: missing {exc}") from exc

    def __repr__(self) -> str:
        return f"KeyShare(index={self.index}, key={self.public.fingerprint}, <secret>)"


def verify_partial(
    tpk: ThresholdPublicKey, ciphertexts: Sequence[mpz], partial: PartialDecryption, context: bytes = b""
) -> None:
    """Raise :class:`InvalidShareError` unless ``partial`` is a correct decryption share of ``ciphertexts``."""
    holder = partial.index
    try:
        vk = tpk.verification_key(holder)
    except ValueError as exc:
        raise InvalidShareError(holder, str(exc)) from exc
    if len(partial.values) != len(ciphertexts):
        raise InvalidShareError(holder, f"{len(partial.values)} values for {len(ciphertexts)} ciphertexts")
    pub = tpk.public_key
    try:
        values = pub.check_ciphertexts(partial.values)
    except CiphertextRangeError as exc:
        raise InvalidShareError(holder, str(exc)) from exc
    n2 = pub.nsquare
    proof = partial.proof
    if not (0 < proof.a < n2 and 0 < proof.b < n2 and proof.z >= 0):
        raise InvalidShareError(holder, "proof values out of range")
    transcript, base_c, base_d = _combined(tpk, holder, context, ciphertexts, values)
    e = _challenge(transcript, base_c, base_d, proof.a, proof.b, tpk.v, vk)
    if gmpy2.powmod(base_c, proof.z, n2) != proof.a * gmpy2.powmod(base_d, e, n2) % n2:
        raise InvalidShareError(holder, "proof does not match the partials (wrong share or tampered values)")
    if gmpy2.powmod(tpk.v, proof.z, n2) != proof.b * gmpy2.powmod(vk, e, n2) % n2:
        raise InvalidShareError(holder, "proof does not match the holder's verification key")


def lagrange_coefficients(holders: Sequence[int], delta: int) -> dict[int, int]:
    """lambda_i = Delta * prod_{j != i} j / (j - i), an integer for every i in ``holders``."""
    out: dict[int, int] = {}
    for i in holders:
        num, den = delta, 1
        for j in holders:
            if j != i:
                num *= j
                den *= j - i
        if num % den:
            raise ArithmeticError("Lagrange coefficient is not an integer; Delta is wrong")
        out[i] = num // den
    return out


@dataclass(frozen=True)
class CombineResult:
    plaintexts: list[mpz]
    used: list[int]
    rejected: dict[int, str]


def combine(
    tpk: ThresholdPublicKey,
    ciphertexts: Sequence[int | mpz],
    partials: Iterable[PartialDecryption],
    context: bytes = b"",
    verify: bool = True,
) -> CombineResult:
    """Recover the plaintexts from t valid partials. Bad partials are skipped and named, not fatal, while t
    valid ones remain; otherwise :class:`NotEnoughSharesError`."""
    pub = tpk.public_key
    cs = pub.check_ciphertexts(ciphertexts)
    chosen: dict[int, PartialDecryption] = {}
    rejected: dict[int, str] = {}
    for partial in partials:
        if len(chosen) == tpk.threshold:
            break
        # A rejected index is not blacklisted: the transport may not authenticate partials, and a forged one
        # under holder i's index must not make holder i's genuine partial, arriving later, be ignored.
        if partial.index in chosen:
            continue
        if verify:
            try:
                verify_partial(tpk, cs, partial, context)
            except InvalidShareError as exc:
                rejected[partial.index] = str(exc)
                continue
        chosen[partial.index] = partial
    if len(chosen) < tpk.threshold:
        raise NotEnoughSharesError(tpk.threshold, sorted(chosen), sorted(rejected))
    lambdas = lagrange_coefficients(sorted(chosen), tpk.delta)
    n, n2 = pub.n, pub.nsquare
    inv = gmpy2.invert(4 * tpk.delta * tpk.delta, n)
    positive = [(chosen[i].values, 2 * lam) for i, lam in lambdas.items() if lam > 0]
    negative = [(chosen[i].values, -2 * lam) for i, lam in lambdas.items() if lam < 0]
    plaintexts: list[mpz] = []
    for j in range(len(cs)):
        num = mpz(1)
        for values, exp in positive:
            num = num * gmpy2.powmod(values[j], exp, n2) % n2
        if negative:
            den = mpz(1)
            for values, exp in negative:
                den = den * gmpy2.powmod(values[j], exp, n2) % n2
            num = num * gmpy2.invert(den, n2) % n2
        plaintexts.append((num - 1) // n * inv % n)
    return CombineResult(plaintexts, sorted(chosen), rejected)


def deal(
    threshold: int, holders: int, bits: int = MIN_KEY_BITS, *, allow_insecure: bool = False
) -> tuple[ThresholdPublicKey, list[KeyShare]]:
    """Generate a key and deal it into ``holders`` shares, any ``threshold`` of which decrypt.

    p, q, m and d exist only inside this call; only the shares and public values leave it.
    """
    if not 1 <= threshold <= holders:
        raise ValueError(f"threshold must satisfy 1 <= t <= l, got t={threshold}, l={holders}")
    if holders > 1000:
        raise ValueError("at most 1000 key holders are supported (Delta = l! grows fast)")
    _check_key_bits(bits, allow_insecure)
    while True:
        p = random_safe_prime(bits // 2)
        q = random_safe_prime(bits // 2)
        n = p * q
        if p != q and n.bit_length() == bits:
            break
    m = ((p - 1) // 2) * ((q - 1) // 2)
    nm = n * m
    d = m * gmpy2.invert(m, n)
    coeffs = [d] + [mpz(secrets.randbelow(int(nm))) for _ in range(threshold - 1)]
    n2 = n * n
    while True:
        r = mpz(secrets.randbelow(int(n2) - 2) + 2)
        if gmpy2.gcd(r, n) == 1:
            break
    v = r * r % n2
    delta = math.factorial(holders)
    secrets_: list[mpz] = []
    for i in range(1, holders + 1):
        acc = mpz(0)
        for a in reversed(coeffs):
            acc = (acc * i + a) % nm
        secrets_.append(acc)
    vks = tuple(gmpy2.powmod(v, delta * s, n2) for s in secrets_)
    tpk = ThresholdPublicKey(PublicKey.from_modulus(n), threshold, holders, v, vks)
    shares = [KeyShare(tpk, i + 1, s) for i, s in enumerate(secrets_)]
    del p, q, m, d, coeffs, secrets_
    return tpk, shares
