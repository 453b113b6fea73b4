"""Full-speed MQTT publishing and receipt counting, for tests that flood the gateway.

:class:`Flooder` publishes a stream of QoS 1 messages as fast as the broker takes them, with a bounded window of
unacknowledged ones (so megabyte payloads are built one by one, never all held in memory), from its own
thread. :class:`ReceiptCounter` subscribes to every device's receipt topic and counts what arrives per topic:
accepted, refused by reason code, and receipts a device could not decode (``Receipt.from_cbor`` refusing one:
the gateway broke its own wire format).
"""

from __future__ import annotations

import collections
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from blockdeepnet.wire import Receipt, WireError


def _client(host: str, port: int, prefix: str) -> mqtt.Client:
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2, client_id=f"{prefix}-{uuid.uuid4().hex[:8]}", protocol=mqtt.MQTTv311
    )
    connected = threading.Event()
    client.on_connect = lambda *_: connected.set()
    client.max_inflight_messages_set(64)
    client.max_queued_messages_set(0)
    client.connect(host, port, keepalive=60)
    client.loop_start()
    if not connected.wait(15):
        raise ConnectionError(f"{prefix}: no CONNACK from {host}:{port}")
    return client


class Flooder:
    """Publishes ``(topic, payload or payload factory)`` items in a thread; :meth:`join` waits for the PUBACKs."""

    def __init__(self, host: str, port: int, *, window: int = 48) -> None:
        self.client = _client(host, port, "flood")
        self.window = window
        self.sent = 0
        self.error: BaseException | None = None
        self._thread: threading.Thread | None = None

    def start(self, items: Iterable[tuple[str, bytes | Callable[[], bytes]]]) -> Flooder:
        self._thread = threading.Thread(target=self._run, args=(items,), name="flooder", daemon=True)
        self._thread.start()
        return self

    def _run(self, items: Iterable[tuple[str, bytes | Callable[[], bytes]]]) -> None:
        outstanding: collections.deque[mqtt.MQTTMessageInfo] = collections.deque()
        try:
            for topic, payload in items:
                data = payload() if callable(payload) else payload
                info = self.client.publish(topic, data, qos=1)
                if info.rc != mqtt.MQTT_ERR_SUCCESS:
                    raise ConnectionError(f"publish on {topic}: {mqtt.error_string(info.rc)}")
                outstanding.append(info)
                self.sent += 1
                while len(outstanding) > self.window:
                    outstanding.popleft().wait_for_publish(60)
            while outstanding:
                info = outstanding.popleft()
                info.wait_for_publish(60)
                if not info.is_published():
                    raise TimeoutError("a flood message was not PUBACKed within 60 s")
        except BaseException as exc:
            self.error = exc

    def join(self, timeout: float = 300.0) -> None:
        assert self._thread is not None
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError(f"flooder still publishing after {timeout} s ({self.sent} sent)")
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@dataclass
class TopicCount:
    accepted: int = 0
    refused: int = 0
    undecodable: int = 0
    reasons: collections.Counter[str] = field(default_factory=collections.Counter)
    details: list[str] = field(default_factory=list)


class ReceiptCounter:
    """Counts receipts on ``<prefix>dev/+/receipt`` per topic (QoS 1, so none is lost on the way)."""

    def __init__(self, host: str, port: int, receipt_filter: str) -> None:
        self.counts: dict[str, TopicCount] = collections.defaultdict(TopicCount)
        self.first_at: float | None = None
        self.last_at: float | None = None
        self._lock = threading.Condition()
        self.client = _client(host, port, "receipts")
        self.client.on_message = self._on_message
        done = threading.Event()
        self.client.on_subscribe = lambda *_: done.set()
        self.client.subscribe(receipt_filter, 1)
        if not done.wait(15):
            raise TimeoutError(f"no SUBACK for {receipt_filter}")

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        now = time.monotonic()
        try:
            receipt: Receipt | None = Receipt.from_cbor(bytes(msg.payload))
        except WireError:
            receipt = None
        with self._lock:
            self.first_at = self.first_at or now
            self.last_at = now
            count = self.counts[msg.topic]
            if receipt is None:
                count.undecodable += 1
                count.details.append(f"{len(msg.payload)} bytes: {bytes(msg.payload[:80])!r}")
            elif receipt.accepted:
                count.accepted += 1
            else:
                count.refused += 1
                count.reasons[str(receipt.reason)] += 1
            self._lock.notify_all()

    def total(self, what: str = "refused") -> int:
        with self._lock:
            return sum(getattr(c, what) for c in self.counts.values())

    def wait_all(self, expected: int, timeout: float, alive: Callable[[], bool], quiet: float = 15.0) -> None:
        """Until ``expected`` receipts of any kind arrived in all, or none came for ``quiet`` seconds, or
        ``timeout``: the caller checks the counts."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while sum(c.accepted + c.refused + c.undecodable for c in self.counts.values()) < expected:
                now = time.monotonic()
                if now > deadline or (self.last_at is not None and now - self.last_at > quiet):
                    return
                if not alive():
                    raise AssertionError("the gateway died while answering the flood")
                self._lock.wait(0.5)

    def snapshot(self) -> dict[str, TopicCount]:
        with self._lock:
            return {
                t: TopicCount(
                    c.accepted, c.refused, c.undecodable, collections.Counter(c.reasons), list(c.details)
                )
                for t, c in self.counts.items()
            }

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
