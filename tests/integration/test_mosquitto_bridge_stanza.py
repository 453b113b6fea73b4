"""`bdn provision mosquitto-bridge` end to end: the stanza it writes for a fleet's [bridge] goes into a real
local Mosquitto's config, which then bridges to a second ("plant") Mosquitto that wants a password: the
fleet's topics go up behind the prefix and a command comes down without it."""

from __future__ import annotations

import stat
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner

from blockdeepnet.ports import free_port
from blockdeepnet.wire import Topics
from cli.main import cli
from tests.support.fleets import small_fleet
from tests.support.mosquitto import MosquittoProcess, write_password_file
from tests.support.mqtt import MqttTestClient

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

PREFIX = "plant1/"
PASSWORD = "plant pass 7"  # a space inside: Mosquitto reads remote_password to the end of the line


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_the_stanza_bridges_a_real_mosquitto(
    tmp_path: Path, mosquitto_factory: Callable[..., MosquittoProcess], protocol: str
) -> None:
    plant = mosquitto_factory(password_file=write_password_file(tmp_path / "plant.users", {"site": PASSWORD}))
    (tmp_path / "bridge.pw").write_text(PASSWORD + "\n")
    (tmp_path / "bridge.pw").chmod(0o600)
    local_port = free_port()
    fleet = small_fleet(
        tmp_path,
        "st",
        devices=2,
        broker_port=local_port,
        broker_mode="external",
        broker_auth=False,
        gateway_extra={
            "bridge": {
                "enabled": False,  # the native bridge does the work instead
                "host": plant.host,
                "port": plant.port,
                "protocol": protocol,
                "username": "site",
                "password_file": str(tmp_path / "bridge.pw"),
                "client_id": f"site-{protocol}",
                "remote_prefix": PREFIX,
                "down": ["spBv1.0/Plant/NCMD/#"],
            }
        },
    )
    stanza = tmp_path / "bridge.conf"
    result = CliRunner().invoke(
        cli, ["provision", "mosquitto-bridge", "--config", str(fleet.gateway_config), "--output", str(stanza)]
    )
    assert result.exit_code == 0, result.output
    assert stat.S_IMODE(stanza.stat().st_mode) == 0o600
    assert PASSWORD not in result.output

    local = mosquitto_factory(port=local_port, extra=stanza.read_text())
    name = fleet.fleet.name
    topics = Topics(name)
    historian = MqttTestClient(plant.host, plant.port, username="site", password=PASSWORD).connect()
    device = MqttTestClient(local.host, local.port).connect()
    try:
        device.subscribe("$SYS/broker/connection/+/state")
        device.expect(f"$SYS/broker/connection/site-{protocol}/state", b"1", timeout=30)
        historian.subscribe(f"{PREFIX}#")
        device.subscribe("spBv1.0/#")
        device.publish(topics.round(), b"round 1", retain=True)
        assert historian.expect(PREFIX + topics.round()).payload == b"round 1"
        device.publish("other/topic", b"stays here")
        historian.publish(f"{PREFIX}spBv1.0/Plant/NCMD/{name}", b"rebirth")
        assert device.expect(f"spBv1.0/Plant/NCMD/{name}").payload == b"rebirth"
        assert not any(m.topic.endswith("other/topic") for m in historian.drain(0.3))
    finally:
        historian.close()
        device.close()


def test_printing_the_stanza_warns_about_the_password(tmp_path: Path) -> None:
    (tmp_path / "bridge.pw").write_text("pw\n")
    fleet = small_fleet(
        tmp_path,
        "st",
        devices=2,
        broker_mode="external",
        broker_auth=False,
        gateway_extra={
            "bridge": {"host": "plant", "username": "u", "password_file": str(tmp_path / "bridge.pw")}
        },
    )
    result = CliRunner().invoke(cli, ["provision", "mosquitto-bridge", "--config", str(fleet.gateway_config)])
    assert result.exit_code == 0
    assert "remote_password pw" in result.stdout and "holds the plant password" in result.stderr
    bad = CliRunner().invoke(
        cli, ["provision", "mosquitto-bridge", "--config", str(fleet.gateway_config), "--output", __file__]
    )
    assert bad.exit_code == 2 and "exists" in bad.stderr
