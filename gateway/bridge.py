"""The upstream bridge: chosen topics from the gateway's broker to the plant's broker (``up``) and back
(``down``), for sites whose SCADA/historian lives on a plant broker.

No QoS 1 message is lost on the way, with either broker or the gateway going away: both sides are persistent
sessions with manual acknowledgements, and a message is acknowledged on the side it came from only once the
other side has acknowledged its copy. Until then the source broker keeps it and delivers it again after a
reconnect (at least once: after a crash of the gateway, or a restart of the source broker, a message may
arrive twice). The source broker's in-flight window (:data:`IN_FLIGHT` as MQTT 5 Receive Maximum; Mosquitto's
``max_inflight_messages`` for MQTT 3.1.1) bounds what waits in the gateway; the rest of an outage waits in
that broker's queue, not in the gateway's memory.

Acknowledgements are handed from paho's callbacks to a small worker thread: paho calls ``on_publish`` while
holding its own lock, so acknowledging (or even waiting for the bridge's lock) right there could deadlock
against the other side's thread publishing.

A plant broker that is down or refuses us is not fatal for the gateway: the bridge keeps retrying (backing
off to 30 s) and says why in the log and in ``bdn_bridge_connected``. Down messages never enter the
protocol's own ``bdn/`` namespace: rounds, global models and receipts speak for the gateway, and the plant
must not be able to forge them with the gateway's credentials.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass

import paho.mqtt.client as paho
from paho.mqtt.subscribeoptions import SubscribeOptions

from blockdeepnet.config import BridgeConfig
from blockdeepnet.wire import BROKER_MESSAGE_MAX_BYTES
from gateway.endpoint import Endpoint, refused
from gateway.metrics import Metrics

log = logging.getLogger("bdn.gateway.bridge")

IN_FLIGHT = 100  # unacknowledged messages a broker may have out to the bridge, per side
PROTECTED = "bdn/"  # the protocol's namespace: nothing comes down into it


@dataclass(frozen=True)
class Route:
    """One direction: messages matching ``filters`` on the source broker are republished on the target.

    ``filters`` are spelled as the source broker sees them: the configured ``up`` filters for ``up``, the
    configured ``down`` filters behind ``prefix`` for ``down``."""

    direction: str  # "up" | "down"
    filters: tuple[str, ...]
    prefix: str

    @classmethod
    def up(cls, cfg: BridgeConfig, fleet: str) -> Route:
        return cls("up", cfg.up_filters(fleet), cfg.remote_prefix)

    @classmethod
    def down(cls, cfg: BridgeConfig) -> Route:
        return cls("down", tuple(cfg.remote_prefix + f for f in cfg.down), cfg.remote_prefix)

    def target_topic(self, topic: str) -> tuple[str | None, str]:
        """``(topic as the target spells it, "")``, or ``(None, why not)`` for a message that must not cross."""
        if self.direction == "up":
            return self.prefix + topic, ""
        if not topic.startswith(self.prefix) or len(topic) == len(self.prefix):
            return None, "prefix"
        local = topic[len(self.prefix) :]
        if local.startswith(PROTECTED):
            return None, "protected"
        return local, ""


class _Side:
    """One broker connection of the bridge: persistent, manual acks, reconnecting forever."""

    def __init__(self, endpoint: Endpoint, client_id: str, label: str, metrics: Metrics) -> None:
        self.endpoint = endpoint
        self.label = label
        self.metrics = metrics
        self.subscriptions: list[tuple[str, int]] = []
        self.client = endpoint.client(client_id, persistent=True, manual_ack=True)
        self.client.max_inflight_messages_set(IN_FLIGHT)
        self.client.max_queued_messages_set(0)  # bounded by the other side's window, see the module notes
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_connect_fail = self._on_connect_fail
        self.connected = threading.Event()
        self._last_problem = ""
        self._stopping = False

    def start(self) -> None:
        self.metrics.bridge_connected.labels(self.label).set(0)
        self.endpoint.connect_async(self.client, persistent=True, receive_maximum=IN_FLIGHT)
        self.client.loop_start()

    def stop(self) -> None:
        self._stopping = True  # our own disconnect: no "lost" warning
        self.client.disconnect()
        self.client.loop_stop()

    def _problem(self, text: str, level: int) -> None:
        """Log a connection problem once, not on every retry."""
        if text != self._last_problem:
            self._last_problem = text
            log.log(level, "bridge: %s: %s; retrying", self.endpoint, text)

    def _on_connect(self, client: paho.Client, _u: object, _f: object, reason: object, _p: object) -> None:
        problem = refused(reason)
        if problem:
            self._problem(f"refused us: {problem}", logging.ERROR)
            return
        if self.subscriptions and self.endpoint.protocol == "5":
            # Retain As Published: a retained value stays retained on the other broker (MQTT 3.1.1 clears the
            # flag on live delivery, so over 3.1.1 only what is retained at subscribe time keeps it).
            client.subscribe(
                [(f, SubscribeOptions(qos=q, retainAsPublished=True)) for f, q in self.subscriptions]
            )
        elif self.subscriptions:
            client.subscribe(self.subscriptions)
        self._last_problem = ""
        self.connected.set()
        self.metrics.bridge_connected.labels(self.label).set(1)
        log.info("bridge: connected to %s", self.endpoint)

    def _on_connect_fail(self, _c: paho.Client, _u: object) -> None:
        # paho calls this from inside its ``except OSError`` block: the exception says why (refused, TLS).
        exc = sys.exc_info()[1]
        self._problem(f"cannot connect ({exc or 'unreachable'})", logging.WARNING)

    def _on_disconnect(self, _c: paho.Client, _u: object, _f: object, reason: object, _p: object) -> None:
        if not self.connected.is_set():
            return  # a refused CONNECT, already logged
        self.connected.clear()
        self.metrics.bridge_connected.labels(self.label).set(0)
        if self._stopping:
            log.info("bridge: disconnected from %s", self.endpoint)
            return
        log.warning(
            "bridge: lost %s (%s); messages wait in the brokers until it is back", self.endpoint, reason
        )


class Bridge:
    """Both sides and the routes between them. ``start``/``close`` for a thread, or ``async with``."""

    def __init__(self, cfg: BridgeConfig, local: Endpoint, fleet: str, metrics: Metrics) -> None:
        cid = cfg.client_id or f"bdn-bridge-{fleet}"
        self.metrics = metrics
        self.qos = cfg.qos
        self.local = _Side(local, f"{cid}-local", "local", metrics)
        self.plant = _Side(Endpoint.plant(cfg), cid, "plant", metrics)
        up, down = Route.up(cfg, fleet), Route.down(cfg)
        self.local.subscriptions = [(f, cfg.qos) for f in up.filters]
        self.plant.subscriptions = [(f, cfg.qos) for f in down.filters]
        self._sources = {"up": self.local, "down": self.plant}
        self._lock = threading.Lock()
        # per direction, target mid -> source mid: what to acknowledge once the target acknowledged
        self._pending: dict[str, dict[int, int]] = {"up": {}, "down": {}}
        self._acks: queue.SimpleQueue[tuple[str, int, object] | None] = queue.SimpleQueue()
        self._worker = threading.Thread(target=self._ack_worker, name="bdn-bridge-acks", daemon=True)
        self.local.client.on_message = self._forwarder(up, self.local, self.plant)
        self.plant.client.on_message = self._forwarder(down, self.plant, self.local)
        self.plant.client.on_publish = self._on_publish("up")
        self.local.client.on_publish = self._on_publish("down")

    def in_flight(self) -> int:
        """Messages forwarded but not yet acknowledged by their target."""
        with self._lock:
            return sum(len(p) for p in self._pending.values())

    def _forwarder(
        self, route: Route, source: _Side, target: _Side
    ) -> Callable[[paho.Client, object, paho.MQTTMessage], None]:
        def forward(_c: paho.Client, _u: object, msg: paho.MQTTMessage) -> None:
            topic, why = route.target_topic(msg.topic)
            if topic is not None and len(msg.payload) > BROKER_MESSAGE_MAX_BYTES:
                topic, why = None, "size"
            if topic is None:
                log.warning(
                    "bridge: %s message on %r not forwarded (%s)", route.direction, msg.topic[:200], why
                )
                self.metrics.bridge_dropped.labels(why).inc()
                if msg.qos:
                    source.client.ack(msg.mid, msg.qos)
                return
            qos = min(self.qos, msg.qos)
            # Publish and record under one lock, so the acknowledgement (handled by the worker, which takes
            # the same lock) always finds the record. Paho's publish never waits for the network.
            with self._lock:
                info = target.client.publish(topic, msg.payload, qos=qos, retain=msg.retain)
                if qos:
                    self._pending[route.direction][info.mid] = msg.mid
            if not qos:
                if msg.qos:
                    source.client.ack(msg.mid, msg.qos)
                self.metrics.bridge_forwarded.labels(route.direction).inc()

        return forward

    def _on_publish(self, direction: str) -> Callable[[paho.Client, object, int, object, object], None]:
        def acked(_c: paho.Client, _u: object, mid: int, reason: object, _p: object) -> None:
            self._acks.put((direction, mid, reason))  # paho holds its lock here: hand over, never wait

        return acked

    def _ack_worker(self) -> None:
        while (item := self._acks.get()) is not None:
            direction, mid, reason = item
            with self._lock:
                source_mid = self._pending[direction].pop(mid, None)
            if source_mid is None:
                continue  # a QoS 0 copy
            if getattr(reason, "is_failure", False):
                # The target broker took the message and refused it (MQTT 5, e.g. its ACL): retrying would
                # not help, so it is acknowledged at the source and counted as dropped.
                log.warning("bridge: %s message refused by the target broker: %s", direction, reason)
                self.metrics.bridge_dropped.labels("refused").inc()
            else:
                self.metrics.bridge_forwarded.labels(direction).inc()
            self._sources[direction].client.ack(source_mid, 1)

    async def __aenter__(self) -> Bridge:
        self.start()
        return self

    async def __aexit__(self, *_: object) -> None:
        await asyncio.to_thread(self.close)

    def start(self) -> None:
        """Connect both sides in the background (paho's threads); returns at once."""
        self._worker.start()
        # The plant side first: messages from the local side then have somewhere to go at once.
        self.plant.start()
        self.local.start()
        log.info(
            "bridge: %s up to %s, %s down",
            ", ".join(f for f, _ in self.local.subscriptions) or "nothing",
            self.plant.endpoint,
            ", ".join(f for f, _ in self.plant.subscriptions) or "nothing",
        )

    def close(self) -> None:
        """Disconnect both sides. Whatever is not acknowledged stays with its source broker."""
        self.local.stop()
        self.plant.stop()
        self._acks.put(None)
        if self._worker.is_alive():
            self._worker.join(timeout=10)
