"""Device-side signing of model updates as EIP-712 typed data (secp256k1).

Why EIP-712: devices hold no gas and run no node. They sign a small, typed claim about their update; the
gateway relays it and the contract re-derives the same digest on chain and checks it with ``ecrecover``. Typed
data (rather than a bare hash) binds the signature to *this* contract on *this* chain (the domain), so a
signature cannot be replayed against another deployment, another chain or another round.

The encoding here must match the Solidity contract byte for byte:

- domain  ``EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)``,
  name ``"BlockDeepNet"``, version ``"1"``;
- message ``Update(uint64 round,bytes32 payloadHash,uint64 samples,uint64 computeMs)``;
- digest  ``keccak256(0x1901 || domainSeparator || structHash)``.

It is computed directly with ``keccak`` and ``abi.encode`` (few moving parts, easy to compare with the Solidity
source); the unit tests cross-check it against eth-account's generic ``encode_typed_data`` and pin a
known-answer vector so the encoding cannot drift silently.

Signatures are 65 bytes ``r || s || v`` with ``v`` in {27, 28} and low ``s`` (``s <= n/2``), which is what
eth-account produces and what OpenZeppelin-style ``ECDSA.recover`` accepts. :func:`recover_signer` applies the
same rules as the contract, so the gateway never relays a signature the contract would reject: a high-``s`` twin
of a valid signature would otherwise be a second valid encoding of the same claim (malleability).

Private keys are plain ``bytes`` handed in by the caller; nothing in this module stores one, and no error
message includes one.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from typing import Final

from eth_abi.abi import encode as abi_encode
from eth_account import Account
from eth_keys.datatypes import PrivateKey, Signature
from eth_keys.exceptions import BadSignature
from eth_utils.address import to_checksum_address
from eth_utils.crypto import keccak
from eth_utils.exceptions import ValidationError as EthValidationError

__all__ = [
    "DOMAIN_NAME",
    "DOMAIN_TYPE",
    "DOMAIN_TYPEHASH",
    "DOMAIN_VERSION",
    "SECP256K1_N",
    "SIGNATURE_LENGTH",
    "UPDATE_TYPE",
    "UPDATE_TYPEHASH",
    "Domain",
    "SignatureError",
    "UpdateClaim",
    "domain_separator",
    "new_device_key",
    "payload_hash",
    "recover_signer",
    "sign_update",
    "update_digest",
    "verify_update",
]

DOMAIN_NAME: Final = "BlockDeepNet"
DOMAIN_VERSION: Final = "1"
DOMAIN_TYPE: Final = "EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)"
UPDATE_TYPE: Final = "Update(uint64 round,bytes32 payloadHash,uint64 samples,uint64 computeMs)"
DOMAIN_TYPEHASH: Final[bytes] = keccak(text=DOMAIN_TYPE)
UPDATE_TYPEHASH: Final[bytes] = keccak(text=UPDATE_TYPE)
_NAME_HASH: Final[bytes] = keccak(text=DOMAIN_NAME)
_VERSION_HASH: Final[bytes] = keccak(text=DOMAIN_VERSION)

#: Order of the secp256k1 group; private keys and signature scalars live in [1, n).
SECP256K1_N: Final = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
#: Largest accepted ``s`` (EIP-2 / OpenZeppelin: ``s <= n // 2``).
_HALF_N: Final = SECP256K1_N // 2
SIGNATURE_LENGTH: Final = 65
_UINT64_MAX: Final = 2**64 - 1
_UINT256_MAX: Final = 2**256 - 1
_ADDRESS_RE: Final = re.compile(r"0x[0-9a-fA-F]{40}")
_ZERO_ADDRESS: Final = "0x" + "00" * 20


class SignatureError(ValueError):
    """A signature is malformed or outside the canonical form the contract accepts."""


def _check_int(name: str, value: object, low: int, high: int) -> int:
    # bool is an int subclass; True as a round number is always a bug, so refuse it.
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{name} must be an int, got {type(value).__name__}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be in [{low}, {high}], got {value}")
    return value


def _checksum_address(name: str, value: object) -> str:
    """Strict address parsing: 0x + 40 hex digits; mixed case must be a valid EIP-55 checksum.

    Mixed case with a wrong checksum means a mistyped address, so it is refused rather than normalised.
    """
    if not isinstance(value, str) or _ADDRESS_RE.fullmatch(value) is None:
        raise ValueError(f"{name} must be a 0x-prefixed 20-byte hex address, got {value!r}")
    checksummed = str(to_checksum_address(value))
    body = value[2:]
    if body != body.lower() and body != body.upper() and value != checksummed:
        raise ValueError(f"{name} has an invalid EIP-55 checksum: {value!r} (expected {checksummed})")
    return checksummed


@dataclass(frozen=True)
class UpdateClaim:
    """What a device asserts about one model update; the fields of the EIP-712 ``Update`` struct.

    ``payload_hash`` is :func:`payload_hash` of the exact update blob sent over MQTT, so the signature covers
    the ciphertexts without putting them on chain. ``samples`` weights the update in aggregation (Eq. 4) and
    drives the data reward, hence it must be positive; ``compute_ms`` is the device's reported training time.
    """

    round: int
    payload_hash: bytes
    samples: int
    compute_ms: int

    def __post_init__(self) -> None:
        _check_int("round", self.round, 0, _UINT64_MAX)
        _check_int("samples", self.samples, 1, _UINT64_MAX)
        _check_int("compute_ms", self.compute_ms, 0, _UINT64_MAX)
        if not isinstance(self.payload_hash, bytes | bytearray | memoryview):
            raise ValueError(f"payload_hash must be bytes, got {type(self.payload_hash).__name__}")
        digest = bytes(self.payload_hash)
        if len(digest) != 32:
            raise ValueError(f"payload_hash must be 32 bytes (keccak256), got {len(digest)}")
        # Normalise bytearray/HexBytes/memoryview to plain immutable bytes so equality and hashing behave.
        object.__setattr__(self, "payload_hash", digest)


@dataclass(frozen=True)
class Domain:
    """The EIP-712 domain: which chain and which contract a signature is valid for.

    Name and version are fixed by the contract, so only the deployment-specific parts are fields.
    ``verifying_contract`` is stored EIP-55 checksummed so two equal domains compare equal whatever the input case.
    """

    chain_id: int
    verifying_contract: str

    def __post_init__(self) -> None:
        # chainId 0 is not a real chain; a signature bound to it would be bound to nothing meaningful.
        _check_int("chain_id", self.chain_id, 1, _UINT256_MAX)
        address = _checksum_address("verifying_contract", self.verifying_contract)
        if address == _ZERO_ADDRESS:
            raise ValueError("verifying_contract must not be the zero address (no contract lives there)")
        object.__setattr__(self, "verifying_contract", address)


def domain_separator(domain: Domain) -> bytes:
    """``hashStruct(EIP712Domain)``; the contract computes the same value (usually once, in its constructor)."""
    return keccak(
        abi_encode(
            ["bytes32", "bytes32", "bytes32", "uint256", "address"],
            [DOMAIN_TYPEHASH, _NAME_HASH, _VERSION_HASH, domain.chain_id, domain.verifying_contract],
        )
    )


def _struct_hash(claim: UpdateClaim) -> bytes:
    return keccak(
        abi_encode(
            ["bytes32", "uint64", "bytes32", "uint64", "uint64"],
            [UPDATE_TYPEHASH, claim.round, claim.payload_hash, claim.samples, claim.compute_ms],
        )
    )


def update_digest(domain: Domain, claim: UpdateClaim) -> bytes:
    """The 32-byte EIP-712 digest ``keccak256(0x1901 || domainSeparator || structHash(Update))`` that is signed."""
    return keccak(b"\x19\x01" + domain_separator(domain) + _struct_hash(claim))


def payload_hash(payload: bytes) -> bytes:
    """keccak256 of the update payload as sent; this, not the payload, is what goes on chain."""
    return keccak(bytes(payload))


def _check_private_key(private_key: bytes) -> None:
    # Messages give lengths and ranges only: a private key must never end up in a log line.
    if not isinstance(private_key, bytes | bytearray):
        raise ValueError(f"private key must be bytes, got {type(private_key).__name__}")
    if len(private_key) != 32:
        raise ValueError(f"private key must be 32 bytes, got {len(private_key)}")
    if not 1 <= int.from_bytes(private_key, "big") < SECP256K1_N:
        raise ValueError("private key is out of range for secp256k1 (must be in [1, n))")


def sign_update(private_key: bytes, domain: Domain, claim: UpdateClaim) -> bytes:
    """Sign ``claim`` for ``domain``; returns 65 bytes ``r || s || v`` (v in {27, 28}, low s).

    Signing is deterministic (RFC 6979), so the same key, domain and claim always give the same bytes.
    """
    _check_private_key(private_key)
    signed = Account.unsafe_sign_hash(update_digest(domain, claim), bytes(private_key))
    signature = bytes(signed.signature)
    # eth-account already normalises; assert the contract's rules so a library change cannot slip past us.
    _split_signature(signature)
    return signature


def _split_signature(signature: bytes) -> tuple[int, int, int]:
    """Parse and validate ``r || s || v`` with the same rules as the contract; returns (v, r, s)."""
    if not isinstance(signature, bytes | bytearray | memoryview):
        raise SignatureError(f"signature must be bytes, got {type(signature).__name__}")
    raw = bytes(signature)
    if len(raw) != SIGNATURE_LENGTH:
        raise SignatureError(f"signature must be {SIGNATURE_LENGTH} bytes (r || s || v), got {len(raw)}")
    r = int.from_bytes(raw[0:32], "big")
    s = int.from_bytes(raw[32:64], "big")
    v = raw[64]
    if v not in (27, 28):
        raise SignatureError(f"signature v must be 27 or 28, got {v}")
    if r == 0 or s == 0:
        raise SignatureError("signature r and s must be non-zero")
    if r >= SECP256K1_N:
        raise SignatureError("signature r is not below the secp256k1 group order")
    if s > _HALF_N:
        raise SignatureError("signature s is in the upper half of the curve order (malleable high-s form)")
    return v, r, s


def recover_signer(domain: Domain, claim: UpdateClaim, signature: bytes) -> str:
    """The checksummed address whose key produced ``signature`` over ``claim`` in ``domain``.

    A valid-looking signature over *different* data recovers *some* other address, not an error; callers must
    compare against the registered device address (see :func:`verify_update`). Raises :class:`SignatureError`
    for signatures the contract's ``ecrecover`` check would refuse.
    """
    v, r, s = _split_signature(signature)
    try:
        sig = Signature(vrs=(v - 27, r, s))
        public_key = sig.recover_public_key_from_msg_hash(update_digest(domain, claim))
    except (BadSignature, EthValidationError) as exc:
        # e.g. r is not the x-coordinate of any curve point: ecrecover returns address(0) for these.
        raise SignatureError(f"signature does not recover to a public key: {exc}") from exc
    return str(public_key.to_checksum_address())


def verify_update(domain: Domain, claim: UpdateClaim, signature: bytes, expected_address: str) -> bool:
    """True iff ``signature`` is a canonical signature of ``claim`` in ``domain`` by ``expected_address``.

    A malformed or non-canonical signature is simply not valid (False); use :func:`recover_signer` to learn why.
    A malformed ``expected_address`` is a caller bug and raises ValueError.
    """
    expected = _checksum_address("expected_address", expected_address)
    try:
        return recover_signer(domain, claim, signature) == expected
    except SignatureError:
        return False


def new_device_key() -> tuple[bytes, str]:
    """A fresh device key from the OS CSPRNG: ``(private_key, checksummed_address)``.

    The address is the device's identity on the wire and on chain; the key must stay on the device.
    """
    while True:
        private_key = secrets.token_bytes(32)
        # Out of range with probability ~2^-128; loop rather than bias by reducing mod n.
        if 1 <= int.from_bytes(private_key, "big") < SECP256K1_N:
            break
    address = PrivateKey(private_key).public_key.to_checksum_address()
    return private_key, str(address)
