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
    qos: int = 0  # as delivered: the publisher's QoS, at most the recorder's subscription QoS (1)

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
    """``persistent``: a persistent session (fixed client id, clean session false), so what the edge node
    publishes while the recorder is cut off (a broker restart) is queued by the broker, not lost.
    ``username``/``password``: for a broker with a password file and ACL (the fleet's ``monitor`` user)."""

    def __init__(
        self,
        host: str,
        port: int,
        topic_filter: str = "spBv1.0/#",
        *,
        persistent: bool = False,
        username: str | None = None,
        password: str | None = None,
    ) -> None:
        self.messages: list[SpbMessage] = []
        self.undecodable: list[str] = []
        self._aliases: dict[tuple[str, str | None], dict[int, str]] = {}
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self._client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=f"spb-host-{port}-{id(self)}",
            clean_session=not persistent,
        )
        self._client.reconnect_delay_set(1, 2)
        if username is not None:
            self._client.username_pw_set(username, password)
        self._client.on_connect = lambda c, *_: c.subscribe(topic_filter, qos=1)
        self._client.on_subscribe = self._on_subscribe
        self._refused: list[str] = []
        self._client.on_message = self._on_message
        self._client.connect(host, port)
        self._client.loop_start()
        if not self._subscribed.wait(15) or self._refused:
            raise RuntimeError(
                f"the Sparkplug recorder could not subscribe on {host}:{port}: {self._refused}"
            )

    def _on_subscribe(self, _c: mqtt.Client, _u: Any, _mid: int, reasons: list[Any], _p: Any) -> None:
        self._refused = [str(r) for r in reasons if r.is_failure]
        self._subscribed.set()

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
                    qos=msg.qos,
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

    @staticmethod
    def assert_births_first(messages: list[SpbMessage]) -> None:
        """Sparkplug B: NDATA and DBIRTH only while the node is born (after NBIRTH, before NDEATH); DDATA and
        DDEATH only for a device born since the last NBIRTH and not dead since."""
        node_born = False
        born: set[str | None] = set()
        for i, m in enumerate(messages):
            if m.kind == "NBIRTH":
                node_born, born = True, set()
            elif m.kind == "NDEATH":
                node_born, born = False, set()
            elif m.kind in ("NDATA", "DBIRTH"):
                assert node_born, f"message {i} ({m.kind} {m.device or ''}) while the node is not born"
                if m.kind == "DBIRTH":
                    born.add(m.device)
            elif m.kind in ("DDATA", "DDEATH"):
                assert m.device in born, f"message {i} ({m.kind} {m.device}) for a device not born"
                if m.kind == "DDEATH":
                    born.discard(m.device)

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()
