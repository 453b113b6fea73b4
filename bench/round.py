"""`bdn bench round`: the gateway's path on its own, for 5, 10, 20 and 50 simulated publishers.

For each N, a fresh fleet of N devices (one 2048-bit threshold key dealt once for the whole run), a fresh
gateway in this process (SQLite store in a temporary folder, the chain on a fresh contract) and N publisher
clients, each sending one pre-made full-size update: 252,398 parameters quantized, packed and encrypted
(2,104 ciphertexts), signed with the device's own key. The updates are made before the clock starts: one
real encryption, then per device a re-randomisation (multiplying each ciphertext by an r^n from one pool,
rotated per device), so every device sends distinct ciphertexts of a valid update at a cost the bench can
afford for 50 devices.

Measured per N (clocks read in this process):

- ``close_latency_s``: from the gateway recording the round's last update on chain (its receipt is then
  published) to the global block arriving at a subscriber: what closing costs. Folding happens as updates
  arrive, so this should hardly grow with N;
- ``round_wall_s``: from the round's ``RoundOpen`` arriving at the publishers to the global block arriving;
- ``ingest_updates_s``: N / (last update recorded − first update sent): updates validated, stored, folded
  in and relayed per second (reported for N = 50, the largest batch).

On the machine's Mosquitto (an external broker, as in production) and again on the embedded amqtt.
The chain is anvil (npm ``@foundry-rs/anvil``) when it is installed, else the embedded eth-tester chain;
the JSON says which.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import secrets
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as paho

from blockdeepnet.config import load_gateway_config
from blockdeepnet.crypto.codec import sample_weight
from blockdeepnet.crypto.randomness import FixedBaseTable, OnTheSpot
from blockdeepnet.crypto.threshold import KeyShare, ThresholdPublicKey, deal
from blockdeepnet.crypto.vector import encrypt_update
from blockdeepnet.eip712 import UpdateClaim, payload_hash, sign_update
from blockdeepnet.fleet import Fleet
from blockdeepnet.learning.model import PAPER_CNN_PARAMS
from blockdeepnet.wire import Topics, Update
from gateway.service import Gateway
from provisioning.anvil import AnvilError, AnvilProcess, free_port
from provisioning.localfleet import LocalFleet, create_local_fleet

Progress = Callable[[str], None]
DEVICE_COUNTS = (5, 10, 20, 50)


def premade_updates(local: LocalFleet, round_no: int = 1) -> list[tuple[str, str, bytes]]:
    """(device address, topic, payload) of one signed, encrypted full-size update per device of ``local``."""
    fleet = local.fleet
    pub = fleet.public_key.public_key
    table = FixedBaseTable(pub)
    rng = np.random.default_rng(7)
    delta = rng.normal(0, 0.01, PAPER_CNN_PARAMS).astype(np.float32)
    total = fleet.total_samples
    samples = fleet.devices[0].samples
    base = encrypt_update(fleet.layout, pub, OnTheSpot(table), delta, sample_weight(samples, total))
    topics = Topics(fleet.name)
    out = []
    factors = OnTheSpot(table).take_many(len(base))
    for j, device in enumerate(local.devices):
        # Device j multiplies ciphertext i by factor (i + j + 1) mod K: distinct ciphertexts of a valid update
        # for every device from one pool of r^n values (fresh randomness matters for privacy, not for timing).
        cts = [c * factors[(i + j + 1) % len(factors)] % pub.nsquare for i, c in enumerate(base)]
        payload = pub.ciphertexts_to_bytes(cts)
        key = bytes.fromhex((device.folder / "device.key").read_text().strip().removeprefix("0x"))
        claim = UpdateClaim(round_no, payload_hash(payload), samples, 1500)
        signature = sign_update(key, fleet.domain, claim)
        update = Update(round_no, device.address, samples, 1500, payload, signature)
        out.append((device.address, topics.update(device.address), update.to_cbor()))
    return out


class _Subscriber:
    """Timestamps the retained ``round`` and the ``global/1`` block as a device would see them."""

    def __init__(self, topics: Topics, port: int) -> None:
        self.round_at: float | None = None
        self.global_at: float | None = None
        self.round_open = threading.Event()
        self.global_seen = threading.Event()
        self._topics = topics
        self.client = paho.Client(
            paho.CallbackAPIVersion.VERSION2, client_id=f"bench-sub-{secrets.token_hex(4)}"
        )
        self.client.username_pw_set("monitor")
        self.client.on_connect = lambda c, *_: c.subscribe([(topics.round(), 1), (topics.global_block(1), 1)])
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def _on_message(self, _c: paho.Client, _u: object, msg: paho.MQTTMessage) -> None:
        now = time.perf_counter()
        if msg.topic == self._topics.round() and self.round_at is None:
            self.round_at = now
            self.round_open.set()
        elif msg.topic == self._topics.global_block(1):
            self.global_at = now
            self.global_seen.set()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _connected_client(client_id: str, username: str, port: int) -> paho.Client:
    """A connected paho client (the username matters on the embedded broker: its ACL is per user)."""
    ready = threading.Event()
    c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=client_id)
    c.username_pw_set(username)
    c.on_connect = lambda *_: ready.set()
    c.connect("127.0.0.1", port)
    c.loop_start()
    if not ready.wait(30):
        raise RuntimeError(f"{client_id} could not connect to the broker on port {port}")
    return c


def _forget_fleet(topics: Topics, gateway_client_id: str, port: int) -> None:
    """Remove a bench fleet's traces from a shared broker: the gateway's session and retained messages."""
    c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=gateway_client_id, clean_session=True)
    c.connect("127.0.0.1", port)
    c.loop_start()
    infos = [
        c.publish(t, b"", qos=1, retain=True)
        for t in (topics.round(), topics.gateway_state(), topics.global_block(1))
    ]
    for info in infos:
        info.wait_for_publish(10)
    c.disconnect()
    c.loop_stop()


def _publish_all(messages: Sequence[tuple[str, str, bytes]], port: int) -> float:
    """One client per device, all connected first; returns the clock (``perf_counter``: CLOCK_MONOTONIC, the
    same in every process) when the first publish started."""
    clients = [
        _connected_client(f"bench-dev-{i}-{secrets.token_hex(3)}", device, port)
        for i, (device, _, _) in enumerate(messages)
    ]
    start = time.perf_counter()
    infos = [
        c.publish(topic, payload, qos=1) for c, (_, topic, payload) in zip(clients, messages, strict=True)
    ]
    for info in infos:
        info.wait_for_publish(60)
    for c in clients:
        c.disconnect()
        c.loop_stop()
    return start


async def measure(
    n: int,
    broker: str,
    dealt: tuple[ThresholdPublicKey, list[KeyShare]],
    workdir: Path,
    chain_url: str | None,
    mosquitto_port: int = 1883,
) -> dict[str, float]:
    """One round with ``n`` publishers on ``broker`` ("mosquitto": the one on 127.0.0.1:``mosquitto_port``, or
    "amqtt": embedded, on a free port)."""
    name = f"bench{n}{broker[:3]}{secrets.token_hex(3)}"
    port = mosquitto_port if broker == "mosquitto" else free_port()
    local = create_local_fleet(
        workdir / name,
        name=name,
        devices=n,
        threshold=dealt[0].threshold,
        holders=dealt[0].holders,
        chain_url=chain_url,
        broker_port=port,
        broker_mode="external" if broker == "mosquitto" else "embedded",
        broker_auth=False,
        dealt=dealt,
        gateway_extra={
            "http": {"enabled": False},
            "rounds": {"max_rounds": 1, "min_updates": 1},
            "broker": {"monitors": "monitor"} if broker == "amqtt" else {},
        },
    )
    messages = await asyncio.to_thread(premade_updates, local)
    recorded: list[float] = []

    def on_event(event: str, _data: dict[str, Any]) -> None:
        if event == "update_recorded":
            recorded.append(time.perf_counter())

    cfg = load_gateway_config(local.gateway_config)
    gw = Gateway(cfg, Fleet.load(local.root / "fleet.json"), on_event=on_event)
    stop = asyncio.Event()
    run = asyncio.create_task(gw.run(stop))
    await asyncio.wait([run, asyncio.create_task(gw.ready.wait())], return_when=asyncio.FIRST_COMPLETED)
    if run.done():
        run.result()
    assert gw.broker_port is not None
    sub = _Subscriber(Topics(name), gw.broker_port)
    try:
        await asyncio.to_thread(sub.round_open.wait, 60)
        # The publishers run in their own process, as devices would: their paho threads sending 1 MB each
        # must not compete with the gateway for this process's interpreter lock.
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            start = await asyncio.get_running_loop().run_in_executor(
                pool, _publish_all, messages, gw.broker_port
            )
        if not await asyncio.to_thread(sub.global_seen.wait, 300):
            raise RuntimeError(f"no global block after 300 s with {n} publishers on {broker}")
        await asyncio.wait_for(gw.finished.wait(), 30)
        stop.set()
        await asyncio.wait_for(run, 30)
    finally:
        sub.close()
        if not run.done():
            run.cancel()
    if broker == "mosquitto":
        # The gateway's persistent session would otherwise stay on the machine's broker for good: end it, and
        # clear the retained messages this fleet left there.
        await asyncio.to_thread(
            _forget_fleet, Topics(name), cfg.broker.client_id or f"bdn-gateway-{name}", port
        )
    assert sub.global_at is not None and sub.round_at is not None and len(recorded) == n
    return {
        "close_latency_s": sub.global_at - recorded[-1],
        "round_wall_s": sub.global_at - sub.round_at,
        "ingest_updates_s": n / (recorded[-1] - start),
    }


def run_round_bench(
    counts: Sequence[int] = DEVICE_COUNTS,
    brokers: Sequence[str] = ("mosquitto", "amqtt"),
    key_bits: int = 2048,
    progress: Progress | None = None,
    dealt: tuple[ThresholdPublicKey, list[KeyShare]] | None = None,
) -> dict[str, Any]:
    """``dealt``: reuse a key (the demo's); else one is dealt (only its public part is used)."""
    say = progress or (lambda _m: None)
    if dealt is None:
        say(f"dealing a {key_bits}-bit threshold key")
        dealt = deal(1, 1, key_bits, allow_insecure=key_bits < 2048)
    key_bits = dealt[0].public_key.bits
    anvil: AnvilProcess | None = None
    try:
        try:
            anvil = AnvilProcess(port=free_port()).start()
            chain = "anvil"
        except AnvilError as exc:
            say(f"anvil unavailable ({exc}); using the embedded chain")
            chain = "embedded"
        results: dict[str, dict[int, dict[str, float]]] = {}
        with tempfile.TemporaryDirectory(prefix="bdn-bench-round-") as tmp:
            for broker in brokers:
                results[broker] = {}
                for n in counts:
                    say(f"{broker}: one round with {n} publishers")
                    url = anvil.url if anvil else None
                    results[broker][n] = asyncio.run(measure(n, broker, dealt, Path(tmp), url))
    finally:
        if anvil is not None:
            anvil.stop()

    def keyed(broker: str) -> dict[str, Any]:
        r = results[broker]
        out: dict[str, Any] = {
            "close_latency_s": {str(n): r[n]["close_latency_s"] for n in counts},
            "round_wall_s": {str(n): r[n]["round_wall_s"] for n in counts},
            "ingest_updates_s": r[max(counts)]["ingest_updates_s"],
        }
        if 5 in r and 50 in r:
            out["close_latency_ratio_50_5"] = r[50]["close_latency_s"] / r[5]["close_latency_s"]
        return out

    report: dict[str, Any] = {
        "key_bits": key_bits,
        "params": PAPER_CNN_PARAMS,
        "chain": chain,
        "store": "sqlite",
    }
    if "mosquitto" in results:
        report.update(keyed("mosquitto"))
    if "amqtt" in results:
        report["amqtt"] = keyed("amqtt")
    return report


__all__ = ["DEVICE_COUNTS", "measure", "premade_updates", "run_round_bench"]
