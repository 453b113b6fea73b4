"""Device enrollment: the one-time token, the device's proof of key possession, and the sealed bundle.

The flow (DESIGN §8, ``docs/enrollment.md``):

1. ``bdn provision enroll --device NAME`` issues an :class:`EnrollmentToken` (fleet, gateway URL and Ethereum
   address, the broker CA's SHA-256 fingerprint, the device name, the key share reserved for it, expiry, a
   random id) with an HMAC-SHA256 tag under the fleet's token key, and shows it as a QR code.
2. The device makes its own secp256k1 key and sends ``{token, address, samples, signature}`` to the gateway,
   where ``signature`` is an EIP-191 signature of :func:`possession_message`: it proves the device holds the
   key of ``address`` (the gateway recovers the public key from it, so no separate key field can disagree)
   and binds the token to that key, so a token copied in transit is useless without the device's key.
3. The gateway checks the tag (forged), expiry, single use, registers the address on chain and answers with a
   bundle (fleet.json, MQTT credentials, the CA, the key share) **encrypted to the device's public key**
   (ECDH on secp256k1, HKDF-SHA256, AES-256-GCM, the token id as associated data) and **signed by the gateway's
   Ethereum key**. The HTTP hop therefore needs no TLS for secrecy or authenticity: only the device can read
   the bundle, and the device accepts only one signed by the gateway address its token names.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
import re
import time
from dataclasses import asdict, dataclass
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from eth_account import Account
from eth_account.messages import encode_defunct
from eth_keys.datatypes import PrivateKey, Signature
from eth_keys.exceptions import BadSignature
from eth_utils.address import to_checksum_address
from eth_utils.crypto import keccak

TOKEN_PREFIX = "bdn-enroll-1:"
MAX_TOKEN_CHARS = 2048  # a token is ~400 characters; the QR code must stay scannable
MAX_REQUEST_BYTES = 8 * 1024
MAX_BUNDLE_BYTES = 256 * 1024  # fleet.json of a 2048-bit fleet with many devices + a share + the CA
_HKDF_INFO = b"bdn-enroll-bundle-v1"
_DEVICE_NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_TOKEN_ID_RE = re.compile(r"[0-9a-f]{32}")


class EnrollmentError(ValueError):
    """A token, request or bundle that cannot be used. ``code`` is a stable reason (for receipts and tests)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def _b64e(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def _b64d(text: str, what: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise EnrollmentError("malformed", f"{what} is not base64url") from None


@dataclass(frozen=True)
class EnrollmentToken:
    """What the QR code carries. Nothing in it is secret except ``mac`` (the token's proof of issue)."""

    fleet: str
    gateway_url: str
    gateway: str  # the gateway's Ethereum address: it signs the bundle
    ca_sha256: str  # hex SHA-256 of the fleet CA certificate (DER); the device pins the broker's CA to it
    device: str
    key_share: int  # the holder index reserved for this device; 0 = no share
    expires: int  # unix seconds
    token_id: str
    mac: str = ""

    def _payload(self) -> bytes:
        fields = asdict(self)
        fields.pop("mac")
        return json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()

    def tag(self, key: bytes) -> str:
        return hmac.new(key, self._payload(), hashlib.sha256).hexdigest()

    def verify_mac(self, key: bytes) -> bool:
        return hmac.compare_digest(self.tag(key), self.mac)

    def expired(self, now: float | None = None) -> bool:
        return (time.time() if now is None else now) >= self.expires

    def encode(self) -> str:
        return TOKEN_PREFIX + _b64e(json.dumps(asdict(self), sort_keys=True, separators=(",", ":")).encode())

    @classmethod
    def decode(cls, text: str) -> EnrollmentToken:
        """Parse a token (from a QR code or typed in); every malformed input is an EnrollmentError."""
        text = text.strip()
        if len(text) > MAX_TOKEN_CHARS:
            raise EnrollmentError("malformed", f"the token is {len(text)} characters, more than any we issue")
        if not text.startswith(TOKEN_PREFIX):
            raise EnrollmentError(
                "malformed",
                f"this is not a BlockDeepNet enrollment token (it must start with {TOKEN_PREFIX})",
            )
        payload = _b64d(text[len(TOKEN_PREFIX) :], "the token")
        try:
            raw = json.loads(payload)
        except (ValueError, RecursionError):  # not JSON, not UTF-8, an integer of > 4300 digits, too deep
            raise EnrollmentError("malformed", "the token's payload is not JSON") from None
        return cls.from_dict(raw)

    @classmethod
    def from_dict(cls, raw: Any) -> EnrollmentToken:
        types = {
            "fleet": str,
            "gateway_url": str,
            "gateway": str,
            "ca_sha256": str,
            "device": str,
            "key_share": int,
            "expires": int,
            "token_id": str,
            "mac": str,
        }
        if not isinstance(raw, dict) or set(raw) != set(types):
            raise EnrollmentError("malformed", "the token does not have the expected fields")
        for name, kind in types.items():
            if type(raw[name]) is not kind:
                raise EnrollmentError("malformed", f"token field {name} must be a {kind.__name__}")
        if not raw["gateway_url"].startswith(("http://", "https://")):
            raise EnrollmentError("malformed", "the token's gateway_url is not an http(s) URL")
        if not re.fullmatch(r"[0-9a-f]{64}", raw["ca_sha256"]) or not re.fullmatch(
            r"[0-9a-f]{64}", raw["mac"]
        ):
            raise EnrollmentError("malformed", "the token's CA fingerprint or tag is not 64 hex digits")
        if not _DEVICE_NAME_RE.fullmatch(raw["device"]) or not _TOKEN_ID_RE.fullmatch(raw["token_id"]):
            raise EnrollmentError("malformed", "the token's device name or id is malformed")
        if raw["key_share"] < 0:
            raise EnrollmentError("malformed", "the token's key_share is negative")
        try:
            raw["gateway"] = to_checksum_address(raw["gateway"])
        except ValueError:
            raise EnrollmentError("malformed", "the token's gateway is not an Ethereum address") from None
        return cls(**raw)


def issue_token(
    key: bytes,
    *,
    fleet: str,
    gateway_url: str,
    gateway: str,
    ca_sha256: str,
    device: str,
    key_share: int,
    ttl_s: int,
    now: float | None = None,
) -> EnrollmentToken:
    """A fresh token for ``device``, valid ``ttl_s`` seconds, tagged with the fleet's token key."""
    if not _DEVICE_NAME_RE.fullmatch(device):
        raise ValueError(f"device name {device!r} must be 1..64 of A-Z a-z 0-9 _ . -")
    if ttl_s <= 0:
        raise ValueError("the token's lifetime must be positive")
    token = EnrollmentToken(
        fleet=fleet,
        gateway_url=gateway_url,
        gateway=to_checksum_address(gateway),
        ca_sha256=ca_sha256,
        device=device,
        key_share=key_share,
        expires=int((time.time() if now is None else now) + ttl_s),
        token_id=os.urandom(16).hex(),
    )
    return EnrollmentToken(**{**asdict(token), "mac": token.tag(key)})


def ca_fingerprint(ca_pem: bytes) -> str:
    """Hex SHA-256 of a PEM certificate's DER form (what a token pins)."""
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(ca_pem)
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


# ------------------------------------------------------------------------------------ proof of possession


def possession_message(token: EnrollmentToken, address: str, samples: int) -> bytes:
    return b"bdn-enroll-v1|%s|%s|%s|%d" % (
        token.fleet.encode(),
        token.token_id.encode(),
        to_checksum_address(address).encode(),
        samples,
    )


@dataclass(frozen=True)
class EnrollRequest:
    token: str
    address: str
    samples: int
    signature: str  # 0x + 65 bytes hex, EIP-191 over possession_message

    def to_json(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    @classmethod
    def make(cls, token: EnrollmentToken, private_key: bytes, samples: int) -> EnrollRequest:
        account = Account.from_key(private_key)
        message = encode_defunct(possession_message(token, account.address, samples))
        signed = account.sign_message(message)
        return cls(token.encode(), account.address, samples, "0x" + bytes(signed.signature).hex())

    @classmethod
    def parse(cls, body: bytes) -> EnrollRequest:
        if len(body) > MAX_REQUEST_BYTES:
            raise EnrollmentError(
                "too_large", f"the request is {len(body)} bytes (limit {MAX_REQUEST_BYTES})"
            )
        try:
            raw = json.loads(body)
        except (ValueError, RecursionError):  # not JSON, not UTF-8, an integer of > 4300 digits, too deep
            raise EnrollmentError("malformed", "the request is not JSON") from None
        kinds = {"token": str, "address": str, "samples": int, "signature": str}
        if not isinstance(raw, dict) or set(raw) != set(kinds):
            raise EnrollmentError("malformed", f"the request needs exactly the fields {', '.join(kinds)}")
        for name, kind in kinds.items():
            if type(raw[name]) is not kind:
                raise EnrollmentError("malformed", f"request field {name} must be a {kind.__name__}")
        if not 1 <= raw["samples"] <= 10**9:
            raise EnrollmentError("malformed", "samples must be 1..10^9")
        return cls(**raw)

    def public_key(self, token: EnrollmentToken) -> bytes:
        """The device's 64-byte public key, recovered from the signature; it must belong to ``address``."""
        try:
            sig = bytes.fromhex(self.signature.removeprefix("0x"))
            address = to_checksum_address(self.address)
        except ValueError:
            raise EnrollmentError("bad_signature", "the signature or address is not hex") from None
        if len(sig) != 65:
            raise EnrollmentError("bad_signature", "the signature must be 65 bytes")
        v = sig[64] - 27 if sig[64] >= 27 else sig[64]
        digest = _defunct_hash(possession_message(token, address, self.samples))
        try:
            public = Signature(sig[:64] + bytes([v])).recover_public_key_from_msg_hash(digest)
        except (BadSignature, ValueError):
            raise EnrollmentError("bad_signature", "the proof of key possession does not verify") from None
        if public.to_checksum_address() != address:
            raise EnrollmentError("bad_signature", "the proof of key possession was made with another key")
        return bytes(public.to_bytes())


def _defunct_hash(message: bytes) -> bytes:
    """The EIP-191 ("Ethereum Signed Message") digest that ``sign_message(encode_defunct(message))`` signs."""
    return keccak(b"\x19Ethereum Signed Message:\n%d" % len(message) + message)


# -------------------------------------------------------------------------------------------- the bundle


def _bundle_key(shared: bytes, ephemeral: bytes) -> bytes:
    return HKDF(hashes.SHA256(), 32, salt=ephemeral, info=_HKDF_INFO).derive(shared)


def seal_bundle(
    contents: dict[str, Any], device_public: bytes, token_id: str, gateway_key: bytes
) -> dict[str, str]:
    """Encrypt ``contents`` (JSON) to the device's public key and sign the result with the gateway's key."""
    peer = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256K1(), b"\x04" + device_public)
    eph = ec.generate_private_key(ec.SECP256K1())
    eph_pub = eph.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    key = _bundle_key(eph.exchange(ec.ECDH(), peer), eph_pub)
    nonce = os.urandom(12)
    ciphertext = AESGCM(key).encrypt(nonce, json.dumps(contents).encode(), token_id.encode())
    blob = eph_pub + nonce + ciphertext
    signed = Account.from_key(gateway_key).sign_message(encode_defunct(_bundle_digest(blob, token_id)))
    return {"bundle": _b64e(blob), "signature": "0x" + bytes(signed.signature).hex()}


def _bundle_digest(blob: bytes, token_id: str) -> bytes:
    return hashlib.sha256(b"bdn-enroll-bundle|" + token_id.encode() + b"|" + blob).digest()


def open_bundle(response: Any, token: EnrollmentToken, device_private: bytes) -> dict[str, Any]:
    """Check the gateway's signature (against the address the token names) and decrypt the bundle."""
    if not isinstance(response, dict) or not isinstance(response.get("bundle"), str):
        raise EnrollmentError("malformed", "the gateway's answer holds no bundle")
    if len(response["bundle"]) > MAX_BUNDLE_BYTES * 2:
        raise EnrollmentError("too_large", "the gateway's bundle is too large")
    blob = _b64d(response["bundle"], "the bundle")
    signature = response.get("signature")
    if not isinstance(signature, str) or not re.fullmatch(r"(0x)?[0-9a-fA-F]{130}", signature):
        raise EnrollmentError("bad_signature", "the gateway's signature on the bundle is not 65 bytes of hex")
    try:
        signer = Account.recover_message(
            encode_defunct(_bundle_digest(blob, token.token_id)), signature=signature
        )
    except (ValueError, TypeError, BadSignature):
        raise EnrollmentError("bad_signature", "the gateway's signature on the bundle is malformed") from None
    if signer != token.gateway:
        raise EnrollmentError(
            "bad_signature",
            f"the bundle is signed by {signer}, not by the fleet's gateway {token.gateway}: refusing it",
        )
    if len(blob) < 65 + 12 + 16:
        raise EnrollmentError("malformed", "the bundle is truncated")
    eph_pub, nonce, ciphertext = blob[:65], blob[65:77], blob[77:]
    try:
        peer = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256K1(), eph_pub)
    except ValueError:
        raise EnrollmentError("malformed", "the bundle's ephemeral key is not a curve point") from None
    own = ec.derive_private_key(int.from_bytes(device_private, "big"), ec.SECP256K1())
    key = _bundle_key(own.exchange(ec.ECDH(), peer), eph_pub)
    try:
        plain = AESGCM(key).decrypt(nonce, ciphertext, token.token_id.encode())
    except InvalidTag:
        raise EnrollmentError("bad_bundle", "the bundle was not encrypted to this device's key") from None
    contents = json.loads(plain)
    if not isinstance(contents, dict):
        raise EnrollmentError("malformed", "the bundle's contents are not a JSON object")
    return contents


def device_address(private_key: bytes) -> str:
    return str(PrivateKey(private_key).public_key.to_checksum_address())
