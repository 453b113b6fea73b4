"""Where an extra MQTT connection of the gateway goes (its own broker, or the plant's), and a paho client
configured for it: protocol version, session kind, credentials, TLS. Used by the bridge and the Sparkplug
edge node, which each need connections of their own (their own will, their own session)."""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from blockdeepnet.config import BridgeConfig, BrokerConfig

SESSION_EXPIRY_S = 24 * 3600  # MQTT 5 persistent sessions: a day-long outage of either side loses nothing


@dataclass(frozen=True)
class Endpoint:
    name: str  # "local broker" / "plant broker", for messages
    host: str
    port: int
    protocol: str  # "3.1.1" | "5"
    username: str | None
    password: str | None
    tls_ca: Path | None
    tls_cert: Path | None
    tls_key: Path | None
    keepalive_s: int

    @classmethod
    def local(cls, cfg: BrokerConfig, port: int) -> Endpoint:
        """The gateway's own broker, with the gateway's credentials (the ACL grants it what it forwards).
        MQTT 5 with an external broker (Mosquitto), so the bridge can keep a live message's retain flag
        (Retain As Published); the embedded amqtt broker speaks 3.1.1 only."""
        return cls(
            "local broker",
            cfg.host,
            port,
            "5" if cfg.mode == "external" else "3.1.1",
            cfg.username or "gateway",
            cfg.password(),
            cfg.tls_ca,
            cfg.tls_cert,
            cfg.tls_key,
            cfg.keepalive_s,
        )

    @classmethod
    def plant(cls, cfg: BridgeConfig) -> Endpoint:
        return cls(
            "plant broker",
            cfg.host,
            cfg.port,
            cfg.protocol,
            cfg.username or None,
            cfg.password(),
            cfg.tls_ca,
            cfg.tls_cert,
            cfg.tls_key,
            cfg.keepalive_s,
        )

    def __str__(self) -> str:
        return f"the {self.name} at {self.host}:{self.port}"

    def client(self, client_id: str, *, persistent: bool, manual_ack: bool = False) -> paho.Client:
        """A paho client for this endpoint. ``persistent``: the broker keeps the session (subscriptions and
        unacknowledged QoS 1 messages) across disconnects: MQTT 3.1.1 clean session false, MQTT 5 clean start
        false with a session expiry. Otherwise a clean session, as Sparkplug B requires of an edge node."""
        v5 = self.protocol == "5"
        c = paho.Client(
            paho.CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=None if v5 else not persistent,
            protocol=paho.MQTTv5 if v5 else paho.MQTTv311,
            manual_ack=manual_ack,
        )
        if self.username:
            c.username_pw_set(self.username, self.password)
        if self.tls_ca or self.tls_cert:
            c.tls_set(
                ca_certs=str(self.tls_ca) if self.tls_ca else None,
                certfile=str(self.tls_cert) if self.tls_cert else None,
                keyfile=str(self.tls_key) if self.tls_key else None,
                tls_version=ssl.PROTOCOL_TLS_CLIENT,
            )
        c.reconnect_delay_set(0.5, 30)
        return c

    def connect_async(self, c: paho.Client, *, persistent: bool, receive_maximum: int | None = None) -> None:
        """Start connecting without waiting: paho's loop retries until the broker is there, so a plant broker
        that is down when the gateway starts is not an error, only a log line. ``receive_maximum`` (MQTT 5):
        how many unacknowledged QoS 1 messages the broker may have in flight to us; the rest it queues."""
        if self.protocol == "5":
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = SESSION_EXPIRY_S if persistent else 0
            if receive_maximum is not None:
                props.ReceiveMaximum = receive_maximum
            c.connect_async(
                self.host, self.port, self.keepalive_s, clean_start=not persistent, properties=props
            )
        else:
            c.connect_async(self.host, self.port, self.keepalive_s)


def refused(reason: object) -> str | None:
    """A CONNACK refusal as advice, or None when the connection was accepted."""
    if not getattr(reason, "is_failure", False):
        return None
    text = str(reason)
    if "authori" in text.lower() or "password" in text.lower():
        return f"{text}: check the username and password file"
    return text
