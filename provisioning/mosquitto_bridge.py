"""``[bridge]`` as a native Mosquitto bridge stanza, for sites that prefer the broker to do the bridging.

The stanza says what the gateway's own bridge does: the same plant broker, protocol, client id, credentials and
TLS files, persistent sessions (``cleansession false``: QoS 1 messages wait out an outage of either side),
and one ``topic`` line per ``up``/``down`` filter. Mosquitto's ``topic <pattern> out|in <qos> <local-prefix>
<remote-prefix>`` puts each prefix in front of the pattern on its side, so ``remote_prefix`` is the remote
prefix and the local prefix is empty (written ``""``).

One thing the native bridge cannot do is look at a topic before publishing it locally: the gateway's bridge
refuses anything coming down into the protocol's ``bdn/`` namespace, Mosquitto would not. So a ``down`` filter
that could reach ``bdn/`` is refused here instead of rendered.

Pure text rendering: the caller decides where the text goes (it holds the plant password when there is one).
"""

from __future__ import annotations

from blockdeepnet.config import BridgeConfig

PROTECTED = "bdn"  # first topic level of the protocol's namespace


class StanzaError(ValueError):
    """A ``[bridge]`` setting that cannot be written as a Mosquitto bridge; the message says what to change."""


def _token(value: str, key: str) -> str:
    """A value Mosquitto reads as one whitespace-separated token."""
    if not value or any(c.isspace() for c in value) or value == '""':
        raise StanzaError(
            f"bridge.{key} = {value!r} cannot be written in mosquitto.conf (empty or has spaces)"
        )
    return value


def _filter(f: str, key: str) -> str:
    levels = _token(f, key).split("/")
    for i, level in enumerate(levels):
        if ("#" in level and (level != "#" or i != len(levels) - 1)) or ("+" in level and level != "+"):
            raise StanzaError(f"bridge.{key}: {f!r} is not an MQTT topic filter")
    return f


def _reaches_protected(f: str) -> bool:
    return f.split("/", 1)[0] in (PROTECTED, "+", "#")


def bridge_stanza(cfg: BridgeConfig, fleet: str, *, source: str = "gateway.toml") -> str:
    """The Mosquitto config text for ``cfg`` (the gateway's ``[bridge]``) of ``fleet``. Includes the plant
    password when ``cfg.password_file`` is set: write it to a file only its owner can read."""
    if not cfg.host:
        raise StanzaError("bridge.host is empty: set the plant broker's address in [bridge]")
    if any(c in cfg.remote_prefix for c in "+#") or any(c.isspace() for c in cfg.remote_prefix):
        raise StanzaError(f"bridge.remote_prefix {cfg.remote_prefix!r} may hold neither wildcards nor spaces")
    for f in cfg.down:
        if _reaches_protected(f):
            raise StanzaError(
                f"bridge.down filter {f!r} could let the plant publish into the fleet's bdn/ topics, which a "
                "native Mosquitto bridge cannot filter out: narrow it (e.g. spBv1.0/<group>/NCMD/#)"
            )
    prefix = cfg.remote_prefix or '""'
    client_id = _token(cfg.client_id or f"bdn-bridge-{fleet}", "client_id")
    lines = [
        f"# Mosquitto bridge for fleet {fleet}: the equivalent of [bridge] in {source}.",
        "# Written by `bdn provision mosquitto-bridge`. Put it in the gateway's Mosquitto config (for example",
        "# /etc/mosquitto/conf.d/bdn-bridge.conf) and set bridge.enabled = false in the gateway's config, so",
        "# that messages are not bridged twice.",
        f"connection bdn-{_token(fleet, 'fleet')}",
        f"address {_token(cfg.host, 'host')}:{cfg.port}",
        f"bridge_protocol_version {'mqttv50' if cfg.protocol == '5' else 'mqttv311'}",
        f"remote_clientid {client_id}",
    ]
    if cfg.username:
        lines.append(f"remote_username {_token(cfg.username, 'username')}")
        password = cfg.password()
        if password:
            lines.append(f"remote_password {password}")
    tls = (("bridge_cafile", "tls_ca", cfg.tls_ca), ("bridge_certfile", "tls_cert", cfg.tls_cert))
    for option, key, path in (*tls, ("bridge_keyfile", "tls_key", cfg.tls_key)):
        if path is not None:
            lines.append(f"{option} {_token(str(path), key)}")
    if cfg.tls_cert is not None and cfg.tls_ca is None:
        lines += ["# The system's CAs, as the gateway's own bridge uses.", "bridge_capath /etc/ssl/certs"]
    lines += [
        "# Persistent sessions on both brokers: QoS 1 messages wait out an outage of either side.",
        "cleansession false",
        f"keepalive_interval {cfg.keepalive_s}",
        "# Reconnect after 5 s, backing off to 30 s, as the gateway's own bridge does.",
        "restart_timeout 5 30",
        "start_type automatic",
        "# Tells a Mosquitto plant broker that this is a bridge (so it does not echo our messages back);",
        "# set it to false if the plant broker is not Mosquitto and refuses the connection.",
        "try_private true",
        "# 1/0 on $SYS/broker/connection/<remote_clientid>/state, on both brokers, as the bridge comes and goes.",
        "notifications true",
    ]
    up, down = cfg.up_filters(fleet), cfg.down
    if up:
        lines.append(f"# Up: <topic> here is {cfg.remote_prefix}<topic> on the plant broker.")
        lines += [f'topic {_filter(f, "up")} out {cfg.qos} "" {prefix}' for f in up]
    if down:
        lines.append(f"# Down: {cfg.remote_prefix}<topic> on the plant broker is <topic> here.")
        lines += [f'topic {_filter(f, "down")} in {cfg.qos} "" {prefix}' for f in down]
    return "\n".join(lines) + "\n"
