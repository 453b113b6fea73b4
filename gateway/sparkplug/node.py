"""The Sparkplug B edge node: one MQTT session of its own, whose will is the NDEATH.

Session rules kept here (Sparkplug 3.0): each new MQTT session gets the next ``bdSeq`` (0-255, kept in the
state folder so a restarted gateway goes on counting), written *before* connecting and carried both by the
will (NDEATH) and by the NBIRTH, so a host can tell which birth a death ends. ``seq`` is 0 on NBIRTH and
counts every later message of the node and its devices modulo 256. On connect: subscribe to NCMD and to the
devices' DCMD, then NBIRTH and a DBIRTH per online device; on ``Node Control/Rebirth``: the same births again
(same bdSeq). Devices take no commands: a DCMD is read (so a broken one is reported) and ignored.
Changes are published as NDATA/DDATA at most every ``min_interval_s``; a device whose state topic says
offline gets a DDEATH, and a DBIRTH when it is back.

QoS as the specification demands: births, data and device deaths at QoS 0 (never retained), the NDEATH at
QoS 1. QoS 0 also keeps sessions apart: paho resends unacknowledged QoS 1 messages after reconnecting, which
would put the last session's data, with its seq, in front of the new NBIRTH; a QoS 0 message is never resent.

Threads: paho calls back on its own thread; everything that reads or changes the metrics runs on the
gateway's asyncio loop (the event hook, the flush task, births scheduled from the paho thread).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import paho.mqtt.client as paho

from blockdeepnet.private_files import write_private_atomic
from blockdeepnet.wire import ONLINE_STATES
from gateway.endpoint import Endpoint, refused
from gateway.sparkplug import payload as spb
from gateway.sparkplug.payload import BOOLEAN, DATETIME, DOUBLE, INT64, REBIRTH, STRING, UINT64, MetricSet

if TYPE_CHECKING:
    from gateway.service import Gateway

log = logging.getLogger("bdn.gateway.sparkplug")

NAMESPACE = "spBv1.0"

NODE_METRICS = [
    (REBIRTH, BOOLEAN),
    ("Round/Number", INT64),
    ("Round/Phase", STRING),
    ("Devices/Online", INT64),
    ("Devices/Registered", INT64),
    ("Updates/Accepted", UINT64),
    ("Updates/Rejected", UINT64),
    ("Model/Accuracy", DOUBLE),
    ("Chain/Height", INT64),
]
DEVICE_METRICS = [
    ("State", STRING),
    ("Samples", INT64),
    ("Key Holder", BOOLEAN),
    ("Last Loss", DOUBLE),
    ("Last Accuracy", DOUBLE),
    ("Last Seen", DATETIME),
]
_PHASES = {
    "round_open": "collecting",
    "round_closing": "closing",
    "round_closed": "decrypting",
    "round_skipped": "skipped",
}


def device_id(name: str, address: str) -> str:
    """The Sparkplug device id: the fleet's device name when it is a valid topic level, else its address."""
    if name and not any(c in name for c in "/+#") and len(name.encode()) <= 64:
        return name
    return address


class BdSeq:
    """The birth/death sequence number, persisted so it keeps counting across gateway restarts."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            last = int(path.read_text().strip())
        except (OSError, ValueError):
            last = -1  # first start (or an unreadable file): the first session is 0
        self.value = (last + 1) % 256
        self._save()

    def advance(self) -> int:
        self.value = (self.value + 1) % 256
        self._save()
        return self.value

    def _save(self) -> None:
        write_private_atomic(self.path, f"{self.value}\n")


@dataclass
class _Device:
    id: str
    metrics: MetricSet
    born: bool = False

    @property
    def online(self) -> bool:
        return self.metrics.get("State") in ONLINE_STATES


class EdgeNode:
    def __init__(self, gw: Gateway, endpoint: Endpoint) -> None:
        cfg = gw.cfg.sparkplug
        self.gw = gw
        self.endpoint = endpoint
        self.group = cfg.group_id
        self.node_id = cfg.edge_node_id or gw.fleet.name
        self.min_interval_s = cfg.min_interval_s
        self.node = MetricSet(NODE_METRICS)
        self.node.set(REBIRTH, False)
        self.node.set("Round/Phase", "waiting")
        self.node.set("Updates/Accepted", 0)
        self.node.set("Updates/Rejected", 0)
        self.node.set("Devices/Online", 0)
        self.devices: dict[str, _Device] = {}
        self._addresses: dict[str, str] = {}  # device address -> Sparkplug device id
        self._accuracy_round = 0  # Model/Accuracy: the mean of the reports on this round's global model
        self._accuracies: dict[str, float] = {}
        self._seq = 0
        self._born = False
        self._stopping = False
        self._lock = threading.Lock()  # bdSeq and the will: changed on paho's thread
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.bd_seq = BdSeq(gw.cfg.state_dir / "sparkplug-bdseq")
        self._client = endpoint.client(f"bdn-spb-{gw.fleet.name}-{self.node_id}", persistent=False)
        self._client.will_set(self.topic("NDEATH"), spb.death(self.bd_seq.value), qos=1)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.message_callback_add(self.topic("NCMD"), self._on_ncmd)
        self._client.message_callback_add(self.topic("DCMD", "+"), self._on_dcmd)
        self._sync_fleet()

    def topic(self, kind: str, device: str | None = None) -> str:
        base = f"{NAMESPACE}/{self.group}/{kind}/{self.node_id}"
        return f"{base}/{device}" if device else base

    # --- lifecycle ------------------------------------------------------------------------------------

    async def __aenter__(self) -> EdgeNode:
        self._loop = asyncio.get_running_loop()
        self.gw.listen(self._on_event)
        self.endpoint.connect_async(self._client, persistent=False)
        self._client.loop_start()
        self._task = asyncio.create_task(self._flush_loop(), name="sparkplug")
        log.info("Sparkplug B edge node %s/%s publishing to %s", self.group, self.node_id, self.endpoint)
        return self

    async def __aexit__(self, *_: object) -> None:
        """A clean stop says so: what changed since the last flush (devices that just went offline get their
        DDEATH, which the rate limit may still hold back), then NDEATH explicitly (the will only fires on a
        lost connection)."""
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        try:
            self._flush()
        except Exception:
            log.exception("Sparkplug: the last changes before NDEATH could not be published")
        if self._client.is_connected():
            with self._lock:
                info = self._client.publish(self.topic("NDEATH"), spb.death(self.bd_seq.value), qos=1)
            await asyncio.to_thread(info.wait_for_publish, 3.0)
        await asyncio.to_thread(self._disconnect)

    def _disconnect(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    # --- paho thread ----------------------------------------------------------------------------------

    def _on_connect(self, client: paho.Client, _u: object, _f: object, reason: object, _p: object) -> None:
        problem = refused(reason)
        if problem:
            log.error("%s refused the Sparkplug edge node: %s; retrying", self.endpoint, problem)
            return
        client.subscribe([(self.topic("NCMD"), 1), (self.topic("DCMD", "+"), 1)])
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._birth)

    def _on_disconnect(self, _c: paho.Client, _u: object, _f: object, reason: object, _p: object) -> None:
        # This session's NDEATH is out (the broker sends the will); the next session needs the next bdSeq,
        # in the will before paho reconnects, which it does on this thread after this callback.
        if self._stopping:
            return
        self._born = False  # at once, not only when the loop gets to _lost: nothing more for this session
        with self._lock:
            bd = self.bd_seq.advance()
            self._client.will_set(self.topic("NDEATH"), spb.death(bd), qos=1)
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._lost)
        log.warning("Sparkplug edge node lost %s (%s); reconnecting with bdSeq %d", self.endpoint, reason, bd)

    @staticmethod
    def _command(kind: str, msg: paho.MQTTMessage) -> dict[str, Any] | None:
        """The metrics of an NCMD/DCMD, or None (logged) when it does not decode: it comes from the network."""
        try:
            return spb.parse_command(bytes(msg.payload))
        except spb.CommandError as exc:
            log.warning("%s on %s ignored: %s", kind, msg.topic, exc)
            return None

    def _on_ncmd(self, _c: paho.Client, _u: object, msg: paho.MQTTMessage) -> None:
        command = self._command("NCMD", msg)
        if command is None:
            return
        if command.get(REBIRTH) is True:
            log.info("Sparkplug host asked for a rebirth")
            assert self._loop is not None
            self._loop.call_soon_threadsafe(self._birth)
        else:
            log.info("NCMD with %s ignored: only %s is supported", sorted(command), REBIRTH)

    def _on_dcmd(self, _c: paho.Client, _u: object, msg: paho.MQTTMessage) -> None:
        command = self._command("DCMD", msg)
        if command is None:
            return
        log.info("DCMD on %s with %s ignored: devices take no commands", msg.topic, sorted(command))

    # --- loop -----------------------------------------------------------------------------------------

    def _next_seq(self) -> int:
        self._seq = (self._seq + 1) % 256
        return self._seq

    def _publish(self, kind: str, data: bytes, device: str | None = None) -> None:
        self._client.publish(self.topic(kind, device), data, qos=0)

    def _lost(self) -> None:
        self._born = False
        for d in self.devices.values():
            d.born = False

    def _birth(self) -> None:
        """NBIRTH (seq 0, this session's bdSeq) and a DBIRTH for every device that is online."""
        if not self._client.is_connected():
            return
        self._sync_fleet()
        self._seq = 0
        with self._lock:
            bd = self.bd_seq.value
            self._publish("NBIRTH", self.node.birth(0, extra=[("bdSeq", INT64, bd)]))
        self._born = True
        for d in self.devices.values():
            d.born = False
            if d.online:
                self._device_birth(d)

    def _device_birth(self, d: _Device) -> None:
        self._publish("DBIRTH", d.metrics.birth(self._next_seq()), d.id)
        d.born = True

    def _sync_fleet(self) -> None:
        """Devices enrolled since the last look get a metric set (and a DBIRTH once they are online)."""
        for entry in self.gw.fleet.devices:
            did = device_id(entry.name, entry.address)
            if did not in self.devices:
                m = MetricSet(DEVICE_METRICS)
                m.set("State", "unknown")
                m.set("Samples", entry.samples)
                m.set("Key Holder", bool(entry.key_share))
                self.devices[did] = _Device(did, m)
                self._addresses[entry.address] = did
        self.node.set("Devices/Registered", len(self.gw.fleet.devices))
        if self.gw.chain_height is not None:
            self.node.set("Chain/Height", self.gw.chain_height)

    def _on_event(self, event: str, data: dict[str, Any]) -> None:
        node = self.node
        if event in _PHASES:
            node.set("Round/Phase", _PHASES[event])
            if event == "round_open":
                node.set("Round/Number", data["round"])
        elif event == "update_recorded":
            node.set("Updates/Accepted", node.get("Updates/Accepted") + 1)
        elif event == "update_rejected":
            node.set("Updates/Rejected", node.get("Updates/Rejected") + 1)
        elif event == "chain_height":
            node.set("Chain/Height", data["height"])
        elif event == "device_state":
            self._device_state(data["device"], data["state"])
        elif event == "report":
            self._report(data)
        else:
            return
        self._wake.set()

    def _device(self, address: str) -> _Device | None:
        did = self._addresses.get(address)
        if did is None:
            self._sync_fleet()
            did = self._addresses.get(address)
        return self.devices.get(did) if did else None

    def _device_state(self, address: str, state: str) -> None:
        d = self._device(address)
        if d is None:
            return
        d.metrics.set("State", state)
        d.metrics.set("Last Seen", spb.now_ms())
        self.node.set("Devices/Online", self.gw.devices_online())

    def _report(self, data: dict[str, Any]) -> None:
        d = self._device(data["device"])
        if d is not None:
            d.metrics.set("Last Loss", data["loss"])
            d.metrics.set("Last Accuracy", data["accuracy"])
            d.metrics.set("Last Seen", spb.now_ms())
        if data["accuracy"] is not None:
            if data["round"] < self._accuracy_round:
                return  # a late report on an older model: the node shows the latest one
            if data["round"] > self._accuracy_round:
                self._accuracy_round, self._accuracies = data["round"], {}
            self._accuracies[data["device"]] = data["accuracy"]
            self.node.set("Model/Accuracy", sum(self._accuracies.values()) / len(self._accuracies))

    async def _flush_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                self._flush()
            except Exception:
                log.exception("Sparkplug publish failed; the next change retries")
            await asyncio.sleep(self.min_interval_s)

    def _flush(self) -> None:
        """What changed since the last flush: NDATA, then per device DBIRTH / DDATA / DDEATH."""
        if not self._born or not self._client.is_connected():
            return  # the next birth carries everything
        if self.node.dirty:
            data = self.node.data(self._next_seq())
            assert data is not None
            self._publish("NDATA", data)
        for d in self.devices.values():
            if d.online and not d.born:
                self._device_birth(d)
            elif d.born:
                self._device_changes(d)  # a dying device's last state (offline, error) goes out first
                if not d.online:
                    self._publish("DDEATH", spb.device_death(self._next_seq()), d.id)
                    d.born = False

    def _device_changes(self, d: _Device) -> None:
        """DDATA with the device's metrics that changed since its last DBIRTH/DDATA, if any."""
        if d.metrics.dirty:
            changed = d.metrics.data(self._next_seq())
            assert changed is not None
            self._publish("DDATA", changed, d.id)
