"""The gateway store (gateway/store.py) on SQLite files in tmp_path.

:class:`StoreBehaviour` holds the checks every backend must pass; :class:`TestSQLiteStore` runs them on SQLite and
tests/integration/test_store_postgres.py runs the same class on PostgreSQL. Failures are forced with real database
triggers, not mocks, so atomicity is shown by the database itself.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from eth_utils.address import to_checksum_address
from sqlalchemy import create_engine, event, inspect, text
from sqlalchemy.engine import Engine

import gateway.store as store_module
from gateway.store import (
    MIGRATIONS,
    SCHEMA_VERSION,
    DeviceRow,
    DuplicateUpdate,
    EnrollmentUsed,
    Store,
    StoreError,
    StoreUnavailable,
    UpdateRow,
)

pytestmark = pytest.mark.timeout(60)

REPO = Path(__file__).resolve().parents[2]
A, B, C = (to_checksum_address(f"0x{n:040x}") for n in (0xA1, 0xB2, 0xC3))
FLEET = [(A, "alpha", 100, 1), (B, "bravo", 200, 2), (C, "charlie", 300, 0)]
BASE = b"\x01" * 32
PAYLOAD = bytes(range(256)) * 16  # 4 KB: blob behaviour without slowing the suite down


def h(n: int) -> bytes:
    """A recognisable 32-byte hash or tx hash."""
    return bytes([n]) * 32


def update(round: int, device: str, *, tag: int = 7, payload: bytes = PAYLOAD, **over: Any) -> dict[str, Any]:
    """add_update's keyword arguments for one update."""
    item: dict[str, Any] = {
        "round": round,
        "device": device,
        "payload_hash": h(tag),
        "samples": 50,
        "compute_ms": 1234,
        "signature": bytes([tag]) * 65,
        "payload": payload,
        "wire_bytes": len(payload) + 200,
        "received_at": 1000.0 + tag,
    }
    item.update(over)
    return item


def raw_engine(url: str) -> Engine:
    """A plain engine on the store's database, for what a test must do behind the store's back."""
    return create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1))


def run_sql(url: str, *statements: str) -> list[Any]:
    """Runs statements in one transaction; returns the rows of the last one (if it returns rows)."""
    engine = raw_engine(url)
    try:
        with engine.begin() as conn:
            result = None
            for statement in statements:
                result = conn.execute(text(statement))
            return list(result) if result is not None and result.returns_rows else []
    finally:
        engine.dispose()


def add_failing_trigger(url: str, table: str, op: str, when: str = "1 = 1") -> Callable[[], object]:
    """A real trigger that makes the database refuse ``op`` on ``table`` when ``when`` holds; returns its remover."""
    if url.startswith("sqlite"):
        run_sql(
            url,
            f"CREATE TRIGGER bdn_test_fail BEFORE {op} ON {table} WHEN {when} "
            "BEGIN SELECT RAISE(ABORT, 'forced failure'); END",
        )
        return lambda: run_sql(url, "DROP TRIGGER bdn_test_fail")
    run_sql(
        url,
        "CREATE FUNCTION bdn_test_fail() RETURNS trigger LANGUAGE plpgsql AS "
        "$$ BEGIN RAISE EXCEPTION 'forced failure'; END $$",
        f"CREATE TRIGGER bdn_test_fail BEFORE {op} ON {table} FOR EACH ROW WHEN ({when}) "
        "EXECUTE FUNCTION bdn_test_fail()",
    )
    return lambda: run_sql(url, f"DROP TRIGGER bdn_test_fail ON {table}", "DROP FUNCTION bdn_test_fail()")


def table_count(url: str, table: str) -> int:
    return int(run_sql(url, f"SELECT count(*) FROM {table}")[0][0])


def table_names(url: str) -> set[str]:
    engine = raw_engine(url)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


class StoreBehaviour:
    """What the store guarantees on any backend. A subclass provides ``db_url``: a fresh, empty database."""

    @pytest.fixture
    def store(self, db_url: str) -> Iterator[Store]:
        with Store(db_url) as s:
            yield s

    @pytest.fixture
    def ready(self, store: Store) -> Store:
        """A store with the three fleet devices and round 1 open."""
        store.upsert_devices(FLEET)
        store.open_round(1, BASE, 600, 100.0, 200.0)
        return store

    # ------------------------------------------------------------------------------------------- schema

    def test_fresh_database_is_created_at_the_latest_version(self, db_url: str, store: Store) -> None:
        assert store.schema_version == SCHEMA_VERSION == len(MIGRATIONS)
        assert run_sql(db_url, "SELECT version FROM schema_meta") == [(SCHEMA_VERSION,)]
        tables = table_names(db_url)
        assert {"schema_meta", "devices", "rounds", "updates", "outbox", "reports", "rejections"} <= tables
        store.close()
        with Store(db_url) as again:
            assert again.schema_version == SCHEMA_VERSION

    def test_a_v0_database_gets_the_schema_and_keeps_its_data(self, db_url: str, store: Store) -> None:
        store.close()
        run_sql(
            db_url,
            *(f"DROP TABLE {t}" for t in ("reports", "rejections", "outbox", "updates", "enrollments")),
        )
        run_sql(db_url, "DROP TABLE rounds", "DROP TABLE devices", "DROP TABLE schema_meta")
        run_sql(
            db_url,
            "CREATE TABLE operator_notes (note VARCHAR(40))",
            "INSERT INTO operator_notes VALUES ('hi')",
        )
        with Store(db_url) as s:
            assert s.schema_version == SCHEMA_VERSION
            assert s.devices() == []
        assert run_sql(db_url, "SELECT note FROM operator_notes") == [("hi",)]

    def test_a_version_1_database_gains_the_enrollments_table(self, db_url: str, ready: Store) -> None:
        ready.add_update(**update(1, A))
        ready.close()
        run_sql(db_url, "DROP TABLE enrollments", "UPDATE schema_meta SET version = 1")
        with Store(db_url) as s:
            assert s.schema_version == SCHEMA_VERSION == 2
            assert s.claim_enrollment("ab" * 16, "dev0", A, 1.0) == ("new", None)
            assert s.get_update(1, A) is not None

    def test_an_enrollment_token_is_used_once(self, store: Store) -> None:
        tid = "cd" * 16
        assert store.claim_enrollment(tid, "dev0", A, 1.0) == ("new", None)
        assert store.claim_enrollment(tid, "dev0", A, 2.0) == ("pending", None)  # the same device retries
        with pytest.raises(EnrollmentUsed, match="another device"):
            store.claim_enrollment(tid, "dev1", B, 3.0)
        store.finish_enrollment(tid, "sealed-bundle")
        assert store.claim_enrollment(tid, "dev0", A, 4.0) == ("done", "sealed-bundle")
        with pytest.raises(EnrollmentUsed):
            store.claim_enrollment(tid, "dev0", B, 5.0)

    def test_an_older_schema_is_upgraded_and_keeps_its_data(
        self, db_url: str, ready: Store, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        ready.add_update(**update(1, A))
        ready.close()
        latest = len(MIGRATIONS)

        def add_note(conn: Any) -> None:
            conn.execute(text("ALTER TABLE devices ADD COLUMN note VARCHAR(20) DEFAULT 'migrated'"))

        monkeypatch.setattr(store_module, "MIGRATIONS", (*MIGRATIONS, add_note))
        with Store(db_url) as s:
            assert s.schema_version == latest + 1
            assert s.get_update(1, A, with_payload=True) is not None
            assert [d.address for d in s.devices()] == sorted([A, B, C])
        assert run_sql(db_url, "SELECT version FROM schema_meta") == [(latest + 1,)]
        assert run_sql(db_url, f"SELECT note FROM devices WHERE address = '{A}'") == [("migrated",)]
        # Reopening runs nothing again (a second ALTER ... ADD COLUMN note would fail).
        with Store(db_url) as s:
            again = s.get_update(1, A, with_payload=True)
            assert again is not None and again.payload == PAYLOAD

    def test_a_failed_migration_changes_nothing(
        self, db_url: str, ready: Store, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        ready.close()

        def half_done(conn: Any) -> None:
            conn.execute(text("CREATE TABLE scratch (x INTEGER)"))
            conn.execute(text("UPDATE devices SET name = 'clobbered'"))
            raise RuntimeError("disk on fire")

        monkeypatch.setattr(store_module, "MIGRATIONS", (*MIGRATIONS, half_done))
        with pytest.raises(
            StoreError,
            match=rf"from schema version {SCHEMA_VERSION} to {SCHEMA_VERSION + 1} failed.*disk on fire",
        ):
            Store(db_url)
        monkeypatch.undo()
        with Store(db_url) as s:
            assert s.schema_version == SCHEMA_VERSION
            assert {d.name for d in s.devices()} == {"alpha", "bravo", "charlie"}
        assert "scratch" not in table_names(db_url)

    def test_a_newer_schema_is_refused(self, db_url: str, store: Store) -> None:
        store.close()
        run_sql(db_url, "UPDATE schema_meta SET version = 99")
        with pytest.raises(
            StoreError, match=rf"schema version 99, newer than this gateway's {SCHEMA_VERSION}"
        ):
            Store(db_url)

    def test_foreign_tables_without_a_version_are_refused(self, db_url: str, store: Store) -> None:
        store.close()
        run_sql(db_url, "DROP TABLE schema_meta")
        with pytest.raises(StoreError, match="no schema version"):
            Store(db_url)

    # ------------------------------------------------------------------------------------------ devices

    def test_devices_upsert_keeps_what_the_gateway_learned(self, store: Store) -> None:
        store.upsert_devices(FLEET)
        assert store.set_device_state(A, "online", 5.0) is True
        store.set_device_registered(A, "0x" + "AB" * 32)
        store.upsert_devices([(A.lower(), "alpha-2", 150, 3)])
        devices = {d.address: d for d in store.devices()}
        assert [d.address for d in store.devices()] == sorted([A, B, C])
        assert devices[A] == DeviceRow(A, "alpha-2", 150, 3, "online", 5.0, "0x" + "ab" * 32)
        assert devices[B] == DeviceRow(B, "bravo", 200, 2, "unknown", None, None)
        store.upsert_devices([])

    def test_device_state_of_an_unknown_or_garbage_address_is_a_no_op(self, store: Store) -> None:
        store.upsert_devices(FLEET)
        unknown = to_checksum_address("0x" + "99" * 20)
        assert store.set_device_state(unknown, "online", 1.0) is False
        assert store.set_device_state("not-an-address", "online", 1.0) is False
        assert store.set_device_state(B.lower(), "training", 2.0) is True
        assert {d.address: d.state for d in store.devices()}[B] == "training"
        with pytest.raises(StoreError, match="state must be one of"):
            store.set_device_state(A, "dancing", 1.0)
        with pytest.raises(StoreError, match="not in the store"):
            store.set_device_registered(unknown, "0x" + "00" * 32)
        with pytest.raises(StoreError, match="Ethereum address"):
            store.upsert_devices([("0x123", "short", 1, 0)])

    # ------------------------------------------------------------------------------------------- rounds

    def test_open_round_is_idempotent_for_the_same_base(self, store: Store) -> None:
        assert store.latest_round() is None and store.last_committed_round() is None
        first = store.open_round(1, BASE, 600, 100.0, 200.0)
        assert (first.round, first.status, first.extensions, first.published) == (1, "open", 0, False)
        assert store.open_round(1, BASE, 999, 300.0, 400.0) == first
        with pytest.raises(StoreError, match="already exists with base"):
            store.open_round(1, h(2), 600, 100.0, 200.0)
        assert store.get_round(2) is None

    def test_round_lifecycle(self, store: Store) -> None:
        store.open_round(1, BASE, 600, 100.0, 200.0)
        store.set_round_chain(1, h(0x0A), 12345)
        store.extend_round(1, 260.0)
        store.extend_round(1, 320.0)
        store.set_round_status(1, "closing")
        row = store.get_round(1)
        assert row is not None
        assert (row.status, row.open_tx, row.chain_deadline_block) == ("closing", h(0x0A), 12345)
        assert (row.deadline_at, row.extensions) == (320.0, 2)
        aggregate = os.urandom(3000)
        commit: dict[str, Any] = {
            "aggregate": aggregate,
            "aggregate_hash": h(0xAA),
            "merkle_root": h(0xBB),
            "count": 3,
            "weight_num": 450,
            "commit_tx": h(0xCC),
            "commit_gas": 99_000,
            "closed_at": 330.0,
        }
        store.commit_round(1, **commit)
        store.commit_round(1, **commit)  # a restart repeating the commit step
        with pytest.raises(StoreError, match="already committed"):
            store.commit_round(1, **{**commit, "aggregate_hash": h(0xAB)})
        with pytest.raises(StoreError, match="cannot become open"):
            store.set_round_status(1, "open")
        with pytest.raises(StoreError, match="no longer move"):
            store.extend_round(1, 400.0)
        committed = store.get_round(1)
        assert committed is not None and committed.aggregate is None
        assert (committed.status, committed.count, committed.weight_num, committed.closed_at) == (
            "committed",
            3,
            450,
            330.0,
        )
        assert (committed.aggregate_hash, committed.merkle_root, committed.commit_tx) == (
            h(0xAA),
            h(0xBB),
            h(0xCC),
        )
        assert committed.published is False
        store.mark_published(1)
        full = store.get_round(1, with_aggregate=True)
        assert full is not None and full.aggregate == aggregate and full.published

        store.open_round(2, h(0xAA), 600, 400.0, 500.0)
        with pytest.raises(StoreError, match="only a committed round"):
            store.mark_published(2)
        store.set_round_status(2, "skipped", "quorum not reached", at=510.0)
        with pytest.raises(StoreError, match="was skipped"):
            store.commit_round(2, **commit)
        skipped = store.get_round(2)
        assert skipped is not None
        assert (skipped.status, skipped.reason, skipped.closed_at) == ("skipped", "quorum not reached", 510.0)
        latest, last = store.latest_round(), store.last_committed_round(with_aggregate=True)
        assert latest is not None and latest.round == 2
        assert last is not None and last.round == 1 and last.aggregate == aggregate
        assert [r.round for r in store.rounds()] == [1, 2]
        assert all(r.aggregate is None for r in store.rounds())
        with pytest.raises(StoreError, match="must be one of"):
            store.set_round_status(2, "committed")
        with pytest.raises(StoreError, match="round 9 is not in the store"):
            store.extend_round(9, 1.0)

    # ------------------------------------------------------------------------------------------ updates

    def test_add_update_stores_it_with_its_outbox_row(self, ready: Store) -> None:
        row = ready.add_update(**update(1, A.lower()))
        assert isinstance(row, UpdateRow)
        assert (row.round, row.device, row.status, row.payload) == (1, A, "stored", None)
        assert (row.payload_hash, row.samples, row.compute_ms, row.wire_bytes) == (
            h(7),
            50,
            1234,
            len(PAYLOAD) + 200,
        )
        assert ready.get_update(1, A) == row
        full = ready.get_update(1, A, with_payload=True)
        assert full is not None and full.payload == PAYLOAD
        [outbox] = ready.pending_outbox()
        assert (outbox.kind, outbox.round, outbox.device, outbox.state, outbox.attempts) == (
            "submit",
            1,
            A,
            "pending",
            0,
        )
        assert ready.outbox_pending_count(1) == ready.outbox_pending_count() == 1
        assert ready.update_counts(1) == {"stored": 1, "recorded": 0, "rejected": 0}
        assert ready.get_update(1, B) is None

    def test_a_duplicate_update_raises_with_the_existing_row(self, ready: Store) -> None:
        first = ready.add_update(**update(1, A, tag=7))
        with pytest.raises(DuplicateUpdate) as caught:
            ready.add_update(**update(1, A, tag=8, payload=b"other"))
        assert caught.value.existing == first
        assert isinstance(caught.value, StoreError)
        stored = ready.get_update(1, A, with_payload=True)
        assert stored is not None and stored.payload == PAYLOAD
        assert ready.outbox_pending_count() == 1

    def test_add_updates_stores_a_batch_and_reports_duplicates_in_place(self, ready: Store) -> None:
        earlier = ready.add_update(**update(1, A, tag=1))
        results = ready.add_updates(
            [update(1, B, tag=2), update(1, A, tag=3), update(1, C, tag=4), update(1, B, tag=5)]
        )
        assert [type(r) for r in results] == [UpdateRow, DuplicateUpdate, UpdateRow, DuplicateUpdate]
        assert isinstance(results[1], DuplicateUpdate) and results[1].existing == earlier
        assert isinstance(results[3], DuplicateUpdate) and results[3].existing == results[0]
        assert ready.update_counts(1)["stored"] == 3
        assert sorted(o.device or "" for o in ready.pending_outbox()) == sorted([A, B, C])
        assert ready.add_updates([]) == []

    def test_an_update_needs_a_known_round_and_device_and_valid_fields(self, ready: Store) -> None:
        stranger = to_checksum_address("0x" + "77" * 20)
        with pytest.raises(StoreError, match="round 5 is not in the store"):
            ready.add_update(**update(5, A))
        with pytest.raises(StoreError, match=f"device {stranger} is not in the store"):
            ready.add_updates([update(1, B), update(1, stranger)])
        with pytest.raises(StoreError, match="signature must be 65 bytes"):
            ready.add_update(**update(1, A, signature=b"\x00" * 64))
        with pytest.raises(StoreError, match="samples must be an integer"):
            ready.add_update(**update(1, A, samples=True))
        with pytest.raises(TypeError, match="wire_bytes"):
            ready.add_updates([{k: v for k, v in update(1, A).items() if k != "wire_bytes"}])
        assert ready.update_counts(1) == {"stored": 0, "recorded": 0, "rejected": 0}
        assert ready.outbox_pending_count() == 0

    def test_uint64_fields_from_devices_round_trip_exactly(self, ready: Store) -> None:
        top = 2**64 - 1
        ready.add_update(**update(1, A, compute_ms=top, samples=2**63))
        row = ready.get_update(1, A)
        assert row is not None and (row.compute_ms, row.samples) == (top, 2**63)
        ready.add_rejection(1.0, top, "garbage", "late", "round from the future")
        assert ready.recent_rejections()[0].round == top
        ready.add_report(1, B, top, 0.5, None, 2.0)
        assert ready.reports(1)[0].samples == top

    def test_rounds_no_row_can_have_are_not_found(self, ready: Store) -> None:
        # A hostile update may name any uint64 round; looking it up must find nothing, not overflow the driver.
        for far in (2**63, 2**64 - 1, -1):
            assert ready.get_round(far) is None and ready.get_update(far, A) is None
            assert ready.recorded_updates(far) == [] and ready.reports(far) == []
            assert ready.update_counts(far) == {"stored": 0, "recorded": 0, "rejected": 0}
            assert ready.outbox_pending_count(far) == 0
            with pytest.raises(StoreError, match="round must be an integer"):
                ready.extend_round(far, 1.0)
        with pytest.raises(StoreError, match="outbox_id must be an integer"):
            ready.mark_done(2**64)

    def test_update_and_outbox_row_are_stored_together_or_not_at_all(self, db_url: str, ready: Store) -> None:
        remove = add_failing_trigger(db_url, "outbox", "INSERT")
        with pytest.raises(StoreError, match="forced failure"):
            ready.add_update(**update(1, A))
        assert ready.get_update(1, A) is None
        assert table_count(db_url, "updates") == table_count(db_url, "outbox") == 0
        remove()
        ready.add_update(**update(1, A))
        assert table_count(db_url, "updates") == table_count(db_url, "outbox") == 1

    def test_a_batch_is_stored_whole_or_not_at_all(self, db_url: str, ready: Store) -> None:
        remove = add_failing_trigger(db_url, "outbox", "INSERT", f"NEW.device = '{C}'")
        with pytest.raises(StoreError, match="forced failure"):
            ready.add_updates([update(1, A), update(1, B), update(1, C)])
        assert table_count(db_url, "updates") == table_count(db_url, "outbox") == 0
        remove()
        assert all(
            isinstance(r, UpdateRow) for r in ready.add_updates([update(1, A), update(1, B), update(1, C)])
        )

    def test_recording_updates_update_and_outbox_together(self, db_url: str, ready: Store) -> None:
        ready.add_update(**update(1, A))
        remove = add_failing_trigger(db_url, "outbox", "UPDATE")
        with pytest.raises(StoreError, match="forced failure"):
            ready.mark_recorded(1, A, tx_hash=h(0x51), block_number=10, log_index=0, gas_used=50_000)
        row = ready.get_update(1, A)
        assert row is not None and (row.status, row.tx_hash) == ("stored", None)
        remove()
        ready.mark_recorded(1, A, tx_hash=h(0x51), block_number=10, log_index=0, gas_used=50_000)
        row = ready.get_update(1, A)
        assert row is not None and (row.status, row.tx_hash, row.gas_used) == ("recorded", h(0x51), 50_000)

    def test_mark_recorded_and_rejected(self, ready: Store) -> None:
        ready.add_updates([update(1, A), update(1, B), update(1, C)])
        ready.mark_recorded(1, A, tx_hash=h(0x51), block_number=10, log_index=1, gas_used=51_000)
        ready.mark_rejected(1, B, "chain_error", "DuplicateSubmission()")
        counts = ready.update_counts(1)
        assert counts == {"stored": 1, "recorded": 1, "rejected": 1}
        rejected = ready.get_update(1, B)
        assert rejected is not None
        assert (rejected.status, rejected.reason, rejected.detail) == (
            "rejected",
            "chain_error",
            "DuplicateSubmission()",
        )
        assert [(o.device, o.state) for o in ready.pending_outbox()] == [(C, "pending")]
        assert ready.outbox_pending_count(1) == 1
        with pytest.raises(StoreError, match="recorded on chain"):
            ready.mark_rejected(1, A, "chain_error", "too late")
        # Reconciliation may find a 'rejected' update on chain after all: the chain wins.
        ready.mark_recorded(1, B, tx_hash=h(0x52), block_number=11, log_index=0, gas_used=52_000)
        recorded = ready.get_update(1, B)
        assert recorded is not None and (recorded.status, recorded.reason) == ("recorded", None)
        with pytest.raises(StoreError, match="has no update from"):
            ready.mark_recorded(2, A, tx_hash=h(1), block_number=1, log_index=0, gas_used=1)

    def test_recorded_updates_come_in_chain_order(self, ready: Store) -> None:
        payloads = {A: b"a" * 100, B: b"b" * 100, C: b"c" * 100}
        ready.add_updates([update(1, d, payload=p) for d, p in payloads.items()])
        ready.mark_recorded(1, A, tx_hash=h(1), block_number=12, log_index=0, gas_used=1)
        ready.mark_recorded(1, B, tx_hash=h(2), block_number=11, log_index=3, gas_used=1)
        ready.mark_recorded(1, C, tx_hash=h(3), block_number=11, log_index=1, gas_used=1)
        rows = ready.recorded_updates(1)
        assert [r.device for r in rows] == [C, B, A]
        assert all(r.payload is None for r in rows)
        assert [r.payload for r in ready.recorded_updates(1, with_payload=True)] == [
            payloads[C],
            payloads[B],
            payloads[A],
        ]
        assert ready.recorded_updates(2) == []

    def test_payloads_are_not_read_unless_asked_for(self, ready: Store) -> None:
        ready.add_updates([update(1, d, payload=os.urandom(1_077_248)) for d in (A, B, C)])
        for d in (A, B, C):
            ready.mark_recorded(1, d, tx_hash=h(1), block_number=1, log_index=int(d[-1], 16), gas_used=1)
        ready.commit_round(
            1,
            aggregate=os.urandom(1_077_248),
            aggregate_hash=h(1),
            merkle_root=h(2),
            count=3,
            weight_num=150,
            commit_tx=h(3),
            commit_gas=1,
            closed_at=1.0,
        )
        blob_column = re.compile(r"\b(updates\.payload|rounds\.aggregate)\b(?!_)")
        statements: list[str] = []
        engine = ready._engine

        def listener(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
            statements.append(statement)

        event.listen(engine, "before_cursor_execute", listener)
        try:
            ready.recorded_updates(1)
            ready.get_update(1, A)
            ready.rounds()
            ready.get_round(1)
            ready.last_committed_round()
            ready.mark_recorded(1, A, tx_hash=h(1), block_number=1, log_index=0, gas_used=1)
            assert statements and not [s for s in statements if blob_column.search(s)]
            ready.recorded_updates(1, with_payload=True)
            ready.get_round(1, with_aggregate=True)
            assert len([s for s in statements if blob_column.search(s)]) == 2
        finally:
            event.remove(engine, "before_cursor_execute", listener)

    def test_an_update_survives_a_kill_right_after_add_update(self, db_url: str, ready: Store) -> None:
        ready.close()
        script = textwrap.dedent(
            """
            import sys, time
            from gateway.store import Store
            url, device = sys.argv[1], sys.argv[2]
            store = Store(url)
            store.add_update(round=1, device=device, payload_hash=bytes(32), samples=5, compute_ms=9,
                             signature=bytes(65), payload=bytes(range(256)) * 4096, wire_bytes=1, received_at=1.0)
            print("stored", flush=True)
            time.sleep(60)
            """
        )
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        child = subprocess.Popen(
            [sys.executable, "-c", script, db_url, A],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
            env=env,
        )
        try:
            line = child.stdout.readline() if child.stdout else ""
            assert line.strip() == "stored", child.stderr.read() if child.stderr else ""
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait()
            for stream in (child.stdout, child.stderr):
                if stream:
                    stream.close()
        assert child.returncode == -signal.SIGKILL
        with Store(db_url) as s:
            row = s.get_update(1, A, with_payload=True)
            assert row is not None and row.payload == bytes(range(256)) * 4096
            assert [(o.kind, o.device) for o in s.pending_outbox()] == [("submit", A)]

    # ------------------------------------------------------------------------------------------- outbox

    def test_enqueue_is_idempotent(self, ready: Store) -> None:
        first = ready.enqueue("open_round", 1)
        assert (first.kind, first.round, first.device, first.state) == ("open_round", 1, None, "pending")
        assert ready.enqueue("open_round", 1) == first
        register = ready.enqueue("register", device=B.lower())
        assert register.device == B and ready.enqueue("register", None, B) == register
        commit = ready.enqueue("commit", 1)
        assert len({first.id, register.id, commit.id}) == 3
        ready.mark_done(first.id, h(9))
        assert ready.enqueue("open_round", 1).state == "done"
        with pytest.raises(StoreError, match="kind must be one of"):
            ready.enqueue("mint", 1)
        with pytest.raises(StoreError, match="round 4 is not in the store"):
            ready.enqueue("open_round", 4)
        with pytest.raises(StoreError, match="is not in the store"):
            ready.enqueue("register", device=to_checksum_address("0x" + "66" * 20))

    def test_outbox_entries_move_from_pending_to_sent_to_done_or_failed(self, ready: Store) -> None:
        ready.add_update(**update(1, A))
        open_ = ready.enqueue("open_round", 1)
        reg_b, reg_c = ready.enqueue("register", device=B), ready.enqueue("register", device=C)
        submit = ready.pending_outbox(["submit"])[0]
        assert [o.id for o in ready.pending_outbox()] == sorted([submit.id, open_.id, reg_b.id, reg_c.id])
        assert [o.id for o in ready.pending_outbox(limit=2)] == sorted(
            [submit.id, open_.id, reg_b.id, reg_c.id]
        )[:2]
        assert [o.kind for o in ready.pending_outbox({"register"})] == ["register", "register"]

        ready.mark_sent(open_.id, h(0x21))
        ready.mark_sent(open_.id, h(0x22))  # a resend with a new transaction
        sent = next(o for o in ready.pending_outbox() if o.id == open_.id)
        assert (sent.state, sent.tx_hash, sent.attempts) == ("sent", h(0x22), 2)
        assert sent.updated_at >= sent.created_at
        ready.mark_done(open_.id)
        ready.mark_failed(reg_b.id, "reverted: AlreadyRegistered()")
        remaining = ready.pending_outbox()
        assert sorted(o.id for o in remaining) == sorted([submit.id, reg_c.id])
        assert ready.outbox_pending_count() == 2 and ready.outbox_pending_count(1) == 1
        with pytest.raises(StoreError, match="is done"):
            ready.mark_sent(open_.id, h(0x23))
        with pytest.raises(StoreError, match="is done"):
            ready.mark_failed(open_.id, "no")
        ready.mark_sent(reg_b.id, h(0x24))  # a failed entry may be retried
        with pytest.raises(StoreError, match="does not exist"):
            ready.mark_done(10_000)
        with pytest.raises(StoreError, match="tx_hash must be 32 bytes"):
            ready.mark_sent(reg_c.id, b"short")

    # ---------------------------------------------------------------------------------- reports, rejections

    def test_reports_are_upserted(self, ready: Store) -> None:
        ready.add_report(1, B, 200, 0.9, None, 10.0)
        ready.add_report(1, A, 100, 0.5, 0.81, 11.0)
        ready.add_report(1, B, 200, 0.7, 0.75, 12.0)
        assert [(r.device, r.loss, r.accuracy, r.at) for r in ready.reports(1)] == [
            (A, 0.5, 0.81, 11.0),
            (B, 0.7, 0.75, 12.0),
        ]
        assert ready.reports(2) == []
        with pytest.raises(StoreError, match="round 3 is not in the store"):
            ready.add_report(3, A, 1, 0.1, None, 1.0)
        with pytest.raises(StoreError, match="loss must be a finite number"):
            ready.add_report(1, A, 1, float("nan"), None, 1.0)

    def test_rejections_are_logged_counted_and_pruned(self, store: Store) -> None:
        for i in range(12):
            store.add_rejection(float(i), i, A, "late" if i % 3 else "bad_signature", f"message {i}")
        assert store.rejection_counts() == {"late": 8, "bad_signature": 4}
        recent = store.recent_rejections(3)
        assert [(r.at, r.detail) for r in recent] == [
            (11.0, "message 11"),
            (10.0, "message 10"),
            (9.0, "message 9"),
        ]
        assert store.prune_rejections(keep=5) == 7
        assert [r.round for r in store.recent_rejections()] == [11, 10, 9, 8, 7]
        assert store.prune_rejections(keep=5) == 0
        assert store.prune_rejections(keep=0) == 5
        assert store.rejection_counts() == {}

    def test_hostile_rejection_text_is_stored_safely(self, store: Store) -> None:
        store.add_rejection(1.0, None, "dev/\x00evil\udcff", "malformed", "x" * 100_000 + "\x00")
        store.add_rejection(2.0, None, None, "too_large", "")
        older, newest = store.recent_rejections()[1], store.recent_rejections()[0]
        assert newest.device is None and newest.detail == ""
        assert (
            older.device is not None
            and "\x00" not in older.device
            and older.device.startswith("dev/\\x00evil")
        )
        assert len(older.detail) == store_module.TEXT_MAX_CHARS

    # ------------------------------------------------------------------------------------------- general

    def test_stores_opened_at_once_on_a_fresh_database_agree(self, db_url: str) -> None:
        # Two gateway processes (or the gateway and `bdn audit`) starting together must not both create the schema.
        opened: list[Store] = []
        errors: list[BaseException] = []

        def open_one() -> None:
            try:
                opened.append(Store(db_url))
            except BaseException as exc:
                errors.append(exc)

        workers = [threading.Thread(target=open_one) for _ in range(4)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        try:
            assert errors == [] and [s.schema_version for s in opened] == [SCHEMA_VERSION] * 4
            opened[0].upsert_devices(FLEET)
            assert len(opened[3].devices()) == 3
        finally:
            for s in opened:
                s.close()

    def test_a_closed_store_refuses_work(self, store: Store) -> None:
        store.close()
        store.close()
        with pytest.raises(StoreError, match="closed"):
            store.devices()

    def test_a_store_opened_in_one_thread_works_in_another(self, ready: Store) -> None:
        results: list[object] = []
        worker = threading.Thread(target=lambda: results.append(ready.add_update(**update(1, C))))
        worker.start()
        worker.join()
        assert isinstance(results[0], UpdateRow)
        assert ready.get_update(1, C) == results[0]

    def test_large_blobs_round_trip(self, ready: Store) -> None:
        blob = os.urandom(1_077_248)
        ready.add_update(**update(1, A, payload=blob))
        row = ready.get_update(1, A, with_payload=True)
        assert row is not None and row.payload == blob


class TestSQLiteStore(StoreBehaviour):
    @pytest.fixture
    def db_url(self, tmp_path: Path) -> str:
        return f"sqlite:///{tmp_path / 'gateway.db'}"


# ---------------------------------------------------------------------------------------------- SQLite only


def test_sqlite_connections_are_durable_and_strict(tmp_path: Path) -> None:
    with Store(f"sqlite:///{tmp_path / 'g.db'}") as s, s._engine.connect() as conn:
        pragma = {p: conn.exec_driver_sql(f"PRAGMA {p}").scalar() for p in ("journal_mode", "synchronous")}
        pragma |= {p: conn.exec_driver_sql(f"PRAGMA {p}").scalar() for p in ("foreign_keys", "busy_timeout")}
        assert pragma == {"journal_mode": "wal", "synchronous": 2, "foreign_keys": 1, "busy_timeout": 10_000}


def test_an_in_memory_store_is_one_database_across_threads() -> None:
    with Store("sqlite://") as s:
        s.upsert_devices(FLEET)
        seen: list[list[DeviceRow]] = []
        worker = threading.Thread(target=lambda: seen.append(s.devices()))
        worker.start()
        worker.join()
        assert len(seen[0]) == 3


def test_a_missing_directory_is_named(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match=f"directory {tmp_path / 'nope'} does not exist"):
        Store(f"sqlite:///{tmp_path / 'nope' / 'g.db'}")


def test_urls_are_checked_and_passwords_never_shown() -> None:
    for url in (
        "mysql://root:hunter2@db/x",
        "postgresql+psycopg2://u:hunter2@db/x",
        "postgresql://u:hunter2@h:port/x",
    ):
        with pytest.raises(StoreError, match="URL") as caught:
            Store(url)
        assert "hunter2" not in str(caught.value)
    assert store_module._redact("postgresql://u:hunter2@h/db") == "postgresql://u:***@h/db"
    assert store_module._resolve_url("postgresql://u@h/db").drivername == "postgresql+psycopg"
    assert store_module._resolve_url("postgres://u@h/db").drivername == "postgresql+psycopg"


def test_an_unreachable_postgres_is_reported_without_the_password() -> None:
    with pytest.raises(StoreUnavailable) as caught:
        Store("postgresql://gateway:hunter2@127.0.0.1:1/bdn")
    message = str(caught.value)
    assert "hunter2" not in message and "hunter2" not in repr(caught.value.__cause__)
    assert "cannot connect to PostgreSQL at postgresql+psycopg://gateway:***@127.0.0.1:1/bdn" in message
    assert "check that PostgreSQL is running" in message
