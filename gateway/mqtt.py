"""The gateway's own MQTT client: persistent session, manual acknowledgements, asyncio on the outside.

paho-mqtt runs its network loop in its own thread; received messages are handed to the asyncio loop through a
queue. QoS 1 messages are **not** acknowledged on receipt (``manual_ack``): :meth:`GatewayClient.ack` sends
the PUBACK once the gateway has committed what the message carried. With ``clean_session=False`` and a fixed
client id, the broker keeps the subscription and every unacknowledged message while the gateway is down and
delivers them again when it returns, so a crash between receive and commit loses nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from dataclasses import dataclass

import paho.mqtt.client as paho

from blockdeepnet.config import BrokerConfig
from gateway.waiting import wait_event

log = logging.getLogger("bdn.gateway.mqtt")


@dataclass(frozen=True)
class Incoming:
    topic: str
    payload: bytes
    qos: int
    mid: int
    retain: bool


class MqttError(Exception):
    """The broker refused us or could not be reached; the message says what to check."""


class GatewayClient:
    def __init__(
        self,
        cfg: BrokerConfig,
        client_id: str,
        subscriptions: list[str],
        will: tuple[str, bytes],
        *,
        port: int | None = None,
        queue_size: int = 256,
    ) -> None:
        self.cfg = cfg
        self.port = port or cfg.port
        self.subscriptions = subscriptions
        # Bounded: when ingest falls behind, paho's thread blocks here and TCP back-pressure reaches the
        # broker, which queues (Mosquitto: max_queued_messages) instead of the gateway growing without limit.
        self.queue: asyncio.Queue[Incoming] = asyncio.Queue(queue_size)
        self.connected = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client = paho.Client(
            paho.CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=False,
            protocol=paho.MQTTv311,
            manual_ack=True,
        )
        self._client.will_set(will[0], will[1], qos=1, retain=True)
        # Always a username: the broker ACL is written per user, and amqtt keeps no session for anonymous.
        self._client.username_pw_set(cfg.username or "gateway", cfg.password())
        if cfg.tls_ca or cfg.tls_cert:
            self._client.tls_set(
                ca_certs=str(cfg.tls_ca) if cfg.tls_ca else None,
                certfile=str(cfg.tls_cert) if cfg.tls_cert else None,
                keyfile=str(cfg.tls_key) if cfg.tls_key else None,
                tls_version=ssl.PROTOCOL_TLS_CLIENT,
            )
        self._client.max_inflight_messages_set(100)
        self._client.max_queued_messages_set(0)
        self._client.reconnect_delay_set(0.2, 5)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message
        self._refused: str | None = None
        self._stopping = False

    # --- paho thread ----------------------------------------------------------------------------------

    def _on_connect(self, client: paho.Client, _u: object, _f: object, rc: object, _p: object) -> None:
        if getattr(rc, "is_failure", False):
            self._refused = str(rc)
            log.error("broker refused the gateway: %s (check broker.username / password_file)", rc)
            return
        # Subscribing again on every connect is harmless with a persistent session and required without one.
        client.subscribe([(topic, 1) for topic in self.subscriptions])
        log.info("connected to the broker at %s:%d", self.cfg.host, self.port)
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self.connected.set)

    def _on_disconnect(self, _c: paho.Client, _u: object, _f: object, rc: object, _p: object) -> None:
        if self._stopping:
            log.info("disconnected from the broker")
        else:
            log.warning("disconnected from the broker (%s); reconnecting", rc)
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self.connected.clear)

    def _on_message(self, _c: paho.Client, _u: object, msg: paho.MQTTMessage) -> None:
        item = Incoming(msg.topic, bytes(msg.payload), msg.qos, msg.mid, bool(msg.retain))
        assert self._loop is not None
        future = asyncio.run_coroutine_threadsafe(self.queue.put(item), self._loop)
        # RuntimeError: the loop is shutting down; the broker redelivers the unacknowledged message later.
        with contextlib.suppress(RuntimeError):
            future.result()

    # --- asyncio side -------------------------------------------------------------------------------

    async def start(self, timeout_s: float = 15.0) -> None:
        self._loop = asyncio.get_running_loop()
        try:
            await asyncio.to_thread(self._client.connect, self.cfg.host, self.port, self.cfg.keepalive_s)
        except OSError as exc:
            raise MqttError(
                f"cannot reach the MQTT broker at {self.cfg.host}:{self.port}: {exc.strerror or exc}"
            ) from exc
        self._client.loop_start()
        if not await wait_event(self.connected, timeout_s):
            self._client.loop_stop()
            why = self._refused or "no CONNACK"
            raise MqttError(
                f"the broker at {self.cfg.host}:{self.port} did not accept the gateway: {why}"
            ) from None

    def ack(self, mid: int, qos: int) -> None:
        """Acknowledge a received QoS>0 message (after what it carried is committed)."""
        if qos > 0:
            self._client.ack(mid, qos)

    def publish(self, topic: str, payload: bytes, *, retain: bool = False, qos: int = 1) -> None:
        """Queue a publish; paho resends QoS 1 until the broker acknowledges, across reconnects."""
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc not in (paho.MQTT_ERR_SUCCESS, paho.MQTT_ERR_NO_CONN):
            log.warning("publish on %s failed to queue: %s", topic, paho.error_string(info.rc))

    async def stop(self, final: tuple[str, bytes] | None = None) -> None:
        """Publish ``final`` (e.g. a retained offline state) and disconnect cleanly."""
        self._stopping = True
        if final is not None and self.connected.is_set():
            info = self._client.publish(final[0], final[1], qos=1, retain=True)
            await asyncio.to_thread(info.wait_for_publish, 3.0)
        # Off the event loop: loop_stop() joins paho's network thread, which may be in the middle of writing to
        # the embedded broker, and that broker runs on this very loop (blocking here deadlocked a shutdown).
        await asyncio.to_thread(self._disconnect)

    def _disconnect(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()
