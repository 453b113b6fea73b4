"""``kill -9`` of the gateway process in the middle of a round: nothing a device handed over may be lost.

Real Mosquitto (persistence, persistent sessions), a real anvil node, the gateway as its own process
(``python -m cli.main gateway run``), six devices with persistent sessions publishing full-size signed
encrypted updates at QoS 1. The gateway is killed at five points of the round:

- ``down``: right after it opened round 1, before any update exists (devices publish to a dead gateway: the
  broker holds the messages in the gateway's persistent session);
- ``ingesting``: the moment the broker has PUBACKed all six updates (the gateway is receiving, validating and
  storing them);
- ``storing``: the test holds the SQLite write lock, so the gateway receives and validates the updates and
  then waits to store them; it is killed there (the window in which an ack sent before the commit loses the
  update, made deterministic);
- ``relaying``: the moment the first accepted receipt reaches its device (others are stored, in the outbox or
  on their way to the chain);
- ``outbox``: one update is on chain, then the chain node is frozen (SIGSTOP) and the other five are
  published: they are stored, acknowledged to the broker and queued in the outbox (the relay's transaction
  hangs in the frozen node); the gateway is killed once two updates wait there, the node is thawed, and one
  of the waiting updates is put on chain with the gateway's key, as if the dead gateway's transaction had
  been mined after all: the restarted relay must recognise it on chain (the contract refuses a second
  submission) and report the chain's transaction, not fail the update or count it twice.

Then it is started again (same config, same SQLite store) and the round must complete with all six updates:
on chain exactly once each, folded into the aggregate exactly once each, every device holding an accepted
receipt whose transaction is the chain's, no device told anything but "accepted" or "resend" (a device that
was told ``round_not_open`` or ``bad_ciphertext`` for its genuine update would give up on the round).

What this catches: an MQTT ack sent before the store commit (the broker would not redeliver the update, the
gateway's memory died with it: the round never reaches its quorum of six); an outbox row written after the ack
or not reconciled on restart (the update is stored but never relayed, or relayed twice: the contract refuses
the second, the count or the aggregate would be off); a restart that folds an update twice or misses one that
went on chain just before the kill (the aggregate check); updates the restarted gateway refuses because its
round is not re-established yet (the receipts check).
"""

from __future__ import annotations

import secrets
import signal
import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from eth_utils.crypto import keccak

from bench.round import premade_updates
from blockdeepnet import merkle
from blockdeepnet.crypto.threshold import deal
from blockdeepnet.ledger import Ledger, SignedUpdate, new_gateway_account, rpc_web3
from blockdeepnet.wire import GlobalBlock, ReasonCode, RoundOpen, Topics, Update
from gateway.chain import load_gateway_key
from gateway.store import Store
from provisioning.anvil import AnvilProcess, free_port
from provisioning.localfleet import LocalFleet, create_local_fleet
from tests.support.devices import Device, accepted
from tests.support.gateway_process import GatewayProcess
from tests.support.mosquitto import MosquittoProcess
from tests.support.mqtt import MqttTestClient

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

N = 6
DEALT = deal(1, 2, 512, allow_insecure=True)


@dataclass
class Rig:
    tmp: Path
    mosquitto: MosquittoProcess
    anvil: AnvilProcess
    local: LocalFleet
    topics: Topics
    gateway: GatewayProcess
    ledger: Ledger


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    mosquitto = MosquittoProcess(tmp_path / "mosquitto", max_queued_messages=100_000).start()
    anvil = AnvilProcess(state_file=tmp_path / "anvil" / "state.json").start()
    gateway: GatewayProcess | None = None
    try:
        http_port = free_port()
        local = create_local_fleet(
            tmp_path / "fleet",
            name=f"crash{secrets.token_hex(4)}",
            devices=N,
            threshold=1,
            holders=2,
            chain_url=anvil.url,
            broker_port=mosquitto.port,
            broker_mode="external",
            broker_auth=False,
            http_port=http_port,
            dealt=DEALT,
            gateway_extra={"rounds": {"quorum": N, "min_updates": N, "deadline_s": 3600.0, "max_rounds": 0}},
        )
        gateway = GatewayProcess(local.gateway_config, tmp_path / "gateway.log", http_port)
        ledger = Ledger(rpc_web3(anvil.url), local.fleet.chain.contract, new_gateway_account())
        yield Rig(tmp_path, mosquitto, anvil, local, Topics(local.fleet.name), gateway, ledger)
    finally:
        if gateway is not None:
            gateway.stop()
            print(gateway.log_tail(150))  # shown by pytest when the test failed
        print(mosquitto.log_tail())
        mosquitto.stop()
        anvil.stop()


def _db(local: LocalFleet) -> Path:
    return local.gateway_config.parent / "state" / "gateway.db"


def _store_counts(local: LocalFleet) -> dict[str, int]:
    """What the (dead) gateway's store holds for round 1, read by a second process as an operator would."""
    with Store(f"sqlite:///{_db(local)}") as store:
        return store.update_counts(1)


def _stored_not_recorded(local: LocalFleet) -> int:
    """Updates of round 1 committed to the store (so acknowledged to the broker) but not yet on chain, read
    while the gateway runs (SQLite WAL: a reader does not block the writer)."""
    if not _db(local).exists():
        return 0
    con = sqlite3.connect(f"file:{_db(local)}?mode=ro", uri=True, timeout=5)
    try:
        row = con.execute("SELECT count(*) FROM updates WHERE round = 1 AND status = 'stored'").fetchone()
        return int(row[0])
    except sqlite3.OperationalError:  # the schema is not there yet
        return 0
    finally:
        con.close()


def _mine_one_stored_update(rig: Rig) -> tuple[str, bytes]:
    """What a gateway killed between sending a transaction and seeing its receipt leaves behind: an update in
    its outbox that is on chain all the same. Sent here with the gateway's own key; returns (device, tx)."""
    with Store(f"sqlite:///{_db(rig.local)}") as store:
        row = next(o for o in store.pending_outbox(["submit"]) if o.round == 1 and o.device)
        assert row.device is not None
        u = store.get_update(1, row.device)
    assert u is not None and u.status == "stored"
    account = load_gateway_key(rig.local.gateway_config.parent / "gateway.key")
    ledger = Ledger(rpc_web3(rig.anvil.url), rig.local.fleet.chain.contract, account)
    receipt = ledger.submit_update(
        SignedUpdate(1, u.device, u.payload_hash, u.samples, u.compute_ms, u.signature)
    )
    assert receipt is not None
    return u.device, bytes(receipt["transactionHash"])


def _wait(what: str, done: Callable[[], bool], rig: Rig, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        assert rig.gateway.running, "the gateway died by itself"
        time.sleep(0.002)


def _refusals(devices: list[Device]) -> list[tuple[str, str, str]]:
    """Receipts refusing a genuine update for another reason than "resend" (the device gives up on it)."""
    return [
        (dev.address, str(r.reason), r.detail)
        for dev in devices
        for r in dev.receipts()
        if not r.accepted and not (r.reason is ReasonCode.DUPLICATE and "resend" in r.detail)
    ]


def _wait_for_global(rig: Rig, watcher: MqttTestClient, devices: list[Device], timeout: float) -> GlobalBlock:
    """The global block of round 1; fails at once when a device's genuine update is refused instead."""
    deadline = time.monotonic() + timeout
    while True:
        refused = _refusals(devices)
        assert not refused, f"genuine updates refused (their devices give up on the round): {refused}"
        try:
            return GlobalBlock.from_cbor(watcher.expect(rig.topics.global_block(1), timeout=0.5).payload)
        except AssertionError:
            if time.monotonic() > deadline:
                waiting = [d.address for d in devices if not any(accepted(r) for r in d.receipts())]
                raise AssertionError(
                    f"round 1 not closed {timeout:.0f} s after the restart: store {_store_counts(rig.local)}, "
                    f"{rig.ledger.get_round(1).count} update(s) on chain, no accepted receipt for {waiting}"
                ) from None


@pytest.mark.parametrize("kill_at", ["down", "ingesting", "storing", "relaying", "outbox"])
def test_kill_9_mid_round_loses_nothing_and_doubles_nothing(rig: Rig, kill_at: str) -> None:
    topics, local = rig.topics, rig.local
    updates = premade_updates(local)
    watcher = MqttTestClient(rig.mosquitto.host, rig.mosquitto.port, clean_session=True).connect()
    devices = [
        Device(rig.mosquitto.host, rig.mosquitto.port, topics, d.address, client_id=f"crash-dev{k}").connect()
        for k, d in enumerate(local.devices)
    ]
    try:
        watcher.subscribe(topics.round())
        watcher.subscribe(topics.global_block(1))
        rig.gateway.start()
        opened = RoundOpen.from_cbor(watcher.expect(topics.round(), timeout=60).payload)
        assert opened.round == 1

        infos: list[mqtt.MQTTMessageInfo] = []
        mined_behind: tuple[str, bytes] | None = None

        def publish(ks: range) -> None:
            infos.extend(devices[k].publish_update(updates[k][2]) for k in ks)

        if kill_at == "down":
            rig.gateway.kill()
            publish(range(N))
        elif kill_at == "ingesting":
            publish(range(N))
            for info in infos:
                info.wait_for_publish(60)
            rig.gateway.kill()
        elif kill_at == "storing":
            lock = sqlite3.connect(_db(local), isolation_level=None, timeout=10)
            try:
                lock.execute("BEGIN IMMEDIATE")  # the gateway's writers now wait (busy_timeout 10 s)
                publish(range(N))
                time.sleep(1.5)  # receive + validate six updates: ~0.2 s; storing them waits for the lock
                rig.gateway.kill()
                lock.rollback()
            finally:
                lock.close()
        elif kill_at == "relaying":
            publish(range(N))
            _wait("an accepted receipt", lambda: any(accepted(r) for d in devices for r in d.receipts()), rig)
            rig.gateway.kill()
        else:  # outbox: one update on chain, then the node freezes and the others pile up in the outbox
            publish(range(1))
            devices[0].wait_receipt(accepted, timeout=60)
            assert rig.anvil.proc is not None
            rig.anvil.proc.send_signal(signal.SIGSTOP)
            try:
                publish(range(1, N))
                _wait(
                    "two updates stored and waiting for the chain",
                    lambda: _stored_not_recorded(local) >= 2,
                    rig,
                )
                rig.gateway.kill()
            finally:
                rig.anvil.proc.send_signal(signal.SIGCONT)
            mined_behind = _mine_one_stored_update(rig)
        assert not rig.gateway.running
        for info in infos:
            Device.wait_published(info)  # the broker has every update (PUBACK: not the gateway's ack)

        at_kill = _store_counts(local)
        receipts_at_kill = sum(1 for dev in devices for r in dev.receipts() if accepted(r))
        print(f"kill -9 at {kill_at!r}: store {at_kill}, {receipts_at_kill} accepted receipt(s) seen")
        assert not rig.ledger.get_round(1).committed, (
            "the round completed before the kill: nothing was tested"
        )

        rig.gateway.start()
        block = _wait_for_global(rig, watcher, devices, timeout=60)

        # Every device holds an accepted receipt naming the transaction the chain has for it, and was never told
        # anything else than "resend" about its genuine update.
        events = {e.device: e for e in rig.ledger.update_events(1)}
        for dev in devices:
            receipt = dev.wait_receipt(accepted, timeout=30)
            assert receipt.round == 1 and receipt.tx_hash == events[dev.address].tx_hash
        if mined_behind is not None:  # the restarted relay found that one on chain instead of failing on it
            device, tx = mined_behind
            assert next(d for d in devices if d.address == device).wait_receipt(accepted).tx_hash == tx
        assert not _refusals(devices)
        assert rig.gateway.running, "the gateway died after the restart"
    finally:
        watcher.close()
        for dev in devices:
            dev.close()

    # On chain exactly once each: six distinct devices, the payload hashes that were published, count six.
    info = rig.ledger.get_round(1)
    recorded = rig.ledger.recorded_updates(1)
    sent = {addr: Update.from_cbor(payload) for addr, _, payload in updates}
    assert info.committed and info.count == N
    assert len(recorded) == N and {d for d, _ in recorded} == set(sent)
    assert all(h == keccak(sent[d].payload) for d, h in recorded)

    # The aggregate folds in each update exactly once, and it is what was committed.
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
    assert "[resumed]" in rig.gateway.log_text()
