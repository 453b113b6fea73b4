"""Over ten thousand hostile messages on device topics while an honest round runs: none gets in, each gets its
receipt, the gateway stays up and the honest round completes.

Hypothesis strategies *generate* the messages (seeded: a failure names its seed and is reproducible); they
are not shrunk, the whole stream is one experiment against a real gateway process, real Mosquitto and anvil:

- random bytes; arbitrary CBOR (nested, tagged, non-map); Update-shaped maps with keys dropped, added or
  retyped and wrong versions; hand-made hostile encodings (indefinite lengths, deep nesting, a byte string
  claiming 2^63 bytes, 2^64-entry maps), maps whose unknown keys are long non-ASCII text;
- correctly signed Updates that are wrong anyway: a registered key for a wrong round (late / not open),
  inflated samples, a device that is not the topic's, an unregistered key (on its own topic or naming a
  registered device), too few ciphertexts;
- full-size (~1 MB) messages: a genuine update truncated at a random point or with one byte flipped; a
  full-count update, correctly signed by a registered device, with one ciphertext 0, n, a multiple of n, n^2
  or 2^1024 - 1; one ciphertext too many or too few, or a ragged length; oversized (> 1.2 MB);
- after the honest updates are on chain: their exact bytes replayed (on their own topic: a "resend", answered
  with the original accepted receipt plus a duplicate notice; on another device's topic: malformed), and
  second, different updates signed by the honest devices (duplicate);
- junk on the devices' state and report topics (no receipt is due there; it must change nothing).

Three honest devices publish their genuine updates in the middle of the flood. The fleet has a fourth
registered device that never submits (its key signs much of the junk): the round waits for it until its
retained state says ``offline``, which the test publishes once the flood is answered, so the duplicates are
judged in the open round and the close is part of the test.

Asserted: the gateway process is alive and ``/healthz`` is 200 during and after; on each device topic the
refusals received equal the junk messages sent there (unregistered addresses too), every one with a reason
code, and no receipt is one a device could not decode; the accepted receipts are exactly the honest ones plus
one per own-topic replay; the store logged one rejection per junk message; the chain holds exactly the three
honest updates and the round's global block is published. The gateway's throughput on junk is printed.
"""

from __future__ import annotations

import collections
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cbor2
import pytest
from eth_account import Account
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

from bench.round import premade_updates
from blockdeepnet.eip712 import UpdateClaim, new_device_key, payload_hash, sign_update
from blockdeepnet.ledger import Ledger, new_gateway_account, rpc_web3
from blockdeepnet.wire import (
    UPDATE_MAX_BYTES,
    DeviceState,
    GlobalBlock,
    ReasonCode,
    Report,
    RoundOpen,
    Topics,
    Update,
)
from gateway.store import Store
from provisioning.anvil import AnvilProcess, free_port
from provisioning.localfleet import LocalFleet
from tests.support.devices import Device, accepted
from tests.support.fleets import small_fleet
from tests.support.flood import Flooder, ReceiptCounter, TopicCount
from tests.support.gateway_process import GatewayProcess
from tests.support.mosquitto import MosquittoProcess
from tests.support.mqtt import MqttTestClient

pytestmark = [pytest.mark.integration, pytest.mark.timeout(420)]

SEED = 20240611
SMALL = 10_000  # small hostile updates (hypothesis examples)
LARGE = 240  # full-size hostile updates (~1 MB each)
SIDE = 600  # junk on state / report topics
REPLAYS = 8  # per honest device, on its own topic; as many again on another's
SECONDS = 20  # per honest device: different, validly signed second updates
FLOODERS = 4

Payload = bytes | Callable[[], bytes]


@dataclass(frozen=True)
class Junk:
    target: int  # index into Ctx.targets: whose update topic it goes to
    kind: str
    payload: Payload


@dataclass
class Ctx:
    local: LocalFleet
    topics: Topics
    targets: list[str]  # 4 registered (0-2 honest, 3 silent), then 2 unregistered addresses
    keys: list[tuple[bytes, str]]  # (private key, address), same order as targets
    genuine: list[bytes]  # the registered devices' genuine update bytes (3's is never sent whole)
    declared: int  # samples each device declared

    @property
    def silent(self) -> int:
        return 3


def _collect(strategy: st.SearchStrategy[Any], n: int, seed_value: int) -> list[Any]:
    """``n`` examples of ``strategy``: Hypothesis as a generator (no shrinking, no database)."""
    out: list[Any] = []

    @seed(seed_value)
    @settings(
        max_examples=n,
        database=None,
        phases=[Phase.generate],
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(strategy)
    def collect(example: Any) -> None:
        out.append(example)

    collect()
    return out


# ------------------------------------------------------------------------------------------- strategies

_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True)
    | st.text(max_size=24)
    | st.binary(max_size=48)
)
_VALUES = st.recursive(
    _SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(max_size=4) | st.integers(-5, 5), inner, max_size=4)
        | st.builds(cbor2.CBORTag, st.integers(0, 2**16), inner)
    ),
    max_leaves=10,
)
_UPDATE_KEYS = ["v", "r", "d", "s", "ms", "p", "sig"]

_HANDMADE = [
    b"",
    b"\xa0",  # empty map
    b"\xbf\xff",  # indefinite-length map
    b"\xbf\x61v\x01\xff",
    b"\xa1\x61v" + b"\x81" * 5000 + b"\x00",  # deep nesting
    b"\xa1\x61p\x5b\x7f\xff\xff\xff\xff\xff\xff\xff",  # a byte string claiming 2^63 bytes
    b"\xbb\xff\xff\xff\xff\xff\xff\xff\xff",  # a map claiming 2^64 - 1 entries
    b"\xa1\x61v\xc2\x58\x20" + b"\xff" * 32,  # a bignum tag
    b"\xa1\x61v\xd9\xd9\xf7\x01",  # self-describe tag
    b"\xa2\x61v\x01\x61v\x02",  # duplicate keys
    b"\xa1\x61v\x01" + b"\x00" * 64,  # trailing bytes
    b"\xa1\x62\xff\xfe\x01",  # invalid UTF-8 key
]


def _small_strategy(ctx: Ctx) -> st.SearchStrategy[Junk]:
    targets = st.integers(0, len(ctx.targets) - 1)
    domain = ctx.local.fleet.domain

    random_bytes = st.builds(lambda t, b: Junk(t, "random_bytes", b), targets, st.binary(max_size=600))
    any_cbor = st.builds(lambda t, v: Junk(t, "any_cbor", cbor2.dumps(v)), targets, _VALUES)
    handmade = st.builds(lambda t, b: Junk(t, "handmade", b), targets, st.sampled_from(_HANDMADE))

    @st.composite
    def mutated_map(draw: st.DrawFn) -> Junk:
        t = draw(targets)
        m: dict[Any, Any] = {
            "v": 1,
            "r": 1,
            "d": ctx.targets[t],
            "s": ctx.declared,
            "ms": 1500,
            "p": draw(st.binary(min_size=1, max_size=256)),
            "sig": draw(st.binary(min_size=65, max_size=65)),
        }
        for _ in range(draw(st.integers(1, 3))):
            key = draw(st.sampled_from([*_UPDATE_KEYS, "x", "V", "", "sig2"]) | st.text(max_size=6))
            if key in m and draw(st.booleans()):
                del m[key]
            else:
                m[key] = draw(
                    _VALUES | st.sampled_from([0, 2, -1, "1", 1.0, True, 2**64, ctx.targets[t].lower()])
                )
        return Junk(t, "mutated_map", cbor2.dumps(m))

    @st.composite
    def unicode_keys(draw: st.DrawFn) -> Junk:
        # The refusal names the unknown keys: a receipt echoing 512 four-byte characters must still fit.
        emoji = st.characters(min_codepoint=0x1F600, max_codepoint=0x1F64F)
        m: dict[Any, Any] = {"v": 1, draw(st.text(emoji, min_size=100, max_size=700)): 1}
        return Junk(draw(targets), "unicode_keys", cbor2.dumps(m))

    @st.composite
    def signed_small(draw: st.DrawFn) -> Junk:
        t = draw(targets)
        key, signer = ctx.keys[draw(st.integers(0, len(ctx.keys) - 1))]
        named = draw(st.sampled_from([ctx.targets[t], signer]))
        round_no = draw(st.sampled_from([0, 1, 1, 2, 7]) | st.integers(0, 2**64 - 1))
        samples = draw(st.sampled_from([ctx.declared, ctx.declared + 1, 1]) | st.integers(1, 2**64 - 1))
        compute_ms = draw(st.integers(0, 2**64 - 1))
        payload = draw(st.binary(min_size=1, max_size=1500))
        signature = sign_update(
            key, domain, UpdateClaim(round_no, payload_hash(payload), samples, compute_ms)
        )
        update = Update(round_no, named, samples, compute_ms, payload, signature)
        return Junk(t, "signed_small", update.to_cbor())

    return st.one_of(random_bytes, any_cbor, handmade, mutated_map(), unicode_keys(), signed_small())


def _signed_full(ctx: Ctx, payload: bytes) -> bytes:
    """A round-1 update of the silent (registered, never submitting) device over ``payload``, validly signed."""
    key, address = ctx.keys[ctx.silent]
    claim = UpdateClaim(1, payload_hash(payload), ctx.declared, 1500)
    return Update(
        1, address, ctx.declared, 1500, payload, sign_update(key, ctx.local.fleet.domain, claim)
    ).to_cbor()


def _large_strategy(ctx: Ctx) -> st.SearchStrategy[Junk]:
    pub = ctx.local.fleet.public_key.public_key
    width = pub.ciphertext_bytes
    silent_payload = Update.from_cbor(ctx.genuine[ctx.silent]).payload
    count = len(silent_payload) // width
    sources = st.integers(0, len(ctx.genuine) - 1)
    n, n2 = int(pub.n), int(pub.nsquare)

    @st.composite
    def truncated(draw: st.DrawFn) -> Junk:
        src = draw(sources)
        cut = draw(st.integers(0, len(ctx.genuine[src]) - 1))
        return Junk(draw(st.integers(0, len(ctx.targets) - 1)), "truncated", lambda: ctx.genuine[src][:cut])

    @st.composite
    def flipped(draw: st.DrawFn) -> Junk:
        src = draw(sources)
        at = draw(st.integers(0, len(ctx.genuine[src]) - 1))
        xor = draw(st.integers(1, 255))

        def build() -> bytes:
            data = bytearray(ctx.genuine[src])
            data[at] ^= xor
            return bytes(data)

        return Junk(src, "flipped", build)

    @st.composite
    def bad_ciphertext(draw: st.DrawFn) -> Junk:
        at = draw(st.integers(0, count - 1))
        value = draw(
            st.sampled_from([0, n, n2, 2 ** (8 * width) - 1])
            | st.integers(1, 2**64).map(lambda k: k * n % n2)
        )

        def build() -> bytes:
            blob = bytearray(silent_payload)
            blob[at * width : (at + 1) * width] = value.to_bytes(width, "big")
            return _signed_full(ctx, bytes(blob))

        return Junk(ctx.silent, "bad_ciphertext", build)

    @st.composite
    def wrong_count(draw: st.DrawFn) -> Junk:
        change = draw(st.sampled_from([-width, width, -1, 1, -3 * width]))

        def build() -> bytes:
            blob = silent_payload[:change] if change < 0 else silent_payload + silent_payload[:change]
            return _signed_full(ctx, blob)

        return Junk(ctx.silent, "wrong_count", build)

    @st.composite
    def oversized(draw: st.DrawFn) -> Junk:
        size = draw(st.integers(UPDATE_MAX_BYTES + 1, UPDATE_MAX_BYTES + 200_000))
        return Junk(
            draw(st.integers(0, len(ctx.targets) - 1)), "oversized", lambda: b"\xa6" + bytes(size - 1)
        )

    return st.one_of(truncated(), flipped(), bad_ciphertext(), wrong_count(), oversized())


def _side_strategy(ctx: Ctx) -> st.SearchStrategy[tuple[str, bytes]]:
    """Junk on registered devices' state and report topics (never a valid DeviceState or Report)."""
    topic = st.builds(
        lambda k, kind: ctx.topics.state(ctx.targets[k]) if kind else ctx.topics.report(ctx.targets[k]),
        st.integers(0, 3),
        st.booleans(),
    )
    junk = st.binary(max_size=300) | _VALUES.map(cbor2.dumps) | st.sampled_from(_HANDMADE)
    return st.tuples(topic, junk)


# ----------------------------------------------------------------------------------------------- the rig


@dataclass
class Rig:
    mosquitto: MosquittoProcess
    anvil: AnvilProcess
    gateway: GatewayProcess
    ctx: Ctx
    ledger: Ledger


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    mosquitto = MosquittoProcess(tmp_path / "mosquitto", max_queued_messages=200_000).start()
    anvil = AnvilProcess().start()
    gateway: GatewayProcess | None = None
    try:
        http_port = free_port()
        local = small_fleet(
            tmp_path,
            "fuzz",
            devices=4,
            chain_url=anvil.url,
            broker_port=mosquitto.port,
            broker_mode="external",
            broker_auth=False,
            http_port=http_port,
            gateway_extra={"rounds": {"quorum": 0, "min_updates": 3, "deadline_s": 600.0, "max_rounds": 0}},
        )
        gateway = GatewayProcess(
            local.gateway_config, tmp_path / "gateway.log", http_port, log_level="warning"
        )
        keys = [
            (bytes.fromhex((d.folder / "device.key").read_text().strip().removeprefix("0x")), d.address)
            for d in local.devices
        ]
        keys += [new_device_key() for _ in range(2)]
        assert all(Account.from_key(k).address == a for k, a in keys)
        ctx = Ctx(
            local,
            Topics(local.fleet.name),
            [a for _, a in keys],
            keys,
            [payload for _, _, payload in premade_updates(local)],
            local.fleet.devices[0].samples,
        )
        ledger = Ledger(rpc_web3(anvil.url), local.fleet.chain.contract, new_gateway_account())
        yield Rig(mosquitto, anvil, gateway, ctx, ledger)
    finally:
        if gateway is not None:
            gateway.stop()
            print(gateway.log_tail(60))  # shown by pytest when the test failed
        print(mosquitto.log_tail())
        mosquitto.stop()
        anvil.stop()


def _spread(items: list[tuple[str, Payload]], k: int) -> list[list[tuple[str, Payload]]]:
    return [items[i::k] for i in range(k)]


def test_ten_thousand_hostile_messages_get_receipts_and_change_nothing(rig: Rig) -> None:
    ctx, topics = rig.ctx, rig.ctx.topics
    host, port = rig.mosquitto.host, rig.mosquitto.port
    t0 = time.monotonic()
    small = _collect(_small_strategy(ctx), SMALL, SEED)
    large = _collect(_large_strategy(ctx), LARGE, SEED + 1)
    side = _collect(_side_strategy(ctx), SIDE, SEED + 2)
    generated_s = time.monotonic() - t0
    assert len(small) == SMALL and len(large) == LARGE and len(side) == SIDE
    # Large ones spread through the stream, not in one lump.
    junk: list[Junk] = list(small)
    for i, j in enumerate(large):
        junk.insert((i * 37) % len(junk), j)
    sent_on: collections.Counter[int] = collections.Counter(j.target for j in junk)
    stream: list[tuple[str, Payload]] = [(topics.update(ctx.targets[j.target]), j.payload) for j in junk]
    side_items: list[tuple[str, Payload]] = [(t, p) for t, p in side]
    for i, item in enumerate(side_items):
        stream.insert((i * 17) % len(stream), item)

    counter = ReceiptCounter(host, port, f"{topics.prefix}dev/+/receipt")
    honest = [
        Device(host, port, topics, ctx.targets[k], client_id=f"fuzz-honest{k}").connect() for k in range(3)
    ]
    flooders = [Flooder(host, port) for _ in range(FLOODERS)]
    try:
        rig.gateway.start()
        with MqttTestClient(host, port) as watcher:
            watcher.connect().subscribe(topics.round())
            assert RoundOpen.from_cbor(watcher.expect(topics.round(), timeout=30).payload).round == 1

        # Phase 1: the flood, with the honest updates published a third of the way in.
        start = time.monotonic()
        cut = len(stream) // 3
        for f, part in zip(flooders, _spread(stream[:cut], FLOODERS), strict=True):
            f.start(part)
        for f in flooders:
            f.join()
        for dev, payload in zip(honest, ctx.genuine[:3], strict=True):
            dev.publish_update(payload)
        for f, part in zip(flooders, _spread(stream[cut:], FLOODERS), strict=True):
            f.start(part)
        health_during = rig.gateway.healthz(timeout=10)
        for f in flooders:
            f.join()
        flood_sent_s = time.monotonic() - start
        for dev in honest:
            dev.wait_receipt(accepted, timeout=240)

        # Phase 2: replays of the accepted updates and second updates of the honest devices.
        replays: list[tuple[str, Payload]] = []
        for k in range(3):
            other = (k + 1) % 3
            replays += [(topics.update(ctx.targets[k]), ctx.genuine[k])] * REPLAYS
            replays += [(topics.update(ctx.targets[other]), ctx.genuine[k])] * REPLAYS
            sent_on[k] += REPLAYS
            sent_on[other] += REPLAYS
            key = ctx.keys[k][0]
            for i in range(SECONDS):
                payload = secrets.token_bytes(64 + i)
                claim = UpdateClaim(1, payload_hash(payload), ctx.declared, i)
                second = Update(
                    1,
                    ctx.targets[k],
                    ctx.declared,
                    i,
                    payload,
                    sign_update(key, ctx.local.fleet.domain, claim),
                )
                replays.append((topics.update(ctx.targets[k]), second.to_cbor()))
                sent_on[k] += 1
        for f, part in zip(flooders, _spread(replays, FLOODERS), strict=True):
            f.start(part)
        for f in flooders:
            f.join()

        total = sum(sent_on.values())
        honest_accepts = 3 * (1 + REPLAYS)  # the honest receipts, one "resend" per own-topic replay
        counter.wait_all(total + honest_accepts, timeout=240, alive=lambda: rig.gateway.running)
        answered_s = time.monotonic() - start
        time.sleep(1.0)  # stragglers: a receipt too many would show now
        counts = counter.snapshot()
        health_after = rig.gateway.healthz(timeout=10)
        assert rig.gateway.running, "the gateway process died"
        on_chain = [d for d, _ in rig.ledger.recorded_updates(1)]
        assert sorted(on_chain) == sorted(ctx.targets[:3]), f"a hostile update got on chain: {on_chain}"
        assert not rig.ledger.get_round(1).committed

        # The honest round completes: the silent device is declared offline (its retained state).
        with MqttTestClient(host, port) as closer:
            closer.connect()
            closer.publish(
                topics.state(ctx.targets[ctx.silent]), DeviceState("offline").to_cbor(), retain=True
            )
            closer.subscribe(topics.global_block(1))
            block = GlobalBlock.from_cbor(closer.expect(topics.global_block(1), timeout=60).payload)
    finally:
        for f in flooders:
            f.close()
        for dev in honest:
            dev.close()
        counter.close()

    rate = total / answered_s
    print(
        f"generated {len(small)} small + {len(large)} full-size + {len(side)} side messages in {generated_s:.1f} s; "
        f"{total} hostile updates + {len(side)} side messages sent in {flood_sent_s:.1f} s (phase 1), all "
        f"answered after {answered_s:.1f} s: {rate:.0f} refusals/s; kinds "
        f"{dict(collections.Counter(j.kind for j in junk))}"
    )
    for t, c in sorted(counts.items()):
        print(
            f"  {t}: accepted {c.accepted}, refused {c.refused} {dict(c.reasons)}, undecodable {c.undecodable}"
        )

    assert health_during is not None and health_during["ok"], health_during
    assert health_after is not None and health_after["ok"], health_after
    undecodable = {t: c.details[:3] for t, c in counts.items() if c.undecodable}
    assert not undecodable, f"receipts a device cannot decode (over the wire limits): {undecodable}"
    for i, address in enumerate(ctx.targets):
        tc = counts.get(topics.receipt(address), TopicCount())
        assert tc.refused == sent_on[i], f"{address}: {sent_on[i]} hostile messages, {tc.refused} refusals"
        expected_accepts = 1 + REPLAYS if i < 3 else 0  # the honest receipt, one "resend" per own replay
        assert tc.accepted == expected_accepts, f"{address}: {tc}"
        assert tc.reasons[str(ReasonCode.CHAIN_ERROR)] == 0
    assert set(counts) <= {topics.receipt(a) for a in ctx.targets}

    # Nothing got in: the chain and the store hold the three honest updates only; every refusal is logged.
    info = rig.ledger.get_round(1)
    assert info.committed and info.count == 3
    assert sorted(d for d, _ in rig.ledger.recorded_updates(1)) == sorted(ctx.targets[:3])
    assert sorted(block.devices) == sorted(ctx.targets[:3])
    with Store(f"sqlite:///{ctx.local.gateway_config.parent / 'state' / 'gateway.db'}") as store:
        assert store.update_counts(1)["recorded"] == 3
        assert sum(store.update_counts(1).values()) == 3
        assert sum(store.rejection_counts().values()) == total
    assert rig.gateway.running


def test_reports_for_rounds_that_do_not_exist_do_not_wedge_ingest(rig: Rig) -> None:
    """A registered device may publish on its own report topic (the broker ACL allows it). A well-formed Report
    for a round the store does not know must be refused like any junk, not fail the ingest batch: a batch
    that fails is never acknowledged, and unacknowledged messages hold the broker's in-flight window for the
    gateway (Mosquitto: 20) until it reconnects, so a few such reports would stop all delivery to it."""
    ctx, topics = rig.ctx, rig.ctx.topics
    host, port = rig.mosquitto.host, rig.mosquitto.port
    silent = ctx.targets[ctx.silent]
    counter = ReceiptCounter(host, port, f"{topics.prefix}dev/+/receipt")
    honest = [
        Device(host, port, topics, ctx.targets[k], client_id=f"rep-honest{k}").connect() for k in range(3)
    ]
    try:
        rig.gateway.start()
        with MqttTestClient(host, port) as attacker:
            attacker.connect().subscribe(topics.round())
            assert RoundOpen.from_cbor(attacker.expect(topics.round(), timeout=30).payload).round == 1
            for i in range(30):
                report = Report(round=1000 + i, samples=1, loss=0.5, accuracy=None)
                attacker.publish(topics.report(silent), report.to_cbor())
                attacker.publish(topics.update(silent), b"junk %d" % i)
        for dev, payload in zip(honest, ctx.genuine[:3], strict=True):
            dev.publish_update(payload)
        counter.wait_all(30 + 3, timeout=30, alive=lambda: rig.gateway.running)  # + 3 honest receipts
        refused = counter.total("refused")
        wedged = rig.gateway.log_text().count("ingest of a batch")
        assert refused == 30, f"{refused} of 30 junk updates answered; {wedged} ingest batch(es) failed"
        for dev in honest:
            dev.wait_receipt(accepted, timeout=30)
        health = rig.gateway.healthz(timeout=10)
        assert health is not None and health["ok"], health
    finally:
        for dev in honest:
            dev.close()
        counter.close()
