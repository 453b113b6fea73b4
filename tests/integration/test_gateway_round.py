"""A whole round through the real gateway: embedded amqtt with password file + ACL, embedded chain, SQLite."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.round import premade_updates
from blockdeepnet import merkle
from blockdeepnet.audit import aggregate_hash
from blockdeepnet.wire import GlobalBlock, ReasonCode, Receipt, RoundOpen, Topics
from gateway.broker import free_port
from provisioning.localfleet import LocalFleet
from tests.support.fleets import device_client, small_fleet
from tests.support.gateway import GatewayThread

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


def _fleet(tmp_path: Path, devices: int = 3, **rounds: object) -> LocalFleet:
    return small_fleet(
        tmp_path,
        "gw",
        devices=devices,
        broker_port=free_port("127.0.0.1"),
        http_port=0,
        gateway_extra={"rounds": {"max_rounds": 1, "min_updates": 1, **rounds}},
    )


def test_round_is_recorded_aggregated_committed_and_published(tmp_path: Path) -> None:
    local = _fleet(tmp_path)
    topics = Topics(local.fleet.name)
    updates = premade_updates(local)
    with GatewayThread(local.gateway_config) as gt:
        port = gt.gw.broker_port
        assert port is not None
        clients = [device_client(local, k, port) for k in range(3)]
        try:
            watcher = clients[0]
            watcher.subscribe(topics.round())
            opened = RoundOpen.from_cbor(watcher.expect(topics.round()).payload)
            assert opened.round == 1 and opened.base_model_hash == local.fleet.initial_model_hash()
            watcher.subscribe(topics.global_block(1))
            for k, c in enumerate(clients):
                c.subscribe(topics.receipt(local.devices[k].address))
                c.publish(*updates[k][1:])
            receipts = [
                Receipt.from_cbor(c.expect(topics.receipt(local.devices[k].address)).payload)
                for k, c in enumerate(clients)
            ]
            assert all(r.accepted and r.tx_hash for r in receipts)
            block = GlobalBlock.from_cbor(watcher.expect(topics.global_block(1), timeout=60).payload)
        finally:
            for c in clients:
                c.close()
        ledger = gt.gw.chain.ledger
        info = ledger.get_round(1)
        assert info.committed and info.count == 3
        pub = local.fleet.public_key.public_key
        agg = pub.ciphertexts_from_bytes(block.aggregate)
        assert info.aggregate_hash == aggregate_hash(pub, agg)
        recorded = ledger.recorded_updates(1)
        assert block.devices == [d for d, _ in recorded]
        assert block.merkle_root == merkle.root(merkle.leaf(1, d, h) for d, h in recorded)
        assert (block.total_weight_num, block.total_weight_den) == (3 * 2745, 3 * 2745)
        # The aggregate is the product of exactly the three published payloads.
        expected = [1] * len(agg)
        for _, _, payload in updates:
            from blockdeepnet.wire import Update

            for i, c in enumerate(pub.ciphertexts_from_bytes(Update.from_cbor(payload).payload)):
                expected[i] = expected[i] * c % pub.nsquare
        assert agg == expected
        gt.wait_for("round_closed")


def test_bad_updates_get_reason_codes_and_a_resend_gets_the_original_receipt(tmp_path: Path) -> None:
    local = _fleet(tmp_path, quorum=2)
    topics = Topics(local.fleet.name)
    updates = premade_updates(local)
    with GatewayThread(local.gateway_config) as gt:
        port = gt.gw.broker_port
        assert port is not None
        dev = device_client(local, 0, port)
        try:
            addr = local.devices[0].address
            dev.subscribe(topics.receipt(addr))
            dev.subscribe(topics.round())
            dev.expect(topics.round())

            def answer(payload: bytes) -> Receipt:
                dev.publish(topics.update(addr), payload)
                return Receipt.from_cbor(dev.expect(topics.receipt(addr)).payload)

            assert answer(b"\x00junk").reason is ReasonCode.MALFORMED
            assert answer(b"\xa1" + b"x" * 1_300_000).reason is ReasonCode.TOO_LARGE
            assert (
                answer(updates[1][2]).reason is ReasonCode.MALFORMED
            )  # device 1's update on device 0's topic
            tampered = bytearray(updates[0][2])
            tampered[-200] ^= 1  # inside the signature or payload: no longer what the device signed
            assert answer(bytes(tampered)).reason is ReasonCode.BAD_SIGNATURE
            first = answer(updates[0][2])
            assert first.accepted
            again = answer(updates[0][2])
            assert again.accepted and again.tx_hash == first.tx_hash
            assert dev.expect(topics.receipt(addr)).payload  # the DUPLICATE notice that follows the resend
        finally:
            dev.close()
        counts = gt.gw.store.rejection_counts()
        assert (
            counts.get("malformed") == 2 and counts.get("too_large") == 1 and counts.get("bad_signature") == 1
        )
        assert gt.gw.chain.ledger.get_round(1).count == 1


def test_http_endpoint_serves_health_metrics_and_a_read_only_chain(tmp_path: Path) -> None:
    import json
    import urllib.request

    from blockdeepnet.ledger import Artifact, rpc_web3

    local = _fleet(tmp_path, quorum=2)
    with GatewayThread(local.gateway_config) as gt:
        base = f"http://127.0.0.1:{gt.gw.http_port}"
        gt.wait_for("round_open")
        with urllib.request.urlopen(f"{base}/healthz", timeout=10) as r:
            health = json.loads(r.read())
        assert health["ok"] and health["broker_connected"] and health["round"] == 1
        with urllib.request.urlopen(f"{base}/metrics", timeout=10) as r:
            metrics = r.read().decode()
        assert (
            "bdn_current_round 1.0" in metrics
            and 'bdn_updates_rejected_total{reason="bad_signature"} 0.0' in metrics
        )
        w3 = rpc_web3(f"{base}/rpc")
        contract = w3.eth.contract(address=local.fleet.chain.contract, abi=Artifact.load().abi)
        assert w3.eth.chain_id == local.fleet.chain.chain_id
        assert bytes(contract.functions.getRound(1).call()[0]) == local.fleet.initial_model_hash()
        # Quantities come back as JSON-RPC hex strings, as from a node (devices read /rpc with plain JSON-RPC).
        ask = urllib.request.Request(
            f"{base}/rpc",
            data=json.dumps({"jsonrpc": "2.0", "id": 7, "method": "eth_chainId", "params": []}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(ask, timeout=10) as r:
            assert json.loads(r.read()) == {
                "jsonrpc": "2.0",
                "id": 7,
                "result": hex(local.fleet.chain.chain_id),
            }
        refused = urllib.request.Request(
            f"{base}/rpc",
            data=json.dumps(
                {"jsonrpc": "2.0", "id": 1, "method": "eth_sendRawTransaction", "params": ["0x00"]}
            ).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(refused, timeout=10) as r:
            assert json.loads(r.read())["error"]["code"] == -32601  # writes are not served


def test_gateway_on_postgresql(tmp_path: Path, pg_database: str) -> None:
    """The same round with the store on PostgreSQL (production), in a database of its own."""
    local = _fleet(tmp_path, devices=2)
    config = local.gateway_config
    config.write_text(config.read_text() + f'\n[store]\nurl = "{pg_database}"\n')
    topics = Topics(local.fleet.name)
    updates = premade_updates(local)
    with GatewayThread(config) as gt:
        port = gt.gw.broker_port
        assert port is not None
        clients = [device_client(local, k, port) for k in range(2)]
        try:
            clients[0].subscribe(topics.global_block(1))
            for _, topic, payload in updates:
                clients[[d.address for d in local.devices].index(topic.split("/")[-2])].publish(
                    topic, payload
                )
            block = GlobalBlock.from_cbor(clients[0].expect(topics.global_block(1), timeout=60).payload)
        finally:
            for c in clients:
                c.close()
        assert len(block.devices) == 2
        row = gt.gw.store.get_round(1)
        assert row is not None and row.status == "committed" and row.count == 2
        assert gt.gw.store.url.startswith("postgresql")


def test_a_round_without_enough_updates_is_extended_then_skipped(tmp_path: Path) -> None:
    local = _fleet(tmp_path, devices=3, min_updates=2, deadline_s=3.0, max_extensions=1, max_rounds=2)
    updates = premade_updates(local)
    with GatewayThread(local.gateway_config) as gt:
        port = gt.gw.broker_port
        assert port is not None
        dev = device_client(local, 0, port)
        try:
            gt.wait_for("round_open")
            dev.publish(*updates[0][1:])
            gt.wait_for("update_recorded")
            skipped = gt.wait_for("round_skipped", timeout=30)[0]
            assert skipped["round"] == 1 and "1 of min 2" in skipped["reason"]
            assert gt.named("round_extended")[0]["round"] == 1
            reopened = gt.wait_for("round_open", count=2, timeout=30)[1]
        finally:
            dev.close()
        assert reopened["round"] == 2
        assert reopened["base"] == local.fleet.initial_model_hash().hex()  # a skipped round changes no model
        row = gt.gw.store.get_round(1)
        assert row is not None and row.status == "skipped" and "1 of min 2" in (row.reason or "")
        assert not gt.gw.chain.ledger.get_round(1).committed
