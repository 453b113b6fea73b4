"""The gateway's Sparkplug B edge node on a real Mosquitto, read by a host that decodes with Eclipse Tahu's
schema (tests/support/sparkplug.py): births before data, sequence numbers, metrics following a real round,
device deaths, rebirth on command, the NDEATH the broker sends when the gateway is killed, and bdSeq counting
on across a restart of the gateway and of the broker."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sparkplub_b_packets.core import sparkplug_b_pb2 as tahu

from bench.round import premade_updates
from blockdeepnet.ports import free_port
from blockdeepnet.wire import DeviceState, Report, Topics
from provisioning.localfleet import LocalFleet
from tests.support.fleets import small_fleet
from tests.support.gateway import GatewayThread
from tests.support.gateway_process import GatewayProcess
from tests.support.mosquitto import MosquittoProcess
from tests.support.mqtt import MqttTestClient
from tests.support.sparkplug import SparkplugRecorder, SpbMessage

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

GROUP = "Plant"


def _fleet(
    tmp_path: Path,
    broker: MosquittoProcess,
    rounds: dict[str, Any],
    http_port: int = 0,
    min_interval_s: float = 0.1,
) -> LocalFleet:
    return small_fleet(
        tmp_path,
        "sp",
        broker_port=broker.port,
        broker_mode="external",
        broker_auth=False,
        http_port=http_port,
        gateway_extra={
            "rounds": {"deadline_s": 600.0, **rounds},
            "sparkplug": {
                "enabled": True,
                "group_id": GROUP,
                "server": "local",
                "min_interval_s": min_interval_s,
            },
        },
    )


def _state(client: MqttTestClient, topics: Topics, address: str, state: str) -> None:
    client.publish(topics.state(address), DeviceState(state).to_cbor(), retain=True)  # type: ignore[arg-type]


def _rebirth() -> bytes:
    cmd = tahu.Payload()
    m = cmd.metrics.add()
    m.name, m.datatype, m.boolean_value = "Node Control/Rebirth", tahu.Boolean, True
    return bytes(cmd.SerializeToString())


def _ndata(msgs: list[SpbMessage], name: str) -> list[Any]:
    return [m.metric(name) for m in msgs if m.kind == "NDATA" and m.has(name)]


def test_births_data_device_deaths_and_rebirth(
    tmp_path: Path, mosquitto_factory: Callable[..., MosquittoProcess], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "bdn.gateway.sparkplug")
    broker = mosquitto_factory()
    local = _fleet(tmp_path, broker, {"max_rounds": 2, "quorum": 2, "min_updates": 2})
    node = local.fleet.name
    topics = Topics(node)
    updates = premade_updates(local)
    dev0, dev1 = local.devices[0], local.devices[1]
    host = SparkplugRecorder(broker.host, broker.port, f"spBv1.0/{GROUP}/#")
    devices = MqttTestClient(broker.host, broker.port).connect()
    try:
        with GatewayThread(local.gateway_config) as gt:
            host.wait_for(lambda: host.count("NBIRTH") == 1)
            host.wait_for(lambda: host.node_metric("Round/Number") == 1)
            for d in (dev0, dev1):
                _state(devices, topics, d.address, "online")
            host.wait_for(lambda: host.count("DBIRTH") == 2)
            devices.publish(topics.update(dev0.address), b"\x00junk")
            host.wait_for(lambda: host.node_metric("Updates/Rejected") == 1)
            for _, topic, payload in updates[:2]:
                devices.publish(topic, payload)
            host.wait_for(lambda: host.node_metric("Updates/Accepted") == 2)
            gt.wait_for("round_closed")
            host.wait_for(lambda: host.node_metric("Round/Number") == 2)  # the next round opened
            for d, loss, acc in ((dev0, 0.5, 0.8), (dev1, 0.7, 0.6)):
                devices.publish(topics.report(d.address), Report(1, 2745, loss, acc).to_cbor())
            host.wait_for(lambda: host.node_metric("Model/Accuracy") == pytest.approx(0.7))
            _state(devices, topics, dev0.address, "offline")
            host.wait_for(lambda: host.count("DDEATH") == 1)
            # Garbage on NCMD and DCMD is ignored; a rebirth request is obeyed.
            devices.publish(f"spBv1.0/{GROUP}/NCMD/{node}", b"\xff\x00garbage")
            devices.publish(f"spBv1.0/{GROUP}/DCMD/{node}/{dev1.name}", b"\xff\x00garbage")
            devices.publish(f"spBv1.0/{GROUP}/NCMD/{node}", _rebirth())
            host.wait_for(lambda: host.count("NBIRTH") == 2 and host.count("DBIRTH") == 3)
            _state(devices, topics, dev0.address, "online")
            host.wait_for(lambda: host.count("DBIRTH") == 4)
        host.wait_for(lambda: host.count("NDEATH") == 1)  # a clean stop says so
    finally:
        devices.close()
        host.close()
    msgs = host.node_messages(GROUP, node)
    SparkplugRecorder.assert_sequence(msgs)
    SparkplugRecorder.assert_births_first(msgs)
    assert {m.qos for m in msgs if m.kind != "NDEATH"} == {0} and msgs[-1].qos == 1  # the spec's QoS
    births = [m for m in msgs if m.kind == "NBIRTH"]
    assert births[0].metric("bdSeq") == births[1].metric("bdSeq") == msgs[-1].metric("bdSeq")
    assert births[0].metric("Devices/Registered") == 3 and host.node_metric("Chain/Height") > 0
    assert births[0].metric("Node Control/Rebirth") is False
    assert births[0].metric("Model/Accuracy") is None  # is_null until a device reports
    assert 2 in _ndata(msgs, "Round/Number") and _ndata(msgs, "Updates/Accepted")[-1] == 2
    assert births[1].metric("Round/Number") == 2 and births[1].metric("Devices/Online") == 1
    kinds0 = [m.kind for m in msgs if m.device == dev0.name]
    assert kinds0[0] == "DBIRTH" and kinds0[-2:] == ["DDEATH", "DBIRTH"]
    before_death = [m for m in msgs if m.device == dev0.name][-3]
    assert before_death.kind == "DDATA" and before_death.metric("State") == "offline"
    first = next(m for m in msgs if m.kind == "DBIRTH" and m.device == dev1.name)
    assert first.metric("State") == "online" and first.metric("Key Holder") is True
    assert first.metric("Samples") == local.fleet.devices[1].samples and first.metric("Last Accuracy") is None
    assert any(m.metric("Last Accuracy") == 0.6 for m in msgs if m.kind == "DDATA" and m.has("Last Accuracy"))
    # After the rebirth only the device that was online is born again, with what it reported.
    after = msgs[msgs.index(births[1]) :]
    reborn = [m for m in after if m.kind == "DBIRTH"]
    assert reborn[0].device == dev1.name and reborn[0].metric("Last Loss") == 0.7
    assert sorted(host.undecodable) == sorted(
        [f"spBv1.0/{GROUP}/NCMD/{node}", f"spBv1.0/{GROUP}/DCMD/{node}/{dev1.name}"]
    )  # only the garbage the test sent
    logged = [r.getMessage() for r in caplog.records if r.name == "bdn.gateway.sparkplug"]
    assert any(line.startswith(f"NCMD on spBv1.0/{GROUP}/NCMD/{node} ignored") for line in logged)
    assert any(line.startswith(f"DCMD on spBv1.0/{GROUP}/DCMD/{node}/{dev1.name} ignored") for line in logged)


def test_a_clean_stop_publishes_the_device_deaths_the_rate_limit_held_back(
    tmp_path: Path, mosquitto_factory: Callable[..., MosquittoProcess]
) -> None:
    """Devices going offline just before the gateway stops (the demo's end) still get their DDEATH, ahead of
    the NDEATH, although the next rate-limited flush would only have come seconds later."""
    broker = mosquitto_factory()
    local = _fleet(tmp_path, broker, {"max_rounds": 1, "quorum": 3}, min_interval_s=10.0)
    node = local.fleet.name
    topics = Topics(node)
    dev0 = local.devices[0]
    host = SparkplugRecorder(broker.host, broker.port, f"spBv1.0/{GROUP}/#")
    devices = MqttTestClient(broker.host, broker.port).connect()
    try:
        with GatewayThread(local.gateway_config) as gt:
            host.wait_for(lambda: host.count("NBIRTH") == 1)
            _state(devices, topics, dev0.address, "online")
            host.wait_for(lambda: host.count("DBIRTH") == 1)
            _state(devices, topics, dev0.address, "offline")
            gt.wait_for("device_state", count=2)
        host.wait_for(lambda: host.count("NDEATH") == 1)
    finally:
        devices.close()
        host.close()
    kinds = [(m.kind, m.device) for m in host.node_messages(GROUP, node) if m.kind != "NDATA"]
    assert kinds[-2:] == [("DDEATH", dev0.name), ("NDEATH", None)], kinds


def test_death_on_kill_and_bdseq_across_restarts(
    tmp_path: Path, mosquitto_factory: Callable[..., MosquittoProcess]
) -> None:
    # Births are QoS 0 (as Sparkplug demands): the broker keeps them for the recorder's session while it is cut
    # off only with queue_qos0_messages.
    broker = mosquitto_factory(extra="queue_qos0_messages true")
    http_port = free_port()
    # More devices wanted than enrolled: no round opens, so the embedded chain may start afresh after the kill.
    local = _fleet(tmp_path, broker, {"min_devices": 4}, http_port)
    node = local.fleet.name
    bdseq_file = local.root / "gateway" / "state" / "sparkplug-bdseq"
    host = SparkplugRecorder(broker.host, broker.port, f"spBv1.0/{GROUP}/#", persistent=True)
    first = GatewayProcess(local.gateway_config, tmp_path / "gateway-1.log", http_port)
    second = GatewayProcess(local.gateway_config, tmp_path / "gateway-2.log", http_port)
    try:
        first.start()
        host.wait_for(lambda: host.count("NBIRTH") == 1)
        first.kill()
        # Mosquitto sends the will after the keepalive grace period (1.5 x 30 s) at the latest; a killed
        # process's socket is closed by the kernel, so it is usually at once.
        host.wait_for(lambda: host.count("NDEATH") == 1, timeout=60)
        second.start()
        host.wait_for(lambda: host.count("NBIRTH") == 2)
        broker.restart()  # the edge node's session ends without a will: it reconnects with the next bdSeq
        host.wait_for(lambda: host.count("NBIRTH") == 3, timeout=60)
        assert second.stop() == 0
        host.wait_for(lambda: host.count("NDEATH") >= 2)
    finally:
        first.kill()
        second.kill()
        host.close()
    msgs = host.node_messages(GROUP, node)
    SparkplugRecorder.assert_sequence(msgs)
    SparkplugRecorder.assert_births_first(msgs)
    births = [m.metric("bdSeq") for m in msgs if m.kind == "NBIRTH"]
    deaths = [m.metric("bdSeq") for m in msgs if m.kind == "NDEATH"]
    assert births == [0, 1, 2]
    assert deaths[0] == 0 and deaths[-1] == 2 and set(deaths) <= {0, 1, 2}
    assert msgs[0].kind == "NBIRTH" and msgs[-1].kind == "NDEATH"
    assert bdseq_file.read_text() == "2\n"


@pytest.mark.parametrize("kind", ["mosquitto", "embedded"])
def test_a_late_host_gets_births_through_the_fleet_acl(
    kind: str, tmp_path: Path, mosquitto_factory: Callable[..., MosquittoProcess]
) -> None:
    """With the broker ACL that provisioning writes (Mosquitto) or the gateway enforces (amqtt): the gateway's
    user may publish in spBv1.0 and read its NCMD; the fleet's read-only monitor user sees everything. The
    host connects after the NBIRTH went out (QoS 0, not retained) and asks for a rebirth, as hosts do."""
    port = free_port()
    local = small_fleet(
        tmp_path,
        "sp",
        devices=2,
        broker_port=port,
        broker_mode="external" if kind == "mosquitto" else "embedded",
        gateway_extra={"sparkplug": {"enabled": True, "group_id": GROUP, "min_interval_s": 0.1}},
    )
    if kind == "mosquitto":
        broker_dir = local.root / "broker"
        mosquitto_factory(
            port=port, password_file=broker_dir / "mosquitto.passwd", acl_file=broker_dir / "mosquitto.acl"
        )
    node = local.fleet.name
    dev = local.devices[0]
    with GatewayThread(local.gateway_config) as gt:
        gt.wait_for("round_open")
        host = SparkplugRecorder(
            "127.0.0.1", port, f"spBv1.0/{GROUP}/#", username="monitor", password=local.passwords["monitor"]
        )
        commander = MqttTestClient("127.0.0.1", port, username="gateway", password=local.passwords["gateway"])
        device = MqttTestClient(
            "127.0.0.1", port, username=dev.address, password=local.passwords[dev.address]
        )
        try:
            commander.connect().publish(f"spBv1.0/{GROUP}/NCMD/{node}", _rebirth())
            host.wait_for(lambda: host.count("NBIRTH") == 1)
            _state(device.connect(), Topics(node), dev.address, "online")
            host.wait_for(lambda: host.count("DBIRTH") == 1)
        finally:
            device.close()
            commander.close()
            host.close()
    seen = host.node_messages(GROUP, node)
    msgs = seen[[m.kind for m in seen].index("NBIRTH") :]  # a late host may catch data of the session first
    SparkplugRecorder.assert_sequence(msgs)
    SparkplugRecorder.assert_births_first(msgs)
    assert msgs[0].metric("Round/Number") == 1
    assert [m.device for m in msgs if m.kind == "DBIRTH"] == [dev.name]
