"""`bdn provision mosquitto-bridge`'s text: each [bridge] setting as the Mosquitto option that means the same,
the prefix on the remote side of every topic line, and the settings a native bridge cannot express refused
with a message that says what to change."""

from __future__ import annotations

from pathlib import Path

import pytest

from blockdeepnet.config import BridgeConfig
from provisioning.mosquitto_bridge import StanzaError, bridge_stanza


def _cfg(**kw: object) -> BridgeConfig:
    return BridgeConfig(**{"enabled": True, "host": "plant.example", **kw})  # type: ignore[arg-type]


def _options(text: str) -> list[str]:
    return [line for line in text.splitlines() if line and not line.startswith("#")]


def test_a_plain_bridge() -> None:
    lines = _options(bridge_stanza(_cfg(port=8883, remote_prefix="plant1/", down=("cmd/#",)), "f1"))
    assert lines[:4] == [
        "connection bdn-f1",
        "address plant.example:8883",
        "bridge_protocol_version mqttv311",
        "remote_clientid bdn-bridge-f1",
    ]
    assert "cleansession false" in lines and "try_private true" in lines and "notifications true" in lines
    assert "restart_timeout 5 30" in lines and "keepalive_interval 30" in lines
    assert [x for x in lines if x.startswith("topic ")] == [
        'topic bdn/v1/f1/gateway/state out 1 "" plant1/',
        'topic bdn/v1/f1/round out 1 "" plant1/',
        'topic bdn/v1/f1/dev/+/state out 1 "" plant1/',
        'topic cmd/# in 1 "" plant1/',
    ]
    assert not any(x.startswith(("remote_username", "remote_password", "bridge_cafile")) for x in lines)


def test_mqtt5_credentials_tls_and_an_empty_prefix(tmp_path: Path) -> None:
    pw = tmp_path / "pw"
    pw.write_text("s3cret with space\n")
    cfg = _cfg(
        protocol="5",
        username="site7",
        password_file=pw,
        tls_ca=Path("/etc/bdn/plant-ca.pem"),
        tls_cert=Path("/etc/bdn/site.pem"),
        tls_key=Path("/etc/bdn/site.key"),
        client_id="site7-bridge",
        up=("a/#",),
        qos=0,
    )
    lines = _options(bridge_stanza(cfg, "f1"))
    for expected in (
        "bridge_protocol_version mqttv50",
        "remote_clientid site7-bridge",
        "remote_username site7",
        "remote_password s3cret with space",  # Mosquitto reads the rest of the line
        "bridge_cafile /etc/bdn/plant-ca.pem",
        "bridge_certfile /etc/bdn/site.pem",
        "bridge_keyfile /etc/bdn/site.key",
        'topic a/# out 0 "" ""',
    ):
        assert expected in lines


def test_a_client_certificate_without_a_ca_uses_the_systems_cas() -> None:
    cfg = _cfg(tls_cert=Path("/c.pem"), tls_key=Path("/k.pem"))
    assert "bridge_capath /etc/ssl/certs" in _options(bridge_stanza(cfg, "f"))


@pytest.mark.parametrize("down", ["#", "+/v1/f/round", "bdn/v1/f/global/#"])
def test_down_filters_that_reach_the_protocol_topics_are_refused(down: str) -> None:
    with pytest.raises(StanzaError, match="narrow it"):
        bridge_stanza(_cfg(down=(down,)), "f")


@pytest.mark.parametrize(
    ("cfg", "match"),
    [
        (_cfg(host=""), "bridge.host is empty"),
        (_cfg(up=("a b/#",)), "has spaces"),
        (_cfg(up=("a/#/b",)), "not an MQTT topic filter"),
        (_cfg(client_id="my bridge"), "client_id"),
        (_cfg(remote_prefix="plant 1/"), "remote_prefix"),
    ],
)
def test_what_mosquitto_could_not_read_is_refused(cfg: BridgeConfig, match: str) -> None:
    with pytest.raises(StanzaError, match=match):
        bridge_stanza(cfg, "f")
