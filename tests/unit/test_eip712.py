"""EIP-712 update signing: our hand-rolled encoding must agree with eth-account's generic one and with a pinned
known-answer vector, and recovery must refuse everything the contract's ecrecover check refuses."""

from __future__ import annotations

from contextlib import suppress
from typing import Any

import pytest
from eth_account import Account
from eth_account.messages import SignableMessage, encode_typed_data
from eth_keys.datatypes import Signature
from eth_utils.crypto import keccak

from blockdeepnet.eip712 import (
    DOMAIN_TYPEHASH,
    SECP256K1_N,
    UPDATE_TYPEHASH,
    Domain,
    SignatureError,
    UpdateClaim,
    domain_separator,
    new_device_key,
    payload_hash,
    recover_signer,
    sign_update,
    update_digest,
    verify_update,
)

KEY = bytes([1]) * 32
KEY_ADDRESS = "0x1a642f0E3c3aF545E7AcBD38b07251B3990914F1"
CONTRACT = "0xABaBaBaBABabABabAbAbABAbABabababaBaBABaB"  # "0x" + "ab" * 20, checksummed
OTHER_CONTRACT = "0x" + "cd" * 20
UINT64_MAX = 2**64 - 1


@pytest.fixture
def domain() -> Domain:
    return Domain(chain_id=1337, verifying_contract=CONTRACT)


@pytest.fixture
def claim() -> UpdateClaim:
    return UpdateClaim(
        round=7, payload_hash=payload_hash(b"blockdeepnet update"), samples=600, compute_ms=1234
    )


def _full_message(domain: Domain, claim: UpdateClaim) -> dict[str, Any]:
    """The typed data written out independently from the spec, for eth-account's generic encoder."""
    return {
        "types": {
            "EIP712Domain": [
                {"name": "name", "type": "string"},
                {"name": "version", "type": "string"},
                {"name": "chainId", "type": "uint256"},
                {"name": "verifyingContract", "type": "address"},
            ],
            "Update": [
                {"name": "round", "type": "uint64"},
                {"name": "payloadHash", "type": "bytes32"},
                {"name": "samples", "type": "uint64"},
                {"name": "computeMs", "type": "uint64"},
            ],
        },
        "primaryType": "Update",
        "domain": {
            "name": "BlockDeepNet",
            "version": "1",
            "chainId": domain.chain_id,
            "verifyingContract": domain.verifying_contract,
        },
        "message": {
            "round": claim.round,
            "payloadHash": claim.payload_hash,
            "samples": claim.samples,
            "computeMs": claim.compute_ms,
        },
    }


def _eip191_digest(message: SignableMessage) -> bytes:
    return keccak(b"\x19" + message.version + message.header + message.body)


def _parts(signature: bytes) -> tuple[int, int, int]:
    return int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:64], "big"), signature[64]


def _join(r: int, s: int, v: int) -> bytes:
    return r.to_bytes(32, "big") + s.to_bytes(32, "big") + bytes([v])


# --- known answer -------------------------------------------------------------------------------------------


def test_type_hashes_are_the_spec_strings() -> None:
    assert DOMAIN_TYPEHASH == keccak(
        text="EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)"
    )
    assert UPDATE_TYPEHASH == keccak(
        text="Update(uint64 round,bytes32 payloadHash,uint64 samples,uint64 computeMs)"
    )
    # Pinned so the Solidity constants can be compared by eye.
    assert DOMAIN_TYPEHASH.hex() == "8b73c3c69bb8fe3d512ecc4cf759cc79239f7b179b0ffacaa9a75d522b39400f"
    assert UPDATE_TYPEHASH.hex() == "fc0e554a6a33a899435d9a41b0411bdc053f9e30f3641b9df74213395a474751"


def test_known_answer_vector(domain: Domain, claim: UpdateClaim) -> None:
    """Computed once and pinned: any change to the encoding, however small, fails here."""
    assert claim.payload_hash.hex() == "5c39c40825811cddbf194415e7acb87f9b10ec02a86875b72edf67bfa1945d6c"
    assert (
        domain_separator(domain).hex() == "68972c258f94ec07aa70a498bce2193312d01bb7c8e1e4cd796c9f4d0d8abfd0"
    )
    assert (
        update_digest(domain, claim).hex()
        == "55b73e484ca5e0ae5ce364f7776dcd315921661df189a26ab1f7acc1508ce933"
    )
    signature = sign_update(KEY, domain, claim)
    # RFC 6979 signing is deterministic, so the signature itself can be pinned.
    assert signature.hex() == (
        "452aa98753b7cce437fb72acbfbf91d32f78d59623379533baa566788ac2b380"
        "5ba21da3752fff4a2ad9420a771b3f37195ee99c5f705e51b86447b63721498a1c"
    )
    assert recover_signer(domain, claim, signature) == KEY_ADDRESS


# --- cross-check against eth-account ------------------------------------------------------------------------

CLAIMS = [
    UpdateClaim(round=0, payload_hash=bytes(32), samples=1, compute_ms=0),
    UpdateClaim(round=1, payload_hash=payload_hash(b""), samples=60_000, compute_ms=1),
    UpdateClaim(round=UINT64_MAX, payload_hash=b"\xff" * 32, samples=UINT64_MAX, compute_ms=UINT64_MAX),
    UpdateClaim(round=123_456, payload_hash=payload_hash(b"\x00" * 4096), samples=17, compute_ms=98_765),
]
DOMAINS = [
    Domain(chain_id=1, verifying_contract=CONTRACT),
    Domain(chain_id=1337, verifying_contract=OTHER_CONTRACT),
    Domain(chain_id=31337, verifying_contract="0x5FbDB2315678afecb367f032d93F642f64180aa3"),
    Domain(chain_id=2**256 - 1, verifying_contract="0x" + "ff" * 20),
]


@pytest.mark.parametrize("domain", DOMAINS, ids=lambda d: f"chain{d.chain_id % 100_000}")
@pytest.mark.parametrize("claim", CLAIMS, ids=lambda c: f"round{c.round % 1_000_000}")
def test_digest_matches_eth_account(domain: Domain, claim: UpdateClaim) -> None:
    message = encode_typed_data(full_message=_full_message(domain, claim))
    assert message.header == domain_separator(domain)
    assert update_digest(domain, claim) == _eip191_digest(message)


@pytest.mark.parametrize("claim", CLAIMS[:2])
def test_signature_matches_eth_account_sign_typed_data(domain: Domain, claim: UpdateClaim) -> None:
    expected = Account.sign_typed_data(KEY, full_message=_full_message(domain, claim)).signature
    assert sign_update(KEY, domain, claim) == bytes(expected)


# --- round trip and binding ---------------------------------------------------------------------------------


def test_round_trip(domain: Domain, claim: UpdateClaim) -> None:
    private_key, address = new_device_key()
    signature = sign_update(private_key, domain, claim)
    assert len(signature) == 65 and signature[64] in (27, 28)
    assert recover_signer(domain, claim, signature) == address
    assert verify_update(domain, claim, signature, address)
    assert verify_update(domain, claim, signature, address.lower())  # any valid spelling of the address
    message = encode_typed_data(full_message=_full_message(domain, claim))
    assert Account.recover_message(message, signature=signature) == address


def test_signatures_are_low_s(domain: Domain) -> None:
    for i in range(32):
        claim = UpdateClaim(round=i, payload_hash=payload_hash(bytes([i])), samples=i + 1, compute_ms=i)
        _, s, _ = _parts(sign_update(KEY, domain, claim))
        assert 0 < s <= SECP256K1_N // 2


@pytest.mark.parametrize(
    ("other_domain", "other_claim"),
    [
        (None, {"round": 8}),
        (None, {"payload_hash": payload_hash(b"another payload")}),
        (None, {"samples": 601}),
        (None, {"compute_ms": 1235}),
        ({"chain_id": 1338}, None),
        ({"verifying_contract": OTHER_CONTRACT}, None),
    ],
    ids=["round", "payload", "samples", "compute_ms", "chain", "contract"],
)
def test_signature_is_bound_to_every_field(
    domain: Domain,
    claim: UpdateClaim,
    other_domain: dict[str, Any] | None,
    other_claim: dict[str, Any] | None,
) -> None:
    signature = sign_update(KEY, domain, claim)
    d2 = Domain(
        **{
            "chain_id": domain.chain_id,
            "verifying_contract": domain.verifying_contract,
            **(other_domain or {}),
        }
    )
    c2 = UpdateClaim(
        **{
            "round": claim.round,
            "payload_hash": claim.payload_hash,
            "samples": claim.samples,
            "compute_ms": claim.compute_ms,
            **(other_claim or {}),
        }
    )
    assert update_digest(d2, c2) != update_digest(domain, claim)
    assert recover_signer(d2, c2, signature) != KEY_ADDRESS
    assert not verify_update(d2, c2, signature, KEY_ADDRESS)


def test_other_key_does_not_verify(domain: Domain, claim: UpdateClaim) -> None:
    private_key, address = new_device_key()
    signature = sign_update(private_key, domain, claim)
    assert verify_update(domain, claim, signature, address)
    assert not verify_update(domain, claim, signature, KEY_ADDRESS)


@pytest.mark.parametrize("index", [0, 13, 31, 32, 50, 63])
def test_tampered_signature_does_not_verify(domain: Domain, claim: UpdateClaim, index: int) -> None:
    signature = bytearray(sign_update(KEY, domain, claim))
    signature[index] ^= 0x01
    tampered = bytes(signature)
    assert not verify_update(domain, claim, tampered, KEY_ADDRESS)
    with suppress(SignatureError):  # also fine: e.g. r no longer an x-coordinate on the curve
        assert recover_signer(domain, claim, tampered) != KEY_ADDRESS


def test_flipped_v_recovers_another_address(domain: Domain, claim: UpdateClaim) -> None:
    r, s, v = _parts(sign_update(KEY, domain, claim))
    flipped = _join(r, s, 55 - v)
    assert recover_signer(domain, claim, flipped) != KEY_ADDRESS
    assert not verify_update(domain, claim, flipped, KEY_ADDRESS)


# --- non-canonical and malformed signatures -----------------------------------------------------------------


def test_high_s_twin_is_rejected(domain: Domain, claim: UpdateClaim) -> None:
    r, s, v = _parts(sign_update(KEY, domain, claim))
    high_s, high_v = SECP256K1_N - s, 55 - v
    # The twin is a mathematically valid signature by the same key (that is the malleability) ...
    twin = Signature(vrs=(high_v - 27, r, high_s))
    assert (
        twin.recover_public_key_from_msg_hash(update_digest(domain, claim)).to_checksum_address()
        == KEY_ADDRESS
    )
    # ... but the contract refuses it, and so must we.
    malleated = _join(r, high_s, high_v)
    with pytest.raises(SignatureError, match="high-s"):
        recover_signer(domain, claim, malleated)
    assert not verify_update(domain, claim, malleated, KEY_ADDRESS)


@pytest.mark.parametrize("length", [0, 1, 64, 66, 130])
def test_bad_length_is_rejected(domain: Domain, claim: UpdateClaim, length: int) -> None:
    with pytest.raises(SignatureError, match="65 bytes"):
        recover_signer(domain, claim, b"\x01" * length)
    assert not verify_update(domain, claim, b"\x01" * length, KEY_ADDRESS)


@pytest.mark.parametrize("v", [0, 1, 26, 29, 35, 36, 255])
def test_bad_v_is_rejected(domain: Domain, claim: UpdateClaim, v: int) -> None:
    r, s, _ = _parts(sign_update(KEY, domain, claim))
    with pytest.raises(SignatureError, match="v must be 27 or 28"):
        recover_signer(domain, claim, _join(r, s, v))


@pytest.mark.parametrize(("r", "s"), [(0, 1), (1, 0), (0, 0)])
def test_zero_r_or_s_is_rejected(domain: Domain, claim: UpdateClaim, r: int, s: int) -> None:
    with pytest.raises(SignatureError, match="non-zero"):
        recover_signer(domain, claim, _join(r, s, 27))


def test_r_not_below_n_is_rejected(domain: Domain, claim: UpdateClaim) -> None:
    _, s, v = _parts(sign_update(KEY, domain, claim))
    with pytest.raises(SignatureError, match="group order"):
        recover_signer(domain, claim, _join(SECP256K1_N, s, v))


def test_r_off_the_curve_is_rejected(domain: Domain, claim: UpdateClaim) -> None:
    # x = 5: 5^3 + 7 = 132 is a quadratic non-residue mod p, so no curve point has this x-coordinate.
    _, s, v = _parts(sign_update(KEY, domain, claim))
    with pytest.raises(SignatureError, match="does not recover"):
        recover_signer(domain, claim, _join(5, s, v))


def test_signature_must_be_bytes(domain: Domain, claim: UpdateClaim) -> None:
    with pytest.raises(SignatureError, match="must be bytes"):
        recover_signer(domain, claim, "0x" + "00" * 65)  # type: ignore[arg-type]


def test_verify_update_rejects_malformed_expected_address(domain: Domain, claim: UpdateClaim) -> None:
    signature = sign_update(KEY, domain, claim)
    with pytest.raises(ValueError, match="expected_address"):
        verify_update(domain, claim, signature, "0x1234")


# --- UpdateClaim and Domain validation ----------------------------------------------------------------------

GOOD_CLAIM: dict[str, Any] = {"round": 1, "payload_hash": bytes(32), "samples": 1, "compute_ms": 0}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"round": -1}, r"round must be in \[0, 18446744073709551615\], got -1"),
        ({"round": 2**64}, "round must be in"),
        ({"round": True}, "round must be an int, got bool"),
        ({"round": 1.0}, "round must be an int, got float"),
        ({"samples": 0}, r"samples must be in \[1, "),
        ({"samples": 2**64}, "samples must be in"),
        ({"compute_ms": -5}, "compute_ms must be in"),
        ({"compute_ms": 2**64}, "compute_ms must be in"),
        ({"payload_hash": bytes(31)}, "payload_hash must be 32 bytes .*got 31"),
        ({"payload_hash": bytes(33)}, "payload_hash must be 32 bytes .*got 33"),
        ({"payload_hash": "00" * 32}, "payload_hash must be bytes, got str"),
    ],
)
def test_update_claim_validation(change: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        UpdateClaim(**{**GOOD_CLAIM, **change})


def test_update_claim_bounds_are_accepted() -> None:
    UpdateClaim(round=0, payload_hash=bytes(32), samples=1, compute_ms=0)
    UpdateClaim(round=UINT64_MAX, payload_hash=bytes(32), samples=UINT64_MAX, compute_ms=UINT64_MAX)


def test_update_claim_normalises_payload_hash_to_bytes() -> None:
    claim = UpdateClaim(round=1, payload_hash=bytearray(32), samples=1, compute_ms=0)  # type: ignore[arg-type]
    assert type(claim.payload_hash) is bytes
    assert claim == UpdateClaim(**GOOD_CLAIM)
    assert hash(claim) == hash(UpdateClaim(**GOOD_CLAIM))


def test_domain_checksums_the_contract_address() -> None:
    assert Domain(1, CONTRACT.lower()).verifying_contract == CONTRACT
    assert Domain(1, "0x" + CONTRACT[2:].upper()).verifying_contract == CONTRACT
    assert Domain(1, CONTRACT.lower()) == Domain(1, CONTRACT)


@pytest.mark.parametrize(
    ("chain_id", "address", "message"),
    [
        (0, CONTRACT, "chain_id must be in"),
        (-1, CONTRACT, "chain_id must be in"),
        (2**256, CONTRACT, "chain_id must be in"),
        (True, CONTRACT, "chain_id must be an int"),
        (1, "ab" * 20, "0x-prefixed 20-byte hex address"),
        (1, "0x" + "ab" * 19, "0x-prefixed 20-byte hex address"),
        (1, "0x" + "ab" * 21, "0x-prefixed 20-byte hex address"),
        (1, "0x" + "zz" * 20, "0x-prefixed 20-byte hex address"),
        (1, bytes(20), "0x-prefixed 20-byte hex address"),
        (1, CONTRACT[:-1] + "b", "invalid EIP-55 checksum"),
        (1, "0x" + "00" * 20, "zero address"),
    ],
)
def test_domain_validation(chain_id: Any, address: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Domain(chain_id=chain_id, verifying_contract=address)


# --- keys ---------------------------------------------------------------------------------------------------


def test_new_device_key() -> None:
    private_key, address = new_device_key()
    assert isinstance(private_key, bytes) and len(private_key) == 32
    assert 1 <= int.from_bytes(private_key, "big") < SECP256K1_N
    assert address == Account.from_key(private_key).address
    assert new_device_key()[0] != private_key


@pytest.mark.parametrize(
    ("private_key", "message"),
    [
        (bytes(31), "32 bytes, got 31"),
        (b"\x07" * 33, "32 bytes, got 33"),
        (bytes(32), "out of range"),
        (SECP256K1_N.to_bytes(32, "big"), "out of range"),
        ("07" * 32, "must be bytes, got str"),
    ],
)
def test_bad_private_key_is_rejected_without_echoing_it(
    domain: Domain, claim: UpdateClaim, private_key: Any, message: str
) -> None:
    with pytest.raises(ValueError, match=message) as info:
        sign_update(private_key, domain, claim)
    text = str(info.value)
    raw = private_key if isinstance(private_key, bytes) else bytes.fromhex(private_key)
    if any(raw):
        assert raw.hex() not in text.lower() and "07070707" not in text


def test_no_key_material_in_reprs(domain: Domain, claim: UpdateClaim) -> None:
    private_key, _ = new_device_key()
    sign_update(private_key, domain, claim)
    for obj in (domain, claim):
        assert private_key.hex() not in repr(obj) and private_key.hex() not in str(obj)


def test_payload_hash_is_keccak256() -> None:
    # keccak256("") — the well-known empty-input value (not SHA3-256's a7ffc6f8...).
    assert payload_hash(b"").hex() == "c5d2460186f7233c927e7db2dcc703c0e500b653ca82273b7bfad8045d85a470"
    assert payload_hash(b"abc") == keccak(b"abc")
