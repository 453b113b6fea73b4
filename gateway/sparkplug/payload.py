"""Sparkplug B payloads: a set of typed metrics with aliases, encoded as births (every metric, by name and
alias) and data messages (only what changed, by alias), and the one command an edge node must obey.

Pure: protobuf only, no MQTT. The wire format is the Sparkplug 3.0 specification's (``spb_payload.proto``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from gateway.sparkplug import spb_payload_pb2 as pb

MAX_COMMAND_BYTES = 16 * 1024  # an NCMD carries a handful of metrics; anything larger is not one of ours

INT64 = pb.Int64
UINT64 = pb.UInt64
DOUBLE = pb.Double
BOOLEAN = pb.Boolean
STRING = pb.String
DATETIME = pb.DateTime

REBIRTH = "Node Control/Rebirth"


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass
class _Metric:
    alias: int
    datatype: int
    value: Any = None
    dirty: bool = False


class MetricSet:
    """The metrics of one edge node or one device. Values change with :meth:`set`; :meth:`birth` and
    :meth:`data` encode them. Aliases are fixed for the set's lifetime, so a host can map DATA to BIRTH."""

    def __init__(self, definitions: Sequence[tuple[str, int]], first_alias: int = 1) -> None:
        self._metrics = {
            name: _Metric(first_alias + i, datatype) for i, (name, datatype) in enumerate(definitions)
        }

    def set(self, name: str, value: Any) -> None:
        m = self._metrics[name]
        if value != m.value:
            m.value = value
            m.dirty = True

    def get(self, name: str) -> Any:
        return self._metrics[name].value

    @property
    def dirty(self) -> bool:
        return any(m.dirty for m in self._metrics.values())

    def birth(self, seq: int, *, extra: Sequence[tuple[str, int, Any]] = ()) -> bytes:
        """Every metric with name, alias, datatype and value (``extra``: metrics outside the set, such as
        ``bdSeq``). Clears the changes: a birth is the full picture."""
        ts = now_ms()
        payload = pb.Payload(timestamp=ts, seq=seq)
        for name, datatype, value in extra:
            _fill(payload.metrics.add(), datatype, value, ts, name=name)
        for name, m in self._metrics.items():
            _fill(payload.metrics.add(), m.datatype, m.value, ts, name=name, alias=m.alias)
            m.dirty = False
        return bytes(payload.SerializeToString())

    def data(self, seq: int) -> bytes | None:
        """The changed metrics by alias, or None when nothing changed."""
        changed = [m for m in self._metrics.values() if m.dirty]
        if not changed:
            return None
        ts = now_ms()
        payload = pb.Payload(timestamp=ts, seq=seq)
        for m in changed:
            _fill(payload.metrics.add(), m.datatype, m.value, ts, alias=m.alias)
            m.dirty = False
        return bytes(payload.SerializeToString())


def death(bd_seq: int) -> bytes:
    """NDEATH: only ``bdSeq`` (no seq), matching the NBIRTH of the same MQTT session."""
    ts = now_ms()
    payload = pb.Payload(timestamp=ts)
    _fill(payload.metrics.add(), INT64, bd_seq, ts, name="bdSeq")
    return bytes(payload.SerializeToString())


def device_death(seq: int) -> bytes:
    return bytes(pb.Payload(timestamp=now_ms(), seq=seq).SerializeToString())


class CommandError(ValueError):
    """An NCMD that is not a Sparkplug payload we can read."""


def parse_command(data: bytes) -> dict[str, Any]:
    """The named metrics of an NCMD. Size-limited before parsing; anything unreadable is a CommandError."""
    if len(data) > MAX_COMMAND_BYTES:
        raise CommandError(f"{len(data)} bytes, more than {MAX_COMMAND_BYTES}")
    try:
        payload = pb.Payload.FromString(data)
    except Exception as exc:  # protobuf raises DecodeError, and others on deeply broken input
        raise CommandError(f"not a Sparkplug B payload: {exc}") from None
    out: dict[str, Any] = {}
    for m in payload.metrics:
        if m.name:
            which = m.WhichOneof("value")
            out[m.name] = None if m.is_null or which is None else getattr(m, which)
    return out


def _fill(
    m: pb.Payload.Metric, datatype: int, value: Any, ts: int, *, name: str = "", alias: int | None = None
) -> None:
    if name:
        m.name = name
    if alias is not None:
        m.alias = alias
    m.timestamp = ts
    m.datatype = datatype
    if value is None or (isinstance(value, float) and math.isnan(value)):
        m.is_null = True
    elif datatype == BOOLEAN:
        m.boolean_value = bool(value)
    elif datatype == DOUBLE:
        m.double_value = float(value)
    elif datatype == STRING:
        m.string_value = str(value)
    elif datatype in (INT64, UINT64, DATETIME):
        # Sparkplug carries Int64 in the uint64 field as its two's complement.
        m.long_value = int(value) & 0xFFFF_FFFF_FFFF_FFFF
    else:
        raise ValueError(f"datatype {datatype} is not used by this edge node")
