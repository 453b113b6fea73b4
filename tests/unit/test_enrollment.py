"""Enrollment tokens, the device's proof of key possession and the sealed bundle (blockdeepnet.enrollment)."""

from __future__ import annotations

import base64
import contextlib
import json
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import pytest
from eth_account import Account
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blockdeepnet.crypto.codec import SlotLayout
from blockdeepnet.crypto.threshold import deal
from blockdeepnet.enrollment import (
    MAX_REQUEST_BYTES,
    MAX_TOKEN_CHARS,
    TOKEN_PREFIX,
    EnrollmentError,
    EnrollmentToken,
    EnrollRequest,
    _b64e,
    _bundle_digest,
    ca_fingerprint,
    device_address,
    issue_token,
    open_bundle,
    possession_message,
    seal_bundle,
)
from blockdeepnet.fleet import ChainInfo, DeviceEntry, Fleet

KEY = bytes(range(32))
GATEWAY = Account.from_key(b"\x01" * 32)
DEVICE = Account.from_key(b"\x02" * 32)
OTHER = Account.from_key(b"\x03" * 32)
NOW = 1_700_000_000.0


def _token(**overrides: Any) -> EnrollmentToken:
    args: dict[str, Any] = {
        "fleet": "farm",
        "gateway_url": "http://10.0.0.1:8080",
        "gateway": GATEWAY.address,
        "ca_sha256": "ab" * 32,
        "device": "pi-7",
        "key_share": 2,
        "ttl_s": 3600,
        "now": NOW,
    }
    args.update(overrides)
    return issue_token(KEY, **args)


def _encoded(fields: Any) -> str:
    return TOKEN_PREFIX + _b64e(json.dumps(fields).encode())


# ------------------------------------------------------------------------------------------------ the token


def test_token_round_trips_and_verifies() -> None:
    token = _token()
    text = token.encode()
    assert text.startswith(TOKEN_PREFIX) and len(text) < 600  # small enough for a scannable QR code
    back = EnrollmentToken.decode(text)
    assert back == token
    assert back.verify_mac(KEY)
    assert back.expires == int(NOW) + 3600 and back.key_share == 2
    assert len(back.token_id) == 32 and back.token_id != _token().token_id  # fresh randomness each time
    # Whitespace around a pasted token is tolerated; the address is checksummed however it was written.
    assert EnrollmentToken.decode(f"  {text}\n") == token
    lower = _token(gateway=GATEWAY.address.lower())
    assert lower.gateway == GATEWAY.address and lower.verify_mac(KEY)


_CHANGES: dict[str, Any] = {
    "fleet": "farm2",
    "gateway_url": "http://10.0.0.66:8080",
    "gateway": OTHER.address,
    "ca_sha256": "cd" * 32,
    "device": "pi-8",
    "key_share": 3,
    "expires": int(NOW) + 10 * 3600,
    "token_id": "0" * 32,
}


def test_every_field_is_covered_by_the_tag() -> None:
    assert set(_CHANGES) == set(asdict(_token())) - {"mac"}  # a new field must be added here too


@pytest.mark.parametrize("field", sorted(_CHANGES))
def test_changing_any_field_breaks_the_tag(field: str) -> None:
    token = _token()
    assert getattr(token, field) != _CHANGES[field]
    forged = replace(token, **{field: _CHANGES[field]})
    assert not forged.verify_mac(KEY)
    # ... also after the trip through the text form a device or attacker would edit
    assert not EnrollmentToken.decode(forged.encode()).verify_mac(KEY)


def test_wrong_key_or_changed_tag_fails() -> None:
    token = _token()
    assert not token.verify_mac(bytes(32))
    assert not token.verify_mac(KEY[:-1])
    flipped = ("0" if token.mac[0] != "0" else "1") + token.mac[1:]
    assert not replace(token, mac=flipped).verify_mac(KEY)
    assert not replace(token, mac="").verify_mac(KEY)


def test_expiry() -> None:
    token = _token(ttl_s=60)
    assert not token.expired(now=NOW)
    assert not token.expired(now=NOW + 59)
    assert token.expired(now=NOW + 60)
    assert token.expired()  # NOW is in 2023: long gone
    assert not _token(now=None, ttl_s=60).expired()
    assert _token(now=time.time() - 120, ttl_s=60).expired()


@pytest.mark.parametrize(
    "changes",
    [
        {"device": ""},
        {"device": "a b"},
        {"device": "x" * 65},
        {"device": "pi/7"},
        {"ttl_s": 0},
        {"ttl_s": -5},
    ],
)
def test_issue_token_refuses_bad_arguments(changes: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        _token(**changes)


def _fields(**changes: Any) -> dict[str, Any]:
    fields = asdict(_token())
    fields.update(changes)
    return fields


_MISSING = _fields()
del _MISSING["token_id"]

_MALFORMED_TOKENS: dict[str, str] = {
    "empty": "",
    "no prefix": _b64e(json.dumps(_fields()).encode()),
    "other prefix": "bdn-enroll-2:" + _b64e(json.dumps(_fields()).encode()),
    "too long": TOKEN_PREFIX + "A" * MAX_TOKEN_CHARS,
    "bad base64 length": TOKEN_PREFIX + "A",
    "not json": TOKEN_PREFIX + _b64e(b"hello, world"),
    "not utf-8": TOKEN_PREFIX + _b64e(b"\xff\xfe\x00"),
    "non-ascii base64": TOKEN_PREFIX + "\u00e9\u00e9\u00e9\u00e9",
    "json list": _encoded([1, 2, 3]),
    "json string": _encoded("token"),
    "missing field": _encoded(_MISSING),
    "extra field": _encoded(_fields(admin=True)),
    "key_share as string": _encoded(_fields(key_share="2")),
    "key_share as bool": _encoded(_fields(key_share=True)),
    "key_share as float": _encoded(_fields(key_share=2.0)),
    "key_share negative": _encoded(_fields(key_share=-1)),
    "expires as string": _encoded(_fields(expires="soon")),
    "fleet as null": _encoded(_fields(fleet=None)),
    "device as list": _encoded(_fields(device=["pi-7"])),
    "device with a slash": _encoded(_fields(device="../pi")),
    "device too long": _encoded(_fields(device="d" * 65)),
    "url not http": _encoded(_fields(gateway_url="ftp://10.0.0.1/")),
    "ca not hex": _encoded(_fields(ca_sha256="zz" * 32)),
    "ca too short": _encoded(_fields(ca_sha256="ab" * 31)),
    "mac too short": _encoded(_fields(mac="ab")),
    "token_id upper case": _encoded(_fields(token_id="AB" * 16)),
    "token_id too short": _encoded(_fields(token_id="ab" * 15)),
    "gateway not an address": _encoded(_fields(gateway="0x1234")),
    "gateway not hex": _encoded(_fields(gateway="0x" + "zz" * 20)),
    "gateway a name": _encoded(_fields(gateway="gateway.example")),
}


@pytest.mark.parametrize("name", sorted(_MALFORMED_TOKENS))
def test_malformed_tokens_are_enrollment_errors(name: str) -> None:
    with pytest.raises(EnrollmentError) as caught:
        EnrollmentToken.decode(_MALFORMED_TOKENS[name])
    assert caught.value.code == "malformed"
    assert str(caught.value)  # a message for the operator


def test_well_formed_variant_of_the_fixture_decodes() -> None:
    """The malformed cases above differ from a valid token only in what they name (else they prove nothing)."""
    assert EnrollmentToken.decode(_encoded(_fields())).verify_mac(KEY)


def test_from_dict_refuses_non_dicts() -> None:
    raw: Any
    for raw in (None, [], "x", 5):
        with pytest.raises(EnrollmentError):
            EnrollmentToken.from_dict(raw)


def test_ca_fingerprint_is_sha256_of_der(tmp_path: Path) -> None:
    import hashlib

    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    from provisioning.certs import create_ca

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    pem = create_ca(tmp_path / "a", "farm").cert.read_bytes()
    der = x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)
    assert ca_fingerprint(pem) == hashlib.sha256(der).hexdigest()
    assert ca_fingerprint(pem) != ca_fingerprint(create_ca(tmp_path / "b", "farm").cert.read_bytes())


# ------------------------------------------------------------------------------------- proof of possession


def test_request_round_trip_recovers_the_device_key() -> None:
    token = _token()
    request = EnrollRequest.make(token, DEVICE.key, 2745)
    parsed = EnrollRequest.parse(request.to_json())
    assert parsed == request
    assert parsed.address == DEVICE.address and parsed.samples == 2745
    public = parsed.public_key(token)
    assert len(public) == 64
    assert device_address(bytes(DEVICE.key)) == DEVICE.address
    from eth_keys.datatypes import PublicKey

    assert PublicKey(public).to_checksum_address() == DEVICE.address


def test_request_signed_by_another_key_fails() -> None:
    token = _token()
    by_other = EnrollRequest.make(token, OTHER.key, 100)
    claimed = replace(by_other, address=DEVICE.address)  # claims DEVICE's address, signed with OTHER's key
    with pytest.raises(EnrollmentError) as caught:
        claimed.public_key(token)
    assert caught.value.code == "bad_signature"


def test_request_with_swapped_address_fails() -> None:
    token = _token()
    request = EnrollRequest.make(token, DEVICE.key, 100)
    with pytest.raises(EnrollmentError) as caught:
        replace(request, address=OTHER.address).public_key(token)
    assert caught.value.code == "bad_signature"


def test_tampered_samples_fail() -> None:
    token = _token()
    request = EnrollRequest.make(token, DEVICE.key, 100)
    request.public_key(token)  # the untampered one verifies
    with pytest.raises(EnrollmentError) as caught:
        replace(request, samples=1_000_000).public_key(token)
    assert caught.value.code == "bad_signature"


def test_a_signature_is_bound_to_its_token() -> None:
    """A proof made for one token cannot be replayed with another (fleet or token id differ)."""
    token = _token()
    request = EnrollRequest.make(token, DEVICE.key, 100)
    for other in (_token(), _token(fleet="farm2")):
        with pytest.raises(EnrollmentError):
            request.public_key(other)
    assert possession_message(token, DEVICE.address.lower(), 5) == possession_message(
        token, DEVICE.address, 5
    )


@pytest.mark.parametrize(
    "signature",
    ["", "0x", "0xzz", "0x" + "00" * 64, "0x" + "00" * 66, "0x" + "00" * 65, "0x" + "ff" * 64 + "1b"],
)
def test_bad_signatures_are_bad_signature(signature: str) -> None:
    token = _token()
    request = replace(EnrollRequest.make(token, DEVICE.key, 100), signature=signature)
    with pytest.raises(EnrollmentError) as caught:
        request.public_key(token)
    assert caught.value.code == "bad_signature"


def test_bad_address_is_bad_signature() -> None:
    token = _token()
    request = replace(EnrollRequest.make(token, DEVICE.key, 100), address="0xnot-an-address")
    with pytest.raises(EnrollmentError) as caught:
        request.public_key(token)
    assert caught.value.code == "bad_signature"


def test_recovery_id_as_0_1_or_27_28_both_verify() -> None:
    token = _token()
    request = EnrollRequest.make(token, DEVICE.key, 100)
    sig = bytes.fromhex(request.signature[2:])
    low = replace(request, signature="0x" + (sig[:64] + bytes([sig[64] - 27])).hex())
    assert low.public_key(token) == request.public_key(token)
    flipped = replace(request, signature="0x" + (sig[:64] + bytes([sig[64] ^ 1])).hex())
    with pytest.raises(EnrollmentError):
        flipped.public_key(token)


def _body(**changes: Any) -> bytes:
    raw = asdict(EnrollRequest.make(_token(), DEVICE.key, 100))
    raw.update(changes)
    return json.dumps(raw).encode()


_MALFORMED_REQUESTS: dict[str, bytes] = {
    "empty": b"",
    "not json": b"token=abc",
    "not utf-8": b"\xff\xfe{}",
    "json list": b"[]",
    "missing field": json.dumps({"token": "x", "address": "y", "samples": 1}).encode(),
    "extra field": _body(key_share=1),
    "samples as string": _body(samples="100"),
    "samples as float": _body(samples=100.0),
    "samples as bool": _body(samples=True),
    "samples zero": _body(samples=0),
    "samples negative": _body(samples=-3),
    "samples too many": _body(samples=10**9 + 1),
    "token as number": _body(token=5),
    "signature as null": _body(signature=None),
    "huge integer": b'{"samples": ' + b"1" * 5000 + b"}",
    "deeply nested": b"[" * 4000 + b"]" * 4000,
    "nan": b'{"samples": NaN}',
}


@pytest.mark.parametrize("name", sorted(_MALFORMED_REQUESTS))
def test_malformed_requests_are_enrollment_errors(name: str) -> None:
    body = _MALFORMED_REQUESTS[name]
    assert len(body) <= MAX_REQUEST_BYTES
    with pytest.raises(EnrollmentError) as caught:
        EnrollRequest.parse(body)
    assert caught.value.code == "malformed"


def test_oversized_request_is_too_large() -> None:
    body = _body(token="x" * MAX_REQUEST_BYTES)
    with pytest.raises(EnrollmentError) as caught:
        EnrollRequest.parse(body)
    assert caught.value.code == "too_large"
    EnrollRequest.parse(_body())  # the same request without padding parses


# ---------------------------------------------------------------------------------------------- the bundle

CONTENTS = {"fleet": {"name": "farm"}, "broker": {"password": "s3cret"}, "key_share": None, "n": [1, 2, 3]}


def _sealed(token: EnrollmentToken, device: Any = DEVICE, gateway: Any = GATEWAY) -> dict[str, str]:
    public = EnrollRequest.make(token, device.key, 10).public_key(token)
    return seal_bundle(CONTENTS, public, token.token_id, gateway.key)


def test_seal_open_round_trip() -> None:
    token = _token()
    answer = _sealed(token)
    assert set(answer) == {"bundle", "signature"}
    assert "s3cret" not in json.dumps(answer)  # encrypted, not just signed
    assert open_bundle(answer, token, bytes(DEVICE.key)) == CONTENTS
    assert open_bundle(json.loads(json.dumps(answer)), token, bytes(DEVICE.key)) == CONTENTS
    assert _sealed(token)["bundle"] != answer["bundle"]  # a fresh ephemeral key and nonce per bundle


def test_open_refuses_a_bundle_signed_by_another_gateway() -> None:
    token = _token()
    with pytest.raises(EnrollmentError) as caught:
        open_bundle(_sealed(token, gateway=OTHER), token, bytes(DEVICE.key))
    assert caught.value.code == "bad_signature"


def test_open_refuses_a_bundle_for_another_device_key() -> None:
    token = _token()
    answer = _sealed(token, device=OTHER)
    with pytest.raises(EnrollmentError) as caught:
        open_bundle(answer, token, bytes(DEVICE.key))
    assert caught.value.code == "bad_bundle"
    assert open_bundle(answer, token, bytes(OTHER.key)) == CONTENTS


def test_open_refuses_a_bundle_for_another_token() -> None:
    token, other = _token(), _token()
    answer = _sealed(token)
    with pytest.raises(EnrollmentError) as caught:
        open_bundle(answer, other, bytes(DEVICE.key))
    assert caught.value.code == "bad_signature"  # the signature covers the token id
    # Even re-signed by the gateway for the other token id, the ciphertext's associated data differs.
    blob = base64.urlsafe_b64decode(answer["bundle"] + "=" * (-len(answer["bundle"]) % 4))
    resigned = _resign(blob, other.token_id)
    with pytest.raises(EnrollmentError) as caught:
        open_bundle(resigned, other, bytes(DEVICE.key))
    assert caught.value.code == "bad_bundle"


def _resign(blob: bytes, token_id: str, gateway: Any = GATEWAY) -> dict[str, str]:
    from eth_account.messages import encode_defunct

    signed = gateway.sign_message(encode_defunct(_bundle_digest(blob, token_id)))
    return {"bundle": _b64e(blob), "signature": "0x" + bytes(signed.signature).hex()}


def _blob(answer: dict[str, str]) -> bytes:
    return base64.urlsafe_b64decode(answer["bundle"] + "=" * (-len(answer["bundle"]) % 4))


@pytest.mark.parametrize("keep", [0, 10, 64, 65, 77, 92])
def test_open_refuses_truncated_bundles(keep: int) -> None:
    token = _token()
    answer = _sealed(token)
    blob = _blob(answer)
    cut = _b64e(blob[:keep])
    with pytest.raises(EnrollmentError) as caught:  # cut after signing: the signature no longer matches
        open_bundle({**answer, "bundle": cut}, token, bytes(DEVICE.key))
    assert caught.value.code == "bad_signature"
    with pytest.raises(EnrollmentError) as caught:  # cut before signing (a broken gateway): still refused
        open_bundle(_resign(blob[:keep], token.token_id), token, bytes(DEVICE.key))
    assert caught.value.code == "malformed"


def test_open_refuses_flipped_ciphertext_bits() -> None:
    token = _token()
    blob = bytearray(_blob(_sealed(token)))
    blob[-1] ^= 1
    with pytest.raises(EnrollmentError) as caught:
        open_bundle(_resign(bytes(blob), token.token_id), token, bytes(DEVICE.key))
    assert caught.value.code == "bad_bundle"
    blob = bytearray(_blob(_sealed(token)))
    blob[1] ^= 1  # the ephemeral point is no longer on the curve (or another point)
    with pytest.raises(EnrollmentError) as caught:
        open_bundle(_resign(bytes(blob), token.token_id), token, bytes(DEVICE.key))
    assert caught.value.code in ("malformed", "bad_bundle")


@pytest.mark.parametrize(
    "answer",
    [
        None,
        [],
        {},
        {"bundle": 5, "signature": "0x"},
        {"bundle": "abc"},
        {"bundle": "abc", "signature": None},
        {"bundle": "abc", "signature": ""},
        {"bundle": "abc", "signature": "0x"},
        {"bundle": "abc", "signature": "0x" + "00" * 65},
        {"bundle": "abc", "signature": 7},
        {"bundle": "A" * (600 * 1024), "signature": "0x" + "00" * 65},
    ],
)
def test_open_refuses_malformed_answers(answer: Any) -> None:
    with pytest.raises(EnrollmentError):
        open_bundle(answer, _token(), bytes(DEVICE.key))


# ------------------------------------------------------------------------------------------------ fuzzing

_B64URL = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
_FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@_FUZZ
@given(
    st.text(max_size=3000)
    | st.builds(lambda s: TOKEN_PREFIX + s, st.text(alphabet=_B64URL + "=+/ \n\u00e9", max_size=2100))
    | st.builds(lambda b: TOKEN_PREFIX + _b64e(b), st.binary(max_size=1600))
)
def test_token_decode_of_any_text_is_a_token_or_an_enrollment_error(text: str) -> None:
    with contextlib.suppress(EnrollmentError):
        EnrollmentToken.decode(text)


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=80),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)
_token_dicts = st.fixed_dictionaries(
    {name: st.one_of(st.just(value), _json_values) for name, value in asdict(_token()).items()},
    optional={"extra": _json_values},
)


@_FUZZ
@given(_token_dicts)
def test_token_decode_of_any_json_payload_is_a_token_or_an_enrollment_error(fields: dict[str, Any]) -> None:
    try:
        token = EnrollmentToken.decode(_encoded(fields))
    except EnrollmentError:
        return
    assert token.key_share >= 0 and token.gateway_url.startswith(("http://", "https://"))


@_FUZZ
@given(st.binary(max_size=MAX_REQUEST_BYTES + 100))
def test_request_parse_of_any_bytes_is_a_request_or_an_enrollment_error(body: bytes) -> None:
    with contextlib.suppress(EnrollmentError):
        EnrollRequest.parse(body)


_request_dicts = st.fixed_dictionaries(
    {
        name: st.one_of(st.just(value), _json_values)
        for name, value in asdict(EnrollRequest.make(_token(), DEVICE.key, 100)).items()
    },
    optional={"extra": _json_values},
)


@_FUZZ
@given(_request_dicts)
def test_request_parse_and_check_of_any_json_is_an_enrollment_error_or_valid(fields: dict[str, Any]) -> None:
    token = _token()
    try:
        request = EnrollRequest.parse(json.dumps(fields).encode())
        request.public_key(token)
    except EnrollmentError:
        return
    assert request.address == DEVICE.address  # only DEVICE can have signed something that verifies


@_FUZZ
@given(st.dictionaries(st.sampled_from(["bundle", "signature", "x"]), _json_values))
def test_open_bundle_of_any_answer_is_an_enrollment_error(answer: dict[str, Any]) -> None:
    with pytest.raises(EnrollmentError):
        open_bundle(answer, _token(), bytes(DEVICE.key))


# ------------------------------------------------------------------------------- fleet growth on the device


@pytest.fixture(scope="module")
def known_fleet() -> Fleet:
    tpk, _ = deal(1, 3, 512, allow_insecure=True)
    chain = ChainInfo("embedded", 1337, "0x" + "22" * 20)
    devices = (DeviceEntry("0x" + "a1" * 20, 64, 1, "pi-1"), DeviceEntry("0x" + "a2" * 20, 32, 0, "pi-2"))
    return Fleet("farm", chain, GATEWAY.address, tpk, SlotLayout(512), 7, devices)


NEWCOMER = DeviceEntry("0x" + "b3" * 20, 50, 2, "pi-3")


class FakeChain:
    """``registered(address) -> (registered and not revoked, key share)`` with a record of what was asked."""

    def __init__(self, entries: dict[str, tuple[bool, int]]) -> None:
        self.entries = entries
        self.asked: list[str] = []

    def __call__(self, address: str) -> tuple[bool, int]:
        self.asked.append(address)
        return self.entries.get(address, (False, 0))


def test_check_growth_accepts_a_pure_extension_registered_on_chain(known_fleet: Fleet) -> None:
    from firmware_agent.enroll import check_growth

    grown = replace(known_fleet, devices=(*known_fleet.devices, NEWCOMER))
    chain = FakeChain({NEWCOMER.address: (True, 2)})
    assert check_growth(known_fleet, grown, chain) == ""
    assert chain.asked == [NEWCOMER.address]  # only newcomers are looked up
    assert check_growth(known_fleet, known_fleet, FakeChain({})) == ""  # nothing new


@pytest.mark.parametrize(
    ("on_chain", "why"),
    [
        ({}, "not registered"),
        ({NEWCOMER.address: (True, 3)}, "key share"),
        ({NEWCOMER.address: (False, 2)}, ""),
    ],
)
def test_check_growth_refuses_newcomers_the_chain_does_not_vouch_for(
    known_fleet: Fleet, on_chain: dict[str, tuple[bool, int]], why: str
) -> None:
    from firmware_agent.enroll import check_growth

    grown = replace(known_fleet, devices=(*known_fleet.devices, NEWCOMER))
    problem = check_growth(known_fleet, grown, FakeChain(on_chain))
    assert problem and NEWCOMER.address in problem and why in problem


def test_check_growth_refuses_a_changed_fleet(known_fleet: Fleet) -> None:
    from firmware_agent.enroll import check_growth

    first, second = known_fleet.devices
    other_key, _ = deal(1, 3, 512, allow_insecure=True)
    changed = {
        "name": replace(known_fleet, name="farm2"),
        "gateway": replace(known_fleet, gateway=OTHER.address),
        "chain": replace(known_fleet, chain=replace(known_fleet.chain, contract="0x" + "33" * 20)),
        "model_seed": replace(known_fleet, model_seed=8),
        "layout": replace(known_fleet, layout=SlotLayout(512, max_devices=50)),
        "public key": replace(known_fleet, public_key=other_key),
        "samples changed": replace(known_fleet, devices=(replace(first, samples=6400), second, NEWCOMER)),
        "share moved": replace(known_fleet, devices=(replace(first, key_share=3), second, NEWCOMER)),
        "device dropped": replace(known_fleet, devices=(first,)),
        "device replaced": replace(known_fleet, devices=(first, NEWCOMER)),
        "order changed": replace(known_fleet, devices=(second, first, NEWCOMER)),
    }
    chain = FakeChain({NEWCOMER.address: (True, 2), first.address: (True, 1), second.address: (True, 0)})
    for what, fresh in changed.items():
        assert check_growth(known_fleet, fresh, chain), what
