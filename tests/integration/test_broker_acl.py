"""The DESIGN §3 broker ACL enforced by real brokers, driven by real paho-mqtt clients.

Every ACL test runs twice: against a Mosquitto started with the rendered acl_file and a ``mosquitto_passwd``
password file, and against the gateway's embedded amqtt broker with its argon2 users file. A broker drops an
unauthorized MQTT 3.1.1 publish silently (the PUBACK still comes), so non-delivery is asserted after a
permitted *control* message, published afterwards, has arrived, plus a short grace period.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import socket
import stat
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from eth_utils.address import to_checksum_address

from blockdeepnet.acl import AclRules, mosquitto_acl
from blockdeepnet.wire import Topics
from gateway.broker import BrokerError, EmbeddedBroker, free_port, port_in_use
from provisioning.broker_credentials import write_amqtt_password_file
from tests.support.embedded import EmbeddedBrokerThread
from tests.support.mosquitto import MosquittoProcess, MosquittoTls, write_password_file
from tests.support.mqtt import MqttTestClient
from tests.support.tls import self_signed_cert

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

GRACE_S = 0.5
"""How long a refused message gets to show up after the control message arrived (it never should)."""


@dataclass
class AclBroker:
    """A running broker enforcing the ACL of a fresh fleet with a gateway, devices A and B and a monitor."""

    kind: str
    host: str
    port: int
    topics: Topics
    a: str
    b: str
    passwords: dict[str, str]
    clients: list[MqttTestClient] = field(default_factory=list)

    @property
    def prefix(self) -> str:
        return self.topics.prefix

    def client(self, username: str | None, password: str | None = None) -> MqttTestClient:
        """An unconnected client; the password defaults to the user's real one."""
        if username is not None and password is None:
            password = self.passwords.get(username)
        c = MqttTestClient(self.host, self.port, username=username, password=password)
        self.clients.append(c)
        return c

    def connect(self, username: str) -> MqttTestClient:
        return self.client(username).connect()


def _address() -> str:
    return str(to_checksum_address(os.urandom(20)))


@pytest.fixture(params=["mosquitto", "amqtt"])
def acl_broker(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[AclBroker]:
    topics = Topics(f"acl-{uuid.uuid4().hex[:12]}")
    a, b = _address(), _address()
    rules = AclRules.build(topics, "gateway", [a, b], monitors=["monitor"])
    passwords = {user: secrets.token_urlsafe(12) for user in rules.usernames}
    if request.param == "mosquitto":
        acl_file = tmp_path / "acl"
        acl_file.write_text(mosquitto_acl(rules))
        mosquitto = MosquittoProcess(
            tmp_path / "mosquitto",
            password_file=write_password_file(tmp_path / "passwd", passwords),
            acl_file=acl_file,
            verbose=True,
        ).start()
        broker = AclBroker("mosquitto", mosquitto.host, mosquitto.port, topics, a, b, passwords)
        try:
            yield broker
        finally:
            for c in broker.clients:
                c.close()
            mosquitto.stop()
    else:
        users_file = tmp_path / "users"
        write_amqtt_password_file(users_file, passwords)
        embedded = EmbeddedBrokerThread("127.0.0.1", 0, users_file=users_file, acl=rules).start()
        broker = AclBroker("amqtt", embedded.host, embedded.port, topics, a, b, passwords)
        try:
            yield broker
        finally:
            for c in broker.clients:
                c.close()
            embedded.stop()


# ------------------------------------------------------------------------------------------ authentication


def test_clients_without_valid_credentials_are_refused(acl_broker: AclBroker) -> None:
    a = acl_broker.a
    for username, password in [(None, None), (a, "wrong-password"), (a, ""), ("stranger", "whatever")]:
        reason = acl_broker.client(username, password).try_connect()
        assert reason is None or reason.is_failure, (username, password, reason)
    reason = acl_broker.client(a).try_connect()
    assert reason is not None and not reason.is_failure


# ---------------------------------------------------------------------------------------------- publishing


def test_a_device_reaches_the_gateway_on_its_own_topics(acl_broker: AclBroker) -> None:
    t, a = acl_broker.topics, acl_broker.a
    gateway = acl_broker.connect("gateway")
    assert gateway.subscribe(f"{acl_broker.prefix}#") == 1
    device = acl_broker.connect(a)
    for topic in (t.update(a), t.state(a), t.report(a), t.share(4, a)):
        device.publish(topic, b"own:" + topic.encode())
        gateway.expect(topic, b"own:" + topic.encode())


def test_a_device_cannot_publish_for_others_or_for_the_gateway(acl_broker: AclBroker) -> None:
    t, a, b = acl_broker.topics, acl_broker.a, acl_broker.b
    gateway = acl_broker.connect("gateway")
    gateway.subscribe(f"{acl_broker.prefix}#")
    device = acl_broker.connect(a)
    forged = [
        t.update(b),
        t.state(b),
        t.share(1, b),
        t.receipt(b),
        t.receipt(a),
        t.round(),
        t.global_block(1),
        t.gateway_state(),
        Topics("some-other-fleet").update(a),
    ]
    for topic in forged:
        device.publish(topic, b"forged")
    device.publish(t.update(a), b"control")
    gateway.expect(t.update(a), b"control")
    leaked = [m.topic for m in gateway.drain(GRACE_S) if m.payload == b"forged"]
    assert leaked == []


def test_the_gateway_publishes_round_and_global_to_every_device(acl_broker: AclBroker) -> None:
    t = acl_broker.topics
    gateway = acl_broker.connect("gateway")
    gateway.publish(t.round(), b"round-1", retain=True)
    readers = [acl_broker.connect(u) for u in (acl_broker.a, acl_broker.b, "monitor")]
    for reader in readers:
        assert reader.subscribe(t.round()) == 1
        assert reader.subscribe(t.all_globals()) == 1
        assert reader.expect(t.round(), b"round-1").retain  # the retained round reaches late subscribers
    gateway.publish(t.global_block(1), b"global-1")
    for reader in readers:
        reader.expect(t.global_block(1), b"global-1")


def test_the_gateway_answers_each_device_on_its_own_receipt_topic(acl_broker: AclBroker) -> None:
    t, a, b = acl_broker.topics, acl_broker.a, acl_broker.b
    gateway = acl_broker.connect("gateway")
    device_a, device_b = acl_broker.connect(a), acl_broker.connect(b)
    assert device_a.subscribe(t.receipt(a)) == 1
    device_b.subscribe(t.receipt(a))  # refused (amqtt) or filtered on delivery (Mosquitto): see below
    assert device_b.subscribe(t.round()) == 1
    gateway.publish(t.receipt(a), b"receipt-a")
    device_a.expect(t.receipt(a), b"receipt-a")
    gateway.publish(t.round(), b"control")
    device_b.expect(t.round(), b"control")
    assert [m.topic for m in device_b.drain(GRACE_S)] == []


# --------------------------------------------------------------------------------------------- subscribing


def test_a_device_cannot_read_other_devices_updates(acl_broker: AclBroker) -> None:
    t, a, b = acl_broker.topics, acl_broker.a, acl_broker.b
    gateway = acl_broker.connect("gateway")
    gateway.subscribe(t.all_updates())
    spy = acl_broker.connect(a)
    granted = {f: spy.subscribe(f) for f in (t.all_updates(), t.update(b), f"{acl_broker.prefix}#", "#")}
    assert spy.subscribe(t.round()) == 1
    if acl_broker.kind == "amqtt":
        # amqtt checks the filter at SUBSCRIBE time and refuses it (SUBACK 0x80).
        assert set(granted.values()) == {0x80}, granted
    device_b = acl_broker.connect(b)
    device_b.publish(t.update(b), b"b-update")
    gateway.expect(t.update(b), b"b-update")
    gateway.publish(t.round(), b"control")
    spy.expect(t.round(), b"control")
    assert [m.topic for m in spy.drain(GRACE_S)] == []


def test_a_monitor_reads_everything_and_publishes_nothing(acl_broker: AclBroker) -> None:
    t, a = acl_broker.topics, acl_broker.a
    monitor = acl_broker.connect("monitor")
    assert monitor.subscribe(f"{acl_broker.prefix}#") == 1
    gateway = acl_broker.connect("gateway")
    gateway.subscribe(f"{acl_broker.prefix}#")
    device = acl_broker.connect(a)
    device.publish(t.update(a), b"update-a")
    monitor.expect(t.update(a), b"update-a")
    gateway.expect(t.update(a), b"update-a")
    for topic in (t.round(), t.global_block(1), t.update(a), t.receipt(a), t.gateway_state()):
        monitor.publish(topic, b"forged")
    gateway.publish(t.round(), b"control")
    gateway.expect(t.round(), b"control")
    monitor.expect(t.round(), b"control")
    leaked = [m.topic for m in gateway.drain(GRACE_S) + monitor.drain() if m.payload == b"forged"]
    assert leaked == []


# ------------------------------------------------------------------------------------ embedded broker set-up


def _start_and_stop(broker: EmbeddedBroker) -> int:
    async def run() -> int:
        async with broker as running:
            return running.port

    return asyncio.run(run())


@pytest.mark.parametrize("listen", [True, False], ids=["listening", "bound-only"])
def test_a_busy_port_is_one_clear_sentence(listen: bool) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        if listen:
            holder.listen()
        port = holder.getsockname()[1]
        assert port_in_use("127.0.0.1", port)
        with pytest.raises(BrokerError) as err:
            _start_and_stop(EmbeddedBroker("127.0.0.1", port, users_file=None, acl=None))
    assert str(err.value) == (
        f"port {port} on 127.0.0.1 is already in use (another MQTT broker?): "
        "set broker.port in gateway.toml to a free port or 0"
    )
    assert not port_in_use("127.0.0.1", port)


def test_port_zero_picks_a_free_port_and_reports_it() -> None:
    with EmbeddedBrokerThread("127.0.0.1", 0, users_file=None, acl=None) as broker:
        assert broker.port != 0
        assert port_in_use("127.0.0.1", broker.port)
        MqttTestClient(broker.host, broker.port, username="anyone").connect().close()
        # Without a users file a username is still required: amqtt keeps no sessions for anonymous clients.
        nameless = MqttTestClient(broker.host, broker.port)
        refused = nameless.try_connect()
        nameless.close()
        assert refused is None or refused.is_failure


def test_without_a_users_file_a_persistent_session_still_queues_qos1() -> None:
    """amqtt drops anonymous sessions (and their queued messages) within a second of a disconnect; the
    default without a users file must not make the gateway's session anonymous."""
    with EmbeddedBrokerThread("127.0.0.1", 0, users_file=None, acl=None) as broker:
        first = MqttTestClient(broker.host, broker.port, username="gw", client_id="gw-q", clean_session=False)
        first.connect().subscribe("q/#")
        first.close()
        time.sleep(1.5)  # amqtt's session monitor runs every second
        with MqttTestClient(broker.host, broker.port, username="dev").connect() as publisher:
            publisher.publish("q/1", b"queued")
        again = MqttTestClient(broker.host, broker.port, username="gw", client_id="gw-q", clean_session=False)
        try:
            assert again.connect().session_present
            again.expect("q/1", b"queued")
        finally:
            again.close()


def test_a_fixed_free_port_is_used_as_configured() -> None:
    port = free_port("127.0.0.1")
    assert _start_and_stop(EmbeddedBroker("127.0.0.1", port, users_file=None, acl=None)) == port


def test_a_missing_users_file_is_reported_before_amqtt_starts(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(BrokerError, match=f"users file {missing} does not exist"):
        _start_and_stop(EmbeddedBroker("127.0.0.1", 0, users_file=missing, acl=None))


def test_the_amqtt_password_file_is_private_argon2_and_replaced_whole(tmp_path: Path) -> None:
    path = tmp_path / "users"
    write_amqtt_password_file(path, {"gateway": "pw1", "monitor": "pw2"})
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    lines = path.read_text().splitlines()
    assert [line.split(":", 1)[0] for line in lines] == ["gateway", "monitor"]
    assert all(line.split(":", 1)[1].startswith("$argon2id$") for line in lines)
    write_amqtt_password_file(path, {"gateway": "pw3"})
    assert [line.split(":", 1)[0] for line in path.read_text().splitlines()] == ["gateway"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["users"]  # no temporary file left behind
    for bad in ({"a b": "x"}, {"a:b": "x"}, {"a": ""}, {"a": "x\ny"}):
        with pytest.raises(ValueError):
            write_amqtt_password_file(tmp_path / "bad", bad)


# ------------------------------------------------------------------------------------------ Mosquitto helper


def test_mosquitto_restart_keeps_sessions_and_queued_qos1_messages(tmp_path: Path) -> None:
    with MosquittoProcess(tmp_path / "m") as mosquitto:
        client_id = f"gw-{uuid.uuid4().hex[:8]}"
        first = MqttTestClient(
            mosquitto.host, mosquitto.port, client_id=client_id, clean_session=False
        ).connect()
        first.subscribe("q/#", qos=1)
        first.close()
        with MqttTestClient(mosquitto.host, mosquitto.port).connect() as publisher:
            for i in range(3):
                publisher.publish(f"q/{i}", b"m%d" % i, qos=1)
        port = mosquitto.port
        mosquitto.restart()
        assert mosquitto.port == port
        again = MqttTestClient(
            mosquitto.host, mosquitto.port, client_id=client_id, clean_session=False
        ).connect()
        try:
            assert again.session_present
            for i in range(3):
                again.expect(f"q/{i}", b"m%d" % i)
        finally:
            again.close()


def test_mosquitto_start_fails_loudly_on_a_bad_config(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="exited"):
        MosquittoProcess(tmp_path / "m", extra="no_such_option true").start()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_mosquitto_tls_listener(tmp_path: Path) -> None:
    cert, key = self_signed_cert(tmp_path)
    tls = MosquittoTls(cafile=cert, certfile=cert, keyfile=key)
    with (
        MosquittoProcess(tmp_path / "m", tls=tls) as mosquitto,
        MqttTestClient(mosquitto.host, mosquitto.port, tls_ca=cert).connect() as client,
    ):
        assert client.subscribe("t") == 1
        client.publish("t", b"over tls")
        client.expect("t", b"over tls")
