"""The upstream bridge between two real Mosquittos (the gateway's and the "plant" broker): forwarding both
ways with the prefix, MQTT 3.1.1 and 5, TLS, a plant broker outage without losing a QoS 1 message, and a
refused login that leaves the bridge retrying instead of taking the gateway down."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from blockdeepnet.config import BridgeConfig, BrokerConfig
from blockdeepnet.wire import GatewayState, Topics
from gateway.bridge import Bridge
from gateway.endpoint import Endpoint
from gateway.metrics import Metrics
from tests.support.fleets import small_fleet
from tests.support.gateway import GatewayThread
from tests.support.mosquitto import MosquittoProcess, MosquittoTls, write_password_file
from tests.support.mqtt import MqttTestClient
from tests.support.tls import self_signed_cert

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

PREFIX = "plant1/"


def _bridge(local: MosquittoProcess, plant: MosquittoProcess, **options: object) -> Bridge:
    cfg = BridgeConfig(
        enabled=True,
        host=plant.host,
        port=plant.port,
        remote_prefix=PREFIX,
        up=("site/#",),
        down=("cmd/#",),
        client_id=f"bridge-{plant.port}",
        **options,  # type: ignore[arg-type]
    )
    b = Bridge(cfg, Endpoint.local(BrokerConfig(), local.port), "f", Metrics())
    b.start()
    return b


@pytest.fixture
def brokers(mosquitto_factory: Callable[..., MosquittoProcess]) -> tuple[MosquittoProcess, MosquittoProcess]:
    return mosquitto_factory(), mosquitto_factory()


@pytest.fixture
def closing() -> Iterator[list[Bridge | MqttTestClient]]:
    things: list[Bridge | MqttTestClient] = []
    yield things
    for t in reversed(things):
        t.close()


def _wait(ok: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while not ok():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_forwards_up_and_down_with_the_prefix(
    brokers: tuple[MosquittoProcess, MosquittoProcess], closing: list[Bridge | MqttTestClient], protocol: str
) -> None:
    local, plant = brokers
    bridge = _bridge(local, plant, protocol=protocol)
    closing.append(bridge)
    _wait(lambda: bridge.local.connected.is_set() and bridge.plant.connected.is_set(), "both sides")
    historian = MqttTestClient(plant.host, plant.port).connect()
    device = MqttTestClient(local.host, local.port).connect()
    closing += [historian, device]
    historian.subscribe(f"{PREFIX}#")
    device.subscribe("cmd/#")
    time.sleep(0.3)  # the bridge's subscriptions are made on connect; let them settle
    device.publish("site/line1/temp", b"21.5", retain=True)
    got = historian.expect(f"{PREFIX}site/line1/temp")
    assert got.payload == b"21.5"
    historian.publish(f"{PREFIX}cmd/line1", b"stop")
    assert device.expect("cmd/line1").payload == b"stop"
    device.publish("other/topic", b"stays local")
    # The retained flag travels: a late subscriber on the plant broker gets the value.
    late = MqttTestClient(plant.host, plant.port).connect()
    closing.append(late)
    late.subscribe(f"{PREFIX}site/#")
    assert late.expect(f"{PREFIX}site/line1/temp").retain
    assert not any(m.topic.endswith("other/topic") for m in historian.drain(0.5))


def test_a_clean_close_is_not_reported_as_a_lost_broker(
    brokers: tuple[MosquittoProcess, MosquittoProcess], caplog: pytest.LogCaptureFixture
) -> None:
    local, plant = brokers
    caplog.set_level(logging.INFO, "bdn.gateway.bridge")
    bridge = _bridge(local, plant)
    _wait(lambda: bridge.local.connected.is_set() and bridge.plant.connected.is_set(), "both sides")
    bridge.close()
    bridge_records = [r for r in caplog.records if r.name == "bdn.gateway.bridge"]
    assert [r.getMessage() for r in bridge_records if r.levelno >= logging.WARNING] == []
    assert sum("disconnected from" in r.getMessage() for r in bridge_records) == 2


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
@pytest.mark.parametrize("gateway_restarts", [False, True], ids=["bridge-up", "bridge-restarted"])
def test_plant_outage_loses_no_qos1_message(
    brokers: tuple[MosquittoProcess, MosquittoProcess],
    closing: list[Bridge | MqttTestClient],
    gateway_restarts: bool,
    protocol: str,
) -> None:
    """The plant broker is down while readings are published locally. With ``gateway_restarts`` the bridge
    is also closed and replaced during the outage: what it held in memory is gone, so every reading that
    still arrives must have waited, unacknowledged, in the local broker."""
    local, plant = brokers
    bridge = _bridge(local, plant, protocol=protocol)
    closing.append(bridge)
    _wait(lambda: bridge.plant.connected.is_set() and bridge.local.connected.is_set(), "both sides")
    # A historian with a persistent session: the plant broker keeps its queue across its own restart.
    historian = MqttTestClient(plant.host, plant.port, client_id="historian", clean_session=False).connect()
    historian.subscribe(f"{PREFIX}site/#")
    historian.close()
    plant.stop()
    _wait(lambda: not bridge.plant.connected.is_set(), "the bridge to notice")
    device = MqttTestClient(local.host, local.port).connect()
    closing.append(device)
    sent = [f"reading {i}".encode() for i in range(60)]
    for payload in sent:
        device.publish("site/line1/count", payload)  # QoS 1, acknowledged by the local broker
    _wait(lambda: bridge.in_flight() > 0, "readings to reach the bridge")
    if gateway_restarts:
        bridge.close()
        bridge = _bridge(local, plant, protocol=protocol)
        closing.append(bridge)
        _wait(lambda: bridge.local.connected.is_set(), "the new bridge's local side")
    plant.start()
    historian = MqttTestClient(plant.host, plant.port, client_id="historian", clean_session=False).connect()
    closing.append(historian)
    arrived: set[bytes] = set()

    def all_arrived() -> bool:
        arrived.update(m.payload for m in historian.drain())
        return len(arrived) >= len(sent)

    _wait(all_arrived, "every reading upstream", 60)
    assert arrived == set(sent)
    # Nothing is left waiting: every message was acknowledged on both sides.
    _wait(lambda: bridge.in_flight() == 0, "the bridge's in-flight set to empty")


def test_tls_to_the_plant_broker(
    tmp_path: Path, mosquitto_factory: Callable[..., MosquittoProcess], closing: list[Bridge | MqttTestClient]
) -> None:
    cert, key = self_signed_cert(tmp_path)
    local = mosquitto_factory()
    plant = mosquitto_factory(tls=MosquittoTls(cafile=cert, certfile=cert, keyfile=key))
    bridge = _bridge(local, plant, tls_ca=cert)
    closing.append(bridge)
    _wait(lambda: bridge.plant.connected.is_set() and bridge.local.connected.is_set(), "a TLS session")
    historian = MqttTestClient(plant.host, plant.port, tls_ca=cert).connect()
    device = MqttTestClient(local.host, local.port).connect()
    closing += [historian, device]
    historian.subscribe(f"{PREFIX}#")
    device.publish("site/x", b"over tls")
    assert historian.expect(f"{PREFIX}site/x").payload == b"over tls"


def test_a_refused_login_is_logged_and_retried(
    tmp_path: Path,
    mosquitto_factory: Callable[..., MosquittoProcess],
    closing: list[Bridge | MqttTestClient],
    caplog: pytest.LogCaptureFixture,
) -> None:
    local = mosquitto_factory()
    plant = mosquitto_factory(password_file=write_password_file(tmp_path / "pw", {"scada": "right"}))
    (tmp_path / "bridge.pw").write_text("wrong\n")
    caplog.set_level(logging.ERROR, "bdn.gateway.bridge")
    bridge = _bridge(local, plant, username="scada", password_file=tmp_path / "bridge.pw")
    closing.append(bridge)
    _wait(lambda: any("refused us" in r.getMessage() for r in caplog.records), "the refusal in the log")
    text = " ".join(r.getMessage() for r in caplog.records)
    assert "check the username and password" in text and "wrong" not in text
    _wait(bridge.local.connected.is_set, "the local side (the plant's refusal does not stop it)")
    assert not bridge.plant.connected.is_set()


def test_through_the_gateway(
    tmp_path: Path, brokers: tuple[MosquittoProcess, MosquittoProcess], closing: list[Bridge | MqttTestClient]
) -> None:
    """``[bridge]`` in a real gateway's config: its state and round go up by default, a Sparkplug command
    comes down, and a forged protocol message from the plant does not."""
    local, plant = brokers
    fleet = small_fleet(
        tmp_path,
        "br",
        devices=2,
        broker_port=local.port,
        broker_mode="external",
        broker_auth=False,
        gateway_extra={
            "rounds": {"deadline_s": 600.0},
            "bridge": {
                "enabled": True,
                "host": plant.host,
                "port": plant.port,
                "protocol": "5",
                "remote_prefix": PREFIX,
                "down": ["spBv1.0/Plant/NCMD/#", "bdn/v1/+/global/#"],
            },
        },
    )
    name = fleet.fleet.name
    topics = Topics(name)
    historian = MqttTestClient(plant.host, plant.port).connect()
    scada = MqttTestClient(local.host, local.port).connect()
    closing += [historian, scada]
    historian.subscribe(f"{PREFIX}bdn/#")
    scada.subscribe("spBv1.0/#")
    scada.subscribe(f"{topics.prefix}global/#")
    with GatewayThread(fleet.gateway_config) as gt:
        state = historian.expect(PREFIX + topics.gateway_state())
        assert GatewayState.from_cbor(state.payload).state == "online"
        historian.expect(PREFIX + topics.round())
        historian.publish(f"{PREFIX}{topics.prefix}global/1", b"forged model")
        historian.publish(f"{PREFIX}spBv1.0/Plant/NCMD/{name}", b"rebirth")
        assert scada.expect(f"spBv1.0/Plant/NCMD/{name}").payload == b"rebirth"
        metrics = gt.gw.metrics.render().decode()
        assert 'bdn_bridge_connected{side="plant"} 1.0' in metrics
        _wait(
            lambda: 'bdn_bridge_dropped_total{reason="protected"} 1.0' in gt.gw.metrics.render().decode(),
            "drop",
        )
        assert gt.error is None
    assert not any(m.topic.startswith(topics.prefix) for m in scada.drain(0.3))
