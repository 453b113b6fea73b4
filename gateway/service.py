"""The gateway process: broker link, ingest, relay, round controller, HTTP endpoint, composed.

Data flow of one update (docs/protocol.md): MQTT (unacked) → :mod:`gateway.validate` → store + outbox in one
transaction → MQTT ack → :mod:`gateway.relay` → contract → fold into the round's running sum → receipt.
Closing a round therefore only drains the relay, hashes the sum and commits: its cost does not grow with
the number of devices.

Concurrency: one asyncio loop. Blocking work runs in threads: the store (SQLAlchemy), the chain
(:class:`gateway.chain.ChainLink`, one lock), and the CPU-bound validation of a batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any

import gmpy2
from eth_utils.crypto import keccak
from gmpy2 import mpz
from web3 import Web3

from blockdeepnet import merkle, sdnotify
from blockdeepnet.config import GatewayConfig
from blockdeepnet.fleet import Fleet
from blockdeepnet.learning.model import PAPER_CNN_PARAMS
from blockdeepnet.ledger import Ledger, LedgerError, SignedUpdate
from blockdeepnet.logs import fields
from blockdeepnet.wire import (
    GONE_STATES,
    ONLINE_STATES,
    DeviceState,
    GatewayState,
    GlobalBlock,
    ReasonCode,
    Receipt,
    Report,
    RoundOpen,
    Topics,
    WireError,
)
from gateway.chain import CHAIN_DEADLINE_BLOCKS, ChainLink, load_gateway_key
from gateway.metrics import Metrics
from gateway.mqtt import GatewayClient, Incoming
from gateway.relay import Outcome, Recorded, Relay
from gateway.rounds import Decision, LiveRound, decide
from gateway.store import DuplicateUpdate, Store, StoreUnavailable
from gateway.validate import Checked, Rejected, UpdateValidator
from gateway.waiting import wait_event

log = logging.getLogger("bdn.gateway")

EventHook = Callable[[str, dict[str, Any]], None]


class GatewayError(Exception):
    """The gateway cannot start or go on; the message says what to fix."""


@dataclass
class _Pending:
    """An update accepted in this process and not yet on chain: its ciphertexts, ready to fold in."""

    samples: int
    ciphertexts: list[mpz]


class Gateway:
    def __init__(
        self, cfg: GatewayConfig, fleet: Fleet, *, w3: Web3 | None = None, on_event: EventHook | None = None
    ) -> None:
        self.cfg = cfg
        self.fleet = fleet
        self.topics = Topics(fleet.name)
        self.metrics = Metrics()
        self.validator = UpdateValidator(fleet, cfg.max_update_bytes)
        self.public_key = fleet.public_key.public_key
        self.length = fleet.layout.ciphertexts_for(PAPER_CNN_PARAMS)
        self._w3 = w3
        self._listeners: list[EventHook] = [on_event] if on_event else []
        self.ready = asyncio.Event()
        self.finished = asyncio.Event()
        self.broker_port: int | None = None
        self.http_port: int | None = None
        self.embedded_broker: Any = None  # gateway.broker.EmbeddedBroker when broker.mode = "embedded"
        self.live: LiveRound | None = None
        self._accepting: int | None = None
        self._pending: dict[tuple[int, str], _Pending] = {}
        self._states: dict[str, str] = {}
        self._changed = asyncio.Event()
        self._round_known = asyncio.Event()
        self.round_loss: dict[int, float] = {}
        self.chain_height: int | None = None
        self.store: Store
        self.chain: ChainLink
        self.client: GatewayClient
        self.relay: Relay

    # ------------------------------------------------------------------------------------------- events

    def listen(self, hook: EventHook) -> None:
        """Call ``hook(event, data)`` on the loop for every gateway event (round_open, round_closing,
        round_closed, round_skipped, round_extended, update_accepted, update_recorded, update_rejected,
        device_state, report, chain_height). The demo's display, the Sparkplug edge node and tests listen."""
        self._listeners.append(hook)

    def _emit(self, event: str, data: dict[str, Any]) -> None:
        """Tell every listener. A listener's failure is logged, never the gateway's: the round goes on."""
        for hook in self._listeners:
            try:
                hook(event, data)
            except Exception:
                log.exception("event listener failed on %s", event)

    def devices_online(self) -> int:
        """Devices whose latest state message says online (or training)."""
        return sum(1 for s in self._states.values() if s in ONLINE_STATES)

    # ----------------------------------------------------------------------------------------- lifecycle

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Run until ``stop`` is set or a fatal error. After ``rounds.max_rounds`` committed rounds no new round
        is opened and ``finished`` is set, but the gateway keeps serving: devices still need the broker (and
        the embedded chain) to decrypt the last global block and report on it."""
        stop = stop or asyncio.Event()
        async with AsyncExitStack() as stack:
            await self._start(stack)
            tasks = [
                asyncio.create_task(self._ingest_loop(), name="ingest"),
                asyncio.create_task(self.relay.run(), name="relay"),
                asyncio.create_task(self._rounds_loop(), name="rounds"),
                asyncio.create_task(self._chain_watch(), name="chain-watch"),
            ]
            watchdog = sdnotify.Watchdog.from_env()
            if watchdog.enabled:
                tasks.append(asyncio.create_task(self._heartbeat(watchdog), name="watchdog"))
            stack.push_async_callback(self._cancel, tasks)
            self.ready.set()
            sdnotify.ready(f"fleet {self.fleet.name}: broker on port {self.broker_port}, rounds running")
            stopper = asyncio.create_task(stop.wait())
            watched: set[asyncio.Task[Any]] = {stopper, *tasks}
            try:
                while stopper in watched:
                    done, watched = await asyncio.wait(watched, return_when=asyncio.FIRST_COMPLETED)
                    for task in done:  # a task that ended normally (the round loop after max_rounds) is fine
                        if task is not stopper and not task.cancelled() and task.exception() is not None:
                            raise task.exception()  # type: ignore[misc]
                    if stopper in done:
                        break
                    watched.add(stopper)
            finally:
                stopper.cancel()
                sdnotify.stopping()

    @staticmethod
    async def _heartbeat(watchdog: sdnotify.Watchdog) -> None:
        """systemd's watchdog (bdn-gateway.service): pinged while this loop turns. Every slow step (store,
        chain, validation) runs in a thread, so a loop that misses its pings for ``WatchdogSec`` is wedged and
        a restart is the cure; a chain or store outage only pauses the round tasks and is not one."""
        assert watchdog.period is not None
        while True:
            watchdog.kick()
            await asyncio.sleep(watchdog.period / 4)

    @staticmethod
    async def _cancel(tasks: list[asyncio.Task[None]]) -> None:
        """Cancel the gateway's tasks and wait for them; one that swallowed its cancellation is named in the
        log and cancelled again, so a stop never hangs on it."""
        for t in tasks:
            t.cancel()
        pending: set[asyncio.Task[None]] = set(tasks)
        while pending:
            _, pending = await asyncio.wait(pending, timeout=5.0)
            for t in pending:
                log.warning(
                    "task %s still runs 5 s after it was cancelled; cancelling it again", t.get_name()
                )
                t.cancel()

    async def _start(self, stack: AsyncExitStack) -> None:
        cfg, fleet = self.cfg, self.fleet
        cfg.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(cfg.state_dir, 0o700)
        self.store = await asyncio.to_thread(Store, cfg.store_url)
        stack.callback(self.store.close)
        account = load_gateway_key(cfg.key_file)
        try:
            self.chain = await asyncio.to_thread(ChainLink.connect, fleet, account, self._w3)
        except LedgerError as exc:
            raise GatewayError(str(exc)) from exc
        latest = await asyncio.to_thread(self.store.latest_round)
        if self.chain.embedded and latest is not None:
            raise GatewayError(
                f"the store at {cfg.store_url} holds {latest.round} round(s), but the embedded chain lives in "
                "memory and starts empty: use a fresh state_dir, or a persistent chain (chain.kind = 'rpc')"
            )
        await asyncio.to_thread(
            self.store.upsert_devices, [(d.address, d.name, d.samples, d.key_share) for d in fleet.devices]
        )
        for address, tx in await asyncio.to_thread(
            self.chain.register_missing, [(d.address, d.key_share) for d in fleet.devices]
        ):
            await asyncio.to_thread(self.store.set_device_registered, address, tx)

        broker = cfg.broker
        port = broker.port
        if broker.mode == "embedded":
            from blockdeepnet.acl import AclRules
            from gateway.broker import EmbeddedBroker

            monitors = [u.strip() for u in broker.monitors.split(",") if u.strip()]
            acl = (
                AclRules.build(
                    self.topics, broker.username or "gateway", [d.address for d in fleet.devices], monitors
                )
                if broker.acl
                else None
            )
            embedded = EmbeddedBroker(broker.host, broker.port, users_file=broker.users_file, acl=acl)
            await stack.enter_async_context(embedded)
            self.embedded_broker = embedded
            port = embedded.port
        self.broker_port = port
        offline = GatewayState("offline").to_cbor()
        self.client = GatewayClient(
            broker,
            broker.client_id or f"bdn-gateway-{fleet.name}",
            [self.topics.all_updates(), self.topics.all_states(), self.topics.all_reports()],
            (self.topics.gateway_state(), offline),
            port=port,
        )
        await self.client.start()
        stack.push_async_callback(self.client.stop, (self.topics.gateway_state(), offline))
        self.client.publish(self.topics.gateway_state(), GatewayState("online").to_cbor(), retain=True)
        if cfg.bridge.enabled:
            from gateway.bridge import Bridge
            from gateway.endpoint import Endpoint

            bridge = Bridge(cfg.bridge, Endpoint.local(broker, port), fleet.name, self.metrics)
            await stack.enter_async_context(bridge)
        self.relay = Relay(self.chain, self._load_pending, self._on_outcomes)
        if cfg.http.enabled:
            from gateway.http import serve

            self.http_port = await serve(self, stack)
        if cfg.sparkplug.enabled:
            from gateway.endpoint import Endpoint
            from gateway.sparkplug.node import EdgeNode

            sp = cfg.sparkplug
            upstream = sp.server == "upstream" or (not sp.server and cfg.bridge.enabled)
            endpoint = Endpoint.plant(cfg.bridge) if upstream else Endpoint.local(broker, port)
            await stack.enter_async_context(EdgeNode(self, endpoint))
        log.info(
            "gateway for fleet %s up: broker %s:%s, chain %s contract %s",
            fleet.name,
            broker.host,
            port,
            fleet.chain.kind,
            fleet.chain.contract,
            extra=fields(fleet=fleet.name),
        )

    # ---------------------------------------------------------------------------------------------- rounds

    async def _rounds_loop(self) -> None:
        await self._resume()
        rounds_cfg = self.cfg.rounds
        while True:
            live = self.live
            assert live is not None
            in_flight = len(live.submitted - live.folded.keys())
            # A device counts as present unless its retained state / last will says it is gone: one the gateway
            # has never heard of yet may still submit, so it is waited for (until the deadline).
            online_missing = sum(
                1
                for d in self.fleet.devices
                if d.address not in live.submitted and self._states.get(d.address) not in GONE_STATES
            )
            decision, why = decide(
                rounds_cfg,
                registered=len(self.fleet.devices),
                recorded=len(live.folded),
                in_flight=in_flight,
                online_missing=online_missing,
                now=time.time(),
                deadline_at=live.deadline_at,
                extensions=live.extensions,
            )
            if decision is Decision.WAIT:
                self._changed.clear()
                await wait_event(self._changed, 0.5)
                continue
            log.info("round %d: %s (%s)", live.round, decision.value, why, extra=fields(round=live.round))
            if decision is Decision.EXTEND:
                live.deadline_at = time.time() + rounds_cfg.deadline_s
                live.extensions += 1
                await asyncio.to_thread(self.store.extend_round, live.round, live.deadline_at)
                self._emit("round_extended", {"round": live.round, "reason": why})
                continue
            self._accepting = None
            if decision is Decision.SKIP:
                await asyncio.to_thread(self.store.set_round_status, live.round, "skipped", why)
                self.metrics.rounds.labels("skipped").inc()
                self._emit("round_skipped", {"round": live.round, "reason": why})
                next_base = live.base
            else:
                next_base = await self._close(live)
            done = sum(1 for r in await asyncio.to_thread(self.store.rounds) if r.status == "committed")
            if rounds_cfg.max_rounds and done >= rounds_cfg.max_rounds:
                log.info("%d round(s) committed: max_rounds reached, no further round will be opened", done)
                self.finished.set()
                return
            await self._open(live.round + 1, next_base)

    async def adopt_fleet(self, fleet: Fleet) -> None:
        """Take a grown fleet (a device enrolled): saved to ``fleet.json`` first, then used for every check.

        The round in progress keeps the sample total it announced; the next round announces the new one, and
        devices that see a total they do not know fetch ``/fleet`` and check the newcomers on chain."""
        await asyncio.to_thread(fleet.save, self.cfg.fleet_file)
        await asyncio.to_thread(
            self.store.upsert_devices, [(d.address, d.name, d.samples, d.key_share) for d in fleet.devices]
        )
        self.fleet = fleet
        self.validator = UpdateValidator(fleet, self.cfg.max_update_bytes)
        self._changed.set()

    def _enrolled_enough(self) -> bool:
        """Round 1 waits for ``rounds.min_devices`` devices and for t key holders (else nobody can decrypt)."""
        holders = sum(1 for d in self.fleet.devices if d.key_share)
        return (
            len(self.fleet.devices) >= self.cfg.rounds.min_devices
            and holders >= self.fleet.public_key.threshold
        )

    async def _resume(self) -> None:
        """Continue where the store says we were: finish a round in progress, or open the next one."""
        latest = await asyncio.to_thread(self.store.latest_round)
        if latest is None and not self._enrolled_enough():
            log.info(
                "waiting for devices to enroll: %d of %d, key holders needed: %d",
                len(self.fleet.devices),
                self.cfg.rounds.min_devices,
                self.fleet.public_key.threshold,
            )
            while not self._enrolled_enough():
                self._changed.clear()
                await self._changed.wait()
        if latest is None:
            await self._open(1, self.fleet.initial_model_hash())
            return
        if latest.status in ("open", "closing"):
            await self._open(latest.round, latest.base_hash, resume=True)
            return
        if latest.status == "committed":
            if not latest.published:
                await self._publish_global(latest.round)
            assert latest.aggregate_hash is not None
            await self._open(latest.round + 1, latest.aggregate_hash)
            return
        await self._open(latest.round + 1, latest.base_hash)  # skipped

    async def _open(self, round_no: int, base: bytes, *, resume: bool = False) -> None:
        """Open (or, after a restart, re-establish) a round. Every step is idempotent."""
        now = time.time()
        total = self.fleet.total_samples
        row = await asyncio.to_thread(
            self.store.open_round, round_no, base, total, now, now + self.cfg.rounds.deadline_s
        )
        if row.status == "closing":
            await asyncio.to_thread(self.store.set_round_status, round_no, "open")

        def chain_open(lg: Ledger) -> tuple[bytes | None, int, int]:
            info = lg.get_round(round_no)
            height = lg.block_number()
            if info.deadline_block:
                return None, info.deadline_block, height
            receipt = lg.open_round(round_no, base, height + CHAIN_DEADLINE_BLOCKS)
            return bytes(receipt["transactionHash"]), height + CHAIN_DEADLINE_BLOCKS, height

        tx, deadline_block, height = await self._chain_retry(chain_open)
        if tx is not None:
            await asyncio.to_thread(self.store.set_round_chain, round_no, tx, deadline_block)
        live = LiveRound.new(
            self.public_key,
            self.length,
            round_no,
            base,
            total,
            row.opened_at,
            row.deadline_at,
            row.extensions,
        )
        if resume:
            await self._rebuild(live)
        self.live = live
        self._accepting = round_no
        self._round_known.set()
        self.metrics.current_round.set(round_no)
        msg = RoundOpen(
            round=round_no,
            base_model_hash=base,
            layout=self.fleet.layout.to_dict(),
            deadline_block=deadline_block,
            chain_block=height,
            total_samples=total,
            key_fingerprint=self.fleet.public_key.fingerprint,
        )
        self.client.publish(self.topics.round(), msg.to_cbor(), retain=True)
        self.client.publish(
            self.topics.gateway_state(), GatewayState("online", round_no).to_cbor(), retain=True
        )
        log.info(
            "round %d open (base %s)%s",
            round_no,
            base.hex()[:16],
            " [resumed]" if resume else "",
            extra=fields(round=round_no),
        )
        self._emit("round_open", {"round": round_no, "base": base.hex(), "resumed": resume})

    async def _rebuild(self, live: LiveRound) -> None:
        """After a restart: what was accepted and what is on chain, from the store."""
        recorded = await asyncio.to_thread(self.store.recorded_updates, live.round, with_payload=True)
        for u in recorded:
            assert u.payload is not None
            live.fold(u.device, u.samples, self.public_key.ciphertexts_from_bytes(u.payload, self.length))
        pending = await asyncio.to_thread(self.store.pending_outbox, ["submit"])
        live.submitted.update(live.folded)
        live.submitted.update(o.device for o in pending if o.round == live.round and o.device)
        log.info(
            "round %d resumed: %d update(s) on chain, %d waiting for the chain",
            live.round,
            len(live.folded),
            len(live.submitted) - len(live.folded),
            extra=fields(round=live.round),
        )

    async def _close(self, live: LiveRound) -> bytes:
        """Aggregate, commit on chain, publish the global block; returns the next round's base hash."""
        r = live.round
        await asyncio.to_thread(self.store.set_round_status, r, "closing")
        self._emit("round_closing", {"round": r, "count": len(live.folded)})
        recorded = await asyncio.to_thread(self.store.recorded_updates, r)
        if {u.device for u in recorded} != set(live.folded):
            raise GatewayError(f"round {r}: the running sum and the store disagree on the included updates")
        aggregate = live.accumulator.result()
        blob = self.public_key.ciphertexts_to_bytes(aggregate)
        agg_hash = keccak(blob)
        root = merkle.root(merkle.leaf(r, u.device, u.payload_hash) for u in recorded)
        count = len(recorded)

        def commit(lg: Ledger) -> tuple[bytes, int]:
            info = lg.get_round(r)
            if info.committed:
                if info.aggregate_hash != agg_hash or info.merkle_root != root:
                    raise LedgerError(f"round {r} is committed on chain with another aggregate or root")
                tx = lg.commit_tx(r)
                if tx is None:
                    raise LedgerError(f"round {r} is committed but its GlobalCommitted event is missing")
                return tx, 0
            receipt = lg.commit_global(r, agg_hash, root, count)
            return bytes(receipt["transactionHash"]), int(receipt["gasUsed"])

        await asyncio.to_thread(self.store.enqueue, "commit", r)
        commit_tx, gas = await self._chain_retry(commit)
        await asyncio.to_thread(
            self.store.commit_round,
            r,
            aggregate=blob,
            aggregate_hash=agg_hash,
            merkle_root=root,
            count=count,
            weight_num=live.weight_num,
            commit_tx=commit_tx,
            commit_gas=gas,
            closed_at=time.time(),
        )
        await self._publish_global(r)
        now = time.time()
        self.metrics.rounds.labels("committed").inc()
        self.metrics.round_latency.observe(now - live.opened_at)
        close_latency = now - (live.last_recorded_at or now)
        self.metrics.close_latency.observe(close_latency)
        self._emit(
            "round_closed",
            {
                "round": r,
                "count": count,
                "devices": [u.device for u in recorded],
                "round_s": now - live.opened_at,
                "close_latency_s": close_latency,
                "commit_gas": gas,
                "update_gas": sum(u.gas_used or 0 for u in recorded),
                "aggregate_hash": agg_hash.hex(),
            },
        )
        return agg_hash

    async def _publish_global(self, r: int) -> None:
        row = await asyncio.to_thread(self.store.get_round, r, with_aggregate=True)
        assert row is not None and row.aggregate is not None and row.merkle_root is not None
        devices = [u.device for u in await asyncio.to_thread(self.store.recorded_updates, r)]
        block = GlobalBlock(
            round=r,
            aggregate=row.aggregate,
            devices=devices,
            total_weight_num=row.weight_num or 0,
            total_weight_den=row.total_samples,
            merkle_root=row.merkle_root,
            commit_tx=row.commit_tx,
        )
        self.client.publish(self.topics.global_block(r), block.to_cbor(), retain=True)
        await asyncio.to_thread(self.store.mark_published, r)
        log.info("round %d: global block published (%d updates)", r, len(devices), extra=fields(round=r))

    async def _chain_retry(self, fn: Callable[[Ledger], Any]) -> Any:
        """A round step on chain: retried while the node is unreachable (a chain outage pauses the round,
        it does not end the gateway); a contract refusal is a bug or tampering and stops it."""
        delay = 0.5
        while True:
            try:
                return await self.chain.call(fn)
            except LedgerError as exc:
                if type(exc).__name__ == "ContractRejected":
                    raise GatewayError(f"the contract refused a round step: {exc}") from exc
                log.warning("chain unavailable for a round step, retrying in %.1f s: %s", delay, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)

    async def _chain_watch(self) -> None:
        seen: int | None = None
        while True:
            with contextlib.suppress(LedgerError):
                height = await self.chain.call(lambda lg: lg.block_number())
                self.metrics.chain_height.set(height)
                if height != seen:
                    seen = height
                    self.chain_height = height
                    self._emit("chain_height", {"height": height})
            self.metrics.outbox_pending.set(await asyncio.to_thread(self.store.outbox_pending_count))
            await asyncio.sleep(2.0)

    # ---------------------------------------------------------------------------------------------- relay

    async def _load_pending(self, limit: int) -> list[SignedUpdate]:
        def load() -> list[SignedUpdate]:
            out = []
            for o in self.store.pending_outbox(["submit"], limit):
                u = self.store.get_update(o.round, o.device) if o.round is not None and o.device else None
                if u is not None:
                    out.append(
                        SignedUpdate(u.round, u.device, u.payload_hash, u.samples, u.compute_ms, u.signature)
                    )
            return out

        return await asyncio.to_thread(load)

    async def _on_outcomes(self, outcomes: list[Outcome]) -> None:
        recorded = [o for o in outcomes if isinstance(o, Recorded)]
        await asyncio.to_thread(
            self.store.mark_recorded_many,
            [(o.round, o.device, o.tx_hash, o.block_number, o.log_index, o.gas_used) for o in recorded],
        )
        for o in outcomes:
            live = self.live
            if isinstance(o, Recorded):
                pending = self._pending.pop((o.round, o.device), None)
                if live is not None and live.round == o.round:
                    if pending is None:  # accepted before a restart: its ciphertexts are in the store
                        row = await asyncio.to_thread(
                            self.store.get_update, o.round, o.device, with_payload=True
                        )
                        assert row is not None and row.payload is not None
                        pending = _Pending(row.samples, self.public_key.ciphertexts_from_bytes(row.payload))
                    live.fold(o.device, pending.samples, pending.ciphertexts)
                self.metrics.accepted.inc()
                self._receipt(o.device, Receipt.accept(o.round, o.tx_hash))
                self._emit("update_recorded", {"round": o.round, "device": o.device, "gas": o.gas_used})
            else:
                await asyncio.to_thread(self.store.mark_rejected, o.round, o.device, "chain_error", o.error)
                self._pending.pop((o.round, o.device), None)
                if live is not None and live.round == o.round:
                    live.submitted.discard(o.device)
                self._reject(o.device, Rejected(ReasonCode.CHAIN_ERROR, o.error, o.round))
        self._changed.set()

    # --------------------------------------------------------------------------------------------- ingest

    def _receipt(self, device: str, receipt: Receipt) -> None:
        self.client.publish(self.topics.receipt(device), receipt.to_cbor())

    def _reject(self, device: str | None, rej: Rejected) -> None:
        self.metrics.rejected.labels(rej.reason.value).inc()
        log.warning(
            "rejected update from %s: %s: %s",
            device or "?",
            rej.reason.value,
            rej.detail,
            extra=fields(round=rej.round, device=device, reason=rej.reason.value),
        )
        if device is not None:
            self._receipt(device, Receipt.reject(rej.round, rej.reason, rej.detail))
        self._emit("update_rejected", {"device": device, "reason": rej.reason.value, "detail": rej.detail})

    async def _ingest_loop(self) -> None:
        queue = self.client.queue
        # After a restart the broker redelivers what arrived while the gateway was down, at once. Those updates
        # belong to the round being resumed: judge none of them before the round controller has re-established
        # it, or they would all be refused as "no round open".
        await self._round_known.wait()
        while True:
            batch = [await queue.get()]
            while len(batch) < 32 and not queue.empty():
                batch.append(queue.get_nowait())
            await self._handle_safely(batch)

    async def _handle_safely(self, batch: list[Incoming]) -> None:
        """Nothing from the network may take the gateway down, nor wedge it: an unacknowledged message holds a
        slot of the broker's in-flight window until the gateway reconnects. A store outage is waited out (the
        batch is retried, unacknowledged, so nothing is lost); any other failure is narrowed down to the message
        that causes it, which is then acknowledged and dropped with a log line and, for an update, a receipt."""
        delay = 0.5
        while True:
            try:
                await self._handle(batch)
                return
            except StoreUnavailable as exc:
                log.warning("store unavailable, %d message(s) wait unacknowledged: %s", len(batch), exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
            except Exception:
                if len(batch) == 1:
                    break
                log.exception("ingest of a batch of %d message(s) failed; retrying one by one", len(batch))
                for msg in batch:
                    await self._handle_safely([msg])
                return
        msg = batch[0]
        log.exception("message on %s could not be handled; dropped", msg.topic)
        self.client.ack(msg.mid, msg.qos)
        with contextlib.suppress(WireError):
            parsed = self.topics.parse(msg.topic)
            if parsed.kind == "update" and parsed.device is not None:
                self._reject(
                    parsed.device, Rejected(ReasonCode.MALFORMED, "the gateway could not process it")
                )

    async def _handle(self, batch: list[Incoming]) -> None:
        updates: list[tuple[Incoming, str]] = []
        other: list[tuple[Incoming, str, str]] = []
        rejections: list[tuple[str | None, Rejected, Incoming]] = []
        for msg in batch:
            try:
                parsed = self.topics.parse(msg.topic)
            except WireError as exc:
                rejections.append((None, Rejected(exc.reason, f"topic: {exc.message}"), msg))
                continue
            assert parsed.device is not None
            if parsed.kind == "update":
                updates.append((msg, parsed.device))
            elif parsed.kind in ("state", "report"):
                other.append((msg, parsed.kind, parsed.device))
        checked: list[tuple[Incoming, Checked]] = []
        if updates:
            results = await asyncio.to_thread(self._check_all, updates, self._accepting)
            for (msg, device), result in zip(updates, results, strict=True):
                if isinstance(result, Rejected):
                    rejections.append((device, result, msg))
                else:
                    checked.append((msg, result))
        accepted = await self._store_checked(checked, rejections)
        for msg, kind, device in other:
            await self._handle_other(msg, kind, device)
        now = time.time()
        await asyncio.to_thread(
            self.store.add_rejections,
            [(now, rej.round or None, device, rej.reason.value, rej.detail) for device, rej, _ in rejections],
        )
        # Everything this batch carried is committed: only now acknowledge it to the broker.
        for msg in batch:
            self.client.ack(msg.mid, msg.qos)
        for device, rej, _ in rejections:
            self._reject(device, rej)
        if accepted:
            self.relay.wake.set()
            self._changed.set()

    def _check_all(
        self, updates: list[tuple[Incoming, str]], open_round: int | None
    ) -> list[Checked | Rejected]:
        """The stateless steps for a batch (runs in a thread: ~20 ms of CPU per full-size update)."""
        # gmpy2 may then drop the interpreter lock inside big-number arithmetic, so the range checks overlap a
        # little with the relay and the store working in other threads.
        gmpy2.get_context().allow_release_gil = True
        out: list[Checked | Rejected] = []
        live = self.live
        for msg, device in updates:
            try:
                update = self.validator.parse(device, msg.payload)
                try:
                    self.validator.device(update)
                    self.validator.round_open(update, open_round, live.round if live is not None else None)
                    digest = self.validator.signature(update)
                    if live is not None and device in live.submitted:
                        out.append(self._duplicate(update.round, device, digest))
                        continue
                    cts = self.validator.ciphertexts(update)
                except Rejected as rej:
                    rej.round = update.round
                    raise
                out.append(Checked(update, digest, cts, len(msg.payload)))
            except Rejected as rej:
                out.append(rej)
        return out

    def _duplicate(self, round_no: int, device: str, digest: bytes) -> Rejected:
        """A second update for (round, device). The same bytes again are a resend (a device that missed its
        receipt): answered with the original receipt, not counted as an attack."""
        existing = self.store.get_update(round_no, device)
        if existing is not None and existing.payload_hash == digest:
            if existing.status == "recorded" and existing.tx_hash is not None:
                self._receipt(device, Receipt.accept(round_no, existing.tx_hash, "resend"))
                return Rejected(ReasonCode.DUPLICATE, "resend of a recorded update", round_no)
            return Rejected(ReasonCode.DUPLICATE, "resend of an update on its way to the chain", round_no)
        return Rejected(ReasonCode.DUPLICATE, f"device already submitted for round {round_no}", round_no)

    async def _store_checked(
        self, checked: list[tuple[Incoming, Checked]], rejections: list[tuple[str | None, Rejected, Incoming]]
    ) -> int:
        if not checked:
            return 0
        items = [
            {
                "round": c.update.round,
                "device": c.update.device,
                "payload_hash": c.payload_hash,
                "samples": c.update.samples,
                "compute_ms": c.update.compute_ms,
                "signature": c.update.signature,
                "payload": c.update.payload,
                "wire_bytes": c.wire_bytes,
                "received_at": time.time(),
            }
            for _, c in checked
        ]
        results = await asyncio.to_thread(self.store.add_updates, items)
        accepted = 0
        live = self.live
        for (msg, c), result in zip(checked, results, strict=True):
            u = c.update
            if isinstance(result, DuplicateUpdate):
                rejections.append((u.device, self._duplicate(u.round, u.device, c.payload_hash), msg))
                continue
            accepted += 1
            self._pending[(u.round, u.device)] = _Pending(u.samples, c.ciphertexts)
            if live is not None and live.round == u.round:
                live.submitted.add(u.device)
                live.last_accepted_at = time.time()
            self._emit("update_accepted", {"round": u.round, "device": u.device, "bytes": c.wire_bytes})
        return accepted

    async def _handle_other(self, msg: Incoming, kind: str, device: str) -> None:
        if self.fleet.device(device) is None:
            log.warning(
                "%s message from unknown device %s ignored", kind, device, extra=fields(device=device)
            )
            return
        try:
            if kind == "state":
                state = DeviceState.from_cbor(msg.payload)
                self._states[device] = state.state
                await asyncio.to_thread(self.store.set_device_state, device, state.state, time.time())
                self.metrics.devices_online.set(self.devices_online())
                self._emit("device_state", {"device": device, "state": state.state})
                self._changed.set()
            else:
                report = Report.from_cbor(msg.payload)
                row = await asyncio.to_thread(self.store.get_round, report.round)
                if row is None or row.status != "committed":
                    # Only a committed round has a global model to report on; anything else is noise that
                    # must be dropped here, not fail (and so never acknowledge) the whole batch.
                    log.warning(
                        "report from %s for round %d, which is not committed, ignored",
                        device,
                        report.round,
                        extra=fields(round=report.round, device=device),
                    )
                    return
                await asyncio.to_thread(
                    self.store.add_report,
                    report.round,
                    device,
                    report.samples,
                    report.loss,
                    report.accuracy,
                    time.time(),
                )
                await self._update_best(report.round)
                self._emit(
                    "report",
                    {
                        "round": report.round,
                        "device": device,
                        "loss": report.loss,
                        "accuracy": report.accuracy,
                    },
                )
        except WireError as exc:
            log.warning("%s message from %s refused: %s", kind, device, exc, extra=fields(device=device))

    async def _update_best(self, round_no: int) -> None:
        reports = await asyncio.to_thread(self.store.reports, round_no)
        samples = sum(r.samples for r in reports)
        loss = sum(r.loss * r.samples for r in reports) / samples
        accs = [r.accuracy for r in reports if r.accuracy is not None]
        if accs:
            self.metrics.global_accuracy.set(sum(accs) / len(accs))
        # The paper's final model: the round whose global loss (sample-weighted over devices) is lowest.
        self.round_loss[round_no] = loss
        best = min(self.round_loss, key=lambda r: (self.round_loss[r], r))
        self.metrics.best_round.set(best)
