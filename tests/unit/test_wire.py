"""The MQTT wire format: topic names and hostile-input-proof CBOR payloads (DESIGN §3)."""

from __future__ import annotations

import random
from typing import Any

import cbor2
import pytest
from eth_utils.address import to_checksum_address

from blockdeepnet.crypto.codec import SlotLayout
from blockdeepnet.wire import (
    BLOB_MAX_BYTES,
    MAX_DEVICES,
    RECEIPT_MAX_BYTES,
    STATE_MAX_BYTES,
    UPDATE_MAX_BYTES,
    DeviceState,
    GatewayState,
    GlobalBlock,
    ParsedTopic,
    ReasonCode,
    Receipt,
    RoundOpen,
    Share,
    Topics,
    Update,
    WireError,
)

ADDR = to_checksum_address("0x" + "ab" * 20)
ADDR2 = to_checksum_address("0x" + "cd" * 20)
H32 = bytes(range(32))
LAYOUT = SlotLayout(key_bits=2048).to_dict()


def _update(**over: Any) -> Update:
    base: dict[str, Any] = dict(
        round=3, device=ADDR, samples=6000, compute_ms=1234, payload=b"\x01" * 1024, signature=b"\x02" * 65
    )
    return Update(**{**base, **over})


MESSAGES = [
    RoundOpen(
        round=7,
        base_model_hash=H32,
        layout=LAYOUT,
        deadline_block=120,
        chain_block=100,
        total_samples=60000,
        key_fingerprint="0123456789abcdef",
    ),
    _update(),
    Receipt.accept(3, H32, "ok"),
    Receipt.reject(3, ReasonCode.BAD_SIGNATURE, "signature does not recover the device"),
    DeviceState("training", 3),
    DeviceState("offline"),
    GlobalBlock(
        round=3,
        aggregate=b"\x03" * 2048,
        devices=[ADDR, ADDR2],
        total_weight_num=12000,
        total_weight_den=60000,
        merkle_root=H32,
        commit_tx=None,
    ),
    GlobalBlock(
        round=4,
        aggregate=b"\x03",
        devices=[ADDR],
        total_weight_num=1,
        total_weight_den=1,
        merkle_root=H32,
        commit_tx=H32,
    ),
    Share(
        round=3, holder=2, values=b"\x04" * 1024, proof_a=b"a" * 512, proof_b=b"b" * 512, proof_z=b"z" * 600
    ),
    GatewayState("online", 5),
    GatewayState("offline"),
]


def _raw(msg: Any) -> dict[Any, Any]:
    out = cbor2.loads(msg.to_cbor())
    assert isinstance(out, dict)
    return out


def _malformed(cls: Any, obj: Any) -> WireError:
    with pytest.raises(WireError) as info:
        cls.from_cbor(cbor2.dumps(obj))
    assert info.value.reason is ReasonCode.MALFORMED
    return info.value


# ------------------------------------------------------------------------------------------------- messages


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: type(m).__name__)
def test_round_trip(msg: Any) -> None:
    data = msg.to_cbor()
    assert type(msg).from_cbor(data) == msg
    assert type(msg).from_cbor(bytearray(data)) == msg
    raw = _raw(msg)
    assert raw["v"] == 1
    assert all(isinstance(k, str) and len(k) <= 3 for k in raw)


def test_encoding_is_deterministic_and_reason_is_enum() -> None:
    r = Receipt.reject(1, ReasonCode.LATE)
    assert r.to_cbor() == Receipt.reject(1, ReasonCode.LATE).to_cbor()
    back = Receipt.from_cbor(r.to_cbor())
    assert back.reason is ReasonCode.LATE
    assert _raw(r)["rc"] == "late"
    assert RoundOpen.from_cbor(MESSAGES[0].to_cbor()).slot_layout() == SlotLayout(key_bits=2048)


def test_reason_codes() -> None:
    assert [r.value for r in ReasonCode] == [
        "too_large",
        "malformed",
        "unknown_device",
        "revoked_device",
        "round_not_open",
        "late",
        "bad_signature",
        "duplicate",
        "bad_ciphertext",
        "wrong_count",
        "chain_error",
    ]
    assert isinstance(ReasonCode.LATE, str)


def test_full_size_update_fits() -> None:
    big = _update(round=2**64 - 1, samples=2**64 - 1, compute_ms=2**64 - 1, payload=b"\xff" * BLOB_MAX_BYTES)
    data = big.to_cbor()
    assert len(data) <= UPDATE_MAX_BYTES
    assert Update.from_cbor(data) == big
    blob = GlobalBlock(
        round=1,
        aggregate=b"\xff" * BLOB_MAX_BYTES,
        devices=[to_checksum_address(f"0x{i:040x}") for i in range(MAX_DEVICES)],
        total_weight_num=1,
        total_weight_den=1,
        merkle_root=H32,
        commit_tx=H32,
    )
    assert GlobalBlock.from_cbor(blob.to_cbor()) == blob


@pytest.mark.parametrize(
    ("cls", "limit"),
    [(Update, UPDATE_MAX_BYTES), (Receipt, RECEIPT_MAX_BYTES), (DeviceState, STATE_MAX_BYTES)],
)
def test_oversize_rejected_before_parsing(cls: Any, limit: int) -> None:
    junk = b"\xff" * (limit + 1)  # not even valid CBOR: only the size check can explain too_large
    with pytest.raises(WireError) as info:
        cls.from_cbor(junk)
    assert info.value.reason is ReasonCode.TOO_LARGE
    with pytest.raises(WireError) as info:
        cls.from_cbor(b"\xff" * limit)
    assert info.value.reason is ReasonCode.MALFORMED


def test_oversize_valid_message_rejected() -> None:
    st = DeviceState("online", 1)
    padded = cbor2.dumps({**_raw(st), "pad": "x" * 300})
    with pytest.raises(WireError) as info:
        DeviceState.from_cbor(padded)
    assert info.value.reason is ReasonCode.TOO_LARGE


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xa6",  # map header, no content
        _update().to_cbor()[:-1],  # truncated
        _update().to_cbor()[:40],
        _update().to_cbor() + b"\x00",  # trailing byte
        cbor2.dumps([1, 2, 3]),  # not a map
        cbor2.dumps("v"),
        cbor2.dumps(None),
        b"\xbf\x61v\x01\xff",  # indefinite-length map
        b"\x81" * 100_000,  # deep nesting (list top level refused at once)
        b"\xa1\x61x" + b"\x81" * 50_000 + b"\x00",  # deep nesting inside a map
        b"\xa1\x61x\x5f" + b"\x41\x00" * 1000 + b"\xff",  # indefinite-length byte string
        b"\xa1\x61x\x5b" + (2**62).to_bytes(8, "big"),  # absurd declared length
        b"\xa1\x61x\x9b" + (2**62).to_bytes(8, "big"),
        b"\xa1\x62\xff\xfe\x01",  # invalid UTF-8 key
        b"\xa2\x61v\x01\x61v\x01",  # duplicate key
        b"\xa1\x81\x01\x01",  # list as map key
        cbor2.dumps({"v": 1, "x": cbor2.CBORTag(1, 0)}),  # datetime tag
        cbor2.dumps({"v": 1, "x": cbor2.CBORTag(2, b"\x01" * 100)}),  # bignum tag
        cbor2.dumps({"v": 1, "x": cbor2.CBORTag(35, "(a+)+$")}),  # regex tag
        cbor2.dumps({"v": 1, "x": cbor2.CBORTag(28, 1)}),  # shared reference
        cbor2.dumps({"v": 1, "x": cbor2.CBORTag(55799, 1)}),
        cbor2.dumps({"v": 1, "x": cbor2.CBORTag(123456789, 1)}),  # unknown tag
    ],
)
def test_bad_cbor_is_malformed(data: bytes) -> None:
    with pytest.raises(WireError) as info:
        Update.from_cbor(data)
    assert info.value.reason is ReasonCode.MALFORMED


def test_non_bytes_input() -> None:
    with pytest.raises(WireError):
        Update.from_cbor("not bytes")  # type: ignore[arg-type]


def test_tagged_valid_update_rejected() -> None:
    raw = _raw(_update())
    raw["r"] = cbor2.CBORTag(2, b"\x03")  # bignum 3: a correct value, but no tags allowed
    _malformed(Update, raw)


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: type(m).__name__)
def test_extra_missing_key_and_version(msg: Any) -> None:
    cls = type(msg)
    raw = _raw(msg)
    _malformed(cls, {**raw, "zz": 1})
    _malformed(cls, {**raw, b"v": 1})
    for key in raw:
        _malformed(cls, {k: v for k, v in raw.items() if k != key})
    for bad in (0, 2, True, 1.0, "1", None):
        _malformed(cls, {**raw, "v": bad})


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("r", True),  # bool is not an int
        ("r", -1),
        ("r", 2**64),
        ("r", 1.0),
        ("r", "3"),
        ("r", None),
        ("s", 0),
        ("s", False),
        ("ms", -5),
        ("d", ADDR.lower()),  # not checksummed
        ("d", ADDR[2:]),
        ("d", ADDR.encode()),
        ("d", ADDR + "0"),
        ("d", "0x" + "Zz" * 20),
        ("d", "0x" + "é" * 40),
        ("p", b""),
        ("p", "text"),
        ("p", [1, 2]),
        ("p", b"\x00" * (BLOB_MAX_BYTES + 1)),
        ("sig", b"\x00" * 64),
        ("sig", b"\x00" * 66),
        ("sig", "00" * 65),
    ],
)
def test_update_field_validation(key: str, value: Any) -> None:
    raw = _raw(_update())
    raw[key] = value
    with pytest.raises(WireError) as info:
        Update.from_cbor(cbor2.dumps(raw))
    assert info.value.reason in (ReasonCode.MALFORMED, ReasonCode.TOO_LARGE)


def test_constructors_validate_too() -> None:
    with pytest.raises(WireError):
        _update(device=ADDR.lower())
    with pytest.raises(WireError):
        _update(round=True)
    with pytest.raises(WireError):
        _update(signature=bytearray(65))
    with pytest.raises(WireError):
        DeviceState("sleeping")  # type: ignore[arg-type]
    with pytest.raises(WireError):
        GatewayState("training")  # type: ignore[arg-type]
    with pytest.raises(WireError):
        Share(round=1, holder=0, values=b"x", proof_a=b"a", proof_b=b"b", proof_z=b"z")


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("h", b"\x00" * 31),
        ("h", b"\x00" * 33),
        ("ts", 0),
        ("kf", "0123456789ABCDEF"),
        ("kf", ""),
        ("kf", 17),
        ("l", [1]),
        ("l", {**LAYOUT, "extra": 1}),
        ("l", {k: v for k, v in LAYOUT.items() if k != "clip"}),
        ("l", {**LAYOUT, "clip": float("nan")}),
        ("l", {**LAYOUT, "clip": float("inf")}),
        ("l", {**LAYOUT, "clip": -1.0}),
        ("l", {**LAYOUT, "clip": True}),
        ("l", {**LAYOUT, "value_bits": 1}),  # refused by SlotLayout itself
        ("l", {**LAYOUT, "key_bits": 8}),
        ("l", {**LAYOUT, "key_bits": 2048.0}),
        ("l", {**LAYOUT, "max_devices": True}),
    ],
)
def test_round_open_validation(key: str, value: Any) -> None:
    raw = _raw(MESSAGES[0])
    raw[key] = value
    _malformed(RoundOpen, raw)


def test_round_open_int_clip_normalised() -> None:
    raw = _raw(MESSAGES[0])
    raw["l"] = {**LAYOUT, "clip": 1}
    assert RoundOpen.from_cbor(cbor2.dumps(raw)).layout["clip"] == 1.0


@pytest.mark.parametrize(
    "patch",
    [
        {"ok": True, "tx": H32, "rc": "late"},  # both
        {"ok": False, "tx": None, "rc": None},  # neither
        {"ok": True, "tx": None, "rc": None},
        {"ok": False, "tx": H32, "rc": None},  # flag disagrees with content
        {"ok": True, "tx": None, "rc": "late"},
        {"ok": 1, "tx": H32, "rc": None},  # int is not a bool
        {"ok": True, "tx": H32[:31], "rc": None},
        {"ok": False, "tx": None, "rc": "not_a_reason"},
        {"ok": False, "tx": None, "rc": 5},
        {"ok": False, "tx": None, "rc": "late", "m": "x" * 600},
        {"ok": False, "tx": None, "rc": "late", "m": b"bytes"},
    ],
)
def test_receipt_validation(patch: dict[str, Any]) -> None:
    raw = _raw(Receipt.reject(1, ReasonCode.LATE))
    _malformed(Receipt, {**raw, **patch})


def test_receipt_constructor_exactly_one() -> None:
    with pytest.raises(WireError):
        Receipt(round=1, accepted=True, tx_hash=H32, reason=ReasonCode.LATE)
    with pytest.raises(WireError):
        Receipt(round=1, accepted=False, tx_hash=None, reason=None)
    with pytest.raises(WireError):
        Receipt(round=1, accepted=False, tx_hash=None, reason="late")  # type: ignore[arg-type]
    assert len(Receipt.reject(1, ReasonCode.MALFORMED, "x" * 10_000).detail) == 512


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("ds", []),
        ("ds", [ADDR, ADDR]),
        ("ds", [ADDR.lower()]),
        ("ds", ADDR),
        ("ds", [ADDR] + [to_checksum_address(f"0x{i:040x}") for i in range(1, MAX_DEVICES + 1)]),
        ("wd", 0),
        ("wn", 0),
        ("wn", 60001),  # weight above 1
        ("mr", H32[:16]),
        ("ct", b""),
        ("ct", "0x" + "00" * 32),
        ("a", b""),
    ],
)
def test_global_block_validation(key: str, value: Any) -> None:
    raw = _raw(MESSAGES[6])
    raw[key] = value
    _malformed(GlobalBlock, raw)


@pytest.mark.parametrize(
    ("cls", "raw"),
    [
        (DeviceState, {"v": 1, "st": "sleeping", "r": None}),
        (DeviceState, {"v": 1, "st": "online", "r": -1}),
        (DeviceState, {"v": 1, "st": "online", "r": False}),
        (GatewayState, {"v": 1, "st": "error", "r": None}),
        (Share, {**_raw(MESSAGES[8]), "i": 0}),
        (Share, {**_raw(MESSAGES[8]), "pz": b"\x00" * 4096}),
        (Share, {**_raw(MESSAGES[8]), "x": b""}),
    ],
)
def test_state_and_share_validation(cls: Any, raw: dict[str, Any]) -> None:
    _malformed(cls, raw)


def test_fuzz_mutations_raise_only_wire_error() -> None:
    """500 seeded random mutations of a valid Update: either a valid Update or WireError, nothing else."""
    rng = random.Random(20240601)
    base = bytearray(_update(payload=bytes(range(256)) * 2).to_cbor())
    outcomes = {"ok": 0, "error": 0}
    for _ in range(500):
        data = bytearray(base)
        for _ in range(rng.randint(1, 8)):
            op = rng.randrange(5)
            pos = rng.randrange(len(data)) if data else 0
            if op == 0 and data:
                data[pos] = rng.randrange(256)
            elif op == 1 and data:
                data[pos] ^= 1 << rng.randrange(8)
            elif op == 2:
                data[pos:pos] = rng.randbytes(rng.randint(1, 16))
            elif op == 3:
                del data[pos : pos + rng.randint(1, 32)]
            else:
                data = data[: rng.randrange(len(data) + 1)]
        try:
            Update.from_cbor(bytes(data))
            outcomes["ok"] += 1
        except WireError as exc:
            assert exc.reason in (ReasonCode.MALFORMED, ReasonCode.TOO_LARGE)
            outcomes["error"] += 1
    assert outcomes["error"] > 400


# --------------------------------------------------------------------------------------------------- topics

T = Topics("fleet-1")
P = "bdn/v1/fleet-1/"


def test_topic_names() -> None:
    assert T.round() == P + "round"
    assert T.update(ADDR) == f"{P}dev/{ADDR}/update"
    assert T.receipt(ADDR) == f"{P}dev/{ADDR}/receipt"
    assert T.state(ADDR) == f"{P}dev/{ADDR}/state"
    assert T.global_block(12) == P + "global/12"
    assert T.share(12, ADDR) == f"{P}share/12/{ADDR}"
    assert T.gateway_state() == P + "gateway/state"
    assert T.all_updates() == P + "dev/+/update"
    assert T.all_states() == P + "dev/+/state"
    assert T.all_shares(12) == P + "share/12/+"


def test_topic_parse_round_trips() -> None:
    cases = {
        T.round(): ParsedTopic("round"),
        T.update(ADDR): ParsedTopic("update", device=ADDR),
        T.receipt(ADDR): ParsedTopic("receipt", device=ADDR),
        T.state(ADDR): ParsedTopic("state", device=ADDR),
        T.global_block(0): ParsedTopic("global", round=0),
        T.global_block(2**64 - 1): ParsedTopic("global", round=2**64 - 1),
        T.share(5, ADDR2): ParsedTopic("share", device=ADDR2, round=5),
        T.gateway_state(): ParsedTopic("gateway_state"),
    }
    for topic, parsed in cases.items():
        assert T.parse(topic) == parsed


@pytest.mark.parametrize("fleet", ["", "a" * 65, "a/b", "a+", "#", "flé", "a b", "a\n", 5])
def test_bad_fleet(fleet: Any) -> None:
    with pytest.raises(WireError):
        Topics(fleet)


def test_fleet_edges() -> None:
    assert Topics("a" * 64).round().startswith("bdn/v1/" + "a" * 64 + "/")
    assert Topics("A_z-9").round() == "bdn/v1/A_z-9/round"


@pytest.mark.parametrize(
    "topic",
    [
        "bdn/v1/other/round",  # another fleet
        "bdn/v2/fleet-1/round",
        "/bdn/v1/fleet-1/round",
        "bdn/v1/fleet-1",
        P,
        P + "round/",
        P + "round/extra",
        P + "rounds",
        P + "dev/+/update",  # a filter is not a topic
        P + "dev/#",
        f"{P}dev/{ADDR.lower()}/update",  # not checksummed
        f"{P}dev/{ADDR[2:]}/update",
        f"{P}dev/0x1234/update",
        f"{P}dev/{ADDR}/update/extra",
        f"{P}dev/{ADDR}/delete",
        f"{P}dev/{ADDR}",
        P + "global/-1",
        P + "global/+1",
        P + "global/01",
        P + "global/1.0",
        P + "global/0x10",
        P + "global/",
        P + "global/١٢",  # Arabic-Indic digits: decimal to str.isdecimal, not to us
        P + "global/18446744073709551616",  # 2^64
        P + "global/1/extra",
        f"{P}share/1/{ADDR.lower()}",
        f"{P}share/x/{ADDR}",
        f"{P}share/1/{ADDR}/x",
        f"{P}share/{ADDR}",
        P + "gateway/state/x",
        P + "gateway",
    ],
)
def test_topic_parse_rejects(topic: str) -> None:
    with pytest.raises(WireError) as info:
        T.parse(topic)
    assert info.value.reason is ReasonCode.MALFORMED


def test_topic_builders_validate() -> None:
    with pytest.raises(WireError):
        T.update(ADDR.lower())
    with pytest.raises(WireError):
        T.global_block(-1)
    with pytest.raises(WireError):
        T.share(True, ADDR)
    with pytest.raises(WireError):
        T.all_shares(2**64)
    with pytest.raises(WireError):
        T.parse(b"bdn/v1/fleet-1/round")  # type: ignore[arg-type]
