"""Device agents against the real Mosquitto on loopback, with the test playing the gateway (docs/protocol.md).

The test gateway is a plain paho client plus the embedded chain: it opens rounds on chain and on ``round``,
checks each update the way the gateway pipeline does (topic, signature, ciphertext count), records it on chain,
answers with a receipt, aggregates homomorphically, commits, and publishes the global block. The agents do
everything else themselves: training, encryption, signing, chain checks, primary/standby key-holder duty,
share verification, combining, decoding, applying and reporting.
"""

from __future__ import annotations

import queue
import socket
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from web3 import Web3

from blockdeepnet import merkle
from blockdeepnet.audit import aggregate_hash
from blockdeepnet.crypto.codec import pack
from blockdeepnet.crypto.homomorphic import Accumulator
from blockdeepnet.crypto.randomness import FixedBaseTable, OnTheSpot
from blockdeepnet.crypto.threshold import deal
from blockdeepnet.crypto.vector import encrypt_plaintexts
from blockdeepnet.eip712 import UpdateClaim, payload_hash, sign_update, verify_update
from blockdeepnet.fleet import ChainInfo
from blockdeepnet.learning import PAPER_CNN_PARAMS
from blockdeepnet.ledger import (
    Ledger,
    SignedUpdate,
    embedded_web3,
    fund_from_node_account,
    new_gateway_account,
)
from blockdeepnet.wire import DeviceState, GlobalBlock, Receipt, Report, RoundOpen, Share, Topics, Update
from firmware_agent import Agent
from firmware_agent.trainer import Trainer, load_local_data
from tests.unit.test_agent_support import FleetFiles, write_fleet

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

HOST, PORT = "127.0.0.1", 1883
WAIT_S = 60.0


def _broker_up() -> bool:
    try:
        with socket.create_connection((HOST, PORT), timeout=1):
            return True
    except OSError:
        return False


@dataclass
class Gateway:
    """The test's stand-in for the gateway: an MQTT client with an inbox, the ledger and the fleet."""

    files: FleetFiles
    ledger: Ledger
    topics: Topics
    client: mqtt.Client
    inbox: queue.Queue[tuple[str, bytes]] = field(default_factory=queue.Queue)
    states: dict[str, list[str]] = field(default_factory=dict)
    payloads: dict[bytes, Update] = field(default_factory=dict)

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        self.client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(timeout=10)

    def expect(self, kind: str, count: int) -> dict[str, bytes]:
        """The first ``count`` distinct devices' messages of ``kind``; other kinds are set aside."""
        got: dict[str, bytes] = {}
        while len(got) < count:
            topic, payload = self.inbox.get(timeout=WAIT_S)
            parsed = self.topics.parse(topic)
            if parsed.kind == kind and parsed.device is not None and parsed.device not in got:
                got[parsed.device] = payload
            elif parsed.kind == "state" and parsed.device is not None:
                self.states.setdefault(parsed.device, []).append(DeviceState.from_cbor(payload).state)
        return got

    def drain_states(self, quiet_s: float = 1.0) -> dict[str, list[str]]:
        """Read the inbox until it stays empty for ``quiet_s``; returns every device's state history."""
        while True:
            try:
                topic, payload = self.inbox.get(timeout=quiet_s)
            except queue.Empty:
                return self.states
            parsed = self.topics.parse(topic)
            if parsed.kind == "state" and parsed.device is not None and payload:
                self.states.setdefault(parsed.device, []).append(DeviceState.from_cbor(payload).state)

    def open_round(self, r: int, base: bytes) -> None:
        deadline = self.ledger.block_number() + 1_000
        self.ledger.open_round(r, base, deadline)
        fleet = self.files.fleet
        ro = RoundOpen(
            round=r,
            base_model_hash=base,
            layout=fleet.layout.to_dict(),
            deadline_block=deadline,
            chain_block=self.ledger.block_number(),
            total_samples=fleet.total_samples,
            key_fingerprint=fleet.public_key.fingerprint,
        )
        self.publish(self.topics.round(), ro.to_cbor(), retain=True)

    def take_updates(self, r: int, count: int) -> None:
        """The gateway's validation pipeline in short for ``count`` devices' updates, then :meth:`record`."""
        fleet = self.files.fleet
        pub = fleet.public_key.public_key
        for device, payload in self.expect("update", count).items():
            u = Update.from_cbor(payload)
            assert u.device == device and u.round == r
            assert u.samples <= fleet.device(device).samples  # type: ignore[union-attr]
            claim = UpdateClaim(u.round, payload_hash(u.payload), u.samples, u.compute_ms)
            assert verify_update(fleet.domain, claim, u.signature, device)
            pub.ciphertexts_from_bytes(u.payload, fleet.layout.ciphertexts_for(PAPER_CNN_PARAMS))
            self.record(u)

    def record(self, u: Update) -> None:
        """On chain (the contract checks the signature again), then the receipt."""
        h = payload_hash(u.payload)
        receipt = self.ledger.submit_update(
            SignedUpdate(u.round, u.device, h, u.samples, u.compute_ms, u.signature)
        )
        assert receipt is not None
        tx = bytes(receipt["transactionHash"])
        self.publish(self.topics.receipt(u.device), Receipt.accept(u.round, tx).to_cbor())
        self.payloads[h] = u

    def close_round(self, r: int) -> GlobalBlock:
        fleet = self.files.fleet
        pub = fleet.public_key.public_key
        recorded = self.ledger.recorded_updates(r)
        acc = Accumulator(pub, fleet.layout.ciphertexts_for(PAPER_CNN_PARAMS))
        for _, h in recorded:
            acc.add(pub.ciphertexts_from_bytes(self.payloads[h].payload))
        aggregate = acc.result()
        root = merkle.root([merkle.leaf(r, d, h) for d, h in recorded])
        commit = self.ledger.commit_global(r, aggregate_hash(pub, aggregate), root, len(recorded))
        block = GlobalBlock(
            round=r,
            aggregate=pub.ciphertexts_to_bytes(aggregate),
            devices=[d for d, _ in recorded],
            total_weight_num=sum(self.payloads[h].samples for _, h in recorded),
            total_weight_den=fleet.total_samples,
            merkle_root=root,
            commit_tx=bytes(commit["transactionHash"]),
        )
        self.publish(self.topics.global_block(r), block.to_cbor(), retain=True)
        return block


@pytest.fixture
def chain() -> tuple[Web3, Ledger]:
    w3 = embedded_web3()
    account = new_gateway_account()
    fund_from_node_account(w3, account.address, 10**18)
    return w3, Ledger.deploy(w3, account)


def _fleet(tmp_path: Path, ledger: Ledger, devices: int, extra_toml: str) -> FleetFiles:
    if not _broker_up():
        pytest.skip(f"no MQTT broker on {HOST}:{PORT} (make test installs and starts Mosquitto)")
    tpk, shares = deal(2, 3, 512, allow_insecure=True)
    info = ChainInfo(kind="embedded", chain_id=ledger.chain_id(), contract=ledger.address)
    name = f"agent-test-{uuid.uuid4().hex[:12]}"
    files = write_fleet(tmp_path, name, tpk, shares, devices=devices, chain=info, extra_toml=extra_toml)
    for d in files.fleet.devices:
        ledger.register_device(d.address, d.key_share)
    return files


@pytest.fixture
def make_gateway(chain: tuple[Web3, Ledger]) -> Iterator[Any]:
    made: list[Gateway] = []

    def make(files: FleetFiles) -> Gateway:
        topics = Topics(files.fleet.name)
        client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2, client_id=f"gw-{uuid.uuid4().hex}"
        )
        gw = Gateway(files, chain[1], topics, client)
        client.on_message = lambda _c, _u, m: gw.inbox.put((m.topic, bytes(m.payload)))
        client.connect(HOST, PORT)
        client.loop_start()
        client.subscribe([(topics.all_updates(), 1), (topics.all_reports(), 1), (topics.all_states(), 1)])
        made.append(gw)
        return gw

    yield make
    for gw in made:
        gw.client.disconnect()
        gw.client.loop_stop()
        _clear_fleet(gw)


def _clear_fleet(gw: Gateway) -> None:
    """Leave nothing on the shared broker: every retained message under the fleet's prefix (rounds, global
    blocks, the agents' shares and states) and the agents' persistent sessions."""
    retained: set[str] = set()
    sweeper = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"sweep-{uuid.uuid4().hex}")
    sweeper.on_message = lambda _c, _u, m: retained.add(m.topic) if m.retain and m.payload else None
    sweeper.connect(HOST, PORT)
    sweeper.loop_start()
    sweeper.subscribe(gw.topics.prefix + "#", 1)
    time.sleep(1.0)
    for topic in retained:
        sweeper.publish(topic, b"", qos=1, retain=True).wait_for_publish(timeout=5)
    sweeper.disconnect()
    sweeper.loop_stop()
    for d in gw.files.devices:
        session = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=d.address, clean_session=True)
        session.connect(HOST, PORT)
        session.disconnect()


class Events:
    """Collects every agent's events (on_event hook) for assertions."""

    def __init__(self) -> None:
        self.items: list[tuple[str, dict[str, Any]]] = []

    def __call__(self, name: str, data: dict[str, Any]) -> None:
        self.items.append((name, data))

    def named(self, name: str, **match: Any) -> list[dict[str, Any]]:
        return [d for n, d in self.items if n == name and all(d.get(k) == v for k, v in match.items())]


def _expected_model(files: FleetFiles, base: np.ndarray, r: int, devices: int) -> np.ndarray:
    """Plain FedAvg (Eq. 4) of the same local training the agents ran: what the encrypted path must give."""
    total, weighted = 0, np.zeros(PAPER_CNN_PARAMS)
    for i in range(devices):
        cfg = files.config(i)
        trainer = Trainer.from_config(load_local_data(cfg.data), cfg.data, cfg.train)
        outcome = trainer.train(base, r, files.fleet.layout.clip)
        weighted += outcome.samples * outcome.delta.astype(np.float64)
        total += outcome.samples
    return base.astype(np.float64) + weighted / total


def _malicious_update(files: FleetFiles, r: int, device: int) -> Update:
    """A registered device that encrypts an out-of-range slot (guard bit set) and signs it properly: nobody
    can see it in the ciphertexts, and every agent must catch it after decryption."""
    fleet = files.fleet
    pub = fleet.public_key.public_key
    slots = np.zeros(PAPER_CNN_PARAMS, dtype=np.uint64)
    slots[77] = 1 << fleet.layout.value_bits
    cts = encrypt_plaintexts(pub, pack(fleet.layout, slots), OnTheSpot(FixedBaseTable(pub)))
    payload = pub.ciphertexts_to_bytes(cts)
    samples = fleet.devices[device].samples
    claim = UpdateClaim(r, payload_hash(payload), samples, 1)
    key = files.devices[device]
    signature = sign_update(key.key, fleet.domain, claim)
    return Update(
        round=r, device=key.address, samples=samples, compute_ms=1, payload=payload, signature=signature
    )


def test_agents_run_rounds_agree_and_refuse_an_overflow(
    tmp_path: Path, chain: tuple[Web3, Ledger], make_gateway: Any
) -> None:
    """Three agents (all key holders, t = 2 of 3) and a fourth registered device that stays silent until it
    cheats in round 3, so rounds 1 and 2 also exercise the dropout correction (W = 192/256)."""
    w3, ledger = chain
    files = _fleet(tmp_path, ledger, 4, "receipt_timeout_s = 30.0\nstandby_delay_s = 60.0\n")
    fleet, topics = files.fleet, Topics(files.fleet.name)
    gw: Gateway = make_gateway(files)
    events = Events()
    agents = [Agent(files.config(i), fleet=fleet, web3=w3, on_event=events) for i in range(3)]
    bound = fleet.layout.error_bound(3 * 64 / fleet.total_samples, 3) + 1e-6
    try:
        gw.open_round(1, fleet.initial_model_hash())  # retained: agents that connect later still see it
        for a in agents:
            a.start()
        gw.take_updates(1, 3)
        block1 = gw.close_round(1)
        reports = gw.expect("report", 3)
        assert {Report.from_cbor(p).round for p in reports.values()} == {1}

        models = [a.model() for a in agents]
        assert all(np.array_equal(models[0], m) for m in models[1:]), "devices disagree on the global model"
        expected = _expected_model(files, fleet.initial_model(), 1, 3)
        assert np.max(np.abs(models[0] - expected)) <= bound
        assert {a.base_hash for a in agents} == {
            aggregate_hash(fleet.public_key.public_key, _cts(fleet, block1))
        }
        # Round 1's primary holders are 2 and 3; holder 1 stands by (60 s) and is not needed.
        assert sorted(e["holder"] for e in events.named("share_published", round=1)) == [2, 3]
        assert all(e["role"] == "primary" for e in events.named("share_published"))

        # Round 2 builds on round 1's aggregate. Before its block goes out, a forged share under primary holder
        # 3's address is waiting (retained): the right number of valid group elements (an update's ciphertexts)
        # with a made-up proof. Every agent rejects it, holder 3 still publishes its own, and the round completes.
        gw.open_round(2, agents[0].base_hash)
        gw.take_updates(2, 3)
        holder3 = next(d for d in files.devices if d.share is not None and d.share.index == 3)
        width = fleet.public_key.public_key.ciphertext_bytes
        forged = Share(
            round=2,
            holder=3,
            values=next(iter(gw.payloads.values())).payload,
            proof_a=(2).to_bytes(width, "big"),
            proof_b=(3).to_bytes(width, "big"),
            proof_z=b"\x05",
        )
        gw.publish(topics.share(2, holder3.address), forged.to_cbor(), retain=True)
        gw.close_round(2)
        reports = gw.expect("report", 3)
        assert {Report.from_cbor(p).round for p in reports.values()} == {2}
        rejected = events.named("share_rejected", round=2, holder=3)
        assert {e["device"] for e in rejected} == {a.address for a in agents}
        assert all("proof does not match" in e["reason"] for e in rejected)
        models2 = [a.model() for a in agents]
        assert all(np.array_equal(models2[0], m) for m in models2[1:])
        expected2 = _expected_model(files, models[0], 2, 3)
        assert np.max(np.abs(models2[0] - expected2)) <= bound
        assert all(a.applied_round == 2 for a in agents)
        assert not events.named("error") and not events.named("overflow")

        # Round 3: the fourth device cheats. The aggregate is committed and decrypted, but no agent applies it.
        base2 = agents[0].base_hash
        gw.open_round(3, base2)
        gw.take_updates(3, 3)
        gw.record(_malicious_update(files, 3, device=3))
        gw.close_round(3)
        flagged = _wait_for(events, "overflow", count=3)
        assert {e["device"] for e in flagged} == {a.address for a in agents}
        assert all(a.applied_round == 2 and a.base_hash == base2 for a in agents)
        assert all(np.array_equal(a.model(), models2[0]) for a in agents)
    finally:
        for a in agents:
            a.stop()
        for a in agents:
            assert a.join(timeout=20)
    states = gw.drain_states()
    for d in files.devices[:3]:
        history = states.get(d.address, [])
        assert {"online", "training", "error"} <= set(history), history
        assert history[-1] == "offline", "a stopped agent says so (retained), not only its last will"


def _cts(fleet: Any, block: GlobalBlock) -> list[Any]:
    return list(fleet.public_key.public_key.ciphertexts_from_bytes(block.aggregate))


def test_restarted_agent_resends_its_update_and_refuses_a_one_device_aggregate(
    tmp_path: Path, chain: tuple[Web3, Ledger], make_gateway: Any
) -> None:
    w3, ledger = chain
    files = _fleet(tmp_path, ledger, 1, "receipt_timeout_s = 30.0\n")
    gw: Gateway = make_gateway(files)
    gw.open_round(1, files.fleet.initial_model_hash())
    first_events = Events()
    first = Agent(files.config(0), fleet=files.fleet, web3=w3, on_event=first_events)
    first.start()
    sent = gw.expect("update", 1)  # no receipt: the device must keep it pending
    first.stop()
    assert first.join(timeout=20)

    again_events = Events()
    again = Agent(files.config(0), fleet=files.fleet, web3=w3, on_event=again_events)
    again.start()
    try:
        resent = gw.expect("update", 1)
        assert resent == sent, "a restarted device must resend the same signed bytes"
        assert not again_events.named("training")
        gw.record(Update.from_cbor(resent[files.devices[0].address]))
        assert _wait_for(again_events, "receipt")[0]["accepted"] is True
        # An aggregate of this one update would reveal it: the agent refuses to decrypt or apply it.
        gw.close_round(1)
        refused = _wait_for(again_events, "global_refused")
        assert "min_aggregate_devices=2" in refused[0]["reason"]
        assert not again_events.named("global_checked") and again.applied_round == 0
    finally:
        again.stop()
        assert again.join(timeout=20)
    assert first_events.named("training") and first_events.named("update_published")


def test_standby_holder_steps_in_resends_until_receipted_and_late_joiner_catches_up(
    tmp_path: Path, chain: tuple[Web3, Ledger], make_gateway: Any
) -> None:
    """Holder 3, a primary of round 1, is down: standby holder 1 shares after its delay. The gateway withholds
    receipts at first: each device republishes the same signed bytes until one comes. Holder 3 then joins late
    and catches up."""
    w3, ledger = chain
    files = _fleet(tmp_path, ledger, 3, "receipt_timeout_s = 1.5\nstandby_delay_s = 1.0\n")
    gw: Gateway = make_gateway(files)
    events = Events()
    agents = [Agent(files.config(i), fleet=files.fleet, web3=w3, on_event=events) for i in range(2)]
    try:
        gw.open_round(1, files.fleet.initial_model_hash())
        for a in agents:
            a.start()
        copies: dict[str, list[bytes]] = {}
        while len(copies) < 2 or min(len(c) for c in copies.values()) < 2:
            topic, payload = gw.inbox.get(timeout=WAIT_S)
            parsed = gw.topics.parse(topic)
            if parsed.kind == "update" and parsed.device is not None:
                copies.setdefault(parsed.device, []).append(payload)
        for device_copies in copies.values():
            assert len(set(device_copies)) == 1, "a resend must be the same signed bytes"
            gw.record(Update.from_cbor(device_copies[0]))
        gw.close_round(1)
        reports = gw.expect("report", 2)
        assert {Report.from_cbor(p).round for p in reports.values()} == {1}
        shared = {e["holder"]: e["role"] for e in events.named("share_published", round=1)}
        assert shared == {2: "primary", 1: "standby"}
        assert np.array_equal(agents[0].model(), agents[1].model())
        assert {e["attempt"] for e in events.named("update_published")} >= {1, 2}
        assert not events.named("publish_gave_up")

        # Holder 3 comes up after round 1 closed and round 2 opened on round 1's aggregate: it catches up from
        # the retained global block and shares, then trains round 2 on the same model as the others.
        gw.open_round(2, agents[0].base_hash)
        late = Agent(files.config(2), fleet=files.fleet, web3=w3, on_event=events)
        agents.append(late)
        late.start()
        while True:
            topic, payload = gw.inbox.get(timeout=WAIT_S)
            parsed = gw.topics.parse(topic)
            if parsed.kind == "update" and parsed.device == late.address:
                assert Update.from_cbor(payload).round == 2
                break
        assert events.named("applied", device=late.address, round=1)
        assert np.array_equal(late.model(), agents[0].model()) and late.base_hash == agents[0].base_hash
    finally:
        for a in agents:
            a.stop()
        for a in agents:
            assert a.join(timeout=20)


def _wait_for(events: Events, name: str, count: int = 1, timeout: float = WAIT_S) -> list[dict[str, Any]]:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        found = events.named(name)
        if len(found) >= count:
            return found
        time.sleep(0.05)
    raise AssertionError(f"fewer than {count} {name!r} events within {timeout} s")
