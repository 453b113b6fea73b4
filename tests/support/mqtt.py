"""A small synchronous paho-mqtt 2.x client for tests: connect, subscribe and publish wait for the broker's
answer, and received messages queue up to be awaited or asserted absent."""

from __future__ import annotations

import queue
import ssl
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode


@dataclass(frozen=True)
class Received:
    topic: str
    payload: bytes
    retain: bool
    qos: int


class MqttTestClient:
    """One MQTT 3.1.1 connection (the protocol amqtt speaks), with paho's network loop in a thread.

    Reconnection is off: a refused CONNECT is reported by :meth:`try_connect`, not retried in the background.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        username: str | None = None,
        password: str | None = None,
        client_id: str | None = None,
        clean_session: bool = True,
        tls_ca: Path | None = None,
        will: tuple[str, bytes, int, bool] | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.client_id = client_id or f"t-{uuid.uuid4().hex[:12]}"
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=mqtt.MQTTv311,
            clean_session=clean_session,
            reconnect_on_failure=False,
        )
        if username is not None:
            self.client.username_pw_set(username, password)
        if tls_ca is not None:
            self.client.tls_set(ca_certs=str(tls_ca), cert_reqs=ssl.CERT_REQUIRED)
        if will is not None:
            topic, payload, qos, retain = will
            self.client.will_set(topic, payload, qos, retain)
        self.messages: queue.Queue[Received] = queue.Queue()
        self._connected = threading.Event()
        self._connack: ReasonCode | None = None
        self._session_present = False
        self._lock = threading.Lock()
        self._suback: dict[int, list[ReasonCode]] = {}
        self._suback_event = threading.Condition(self._lock)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe

    # --- paho callbacks (network thread) -----------------------------------------------------------------

    def _on_connect(
        self, client: Any, userdata: Any, flags: Any, reason: ReasonCode, properties: Any
    ) -> None:
        self._connack = reason
        self._session_present = bool(flags.session_present)
        self._connected.set()

    def _on_disconnect(
        self, client: Any, userdata: Any, flags: Any, reason: ReasonCode, properties: Any
    ) -> None:
        self._connected.set()  # unblocks try_connect when the broker just closes the socket

    def _on_message(self, client: Any, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        self.messages.put(Received(msg.topic, bytes(msg.payload), bool(msg.retain), msg.qos))

    def _on_subscribe(
        self, client: Any, userdata: Any, mid: int, reasons: list[ReasonCode], properties: Any
    ) -> None:
        with self._suback_event:
            self._suback[mid] = list(reasons)
            self._suback_event.notify_all()

    # --- operations --------------------------------------------------------------------------------------

    def try_connect(self, timeout: float = 10.0) -> ReasonCode | None:
        """Connect and return the CONNACK reason (None: the broker closed the socket without one)."""
        self.client.connect(self.host, self.port, keepalive=30)
        self.client.loop_start()
        if not self._connected.wait(timeout):
            raise TimeoutError(f"no CONNACK from {self.host}:{self.port} within {timeout} s")
        return self._connack

    def connect(self, timeout: float = 10.0) -> MqttTestClient:
        reason = self.try_connect(timeout)
        if reason is None or reason.is_failure:
            self.close()
            raise ConnectionError(f"{self.client_id}: connection refused: {reason}")
        return self

    @property
    def session_present(self) -> bool:
        return self._session_present

    def subscribe(self, topic_filter: str, qos: int = 1, timeout: float = 10.0) -> int:
        """Subscribe and return the granted QoS, or 0x80 when the broker refused the filter."""
        rc, mid = self.client.subscribe(topic_filter, qos)
        if rc != mqtt.MQTT_ERR_SUCCESS:
            raise ConnectionError(f"subscribe {topic_filter!r} not sent: {mqtt.error_string(rc)}")
        deadline = time.monotonic() + timeout
        with self._suback_event:
            while mid not in self._suback:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"no SUBACK for {topic_filter!r} within {timeout} s")
                self._suback_event.wait(remaining)
            reason = self._suback.pop(mid)[0]
        return 0x80 if reason.is_failure else int(reason.value)

    def publish(
        self, topic: str, payload: bytes, qos: int = 1, retain: bool = False, timeout: float = 10.0
    ) -> None:
        """Publish and, for QoS 1, wait for the PUBACK (brokers acknowledge refused publishes too)."""
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        info.wait_for_publish(timeout)
        if not info.is_published():
            raise TimeoutError(f"publish on {topic!r} not acknowledged within {timeout} s")

    def expect(self, topic: str, payload: bytes | None = None, timeout: float = 10.0) -> Received:
        """The next message on ``topic`` (with ``payload``, if given); other messages are kept aside."""
        deadline = time.monotonic() + timeout
        skipped: list[Received] = []
        try:
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(
                        f"{self.client_id}: nothing on {topic!r} within {timeout} s; got instead "
                        f"{[(m.topic, m.payload[:40]) for m in skipped]}"
                    )
                try:
                    msg = self.messages.get(timeout=remaining)
                except queue.Empty:
                    continue
                if msg.topic == topic and (payload is None or msg.payload == payload):
                    return msg
                skipped.append(msg)
        finally:
            for m in skipped:
                self.messages.put(m)

    def drain(self, wait: float = 0.0) -> list[Received]:
        """Everything received so far, after waiting ``wait`` seconds for stragglers."""
        if wait:
            time.sleep(wait)
        out = []
        while True:
            try:
                out.append(self.messages.get_nowait())
            except queue.Empty:
                return out

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def __enter__(self) -> MqttTestClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
