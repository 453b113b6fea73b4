"""The gateway rides out what fails around it in the middle of a round: the broker, the chain node, a device.

Real Mosquitto (persistence, persistent sessions, high ``max_queued_messages``), a real anvil node (with a
state file, so it can be stopped and started again on the same port with its chain), the real gateway in a
background thread, devices as MQTT clients with persistent sessions that reconnect by themselves, publishing
full-size signed encrypted updates (512-bit key: 8,414 ciphertexts of 128 bytes, ~1 MB each).

- broker restart: Mosquitto is stopped while the gateway holds half the updates unacknowledged (the test holds
  the store's write lock, so the gateway cannot commit them yet); then they are stored and relayed while the
  broker is down (their acks and receipts have no connection to go to); two devices publish while it is down
  (paho queues), one after it is back. The broker must redeliver the three from its disk (the gateway's
  persistent session), the gateway must answer them as resends, deliver the receipts it queued, and take
  the other three: every update ends on chain once and every device holds its accepted receipt.
- chain outage: anvil is stopped (its state dumped) once two updates are on chain; four more are published
  while it is down: the gateway must still acknowledge them (stored with their outbox rows, acked to the
  broker), report ``/healthz`` unhealthy (503, ``chain_reachable`` false) and keep running; when anvil is
  back on the same port the relay drains the outbox and the round completes, each update recorded once.
- device death: four devices with last wills, quorum "all registered", ``min_updates`` 2, a 600 s deadline;
  three submit; the fourth is a separate process that gets SIGKILLed (no DISCONNECT: the broker publishes its
  will, retained ``offline``); the gateway must close the round with three right away, not at the deadline.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from eth_utils.crypto import keccak

from bench.round import premade_updates
from blockdeepnet import merkle
from blockdeepnet.crypto.threshold import deal
from blockdeepnet.ledger import Ledger, new_gateway_account, rpc_web3
from blockdeepnet.wire import DeviceState, GlobalBlock, ReasonCode, RoundOpen, Topics, Update
from provisioning.anvil import AnvilProcess
from provisioning.localfleet import LocalFleet, create_local_fleet
from tests.support.devices import Device, accepted, spawn_device_process
from tests.support.gateway import GatewayThread
from tests.support.mosquitto import MosquittoProcess
from tests.support.mqtt import MqttTestClient

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

DEALT = deal(1, 2, 512, allow_insecure=True)


@dataclass
class Env:
    tmp: Path
    mosquitto: MosquittoProcess
    anvil: AnvilProcess

    def fleet(self, devices: int, **rounds: object) -> LocalFleet:
        return create_local_fleet(
            self.tmp / "fleet",
            name=f"out{secrets.token_hex(4)}",
            devices=devices,
            threshold=1,
            holders=2,
            chain_url=self.anvil.url,
            broker_port=self.mosquitto.port,
            broker_mode="external",
            broker_auth=False,
            http_port=0,
            dealt=DEALT,
            gateway_extra={"rounds": {"max_rounds": 0, **rounds}},
        )


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    mosquitto = MosquittoProcess(tmp_path / "mosquitto", max_queued_messages=100_000).start()
    anvil = AnvilProcess(state_file=tmp_path / "anvil" / "state.json").start()
    try:
        yield Env(tmp_path, mosquitto, anvil)
    finally:
        print(mosquitto.log_tail())  # shown by pytest when the test failed
        mosquitto.stop()
        anvil.stop()


def _db(local: LocalFleet) -> Path:
    return local.gateway_config.parent / "state" / "gateway.db"


def _ledger(env: Env, local: LocalFleet) -> Ledger:
    return Ledger(rpc_web3(env.anvil.url), local.fleet.chain.contract, new_gateway_account())


def _healthz(gt: GatewayThread) -> tuple[int, dict[str, Any]]:
    url = f"http://127.0.0.1:{gt.gw.http_port}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _until(what: str, done: Callable[[], bool], gt: GatewayThread, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert gt.error is None, f"the gateway failed: {gt.error!r}"
        assert gt._thread.is_alive(), "the gateway thread ended"
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s; last events {gt.events[-8:]}"
        time.sleep(0.02)


def _bad_refusals(devices: list[Device]) -> list[tuple[str, ReasonCode | None, str]]:
    """Refusals of genuine updates other than the "resend" notice (a device gives up on such a round)."""
    return [
        (d.address, r.reason, r.detail)
        for d in devices
        for r in d.receipts()
        if not r.accepted and not (r.reason is ReasonCode.DUPLICATE and "resend" in r.detail)
    ]


def _check_round(
    ledger: Ledger, local: LocalFleet, block: GlobalBlock, updates: list[tuple[str, str, bytes]]
) -> None:
    """On chain exactly once each, and the global block's aggregate is the product of exactly these payloads."""
    info = ledger.get_round(1)
    recorded = ledger.recorded_updates(1)
    sent = {addr: Update.from_cbor(payload) for addr, _, payload in updates}
    assert info.committed and info.count == len(sent)
    assert len(recorded) == len(sent) and {d for d, _ in recorded} == set(sent)
    assert all(h == keccak(sent[d].payload) for d, h in recorded)
    pub = local.fleet.public_key.public_key
    aggregate = pub.ciphertexts_from_bytes(block.aggregate)
    expected = [1] * len(aggregate)
    for update in sent.values():
        for i, c in enumerate(pub.ciphertexts_from_bytes(update.payload)):
            expected[i] = expected[i] * c % pub.nsquare
    assert aggregate == expected
    assert keccak(block.aggregate) == info.aggregate_hash
    assert block.devices == [d for d, _ in recorded]
    assert block.merkle_root == merkle.root(merkle.leaf(1, d, h) for d, h in recorded) == info.merkle_root


def _receipts_match_chain(ledger: Ledger, devices: list[Device]) -> None:
    events = {e.device: e for e in ledger.update_events(1)}
    for dev in devices:
        receipt = dev.wait_receipt(accepted, timeout=30)
        assert receipt.round == 1 and receipt.tx_hash == events[dev.address].tx_hash
    assert not _bad_refusals(devices)


def test_broker_restart_mid_round(env: Env) -> None:
    n = 6
    local = env.fleet(n, quorum=n, min_updates=n, deadline_s=3600.0)
    topics = Topics(local.fleet.name)
    updates = premade_updates(local)
    host, port = env.mosquitto.host, env.mosquitto.port
    with GatewayThread(local.gateway_config) as gt:
        devices = [
            Device(host, port, topics, d.address, client_id=f"brk-dev{k}").connect()
            for k, d in enumerate(local.devices)
        ]
        lock: sqlite3.Connection | None = None
        try:
            with MqttTestClient(host, port) as watcher:
                watcher.connect().subscribe(topics.round())
                assert RoundOpen.from_cbor(watcher.expect(topics.round(), timeout=30).payload).round == 1
            # Half the updates reach the gateway, which cannot store them yet (the test holds the SQLite write
            # lock): at the broker's restart they are in flight, unacknowledged, in the gateway's session.
            lock = sqlite3.connect(_db(local), isolation_level=None, timeout=10)
            lock.execute("BEGIN IMMEDIATE")
            for info in [devices[k].publish_update(updates[k][2]) for k in range(3)]:
                info.wait_for_publish(30)
            time.sleep(0.5)
            env.mosquitto.stop()  # clean stop: the broker writes sessions and in-flight messages to disk
            lock.rollback()
            lock.close()
            lock = None
            # Stored and relayed while the broker is down: the acks and the receipts have no connection to go to.
            _until("3 updates on chain", lambda: len(gt.named("update_recorded")) == 3, gt)
            queued = [devices[k].publish_update(updates[k][2]) for k in (3, 4)]  # paho holds them
            time.sleep(3.0)  # long enough for the gateway's reconnect backoff to exceed the devices'
            env.mosquitto.start()
            for dev in devices:
                dev.wait_connected(2)
            _until("the gateway reconnected", gt.gw.client.connected.is_set, gt)
            last = devices[5].publish_update(updates[5][2])
            for info in [*queued, last]:
                Device.wait_published(info)
            with MqttTestClient(host, port) as watcher:  # the global block is retained
                watcher.connect().subscribe(topics.global_block(1))
                block = GlobalBlock.from_cbor(watcher.expect(topics.global_block(1), timeout=60).payload)
            _receipts_match_chain(_ledger(env, local), devices)
        finally:
            if lock is not None:
                lock.close()
            for dev in devices:
                dev.close()
        closed = gt.wait_for("round_closed")
        assert closed[0]["count"] == n
        # The broker redelivered the three whose acks were lost (persistent session, restored from disk); the
        # gateway recognised them as resends instead of storing or relaying them again.
        resends = [e for e in gt.named("update_rejected") if "resend" in e["detail"]]
        assert {e["device"] for e in resends} == {d.address for d in devices[:3]}
        assert gt.error is None
    _check_round(_ledger(env, local), local, block, updates)


def test_chain_outage_mid_round(env: Env) -> None:
    n = 6
    local = env.fleet(n, quorum=n, min_updates=n, deadline_s=3600.0)
    topics = Topics(local.fleet.name)
    updates = premade_updates(local)
    host, port = env.mosquitto.host, env.mosquitto.port
    with GatewayThread(local.gateway_config) as gt:
        watcher = MqttTestClient(host, port).connect()
        devices = [
            Device(host, port, topics, d.address, client_id=f"chn-dev{k}").connect()
            for k, d in enumerate(local.devices)
        ]
        try:
            watcher.subscribe(topics.round())
            watcher.subscribe(topics.global_block(1))
            assert RoundOpen.from_cbor(watcher.expect(topics.round(), timeout=30).payload).round == 1
            for k in range(2):
                devices[k].publish_update(updates[k][2])
            for k in range(2):
                devices[k].wait_receipt(accepted, timeout=30)
            assert _healthz(gt)[0] == 200

            env.anvil.stop()  # SIGTERM: anvil dumps the chain to its state file
            for k in range(2, n):
                devices[k].publish_update(updates[k][2]).wait_for_publish(30)
            # The gateway takes them in while the chain is away: stored with their outbox rows (so acked to the
            # broker), reported as accepted-by-the-gateway, but no device gets a chain receipt yet.
            _until(
                "4 updates accepted while the chain is down",
                lambda: len(gt.named("update_accepted")) == n,
                gt,
            )
            _until("the relay reports the chain unreachable", lambda: not gt.gw.relay.healthy, gt, timeout=60)
            status, health = _healthz(gt)
            assert status == 503 and health["chain_reachable"] is False and health["broker_connected"] is True
            counts = gt.gw.store.update_counts(1)
            assert counts["stored"] == n - 2 and counts["recorded"] == 2
            assert gt.gw.store.outbox_pending_count() == n - 2
            time.sleep(3.0)  # a few more relay attempts fail: nothing may give up or crash
            assert not any(accepted(r) for dev in devices[2:] for r in dev.receipts())
            assert not _bad_refusals(devices)
            assert gt.gw._accepting == 1 and not gt.named("round_closed")

            env.anvil.start()  # the same port, the same chain (loaded from the state file)
            block = GlobalBlock.from_cbor(watcher.expect(topics.global_block(1), timeout=90).payload)
            ledger = _ledger(env, local)
            _receipts_match_chain(ledger, devices)
            _until("/healthz is healthy again", lambda: _healthz(gt)[0] == 200, gt, timeout=30)
        finally:
            watcher.close()
            for dev in devices:
                dev.close()
        assert gt.wait_for("round_closed")[0]["count"] == n
        assert len(gt.named("update_recorded")) == n
        assert gt.error is None
    _check_round(_ledger(env, local), local, block, updates)


def test_a_device_dying_mid_round_closes_it_early(env: Env) -> None:
    n = 4
    local = env.fleet(n, quorum=0, min_updates=2, deadline_s=600.0)
    topics = Topics(local.fleet.name)
    updates = premade_updates(local)
    host, port = env.mosquitto.host, env.mosquitto.port
    doomed = local.devices[3].address
    with GatewayThread(local.gateway_config) as gt:
        watcher = MqttTestClient(host, port).connect()
        devices = [
            Device(host, port, topics, d.address, client_id=f"lwt-dev{k}", lwt=True).connect()
            for k, d in enumerate(local.devices[:3])
        ]
        proc = spawn_device_process(host, port, local.fleet.name, doomed)
        try:
            watcher.subscribe(topics.round())
            watcher.subscribe(topics.global_block(1))
            watcher.subscribe(topics.state(doomed))
            assert RoundOpen.from_cbor(watcher.expect(topics.round(), timeout=30).payload).round == 1
            _until(
                "every device seen online",
                lambda: (
                    {d["device"] for d in gt.named("device_state") if d["state"] == "online"}
                    == {d.address for d in local.devices}
                ),
                gt,
            )
            opened_at = time.monotonic()
            for dev, (_, _, payload) in zip(devices, updates, strict=False):
                dev.publish_update(payload)
            for dev in devices:
                dev.wait_receipt(accepted, timeout=30)
            # Three of four are in and the fourth is online: the round waits for it (the deadline is 600 s).
            time.sleep(2.0)
            assert not gt.named("round_closed")
            assert not [m for m in watcher.drain() if m.topic == topics.global_block(1)]

            proc.kill()  # SIGKILL: no DISCONNECT, the broker publishes the will
            proc.wait(10)
            watcher.expect(topics.state(doomed), DeviceState("offline").to_cbor(), timeout=30)  # the will
            block = GlobalBlock.from_cbor(watcher.expect(topics.global_block(1), timeout=30).payload)
            assert time.monotonic() - opened_at < 60, "the round waited for a device that is gone"
        finally:
            if proc.poll() is None:
                proc.kill()
            watcher.close()
            for dev in devices:
                dev.close()
        closed = gt.wait_for("round_closed")[0]
        assert closed["count"] == 3 and doomed not in closed["devices"]
        assert any(d == {"device": doomed, "state": "offline"} for d in gt.named("device_state"))
        assert gt.error is None
    assert sorted(block.devices) == sorted(d.address for d in devices)
    _check_round(_ledger(env, local), local, block, updates[:3])
