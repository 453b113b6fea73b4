"""The gateway's Sparkplug B edge node on a real Mosquitto, read by a host that decodes with Eclipse Tahu's
schema (tests/support/sparkplug.py): births before data, sequence numbers, device deaths, rebirth on
command, and the NDEATH the broker sends when the gateway is killed."""

from __future__ import annotations

import secrets
from collections.abc import Callable
from pathlib import Path

import pytest
from sparkplub_b_packets.core import sparkplug_b_pb2 as tahu

from blockdeepnet.crypto.threshold import deal
from blockdeepnet.ports import free_port
from blockdeepnet.wire import DeviceState, Topics
from provisioning.localfleet import LocalFleet, create_local_fleet
from tests.support.gateway import GatewayThread
from tests.support.gateway_process import GatewayProcess
from tests.support.mosquitto import MosquittoProcess
from tests.support.mqtt import MqttTestClient
from tests.support.sparkplug import SparkplugRecorder

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

DEALT = deal(1, 2, 512, allow_insecure=True)
GROUP = "Plant"


def _fleet(tmp_path: Path, broker: MosquittoProcess, http_port: int = 0) -> LocalFleet:
    return create_local_fleet(
        tmp_path / "fleet",
        name=f"sp{secrets.token_hex(3)}",
        devices=3,
        threshold=1,
        holders=2,
        broker_port=broker.port,
        broker_mode="external",
        broker_auth=False,
        http_port=http_port,
        dealt=DEALT,
        gateway_extra={
            "rounds": {"max_rounds": 1, "deadline_s": 600.0},
            "sparkplug": {"enabled": True, "group_id": GROUP, "min_interval_s": 0.1},
        },
    )


def _state(client: MqttTestClient, topics: Topics, address: str, state: str) -> None:
    client.publish(topics.state(address), DeviceState(state).to_cbor(), retain=True)  # type: ignore[arg-type]


def _rebirth() -> bytes:
    cmd = tahu.Payload()
    m = cmd.metrics.add()
    m.name, m.datatype, m.boolean_value = "Node Control/Rebirth", tahu.Boolean, True
    return bytes(cmd.SerializeToString())


def test_births_data_device_deaths_and_rebirth(
    tmp_path: Path, mosquitto_factory: Callable[..., MosquittoProcess]
) -> None:
    broker = mosquitto_factory()
    local = _fleet(tmp_path, broker)
    node = local.fleet.name
    topics = Topics(node)
    host = SparkplugRecorder(broker.host, broker.port, f"spBv1.0/{GROUP}/#")
    devices = MqttTestClient(broker.host, broker.port).connect()
    try:
        with GatewayThread(local.gateway_config):
            host.wait_for(lambda: host.count("NBIRTH") == 1)
            host.wait_for(lambda: host.node_metric("Round/Number") == 1)
            for d in local.devices[:2]:
                _state(devices, topics, d.address, "online")
            host.wait_for(lambda: host.count("DBIRTH") == 2)
            _state(devices, topics, local.devices[0].address, "offline")
            host.wait_for(lambda: host.count("DDEATH") == 1)
            # Garbage on NCMD is ignored; a rebirth request is obeyed.
            devices.publish(f"spBv1.0/{GROUP}/NCMD/{node}", b"\xff\x00garbage")
            devices.publish(f"spBv1.0/{GROUP}/NCMD/{node}", _rebirth())
            host.wait_for(lambda: host.count("NBIRTH") == 2 and host.count("DBIRTH") == 3)
            _state(devices, topics, local.devices[0].address, "online")
            host.wait_for(lambda: host.count("DBIRTH") == 4)
        host.wait_for(lambda: host.count("NDEATH") == 1)  # a clean stop says so
    finally:
        devices.close()
        host.close()
    msgs = host.node_messages(GROUP, node)
    SparkplugRecorder.assert_sequence(msgs)
    births = [m for m in msgs if m.kind == "NBIRTH"]
    assert births[0].metric("bdSeq") == births[1].metric("bdSeq") == msgs[-1].metric("bdSeq")
    assert births[0].metric("Devices/Registered") == 3 and host.node_metric("Chain/Height") > 0
    dev0, dev1 = local.devices[0].name, local.devices[1].name
    assert [m.kind for m in msgs if m.device == dev0] == ["DBIRTH", "DDATA", "DDEATH", "DBIRTH"]
    first = next(m for m in msgs if m.kind == "DBIRTH" and m.device == dev1)
    assert first.metric("State") == "online" and first.metric("Key Holder") is True
    assert first.metric("Samples") == local.fleet.devices[1].samples
    # After the rebirth only the device that was online is born again.
    after = msgs[msgs.index(births[1]) :]
    assert [m.device for m in after if m.kind == "DBIRTH"][:1] == [dev1]
    assert host.undecodable == [f"spBv1.0/{GROUP}/NCMD/{node}"]  # only the garbage the test sent


def test_the_broker_announces_the_death_of_a_killed_gateway(
    tmp_path: Path, mosquitto_factory: Callable[..., MosquittoProcess]
) -> None:
    broker = mosquitto_factory()
    http_port = free_port()
    local = _fleet(tmp_path, broker, http_port)
    host = SparkplugRecorder(broker.host, broker.port, f"spBv1.0/{GROUP}/#")
    gw = GatewayProcess(local.gateway_config, tmp_path / "gateway.log", http_port)
    try:
        gw.start()
        host.wait_for(lambda: host.count("NBIRTH") == 1)
        gw.kill()
        # Mosquitto sends the will after the keepalive grace period (1.5 x 30 s) at the latest; a killed
        # process's socket is closed by the kernel, so it is usually at once.
        host.wait_for(lambda: host.count("NDEATH") == 1, timeout=60)
    finally:
        gw.kill()
        host.close()
    msgs = host.node_messages(GROUP, local.fleet.name)
    birth, death = msgs[0], msgs[-1]
    assert birth.kind == "NBIRTH" and death.kind == "NDEATH"
    assert death.metric("bdSeq") == birth.metric("bdSeq") == 0
    assert (local.root / "gateway" / "state" / "sparkplug-bdseq").read_text() == "0\n"
