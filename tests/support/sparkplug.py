"""A Sparkplug B host-side recorder for tests: subscribes on a real broker and decodes every message with
Eclipse Tahu's generated schema (the PyPI package ``sparkplug_b_packets``), never with the gateway's own
module, so an encoding mistake on our side cannot hide behind a matching decoding mistake.

Metrics in NDATA/DDATA may come by alias only (Sparkplug B §6.4.5): names are resolved from the births.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt
from sparkplub_b_packets.core import sparkplug_b_pb2 as tahu  # (sic: the package's own spelling)

_NO_SEQ = ("NDEATH",)


@dataclass
class SpbMessage:
    kind: str  # NBIRTH, NDATA, NDEATH, DBIRTH, DDATA, DDEATH, NCMD, DCMD
    group: str
    node: str
    device: str | None
    seq: int | None
    timestamp: int | None
    metrics: dict[str, Any] = field(default_factory=dict)
    received_at: float = field(default_factory=time.monotonic)

    def has(self, name: str) -> bool:
        return name in self.metrics

    def metric(self, name: str) -> Any:
        return self.metrics[name]


def metric_value(m: Any) -> Any:
    """A decoded Tahu ``Metric``'s value (``None`` when ``is_null``)."""
    if m.is_null:
        return None
    which = m.WhichOneof("value")
    return getattr(m, which) if which else None


class SparkplugRecorder:
    def __init__(self, host: str, port: int, topic_filter: str = "spBv1.0/#") -> None:
        self.messages: list[SpbMessage] = []
        self.undecodable: list[str] = []
        self._aliases: dict[tuple[str, str | None], dict[int, str]] = {}
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self._client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"spb-host-{port}-{id(self)}")
        self._client.on_connect = lambda c, *_: c.subscribe(topic_filter, qos=1)
        self._client.on_subscribe = lambda *_: self._subscribed.set()
        self._client.on_message = self._on_message
        self._client.connect(host, port)
        self._client.loop_start()
        if not self._subscribed.wait(15):
            raise RuntimeError(f"the Sparkplug recorder could not subscribe on {host}:{port}")

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        parts = msg.topic.split("/")
        if len(parts) not in (4, 5) or parts[0] != "spBv1.0":
            return
        group, kind, node = parts[1], parts[2], parts[3]
        device = parts[4] if len(parts) == 5 else None
        try:
            payload = tahu.Payload.FromString(bytes(msg.payload))
        except Exception:
            with self._lock:
                self.undecodable.append(msg.topic)
            return
        with self._lock:
            aliases = self._aliases.setdefault((node, device), {})
            if kind in ("NBIRTH", "DBIRTH"):
                aliases.clear()
            metrics: dict[str, Any] = {}
            for m in payload.metrics:
                name = m.name
                if name and m.HasField("alias"):
                    aliases[m.alias] = name
                elif not name and m.HasField("alias"):
                    name = aliases.get(m.alias, f"<alias {m.alias}>")
                metrics[name] = metric_value(m)
            self.messages.append(
                SpbMessage(
                    kind=kind,
                    group=group,
                    node=node,
                    device=device,
                    seq=payload.seq if payload.HasField("seq") else None,
                    timestamp=payload.timestamp if payload.HasField("timestamp") else None,
                    metrics=metrics,
                )
            )

    def snapshot(self) -> list[SpbMessage]:
        with self._lock:
            return list(self.messages)

    def node_messages(self, group: str, node: str) -> list[SpbMessage]:
        """What one edge node published (its own and its devices' messages), in arrival order; commands to it
        are left out."""
        return [
            m
            for m in self.snapshot()
            if m.group == group and m.node == node and m.kind not in ("NCMD", "DCMD")
        ]

    def count(self, kind: str) -> int:
        return sum(1 for m in self.snapshot() if m.kind == kind)

    def node_metric(self, name: str) -> Any:
        """The latest value of a node metric, from NBIRTH or NDATA (None if never seen)."""
        value = None
        for m in self.snapshot():
            if m.kind in ("NBIRTH", "NDATA") and name in m.metrics:
                value = m.metrics[name]
        return value

    def wait_for(self, ok: Callable[[], bool], timeout: float = 30.0) -> None:
        end = time.monotonic() + timeout
        while not ok():
            if time.monotonic() > end:
                kinds = [f"{m.kind}/{m.device or ''}" for m in self.snapshot()]
                raise AssertionError(f"Sparkplug condition not met within {timeout} s; seen: {kinds}")
            time.sleep(0.1)

    @staticmethod
    def assert_sequence(messages: list[SpbMessage]) -> None:
        """Sparkplug B: NBIRTH carries seq 0; every following message of that node session (NDATA, DBIRTH,
        DDATA, DDEATH) carries the previous seq + 1 modulo 256; NDEATH carries none."""
        expected: int | None = None
        for i, m in enumerate(messages):
            if m.kind in _NO_SEQ:
                assert m.seq is None, f"message {i}: NDEATH with a seq ({m.seq})"
                expected = None
                continue
            assert m.seq is not None, f"message {i} ({m.kind}) has no seq"
            if m.kind == "NBIRTH":
                assert m.seq == 0, f"message {i}: NBIRTH with seq {m.seq}"
            else:
                assert expected is not None, f"message {i} ({m.kind}) before any NBIRTH"
                assert m.seq == expected, f"message {i} ({m.kind}): seq {m.seq}, expected {expected}"
            expected = (m.seq + 1) % 256

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()
