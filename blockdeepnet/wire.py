"""The MQTT wire format of DESIGN §3: topic names and CBOR payloads, with no MQTT client code.

Everything a device publishes reaches the gateway from an untrusted network, so every decoder here is
written for hostile input:

1. the byte length is checked against a per-message limit *before* any parsing, so a huge or
   pathological payload (deep nesting, giant indefinite-length items) costs at most one ``len()``;
2. the top-level item must be a definite-length CBOR map (checked on the first byte, before decoding);
3. decoding uses cbor2 with a nesting depth of 2, no indefinite lengths, no duplicate keys, only
   text/byte map keys, and every semantic tag refused (tags would let a sender smuggle in datetimes,
   bignums, regexes, shared references ... that no field of ours can hold); trailing bytes are refused;
4. the decoded map must have exactly the message's key set and version ``v == 1``, and every field is
   checked for type (bools are not ints, ints are not bools) and range (uints < 2^64, fixed-width hashes
   and signatures, checksummed addresses, bounded strings and lists).

Any violation raises :class:`WireError` with reason ``too_large`` (size) or ``malformed`` (everything
else) and never another exception type: the gateway maps it straight onto the receipt's reason code.
The same field checks run in every constructor, so a message that exists has a valid encoding and
``to_cbor`` cannot emit something that ``from_cbor`` would refuse. Encoding is canonical (RFC 8949
§4.2.1 core deterministic), so equal messages have equal bytes.

What is *not* checked here, because it needs state or keys the wire layer does not have: that the
update's device matches its topic, that the round is open, the EIP-712 signature itself, and that the
ciphertext blob's length is a whole number of ciphertexts of the fleet key's width (reason
``wrong_count``). Those are the gateway's later, costlier pipeline steps.
"""

from __future__ import annotations

import io
import math
import re
from dataclasses import dataclass, fields
from enum import StrEnum
from typing import Any, ClassVar, Final, Literal, Self, TypeVar, cast

import cbor2
from eth_utils.address import is_checksum_address

from blockdeepnet.crypto.codec import SlotLayout

VERSION: Final = 1
"""Value of the ``v`` field of every payload; a decoder refuses any other (no silent half-understanding)."""

UINT_LIMIT: Final = 1 << 64
"""Exclusive upper bound of every unsigned integer field (round numbers, blocks, samples, ...)."""

CIPHERTEXT_BYTES: Final = 512
"""Width of one Paillier ciphertext (mod n^2) for a 2048-bit modulus, the largest key the fleet uses."""

MAX_CIPHERTEXTS: Final = 2104
"""Ciphertexts of one full-size update (252,398 parameters packed into 2048-bit plaintexts)."""

BLOB_MAX_BYTES: Final = MAX_CIPHERTEXTS * CIPHERTEXT_BYTES
"""Largest ciphertext blob: an update's payload, an aggregate, or a holder's partial decryptions."""

MAX_DEVICES: Final = 1024
"""Most devices one global block may list (far above the codec's default ``max_devices`` of 100)."""

PROOF_MAX_BYTES: Final = 2048
"""Largest value of one share-proof element (a, b < n^2 take 512 bytes; z is a bit longer)."""

DETAIL_MAX_CHARS: Final = 512
"""Longest human-readable text in a receipt: enough to explain, too little to abuse as a channel."""

FINGERPRINT_RE: Final = re.compile(r"[0-9a-f]{1,64}")
"""Key fingerprints are lowercase hex (``PaillierPublicKey.fingerprint`` gives 16 characters)."""

# Per-message byte limits, checked before any parsing. Each is the largest honest encoding plus headroom.
UPDATE_MAX_BYTES: Final = 1_200_000
"""Update: a full blob (1,077,248 bytes) plus header, address and signature, with headroom."""
ROUND_MAX_BYTES: Final = 8 * 1024
RECEIPT_MAX_BYTES: Final = 2 * 1024
STATE_MAX_BYTES: Final = 256
REPORT_MAX_BYTES: Final = 256
GLOBAL_MAX_BYTES: Final = 1_300_000
"""GlobalBlock: a full aggregate plus up to MAX_DEVICES addresses (~45 KB) and hashes."""
SHARE_MAX_BYTES: Final = 1_300_000
"""Share: a full blob of partial decryptions plus the three proof values."""
BROKER_MESSAGE_MAX_BYTES: Final = 4 * 1024 * 1024
"""The largest MQTT message a fleet's broker takes (Mosquitto's ``message_size_limit``): room for every
message above, and the most the upstream bridge forwards."""

TOPIC_ROOT: Final = "bdn/v1"
_FLEET_RE: Final = re.compile(r"[A-Za-z0-9_-]{1,64}")
# ASCII digits only (str.isdecimal would accept other scripts' digits), no sign, no leading zeros:
# one round number has exactly one topic, which matters for retained messages.
_ROUND_RE: Final = re.compile(r"0|[1-9][0-9]*")


class ReasonCode(StrEnum):
    """Why the gateway refused an update; carried in receipts and used as a metrics label."""

    TOO_LARGE = "too_large"
    MALFORMED = "malformed"
    UNKNOWN_DEVICE = "unknown_device"
    REVOKED_DEVICE = "revoked_device"
    ROUND_NOT_OPEN = "round_not_open"
    LATE = "late"
    BAD_SIGNATURE = "bad_signature"
    DUPLICATE = "duplicate"
    BAD_CIPHERTEXT = "bad_ciphertext"
    WRONG_COUNT = "wrong_count"
    CHAIN_ERROR = "chain_error"


class WireError(ValueError):
    """A topic or payload that does not follow the wire format; ``reason`` goes into the receipt."""

    def __init__(self, reason: ReasonCode, message: str) -> None:
        super().__init__(f"{reason.value}: {message}")
        self.reason = reason
        self.message = message


def _malformed(message: str) -> WireError:
    return WireError(ReasonCode.MALFORMED, message)


# ---------------------------------------------------------------------------------------------- field checks


def _uint(name: str, value: object, minimum: int = 0) -> int:
    # type() rather than isinstance(): bool and IntEnum are int subclasses and must not pass as numbers.
    if type(value) is not int:
        raise _malformed(f"{name} must be an integer, got {type(value).__name__}")
    if not minimum <= value < UINT_LIMIT:
        raise _malformed(f"{name} must be in [{minimum}, 2^64), got {value}")
    return value


def _opt_uint(name: str, value: object) -> int | None:
    return None if value is None else _uint(name, value)


def _bool(name: str, value: object) -> bool:
    if type(value) is not bool:
        raise _malformed(f"{name} must be a boolean, got {type(value).__name__}")
    return value


def _bytes(name: str, value: object, *, exact: int | None = None, maximum: int | None = None) -> bytes:
    if type(value) is not bytes:
        raise _malformed(f"{name} must be a byte string, got {type(value).__name__}")
    if exact is not None and len(value) != exact:
        raise _malformed(f"{name} must be exactly {exact} bytes, got {len(value)}")
    if maximum is not None and not 1 <= len(value) <= maximum:
        raise _malformed(f"{name} must be 1..{maximum} bytes, got {len(value)}")
    return value


def _text(name: str, value: object, maximum: int) -> str:
    if type(value) is not str:
        raise _malformed(f"{name} must be a text string, got {type(value).__name__}")
    if len(value) > maximum:
        raise _malformed(f"{name} longer than {maximum} characters")
    return value


def _address(name: str, value: object) -> str:
    """A checksummed (EIP-55) address: the checksum catches typos and makes one address one topic."""
    if type(value) is not str or len(value) != 42 or not is_checksum_address(value):
        raise _malformed(f"{name} must be an EIP-55 checksummed address, got {value!r:.60}")
    return value


def _choice(name: str, value: object, allowed: frozenset[str]) -> str:
    if type(value) is not str or value not in allowed:
        raise _malformed(f"{name} must be one of {sorted(allowed)}, got {value!r:.40}")
    return value


_LAYOUT_INT_KEYS: Final = ("key_bits", "value_bits", "max_devices", "guard_bits")
_LAYOUT_KEYS: Final = frozenset({*_LAYOUT_INT_KEYS, "clip"})


def _layout(value: object) -> dict[str, int | float]:
    """``SlotLayout.to_dict()``, checked field by field and then by SlotLayout itself."""
    if type(value) is not dict:
        raise _malformed(f"layout must be a map, got {type(value).__name__}")
    if set(value) != _LAYOUT_KEYS:
        raise _malformed(f"layout keys must be {sorted(_LAYOUT_KEYS)}, got {sorted(map(repr, value))}")
    out: dict[str, int | float] = {k: _uint(f"layout.{k}", value[k]) for k in _LAYOUT_INT_KEYS}
    clip = value["clip"]
    if type(clip) is int:
        clip = float(_uint("layout.clip", clip))
    if type(clip) is not float or not math.isfinite(clip):
        raise _malformed(f"layout.clip must be a finite number, got {clip!r:.40}")
    out["clip"] = clip
    try:
        SlotLayout.from_dict(out)
    except ValueError as exc:
        raise _malformed(f"layout rejected by the codec: {exc}") from exc
    return out


# ------------------------------------------------------------------------------------------------- decoding


def _reject_tag(*_: object) -> object:
    raise _malformed("CBOR semantic tags are not allowed")


# cbor2 decodes some tags itself (probing 0..70000 on cbor2 6.3 found 0-5, 25, 28-30, 35-37, 52, 54, 100,
# 256, 258, 260, 261, 1004, 43000, 55799); those are overridden here, with all of 0..299 as a margin for
# newer versions. Every other tag goes to tag_hook. Both refuse, so no tag ever becomes a Python object.
_REJECT_TAGS: Final = {tag: _reject_tag for tag in (*range(300), 1004, 1040, 43000, 55799)}


_DECODER_OPTIONS: Final[dict[str, Any]] = {
    "max_depth": 2,  # a message map holding at most one map (layout) or list (devices)
    "allow_indefinite": False,
    "allow_duplicate_keys": False,
    "strict_hashable_types": True,  # map keys only text/bytes: no hash-collision games with tuples
    "semantic_decoders": _REJECT_TAGS,
    "tag_hook": _reject_tag,
    "str_errors": "strict",
}

try:  # fail at import, not per message, if the installed cbor2 lacks an option (they need cbor2 >= 6.2)
    cbor2.CBORDecoder(io.BytesIO(b""), **_DECODER_OPTIONS)
except TypeError as exc:  # pragma: no cover - depends on the installed cbor2
    raise ImportError(f"blockdeepnet.wire needs cbor2 >= 6.2: {exc}") from exc


def _decode(data: object, limit: int, what: str) -> dict[str, Any]:
    """Bytes → top-level map, refusing oversize, non-map, malformed or non-canonical-shaped input."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise _malformed(f"{what} payload must be bytes, got {type(data).__name__}")
    raw = bytes(data)
    if len(raw) > limit:
        raise WireError(ReasonCode.TOO_LARGE, f"{what} payload of {len(raw)} bytes exceeds {limit}")
    # Major type 5 with a definite length (0xa0..0xbb); 0xbf is an indefinite map, refused anyway.
    if not raw or not 0xA0 <= raw[0] <= 0xBB:
        raise _malformed(f"{what} payload must be a CBOR map")
    fp = io.BytesIO(raw)
    # Built outside the try: a cbor2 without these options must fail loudly, not call everything malformed.
    decoder = cbor2.CBORDecoder(fp, **_DECODER_OPTIONS)
    try:
        decoded = decoder.decode()
    except WireError:
        raise
    except Exception as exc:
        # cbor2 documents CBORDecodeError, but a C extension fed hostile bytes may surface others
        # (ValueError, OverflowError, MemoryError, RecursionError ...): all of them mean "malformed".
        raise _malformed(f"{what} payload is not valid CBOR: {type(exc).__name__}: {exc}") from None
    if fp.tell() != len(raw):
        raise _malformed(f"{what} payload has {len(raw) - fp.tell()} trailing bytes")
    if type(decoded) is not dict:  # pragma: no cover - guaranteed by the first-byte check
        raise _malformed(f"{what} payload must be a CBOR map")
    return decoded


# ------------------------------------------------------------------------------------------------- messages


class _Message:
    """Shared CBOR plumbing. Subclasses are frozen dataclasses that list their short wire keys.

    ``_KEYS`` maps each dataclass field to its wire key (in field order); ``_MAX_BYTES`` is the size
    checked before parsing. Subclasses validate every field in ``__post_init__`` and may convert wire
    values (e.g. reason strings to :class:`ReasonCode`) in ``_from_wire``.
    """

    _KEYS: ClassVar[dict[str, str]]
    _MAX_BYTES: ClassVar[int]

    def _to_wire(self) -> dict[str, Any]:
        return {key: getattr(self, name) for name, key in self._KEYS.items()}

    @classmethod
    def _from_wire(cls, values: dict[str, Any]) -> dict[str, Any]:
        return values

    def to_cbor(self) -> bytes:
        """Canonical CBOR map with the version field ``v``."""
        return cbor2.dumps({"v": VERSION, **self._to_wire()}, canonical=True)

    @classmethod
    def from_cbor(cls, data: bytes) -> Self:
        """Decode and validate hostile bytes; raises only :class:`WireError`."""
        what = cls.__name__
        decoded = _decode(data, cls._MAX_BYTES, what)
        expected = {"v", *cls._KEYS.values()}
        if decoded.keys() != expected:
            extra = sorted(map(repr, decoded.keys() - expected))
            missing = sorted(expected - decoded.keys())
            raise _malformed(f"{what} keys wrong: unknown {extra}, missing {missing}")
        version = decoded["v"]
        if type(version) is not int or version != VERSION:
            raise _malformed(f"{what} version must be {VERSION}, got {version!r:.20}")
        values = {name: decoded[key] for name, key in cls._KEYS.items()}
        try:
            return cls(**cls._from_wire(values))
        except WireError:
            raise
        except Exception as exc:  # pragma: no cover - every field check raises WireError itself
            raise _malformed(f"{what}: {type(exc).__name__}: {exc}") from None


_M = TypeVar("_M", bound=type[_Message])


def _check_keys(cls: _M) -> _M:
    """Class decorator (applied after @dataclass): the key table must cover exactly the fields."""
    names = [f.name for f in fields(cast(Any, cls))]
    if list(cls._KEYS) != names or len(set(cls._KEYS.values())) != len(names) or "v" in cls._KEYS.values():
        raise TypeError(f"{cls.__name__}._KEYS does not match its fields")
    return cls


@_check_keys
@dataclass(frozen=True)
class RoundOpen(_Message):
    """Retained on ``round``: what a device needs to train, encode and sign an update for this round."""

    round: int
    base_model_hash: bytes
    layout: dict[str, int | float]
    deadline_block: int
    chain_block: int
    total_samples: int
    key_fingerprint: str

    _KEYS: ClassVar[dict[str, str]] = {
        "round": "r",
        "base_model_hash": "h",
        "layout": "l",
        "deadline_block": "dl",
        "chain_block": "cb",
        "total_samples": "ts",
        "key_fingerprint": "kf",
    }
    _MAX_BYTES: ClassVar[int] = ROUND_MAX_BYTES

    def __post_init__(self) -> None:
        _uint("round", self.round)
        _bytes("base_model_hash", self.base_model_hash, exact=32)
        object.__setattr__(self, "layout", _layout(self.layout))  # a private, normalised copy
        _uint("deadline_block", self.deadline_block)
        _uint("chain_block", self.chain_block)
        _uint("total_samples", self.total_samples, minimum=1)
        if type(self.key_fingerprint) is not str or not FINGERPRINT_RE.fullmatch(self.key_fingerprint):
            raise _malformed(
                f"key_fingerprint must be 1..64 lowercase hex digits, got {self.key_fingerprint!r:.70}"
            )

    def slot_layout(self) -> SlotLayout:
        """The codec layout announced for this round."""
        return SlotLayout.from_dict(self.layout)


@_check_keys
@dataclass(frozen=True)
class Update(_Message):
    """A device's encrypted, signed update on ``dev/<addr>/update``; ``payload`` is the fixed-width blob."""

    round: int
    device: str
    samples: int
    compute_ms: int
    payload: bytes
    signature: bytes

    _KEYS: ClassVar[dict[str, str]] = {
        "round": "r",
        "device": "d",
        "samples": "s",
        "compute_ms": "ms",
        "payload": "p",
        "signature": "sig",
    }
    _MAX_BYTES: ClassVar[int] = UPDATE_MAX_BYTES

    def __post_init__(self) -> None:
        _uint("round", self.round)
        _address("device", self.device)
        _uint("samples", self.samples, minimum=1)
        _uint("compute_ms", self.compute_ms)
        _bytes("payload", self.payload, maximum=BLOB_MAX_BYTES)
        _bytes("signature", self.signature, exact=65)


@_check_keys
@dataclass(frozen=True)
class Receipt(_Message):
    """The gateway's answer on ``dev/<addr>/receipt``: accepted with a tx hash, or refused with a reason."""

    round: int
    accepted: bool
    tx_hash: bytes | None
    reason: ReasonCode | None
    detail: str = ""

    _KEYS: ClassVar[dict[str, str]] = {
        "round": "r",
        "accepted": "ok",
        "tx_hash": "tx",
        "reason": "rc",
        "detail": "m",
    }
    _MAX_BYTES: ClassVar[int] = RECEIPT_MAX_BYTES

    def __post_init__(self) -> None:
        _uint("round", self.round)
        _bool("accepted", self.accepted)
        if self.tx_hash is not None:
            _bytes("tx_hash", self.tx_hash, exact=32)
        if self.reason is not None and not isinstance(self.reason, ReasonCode):
            raise _malformed(f"reason must be a ReasonCode, got {self.reason!r:.40}")
        # Exactly one of the two, and it must agree with the flag: a receipt can't be half accepted.
        if (self.tx_hash is None) == (self.reason is None):
            raise _malformed("a receipt carries exactly one of tx_hash and reason")
        if self.accepted != (self.tx_hash is not None):
            raise _malformed("accepted receipts carry a tx_hash, refused ones a reason")
        _text("detail", self.detail, DETAIL_MAX_CHARS)

    def _to_wire(self) -> dict[str, Any]:
        wire = super()._to_wire()
        wire["rc"] = None if self.reason is None else self.reason.value
        return wire

    @classmethod
    def _from_wire(cls, values: dict[str, Any]) -> dict[str, Any]:
        reason = values["reason"]
        if reason is not None:
            values["reason"] = ReasonCode(_choice("reason", reason, _REASONS))
        return values

    @classmethod
    def accept(cls, round: int, tx_hash: bytes, detail: str = "") -> Receipt:
        return cls(round=round, accepted=True, tx_hash=tx_hash, reason=None, detail=detail)

    @classmethod
    def reject(cls, round: int, reason: ReasonCode, detail: str = "") -> Receipt:
        return cls(round=round, accepted=False, tx_hash=None, reason=reason, detail=detail[:DETAIL_MAX_CHARS])


_REASONS: Final = frozenset(r.value for r in ReasonCode)

DeviceStatus = Literal["online", "offline", "training", "error"]
GatewayStatus = Literal["online", "offline"]
_DEVICE_STATUSES: Final = frozenset({"online", "offline", "training", "error"})
_GATEWAY_STATUSES: Final = frozenset({"online", "offline"})
#: A device in one of these states counts as online (metrics, dashboard, Sparkplug, the demo's table).
ONLINE_STATES: Final = frozenset({"online", "training"})
#: A device that says it is gone (its last will, or an error): a round does not wait for it.
GONE_STATES: Final = frozenset({"offline", "error"})


@_check_keys
@dataclass(frozen=True)
class DeviceState(_Message):
    """Retained on ``dev/<addr>/state`` (also the device's MQTT last will, with state ``offline``)."""

    state: DeviceStatus
    round: int | None = None

    _KEYS: ClassVar[dict[str, str]] = {"state": "st", "round": "r"}
    _MAX_BYTES: ClassVar[int] = STATE_MAX_BYTES

    def __post_init__(self) -> None:
        _choice("state", self.state, _DEVICE_STATUSES)
        _opt_uint("round", self.round)


@_check_keys
@dataclass(frozen=True)
class GatewayState(_Message):
    """Retained on ``gateway/state`` (also the gateway's last will): up or down, and its current round."""

    state: GatewayStatus
    round: int | None = None

    _KEYS: ClassVar[dict[str, str]] = {"state": "st", "round": "r"}
    _MAX_BYTES: ClassVar[int] = STATE_MAX_BYTES

    def __post_init__(self) -> None:
        _choice("state", self.state, _GATEWAY_STATUSES)
        _opt_uint("round", self.round)


@_check_keys
@dataclass(frozen=True)
class GlobalBlock(_Message):
    """Retained on ``global/<round>``: the aggregate ciphertexts and what the chain committed for them.

    ``total_weight_num / total_weight_den`` is W = sum of included s_k / s (<= 1), which the codec needs
    to correct the decoded mean when devices dropped out; kept as an exact fraction, not a float.
    """

    round: int
    aggregate: bytes
    devices: list[str]
    total_weight_num: int
    total_weight_den: int
    merkle_root: bytes
    commit_tx: bytes | None

    _KEYS: ClassVar[dict[str, str]] = {
        "round": "r",
        "aggregate": "a",
        "devices": "ds",
        "total_weight_num": "wn",
        "total_weight_den": "wd",
        "merkle_root": "mr",
        "commit_tx": "ct",
    }
    _MAX_BYTES: ClassVar[int] = GLOBAL_MAX_BYTES

    def __post_init__(self) -> None:
        _uint("round", self.round)
        _bytes("aggregate", self.aggregate, maximum=BLOB_MAX_BYTES)
        if type(self.devices) not in (list, tuple) or not 1 <= len(self.devices) <= MAX_DEVICES:
            raise _malformed(f"devices must be a list of 1..{MAX_DEVICES} addresses")
        devices = [_address("devices[]", d) for d in self.devices]
        if len(set(devices)) != len(devices):
            raise _malformed("devices lists an address twice")
        object.__setattr__(self, "devices", devices)  # a private list copy
        den = _uint("total_weight_den", self.total_weight_den, minimum=1)
        num = _uint("total_weight_num", self.total_weight_num, minimum=1)
        if num > den:
            raise _malformed(f"total weight {num}/{den} exceeds 1")
        _bytes("merkle_root", self.merkle_root, exact=32)
        if self.commit_tx is not None:
            _bytes("commit_tx", self.commit_tx, exact=32)


@_check_keys
@dataclass(frozen=True)
class Share(_Message):
    """Retained on ``share/<round>/<addr>``: holder ``holder``'s partial decryptions and batch proof."""

    round: int
    holder: int
    values: bytes
    proof_a: bytes
    proof_b: bytes
    proof_z: bytes

    _KEYS: ClassVar[dict[str, str]] = {
        "round": "r",
        "holder": "i",
        "values": "x",
        "proof_a": "pa",
        "proof_b": "pb",
        "proof_z": "pz",
    }
    _MAX_BYTES: ClassVar[int] = SHARE_MAX_BYTES

    def __post_init__(self) -> None:
        _uint("round", self.round)
        _uint("holder", self.holder, minimum=1)
        _bytes("values", self.values, maximum=BLOB_MAX_BYTES)
        _bytes("proof_a", self.proof_a, maximum=PROOF_MAX_BYTES)
        _bytes("proof_b", self.proof_b, maximum=PROOF_MAX_BYTES)
        _bytes("proof_z", self.proof_z, maximum=PROOF_MAX_BYTES)


def _metric(name: str, value: object, maximum: float) -> float:
    # A float that is not a finite number in [0, maximum] is no loss or accuracy; ints are not accepted
    # either, so one value has exactly one encoding.
    if type(value) is not float or not math.isfinite(value) or not 0.0 <= value <= maximum:
        raise _malformed(f"{name} must be a finite float in [0, {maximum}], got {value!r:.40}")
    return value


@_check_keys
@dataclass(frozen=True)
class Report(_Message):
    """On ``dev/<addr>/report`` after a device applied global block ``round``: the new global model's loss on
    the device's own training data (the lowest-loss rule picks the final round by the sample-weighted mean of
    these) and, where the device holds a labelled test set, its accuracy there (``None`` otherwise)."""

    round: int
    samples: int
    loss: float
    accuracy: float | None

    _KEYS: ClassVar[dict[str, str]] = {"round": "r", "samples": "s", "loss": "lo", "accuracy": "ac"}
    _MAX_BYTES: ClassVar[int] = REPORT_MAX_BYTES

    def __post_init__(self) -> None:
        _uint("round", self.round)
        _uint("samples", self.samples, minimum=1)
        _metric("loss", self.loss, 1e6)
        if self.accuracy is not None:
            _metric("accuracy", self.accuracy, 1.0)


# --------------------------------------------------------------------------------------------------- topics

TopicKind = Literal["round", "update", "receipt", "state", "report", "global", "share", "gateway_state"]


@dataclass(frozen=True)
class ParsedTopic:
    """What a concrete topic names: its kind, and the device address and round number it carries."""

    kind: TopicKind
    device: str | None = None
    round: int | None = None


def _topic_round(value: object) -> int:
    return _uint("round", value)


def _topic_address(value: object) -> str:
    try:
        return _address("device address", value)
    except WireError as exc:
        raise _malformed(f"topic {exc.message}") from None


@dataclass(frozen=True)
class Topics:
    """Topic names of one fleet under ``bdn/v1/<fleet>/`` (DESIGN §3).

    Builders validate their arguments the same way :meth:`parse` does, so no code path can publish on a
    topic the gateway would refuse or that the broker ACL (written per checksummed address) would miss.
    """

    fleet: str

    def __post_init__(self) -> None:
        if type(self.fleet) is not str or not _FLEET_RE.fullmatch(self.fleet):
            raise _malformed(f"fleet id must be 1..64 of [A-Za-z0-9_-], got {self.fleet!r:.80}")

    @property
    def prefix(self) -> str:
        return f"{TOPIC_ROOT}/{self.fleet}/"

    def round(self) -> str:
        return f"{self.prefix}round"

    def update(self, addr: str) -> str:
        return f"{self.prefix}dev/{_topic_address(addr)}/update"

    def receipt(self, addr: str) -> str:
        return f"{self.prefix}dev/{_topic_address(addr)}/receipt"

    def state(self, addr: str) -> str:
        return f"{self.prefix}dev/{_topic_address(addr)}/state"

    def report(self, addr: str) -> str:
        return f"{self.prefix}dev/{_topic_address(addr)}/report"

    def global_block(self, round: int) -> str:
        return f"{self.prefix}global/{_topic_round(round)}"

    def share(self, round: int, addr: str) -> str:
        return f"{self.prefix}share/{_topic_round(round)}/{_topic_address(addr)}"

    def gateway_state(self) -> str:
        return f"{self.prefix}gateway/state"

    # Subscription filters (MQTT wildcards); never valid input to parse().
    def all_updates(self) -> str:
        return f"{self.prefix}dev/+/update"

    def all_states(self) -> str:
        return f"{self.prefix}dev/+/state"

    def all_reports(self) -> str:
        return f"{self.prefix}dev/+/report"

    def all_globals(self) -> str:
        return f"{self.prefix}global/+"

    def every_share(self) -> str:
        return f"{self.prefix}share/+/+"

    def all_shares(self, round: int) -> str:
        return f"{self.prefix}share/{_topic_round(round)}/+"

    def parse(self, topic: str) -> ParsedTopic:
        """Classify a received topic of this fleet; anything else raises :class:`WireError` (malformed).

        Refuses other prefixes, wildcards, unknown or extra levels, non-checksummed addresses and
        round numbers that are not plain ASCII decimals below 2^64 without leading zeros.
        """
        if type(topic) is not str or not topic.startswith(self.prefix):
            raise _malformed(f"topic {topic!r:.120} is not under {self.prefix}")
        levels = topic[len(self.prefix) :].split("/")
        match levels:
            case ["round"]:
                return ParsedTopic("round")
            case ["gateway", "state"]:
                return ParsedTopic("gateway_state")
            case ["dev", addr, "update"]:
                return ParsedTopic("update", device=_topic_address(addr))
            case ["dev", addr, "receipt"]:
                return ParsedTopic("receipt", device=_topic_address(addr))
            case ["dev", addr, "state"]:
                return ParsedTopic("state", device=_topic_address(addr))
            case ["dev", addr, "report"]:
                return ParsedTopic("report", device=_topic_address(addr))
            case ["global", r]:
                return ParsedTopic("global", round=_parse_round(r))
            case ["share", r, addr]:
                return ParsedTopic("share", device=_topic_address(addr), round=_parse_round(r))
        raise _malformed(f"topic {topic!r:.120} is not a known topic")


def _parse_round(text: str) -> int:
    if len(text) > 20 or not _ROUND_RE.fullmatch(text):
        raise _malformed(f"topic round must be a plain decimal number, got {text!r:.30}")
    return _topic_round(int(text))


__all__ = [
    "BLOB_MAX_BYTES",
    "CIPHERTEXT_BYTES",
    "GLOBAL_MAX_BYTES",
    "MAX_CIPHERTEXTS",
    "MAX_DEVICES",
    "RECEIPT_MAX_BYTES",
    "REPORT_MAX_BYTES",
    "ROUND_MAX_BYTES",
    "SHARE_MAX_BYTES",
    "STATE_MAX_BYTES",
    "TOPIC_ROOT",
    "UPDATE_MAX_BYTES",
    "VERSION",
    "DeviceState",
    "DeviceStatus",
    "GatewayState",
    "GatewayStatus",
    "GlobalBlock",
    "ParsedTopic",
    "ReasonCode",
    "Receipt",
    "Report",
    "RoundOpen",
    "Share",
    "TopicKind",
    "Topics",
    "Update",
    "WireError",
]
