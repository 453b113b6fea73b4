"""The device agent: one MQTT session, one worker thread, and the round protocol of docs/protocol.md.

Threads. paho's network thread only parses topic names and queues raw payloads; everything else (CBOR
decoding, training, encryption, chain checks, share verification, ~70 s partial decryptions, combining) runs
on the worker thread (``run()``), so keepalives and PUBACKs keep flowing while the device computes and the
broker never drops it mid-round. The worker drains every queued message (cheap: decode and record) before it
takes one heavy step, so a step always works on the freshest picture (e.g. it does not train a round whose
global block is already in the queue).

Heavy steps, in priority order: check a received global block against the chain; verify one pending share;
apply the lowest global block that builds on the model held, once t valid shares are in; do this key holder's
share duty when due (primary holders at once, standby holders after ``standby_delay_s`` if t valid shares
have not appeared); train the open round if it builds on the model held.

Durability (see :mod:`firmware_agent.state`): the signed update is saved before it is first published and
republished with the same bytes until a receipt arrives (up to ``max_publish_attempts``), also after a restart;
a round already submitted is never trained again; the model, its hash and the last applied round are saved
before the report goes out.

Session. The client id is the device address with a persistent session (clean_session false), so QoS 1
messages sent while the device was offline are delivered when it returns. Subscriptions are renewed on every
connect anyway (a broker may have lost the session). The last will is a retained ``offline`` state.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import queue
import threading
import time
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import paho.mqtt.client as mqtt
from eth_utils.crypto import keccak
from gmpy2 import mpz
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode

from blockdeepnet import sdnotify
from blockdeepnet.audit import aggregate_hash
from blockdeepnet.config import AgentConfig
from blockdeepnet.crypto.codec import CodecRangeError, SlotLayout, SlotOverflowError
from blockdeepnet.crypto.paillier import CiphertextRangeError
from blockdeepnet.crypto.randomness import FixedBaseTable, RandomnessPool
from blockdeepnet.crypto.threshold import KeyShare, NotEnoughSharesError
from blockdeepnet.fleet import Fleet, FleetError
from blockdeepnet.learning import PAPER_CNN_PARAMS
from blockdeepnet.logs import fields
from blockdeepnet.wire import (
    DeviceState,
    DeviceStatus,
    GlobalBlock,
    ParsedTopic,
    Receipt,
    Report,
    RoundOpen,
    Share,
    Topics,
    Update,
    WireError,
)
from firmware_agent.chainview import ChainCheckError, ChainUnavailable, ChainView, CheckedGlobal
from firmware_agent.crypto_duty import (
    ShareBook,
    apply_delta,
    decode_global,
    is_primary,
    seal_update,
    share_message,
)
from firmware_agent.errors import AgentSetupError
from firmware_agent.keys import DeviceKey, load_device_key_from, load_key_share_from, read_private_file
from firmware_agent.state import AgentState, StateStore
from firmware_agent.tflite_export import export_global_model
from firmware_agent.trainer import Trainer, load_local_data
from firmware_agent.vault import DEVICE_KEY, KEY_SHARE, open_vault

if TYPE_CHECKING:
    from web3 import Web3

logger = logging.getLogger("firmware_agent")

EventHook = Callable[[str, dict[str, Any]], None]
"""``on_event(name, data)``, for a demo's progress display or a test. Called on the worker thread
(``connected``, ``disconnected``, ``connect_failed`` and the ``state`` sent on connect: on the MQTT thread); it
must return quickly, and an exception it raises is logged and otherwise ignored. Every ``data`` has ``device``
(the address); hashes are hex strings. Names and their other keys:

- lifecycle: ``started`` (address, holder, applied_round, base_hash), ``connected`` (session_present),
  ``connect_failed`` (reason), ``disconnected`` (reason), ``stopped``, ``state`` (state, round), ``error``
  (message, and round when it concerns one);
- rounds: ``round_open`` (round, base_hash), ``round_refused`` (round, reason), ``waiting_for_base`` (round,
  base_hash), ``training`` (round), ``trained`` (round, samples, train_loss, base_loss, clipped, seconds),
  ``update_published`` (round, attempt, bytes, ciphertexts), ``receipt`` (round, accepted, tx_hash, reason,
  detail), ``publish_gave_up`` (round, attempts);
- global blocks: ``global_received`` (round, devices), ``global_refused`` (round, reason), ``global_checked``
  (round, base_hash), ``share_published`` (round, holder, role "primary"/"standby", seconds),
  ``share_accepted`` (round, holder, valid), ``share_rejected`` (round, holder, sender, reason), ``combined``
  (round, holders, rejected), ``applied`` (round, base_hash, loss, accuracy), ``overflow`` (round, message).
"""

_POLL_S = 0.25  # longest the worker sleeps: bounds how long stop() takes to be noticed
_CHAIN_RETRY_S = 5.0
_CHAIN_RETRY_UNAVAILABLE_S = 15.0
_MAX_CHAIN_CHECKS = 20
_MAX_OPEN_ROUNDS = 8  # global blocks held while catching up; older ones are dropped
_MAX_SHARE_ROUNDS = 16  # rounds with shares but no global block yet
_LONGEST_STEP_S = 3 * 3600.0  # a heavy step stuck longer than this stops the systemd watchdog pings


class _DeviceLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """Prefixes every line with the device address, so N agents in one process or journal stay apart, and
    carries it as the ``device`` field (with the call's own ``extra=fields(round=...)``) for JSON logs."""

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, MutableMapping[str, Any]]:
        extra = self.extra or {}
        kwargs["extra"] = {**extra, **kwargs.get("extra", {})}
        return f"device {extra.get('device')}: {msg}", kwargs


@dataclass
class _Round:
    """A received global block and the work it still needs on this device."""

    block: GlobalBlock
    digest: bytes
    ciphertexts: list[mpz]
    aggregate_hash: bytes
    checked: CheckedGlobal | None = None
    book: ShareBook | None = None
    next_check: float = 0.0
    checks: int = 0
    duty_due: float | None = None
    duty_role: str = ""
    failed: str = ""


class Agent:
    """One device: trains, encrypts, signs and publishes its updates, shares its key duty, applies globals.

    Construct it from a validated :class:`AgentConfig`; every set-up problem raises
    :class:`AgentSetupError` here, before any connection. ``fleet``, ``web3`` / ``chain`` and ``on_event`` are
    for an in-process demo or test: a pre-loaded fleet, the embedded chain's web3 object (or a ready
    :class:`ChainView`) instead of a JSON-RPC URL, and a progress hook.

    ``run()`` blocks until :meth:`stop`; ``start()`` runs it on a thread of its own, so several agents can share
    a process.
    """

    def __init__(
        self,
        config: AgentConfig,
        *,
        fleet: Fleet | None = None,
        web3: Web3 | None = None,
        chain: ChainView | None = None,
        on_event: EventHook | None = None,
    ) -> None:
        self.config = config
        self._on_event = on_event
        try:
            self.fleet = fleet if fleet is not None else Fleet.load(config.fleet_file)
        except FleetError as exc:
            raise AgentSetupError(str(exc)) from None
        vault = open_vault(config)
        self._key: DeviceKey = load_device_key_from(vault)
        self.address = self._key.address
        self.log = _DeviceLog(logger, {"device": self.address})
        entry = self.fleet.device(self.address)
        if entry is None:
            raise AgentSetupError(
                f"device {self.address} (key {vault.location(DEVICE_KEY)}) is not listed in fleet file "
                f"{config.fleet_file}"
            )
        self.holder_index = entry.key_share
        self._share: KeyShare | None = None
        # files: a share is configured iff share_file is set (a missing file is then the file's own error);
        # tpm / keystore: iff the vault holds one.
        if vault.kind == "files":
            held = config.share_file is not None
            present, absent = "share_file is set", "share_file is not set"
        else:
            held = vault.has(KEY_SHARE)
            present = f"a key share is held in {vault.location(KEY_SHARE)}"
            absent = f"no key share is held in {vault.location(KEY_SHARE)} (bdn agent keys --import)"
        if held:
            if entry.key_share == 0:
                raise AgentSetupError(
                    f"{present}, but fleet.json does not list {self.address} as a key holder"
                )
            self._share = load_key_share_from(vault, self.fleet.public_key, entry.key_share)
        elif entry.key_share:
            raise AgentSetupError(
                f"fleet.json lists {self.address} as key holder {entry.key_share}, but {absent}"
            )
        self.tpk = self.fleet.public_key
        self.layout: SlotLayout = self.fleet.layout
        self.topics = Topics(self.fleet.name)
        self.ciphertext_count = self.layout.ciphertexts_for(PAPER_CNN_PARAMS)

        data = load_local_data(config.data)
        if data.samples > entry.samples:
            raise AgentSetupError(
                f"the local data holds {data.samples} samples, more than the {entry.samples} this device "
                "declared in fleet.json (the gateway would refuse every update)"
            )
        self.samples = data.samples
        self.trainer = Trainer.from_config(data, config.data, config.train)

        self.chain = chain or self._chain_view(web3)
        self._password = (
            read_private_file(config.broker.password_file, "broker password file").strip()
            if config.broker.password_file is not None
            else None
        )

        self._pool = RandomnessPool(FixedBaseTable(self.tpk.public_key))
        self._queue: queue.Queue[tuple[ParsedTopic, bytes]] = queue.Queue()
        self._stopping = False
        self._ran = False
        self._thread: threading.Thread | None = None
        self._connected_once = False
        self._join_requested = False
        self._round_open: RoundOpen | None = None
        self._rounds: dict[int, _Round] = {}
        self._refused: dict[int, bytes] = {}
        self._shares: dict[int, dict[str, Share]] = {}
        self._holders = {d.address: d.key_share for d in self.fleet.devices if d.key_share}
        self._receipt_deadline: float | None = None
        self._attempts = 0
        self._train_failed_round = 0
        self._noted: set[tuple[str, int]] = set()
        self._client = self._make_client()

        # Last: the folder lock is held from here until close(), so nothing after it may fail.
        self._state_lock = threading.Lock()
        self.store = StateStore(config.state_dir)
        self.store.open()
        try:
            self._state = self._load_state()
        except BaseException:
            self.store.close()
            raise

    # ------------------------------------------------------------------------------------------- set-up

    def _chain_view(self, web3: Web3 | None) -> ChainView:
        info = self.fleet.chain
        if web3 is not None:
            return ChainView(web3, info.contract, chain_id=info.chain_id)
        url = self.config.chain_rpc or info.url
        if not url:
            raise AgentSetupError(
                "no chain to check global blocks against: the fleet's chain is embedded in the gateway, so set "
                "chain_rpc in agent.toml to the gateway's /rpc URL"
            )
        return ChainView.from_url(url, info.contract, chain_id=info.chain_id, poa=info.poa)

    def _load_state(self) -> AgentState:
        fleet = self.fleet
        state = self.store.load()
        if state is None:
            state = AgentState(
                fleet=fleet.name,
                contract=fleet.chain.contract,
                key_fingerprint=self.tpk.fingerprint,
                address=self.address,
                weights=fleet.initial_model(),
                base_hash=fleet.initial_model_hash(),
            )
            self.store.save(state)
            return state
        mine = (fleet.name, fleet.chain.contract, self.tpk.fingerprint, self.address)
        saved = (state.fleet, state.contract, state.key_fingerprint, state.address)
        if saved != mine:
            raise AgentSetupError(
                f"state folder {self.config.state_dir} belongs to fleet {state.fleet} / contract {state.contract} "
                f"/ key {state.key_fingerprint} / device {state.address}, not to this configuration; use another "
                "state_dir"
            )
        return state

    def _make_client(self) -> mqtt.Client:
        b = self.config.broker
        client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=b.client_id or self.address,
            clean_session=False,
            protocol=mqtt.MQTTv311,
        )
        client.username_pw_set(b.username or self.address, self._password)
        if b.tls_ca is not None or b.tls_cert is not None:
            try:
                client.tls_set(
                    ca_certs=str(b.tls_ca) if b.tls_ca else None,
                    certfile=str(b.tls_cert) if b.tls_cert else None,
                    keyfile=str(b.tls_key) if b.tls_key else None,
                )
            except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
                raise AgentSetupError(f"broker TLS files cannot be used: {exc}") from None
        client.will_set(self.topics.state(self.address), DeviceState("offline").to_cbor(), qos=1, retain=True)
        client.reconnect_delay_set(min_delay=1, max_delay=30)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        return client

    # ------------------------------------------------------------------------------------ public API

    @property
    def is_holder(self) -> bool:
        return self._share is not None

    @property
    def applied_round(self) -> int:
        return self._state.applied_round

    @property
    def base_hash(self) -> bytes:
        """The hash naming the model held: the initial model's, then the last applied aggregate's."""
        return self._state.base_hash

    def model(self) -> npt.NDArray[np.float32]:
        """A copy of the model weights held now (flat, ``PAPER_CNN_PARAMS`` float32)."""
        with self._state_lock:
            return np.array(self._state.weights, dtype=np.float32)

    def start(self) -> threading.Thread:
        """Run the agent on a background thread (for several agents in one process); returns the thread."""
        if self._thread is not None:
            raise RuntimeError("agent already started")
        self._thread = threading.Thread(target=self.run, name=f"bdn-agent-{self.address[:10]}", daemon=True)
        self._thread.start()
        return self._thread

    def stop(self) -> None:
        """Ask the agent to finish: it completes the step in progress, publishes ``offline`` and disconnects.
        Only sets a flag, so it is safe to call from a signal handler or any thread."""
        self._stopping = True

    def join(self, timeout: float | None = None) -> bool:
        """Wait for an agent started with :meth:`start` to end; True when it has."""
        if self._thread is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def close(self) -> None:
        """Release the state folder. ``run()`` does it on the way out; call it for an agent never run."""
        self.store.close()

    def run(self) -> None:
        """Connect (retrying until the broker answers) and serve rounds until :meth:`stop`. Once per agent."""
        if self._ran:
            raise RuntimeError("an agent runs once; construct a new one to run again")
        self._ran = True
        b = self.config.broker
        self.log.info(
            "starting: fleet %s, %s, holds round %d (model %s)",
            self.fleet.name,
            f"key holder {self.holder_index}" if self.is_holder else "no key share",
            self._state.applied_round,
            self._state.base_hash.hex()[:16],
            extra=fields(fleet=self.fleet.name),
        )
        self._emit(
            "started",
            {
                "address": self.address,
                "holder": self.holder_index if self.is_holder else 0,
                "applied_round": self._state.applied_round,
                "base_hash": self._state.base_hash.hex(),
            },
        )
        self._pool.start_background_refill(self.ciphertext_count)
        self._client.connect_async(b.host, b.port, keepalive=b.keepalive_s)
        self._client.loop_start()
        try:
            self._work()
        except KeyboardInterrupt:
            self.log.info("interrupted")
        finally:
            sdnotify.stopping()
            self._shutdown()

    # ------------------------------------------------------------------------------- MQTT callbacks

    def _on_connect(
        self, client: mqtt.Client, _userdata: Any, flags: Any, reason_code: Any, _properties: Any
    ) -> None:
        if reason_code.is_failure:
            self.log.error("broker %s refused the connection: %s", self.config.broker.host, reason_code)
            self._emit("connect_failed", {"reason": str(reason_code)})
            return
        t = self.topics
        filters = [t.round(), t.all_globals(), t.every_share(), t.receipt(self.address)]
        client.subscribe([(f, 1) for f in filters])
        self.log.info("connected to %s:%d", self.config.broker.host, self.config.broker.port)
        self._publish_state("online", self._state.applied_round or None)
        self._emit("connected", {"session_present": bool(flags.session_present)})

    def _on_disconnect(
        self, _client: mqtt.Client, _userdata: Any, _flags: Any, reason_code: Any, _properties: Any
    ) -> None:
        if not self._stopping:
            self.log.warning("disconnected from the broker (%s); reconnecting", reason_code)
        self._emit("disconnected", {"reason": str(reason_code)})

    def _on_message(self, _client: mqtt.Client, _userdata: Any, message: mqtt.MQTTMessage) -> None:
        if not message.payload:
            return  # a cleared retained message
        try:
            parsed = self.topics.parse(message.topic)
        except WireError:
            self.log.debug("ignoring message on unexpected topic %r", message.topic)
            return
        self._queue.put((parsed, bytes(message.payload)))

    # ----------------------------------------------------------------------------------- worker loop

    def _work(self) -> None:
        watchdog = sdnotify.Watchdog.from_env()  # systemd's (bdn-agent.service); a no-op elsewhere
        while not self._stopping:
            watchdog.kick()
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                pass
            else:
                self._guard(self._dispatch, item)
                continue
            if not self._connected_once and self._client.is_connected():
                self._connected_once = True
                sdnotify.ready(f"device {self.address} connected to {self.config.broker.host}")
                self._guard(self._resume_pending)
            self._guard(self._check_receipt_timeout)
            with watchdog.patience(_LONGEST_STEP_S):  # a Pi's partial decryption must not count as a hang
                worked = self._guard(self._step)
            if worked:
                continue
            try:
                item = self._queue.get(timeout=self._sleep_time())
            except queue.Empty:
                continue
            self._guard(self._dispatch, item)

    def _guard(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run one handler; an unexpected error is logged and reported, never fatal to the daemon."""
        try:
            return fn(*args)
        except Exception as exc:
            self.log.exception("unexpected error in %s", getattr(fn, "__name__", fn))
            self._emit("error", {"message": f"{type(exc).__name__}: {exc}"})
            return False

    def _sleep_time(self) -> float:
        now = time.monotonic()
        wake = [now + _POLL_S]
        if self._receipt_deadline is not None:
            wake.append(self._receipt_deadline)
        for rnd in self._rounds.values():
            if rnd.checked is None and not rnd.failed:
                wake.append(rnd.next_check)
            if rnd.duty_due is not None:
                wake.append(rnd.duty_due)
        return max(0.0, min(wake) - now)

    def _shutdown(self) -> None:
        self.log.info("stopping")
        self._pool.stop_background_refill()
        if self._client.is_connected():
            info = self._client.publish(
                self.topics.state(self.address), DeviceState("offline").to_cbor(), qos=1, retain=True
            )
            with contextlib.suppress(RuntimeError, ValueError):  # the connection dropped meanwhile
                info.wait_for_publish(timeout=3.0)
            self._client.disconnect()
        self._client.loop_stop()
        self.close()
        self.log.info("stopped")
        self._emit("stopped", {})

    # --------------------------------------------------------------------------------- dispatching

    def _dispatch(self, item: tuple[ParsedTopic, bytes]) -> None:
        parsed, payload = item
        try:
            if parsed.kind == "round":
                self._on_round(RoundOpen.from_cbor(payload))
            elif parsed.kind == "global":
                self._on_global(GlobalBlock.from_cbor(payload), payload, parsed)
            elif parsed.kind == "share" and parsed.device is not None:
                self._on_share(Share.from_cbor(payload), parsed)
            elif parsed.kind == "receipt" and parsed.device == self.address:
                self._on_receipt(Receipt.from_cbor(payload))
        except WireError as exc:
            self.log.warning("malformed %s message (%s) ignored", parsed.kind, exc)

    def _on_round(self, ro: RoundOpen) -> None:
        if self._round_open is not None and ro.round < self._round_open.round:
            return
        problem = ""
        if ro.key_fingerprint != self.tpk.fingerprint:
            problem = f"announces key {ro.key_fingerprint}, the fleet key is {self.tpk.fingerprint}"
        elif ro.slot_layout() != self.layout:
            problem = "announces a codec layout other than the fleet's"
        elif ro.total_samples != self.fleet.total_samples and not self._grow_fleet(ro.total_samples):
            problem = f"announces {ro.total_samples} total samples, fleet.json has {self.fleet.total_samples}"
        if problem:
            if self._note("round_refused", ro.round):
                self.log.error(
                    "round %d refused: the gateway %s", ro.round, problem, extra=fields(round=ro.round)
                )
                self._emit("round_refused", {"round": ro.round, "reason": problem})
            return
        if self._round_open is None or ro.round != self._round_open.round:
            self.log.info(
                "round %d opened on model %s",
                ro.round,
                ro.base_model_hash.hex()[:16],
                extra=fields(round=ro.round),
            )
            self._emit("round_open", {"round": ro.round, "base_hash": ro.base_model_hash.hex()})
        self._round_open = ro

    def _grow_fleet(self, announced_total: int) -> bool:
        """Devices enrolled after this one: fetch the gateway's fleet and take it if it only adds devices that
        the chain registered (:func:`firmware_agent.enroll.check_growth`) and explains the announced total."""
        if not self.config.gateway_url:
            return False
        from firmware_agent.enroll import EnrollFailed, check_growth, fetch_fleet

        try:
            fresh = fetch_fleet(self.config.gateway_url)
            problem = check_growth(self.fleet, fresh, self.chain.device_registered)
        except (EnrollFailed, ChainUnavailable) as exc:
            self.log.warning("cannot update the fleet from the gateway: %s", exc)
            return False
        if problem or fresh.total_samples != announced_total:
            self.log.error(
                "fleet update from the gateway refused: %s", problem or "the sample total still differs"
            )
            return False
        fresh.save(self.config.fleet_file)
        self.fleet = fresh
        self._holders = {d.address: d.key_share for d in fresh.devices if d.key_share}
        self.log.info("fleet updated: %d devices, %d samples", len(fresh.devices), fresh.total_samples)
        self._emit("fleet_grown", {"devices": len(fresh.devices)})
        return True

    def _on_receipt(self, receipt: Receipt) -> None:
        state = self._state
        if state.pending_update is None or state.pending_round != receipt.round:
            self.log.debug(
                "round %d: receipt for no pending update ignored",
                receipt.round,
                extra=fields(round=receipt.round),
            )
            return
        if receipt.accepted:
            assert receipt.tx_hash is not None
            self.log.info(
                "round %d: update accepted, on chain in tx 0x%s",
                receipt.round,
                receipt.tx_hash.hex(),
                extra=fields(round=receipt.round, tx="0x" + receipt.tx_hash.hex()),
            )
        else:
            assert receipt.reason is not None
            self.log.warning(
                "round %d: update refused by the gateway: %s %s",
                receipt.round,
                receipt.reason.value,
                receipt.detail,
                extra=fields(round=receipt.round, reason=receipt.reason.value),
            )
        self._save(state.evolve(pending_update=None))
        self._receipt_deadline = None
        self._emit(
            "receipt",
            {
                "round": receipt.round,
                "accepted": receipt.accepted,
                "tx_hash": receipt.tx_hash.hex() if receipt.tx_hash else None,
                "reason": receipt.reason.value if receipt.reason else None,
                "detail": receipt.detail,
            },
        )

    def _on_global(self, block: GlobalBlock, payload: bytes, parsed: ParsedTopic) -> None:
        r = block.round
        if parsed.round != r:
            self.log.warning(
                "global block for round %d published on the topic of round %s; ignored",
                r,
                parsed.round,
                extra=fields(round=r),
            )
            return
        if r <= self._state.applied_round:
            return
        digest = keccak(payload)
        known = self._rounds.get(r)
        if self._refused.get(r) == digest or (
            known is not None and (known.digest == digest or known.checked is not None)
        ):
            return  # a redelivery; or a different block for a round the chain already vouched for
        reason = self._precheck_global(block)
        ciphertexts: list[mpz] = []
        if not reason:
            try:
                ciphertexts = self.tpk.public_key.ciphertexts_from_bytes(
                    block.aggregate, self.ciphertext_count
                )
            except CiphertextRangeError as exc:
                reason = f"aggregate is not {self.ciphertext_count} valid ciphertexts: {exc}"
        if reason:
            self._refuse(r, digest, reason)
            return
        self._rounds[r] = _Round(block, digest, ciphertexts, aggregate_hash(self.tpk.public_key, ciphertexts))
        self.log.info(
            "round %d: global block received (%d devices)", r, len(block.devices), extra=fields(round=r)
        )
        self._emit("global_received", {"round": r, "devices": list(block.devices)})
        while len(self._rounds) > _MAX_OPEN_ROUNDS:
            oldest = min(self._rounds)
            self.log.warning(
                "round %d: dropped, more than %d global blocks waiting",
                oldest,
                _MAX_OPEN_ROUNDS,
                extra=fields(round=oldest),
            )
            del self._rounds[oldest]

    def _precheck_global(self, block: GlobalBlock) -> str:
        """Cheap checks before any chain call: fleet, weights, and the privacy floor on the device count."""
        if len(block.devices) < self.config.min_aggregate_devices:
            return (
                f"aggregate of {len(block.devices)} update(s) is below min_aggregate_devices="
                f"{self.config.min_aggregate_devices}: decrypting it could reveal an individual update"
            )
        strangers = [d for d in block.devices if self.fleet.device(d) is None]
        if strangers:
            return f"lists devices outside the fleet: {', '.join(strangers)}"
        # The fleet only grows by appending (enrollment): the round's fleet is a prefix of ours, and its sample
        # total the sum over that prefix. A block from before a newcomer joined is still this fleet's.
        totals = list(itertools.accumulate(d.samples for d in self.fleet.devices))
        listed = set(block.devices)
        last = max((i for i, d in enumerate(self.fleet.devices) if d.address in listed), default=0)
        if block.total_weight_den not in totals[last:]:
            return (
                f"weight denominator {block.total_weight_den} is not the sample total of the fleet "
                f"({self.fleet.total_samples}) or of the fleet as it was before later enrollments"
            )
        return ""

    def _refuse(self, r: int, digest: bytes, reason: str) -> None:
        self._refused[r] = digest
        self._rounds.pop(r, None)
        self.log.warning("round %d: global block refused: %s", r, reason, extra=fields(round=r))
        self._emit("global_refused", {"round": r, "reason": reason})

    def _on_share(self, share: Share, parsed: ParsedTopic) -> None:
        r, sender = share.round, parsed.device
        assert sender is not None
        if parsed.round != r or r <= self._state.applied_round:
            return
        if r not in self._rounds and r not in self._shares and len(self._shares) >= _MAX_SHARE_ROUNDS:
            self.log.debug(
                "round %d: share from %s ignored (too many rounds without a global block)",
                r,
                sender,
                extra=fields(round=r),
            )
            return
        self._shares.setdefault(r, {})[sender] = share

    # ---------------------------------------------------------------------------------- heavy steps

    def _step(self) -> bool:
        """Do the most urgent piece of heavy work, if any; True when something was done."""
        now = time.monotonic()
        for r in sorted(self._rounds):
            rnd = self._rounds[r]
            if rnd.checked is None and not rnd.failed and rnd.next_check <= now:
                self._chain_check(rnd)
                return True
        for r in sorted(self._rounds):
            rnd = self._rounds[r]
            if rnd.book is not None and not rnd.book.ready and self._shares.get(r):
                self._verify_one(rnd)
                return True
        for r in sorted(self._rounds):
            rnd = self._rounds[r]
            if (
                rnd.checked is not None
                and not rnd.failed
                and rnd.checked.base_model_hash == self._state.base_hash
            ):
                if rnd.book is not None and rnd.book.ready:
                    self._apply(rnd)
                    return True
                break  # the next round to apply still waits for shares
        for r in sorted(self._rounds):
            rnd = self._rounds[r]
            if rnd.duty_due is not None and rnd.duty_due <= now:
                self._holder_duty(rnd)
                return True
        return self._maybe_train()

    def _chain_check(self, rnd: _Round) -> None:
        r = rnd.block.round
        rnd.checks += 1
        try:
            checked = self.chain.check_global(rnd.block, rnd.aggregate_hash)
        except ChainUnavailable as exc:
            rnd.next_check = time.monotonic() + _CHAIN_RETRY_UNAVAILABLE_S
            self.log.warning(
                "round %d: cannot check the global block on chain yet: %s", r, exc, extra=fields(round=r)
            )
            return
        except ChainCheckError as exc:
            if exc.retryable and rnd.checks < _MAX_CHAIN_CHECKS:
                rnd.next_check = time.monotonic() + _CHAIN_RETRY_S
                self.log.info("round %d: %s; checking again shortly", r, exc.reason, extra=fields(round=r))
                return
            self._refuse(r, rnd.digest, f"chain check failed: {exc.reason}")
            return
        rnd.checked = checked
        rnd.book = ShareBook(
            self.tpk, rnd.ciphertexts, self.fleet.decrypt_context(r, rnd.aggregate_hash), self._holders
        )
        self.log.info("round %d: global block matches the chain commit", r, extra=fields(round=r))
        self._emit("global_checked", {"round": r, "base_hash": checked.base_model_hash.hex()})
        if self._share is not None:
            primary = is_primary(r, self._share.index, self.tpk.threshold, self.tpk.holders)
            rnd.duty_role = "primary" if primary else "standby"
            rnd.duty_due = time.monotonic() + (0.0 if primary else self.config.standby_delay_s)

    def _verify_one(self, rnd: _Round) -> None:
        assert rnd.book is not None
        r = rnd.block.round
        pending = self._shares[r]
        sender = next(iter(pending))
        share = pending.pop(sender)
        offer = rnd.book.offer(sender, share)
        if offer.accepted:
            if not offer.reason:
                self.log.info(
                    "round %d: valid share from holder %d (%s)",
                    r,
                    offer.holder,
                    sender,
                    extra=fields(round=r, holder=offer.holder),
                )
                self._emit(
                    "share_accepted", {"round": r, "holder": offer.holder, "valid": len(rnd.book.valid)}
                )
        else:
            self.log.warning(
                "round %d: share from %s rejected: %s", r, sender, offer.reason, extra=fields(round=r)
            )
            self._emit(
                "share_rejected",
                {"round": r, "holder": offer.holder, "sender": sender, "reason": offer.reason},
            )

    def _holder_duty(self, rnd: _Round) -> None:
        assert rnd.book is not None and self._share is not None
        r = rnd.block.round
        rnd.duty_due = None
        if rnd.book.has(self._share.index):
            return
        if rnd.book.ready:
            self.log.info(
                "round %d: %d valid shares already in; %s duty not needed",
                r,
                len(rnd.book.valid),
                rnd.duty_role,
                extra=fields(round=r),
            )
            return
        self.log.info(
            "round %d: decrypting my share as %s holder %d",
            r,
            rnd.duty_role,
            self._share.index,
            extra=fields(round=r, holder=self._share.index),
        )
        start = time.perf_counter()
        partial = self._share.partial_decrypt(rnd.ciphertexts, rnd.book.context)
        rnd.book.add_own(partial)
        message = share_message(r, partial, self.tpk.public_key)
        self._publish(self.topics.share(r, self.address), message.to_cbor(), retain=True)
        seconds = time.perf_counter() - start
        self.log.info("round %d: share published (%.1f s)", r, seconds, extra=fields(round=r))
        self._emit(
            "share_published",
            {"round": r, "holder": self._share.index, "role": rnd.duty_role, "seconds": seconds},
        )

    def _apply(self, rnd: _Round) -> None:
        assert rnd.book is not None
        r = rnd.block.round
        try:
            result = rnd.book.combine()
            mean_delta = decode_global(self.layout, result.plaintexts, rnd.block)
        except (SlotOverflowError, CodecRangeError, NotEnoughSharesError) as exc:
            rnd.failed = str(exc)
            self.log.error("round %d: aggregate NOT applied: %s", r, exc, extra=fields(round=r))
            self._publish_state("error", r)
            self._emit(
                "overflow" if isinstance(exc, SlotOverflowError) else "error",
                {"round": r, "message": str(exc)},
            )
            return
        self._emit("combined", {"round": r, "holders": result.used, "rejected": dict(rnd.book.rejected)})
        weights = apply_delta(self._state.weights, mean_delta)
        pending = self._state.pending_update
        if pending is not None and (self._state.pending_round or 0) <= r:
            pending = None  # its round is closed: stop republishing it
            self._receipt_deadline = None
        self._save(
            self._state.evolve(
                weights=weights, base_hash=rnd.aggregate_hash, applied_round=r, pending_update=pending
            )
        )
        export_global_model(self.config.state_dir, weights, self.log)  # model.tflite; never raises
        for old in [k for k in self._rounds if k <= r]:
            del self._rounds[old]
        for old in [k for k in self._shares if k <= r]:
            del self._shares[old]
        for old in [k for k in self._refused if k <= r]:
            del self._refused[old]
        loss, accuracy = self.trainer.evaluate(weights)
        self.log.info(
            "round %d: global model applied (holders %s), loss %.4f%s",
            r,
            result.used,
            loss,
            "" if accuracy is None else f", test accuracy {accuracy:.2%}",
            extra=fields(round=r),
        )
        if math.isfinite(loss):
            report = Report(round=r, samples=self.samples, loss=min(loss, 1e6), accuracy=accuracy)
            self._publish(self.topics.report(self.address), report.to_cbor())
        else:
            self.log.warning("round %d: loss is not finite; no report", r, extra=fields(round=r))
        self._publish_state("online", r)
        self._emit(
            "applied", {"round": r, "base_hash": rnd.aggregate_hash.hex(), "loss": loss, "accuracy": accuracy}
        )

    def _maybe_train(self) -> bool:
        ro, state = self._round_open, self._state
        if ro is None or ro.round <= max(
            state.submitted_round, state.applied_round, self._train_failed_round
        ):
            return False
        r = ro.round
        if r in self._rounds or r in self._refused:
            return False  # its global block is out: the round is closed
        if ro.base_model_hash != state.base_hash:
            if self._note("waiting", r):
                self.log.info(
                    "round %d builds on model %s, I hold %s (round %d): catching up from global blocks first",
                    r,
                    ro.base_model_hash.hex()[:16],
                    state.base_hash.hex()[:16],
                    state.applied_round,
                    extra=fields(round=r),
                )
                self._emit("waiting_for_base", {"round": r, "base_hash": ro.base_model_hash.hex()})
            return False
        if not self._may_join(r):
            return False
        self._train(ro)
        return True

    def request_join(self) -> None:
        """The status button was pressed: with ``status.join = "button"`` the device takes part in the next
        round it can (thread-safe: called from the button's thread)."""
        self._join_requested = True

    def _may_join(self, r: int) -> bool:
        """``status.join = "button"``: one press, one round; the press is used up when round ``r`` is taken."""
        if self.config.status.join == "auto":
            return True
        if not self._join_requested:
            if self._note("button", r):
                self.log.info(
                    "round %d: waiting for the status button before taking part", r, extra=fields(round=r)
                )
                self._emit("waiting_for_button", {"round": r})
            return False
        self._join_requested = False
        return True

    def _train(self, ro: RoundOpen) -> None:
        r = ro.round
        self._publish_state("training", r)
        self._emit("training", {"round": r})
        self.log.info("round %d: training on %d samples", r, self.samples, extra=fields(round=r))
        try:
            outcome = self.trainer.train(self._state.weights, r, self.layout.clip)
            update = seal_update(
                round_no=r,
                device=self._key,
                domain=self.fleet.domain,
                layout=self.layout,
                public_key=self.tpk.public_key,
                randomness=self._pool,
                delta=outcome.delta,
                samples=outcome.samples,
                total_samples=ro.total_samples,
                train_ms=round(outcome.seconds * 1000),
            )
        except (FloatingPointError, CodecRangeError, ValueError) as exc:
            self._train_failed_round = r
            self.log.error("round %d: no update this round: %s", r, exc, extra=fields(round=r))
            self._publish_state("error", r)
            self._emit("error", {"round": r, "message": str(exc)})
            return
        data = update.to_cbor()
        self._save(self._state.evolve(submitted_round=r, pending_update=data))  # before it leaves the device
        self._attempts = 0
        self._send_update(update, data)
        self._publish_state("online", r)
        self._emit(
            "trained",
            {
                "round": r,
                "samples": outcome.samples,
                "train_loss": outcome.train_loss,
                "base_loss": outcome.base_loss,
                "clipped": outcome.clipped,
                "seconds": outcome.seconds,
            },
        )

    # ---------------------------------------------------------------------------- update delivery

    def _send_update(self, update: Update, data: bytes) -> None:
        self._attempts += 1
        self._publish(self.topics.update(self.address), data)
        self._receipt_deadline = time.monotonic() + self.config.receipt_timeout_s
        self.log.info(
            "round %d: update published (attempt %d of %d, %d bytes)",
            update.round,
            self._attempts,
            self.config.max_publish_attempts,
            len(data),
            extra=fields(round=update.round),
        )
        self._emit(
            "update_published",
            {
                "round": update.round,
                "attempt": self._attempts,
                "bytes": len(data),
                "ciphertexts": len(update.payload) // self.tpk.public_key.ciphertext_bytes,
            },
        )

    def _resume_pending(self) -> None:
        """After a restart: the update signed before it is sent again, byte for byte."""
        data = self._state.pending_update
        if data is not None:
            update = Update.from_cbor(data)
            self.log.info(
                "round %d: resuming delivery of the update saved before the restart",
                update.round,
                extra=fields(round=update.round),
            )
            self._attempts = 0
            self._send_update(update, data)

    def _check_receipt_timeout(self) -> None:
        if self._receipt_deadline is None or time.monotonic() < self._receipt_deadline:
            return
        data = self._state.pending_update
        if data is None:
            self._receipt_deadline = None
            return
        update = Update.from_cbor(data)
        if self._attempts < self.config.max_publish_attempts:
            self.log.warning(
                "round %d: no receipt after %.0f s; publishing again",
                update.round,
                self.config.receipt_timeout_s,
                extra=fields(round=update.round),
            )
            self._send_update(update, data)
            return
        self._receipt_deadline = None
        self.log.error(
            "round %d: no receipt after %d attempts; giving up on this round",
            update.round,
            self._attempts,
            extra=fields(round=update.round),
        )
        self._save(self._state.evolve(pending_update=None))
        self._emit("publish_gave_up", {"round": update.round, "attempts": self._attempts})

    # ---------------------------------------------------------------------------------- helpers

    def _publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        info = self._client.publish(topic, payload, qos=1, retain=retain)
        # NO_CONN: paho keeps the QoS 1 message and sends it once the connection is back.
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            self.log.error("publishing on %s failed: %s", topic, mqtt.error_string(info.rc))

    def _publish_state(self, status: DeviceStatus, round_no: int | None) -> None:
        self._publish(self.topics.state(self.address), DeviceState(status, round_no).to_cbor(), retain=True)
        self._emit("state", {"state": status, "round": round_no})

    def _save(self, state: AgentState) -> None:
        self.store.save(state)
        with self._state_lock:
            self._state = state

    def _note(self, what: str, round_no: int) -> bool:
        """True the first time ``what`` happens for ``round_no``: keeps repeated conditions to one log line."""
        key = (what, round_no)
        if key in self._noted:
            return False
        self._noted.add(key)
        return True

    def _emit(self, name: str, data: dict[str, Any]) -> None:
        if self._on_event is None:
            return
        try:
            self._on_event(name, {"device": self.address, **data})
        except Exception:
            self.log.exception("event hook failed on %r", name)
