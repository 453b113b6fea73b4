"""The gateway's durable state (DESIGN §5, §6): devices, rounds, updates with their ciphertext payloads, the
chain outbox, device reports and a bounded log of rejected messages, on SQLAlchemy 2.

Why it is built this way:

- **Nothing acknowledged may be lost.** The gateway acknowledges an MQTT update only after :meth:`Store.add_update`
  (or :meth:`Store.add_updates`) returned, so every method commits its own transaction before it returns and
  SQLite runs in WAL mode with ``synchronous=FULL``: a returned commit is on disk, not only in the OS cache, and
  survives a power cut as well as a killed process.
- **An update and its outbox row are one fact.** The relay sends what the outbox holds (DESIGN §5), so an update
  is inserted together with its ``submit`` outbox row in one transaction, and recording/rejecting it updates both
  in one transaction: there is never an update the relay does not know about, nor an outbox row without its
  update.
- **Blobs on demand.** Payloads and aggregates are ~1 MB each. They are deferred columns that no query loads
  unless the caller asks (``with_payload`` / ``with_aggregate``): listing a round's updates reads kilobytes.
- **Plain rows out.** Methods return frozen dataclasses, never ORM objects tied to a session, so callers cannot
  trigger lazy loads or accidental writes, and rows can cross threads or be logged.
- **The app owns its schema.** A ``schema_meta`` table holds the schema version; :data:`MIGRATIONS` upgrades an
  older database in one transaction at open (all or nothing on both backends), and a database written by newer
  code is refused rather than misread.
- **Secrets stay out of messages.** A database URL's password never appears in a log line, an exception message
  or ``repr(store)``.

Backends: SQLite by default (``sqlite:///path/to/gateway.db``) and PostgreSQL for production
(``postgresql://user:password@host/db``, driven by psycopg 3). Each method opens its own session, and the engine's
pool is thread-safe, so the asyncio gateway can call the store from a worker thread (several threads or processes
work too; SQLite then serialises the writers). ``sqlite://`` (in memory) is one shared connection, for tests.

Errors: everything raises :class:`StoreError` (only an :meth:`Store.add_updates` item with a missing or unknown
key raises TypeError, as a wrong keyword argument would). :class:`StoreUnavailable` (a subclass) means the database could not
be reached or written (connection lost, disk full, locked for too long): worth retrying later. Any other
StoreError is a refusal (invalid argument, unknown round, a state change that makes no sense) that a retry will
not fix. :class:`DuplicateUpdate` (a subclass) carries the update already stored for that round and device.
"""

from __future__ import annotations

import logging
import math
import re
import threading
import time
import zlib
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, Final, TypeVar, cast
from urllib.parse import quote

from eth_utils.address import to_checksum_address
from sqlalchemy import (
    BigInteger,
    Connection,
    CursorResult,
    Double,
    Engine,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    create_engine,
    delete,
    event,
    func,
    inspect,
    select,
    text,
)
from sqlalchemy.engine import URL, Dialect, make_url
from sqlalchemy.exc import (
    ArgumentError,
    DBAPIError,
    DisconnectionError,
    IntegrityError,
    InterfaceError,
    NoSuchModuleError,
    OperationalError,
    SQLAlchemyError,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker, undefer
from sqlalchemy.pool import StaticPool

__all__ = [
    "DEVICE_STATES",
    "MIGRATIONS",
    "OUTBOX_KINDS",
    "OUTBOX_STATES",
    "ROUND_STATUSES",
    "SCHEMA_VERSION",
    "UPDATE_STATUSES",
    "DeviceRow",
    "DuplicateUpdate",
    "EnrollmentUsed",
    "OutboxRow",
    "RejectionRow",
    "ReportRow",
    "RoundRow",
    "Store",
    "StoreError",
    "StoreUnavailable",
    "UpdateRow",
]

log = logging.getLogger(__name__)

DEVICE_STATES: Final = frozenset({"unknown", "online", "offline", "training", "error"})
ROUND_STATUSES: Final = frozenset({"open", "closing", "committed", "skipped"})
UPDATE_STATUSES: Final = ("stored", "recorded", "rejected")
OUTBOX_KINDS: Final = frozenset({"submit", "open_round", "commit", "register"})
OUTBOX_STATES: Final = frozenset({"pending", "sent", "done", "failed"})

SQLITE_BUSY_TIMEOUT_MS: Final = 10_000
"""How long a SQLite writer waits for another writer (e.g. a second process on the same file) before giving up."""
PG_CONNECT_TIMEOUT_S: Final = 10
"""libpq waits forever for an unreachable host by default; the gateway should fail with a message instead."""
TEXT_MAX_CHARS: Final = 2000
"""Longest reason/detail/error text kept: rejection details can echo hostile input, which must stay bounded."""

_INT64_LIMIT: Final = 1 << 63
_UINT64_LIMIT: Final = 1 << 64
_ADDRESS_RE: Final = re.compile(r"0x[0-9a-fA-F]{40}")
_WRITE_OPTION: Final = "bdn_write"
_PG_MIGRATION_LOCK: Final = zlib.crc32(b"blockdeepnet gateway store schema")
_T = TypeVar("_T")


# ------------------------------------------------------------------------------------------------------ errors


class StoreError(Exception):
    """The store refused an operation or the database failed; the message says which and what to check."""


class StoreUnavailable(StoreError):
    """The database could not be reached or written (connection lost, disk full, locked too long): retry later."""


class EnrollmentUsed(StoreError):
    """The enrollment token was already redeemed by another device."""


class DuplicateUpdate(StoreError):
    """An update for this round and device is already stored; ``existing`` is that row (without payload).

    The gateway compares ``existing.payload_hash`` with the new message's: equal means a resend (answer with the
    original receipt), different means a second, conflicting update (``duplicate``)."""

    def __init__(self, existing: UpdateRow) -> None:
        super().__init__(
            f"round {existing.round}: an update from {existing.device} is already stored "
            f"(id {existing.id}, payload hash 0x{existing.payload_hash.hex()}, status {existing.status})"
        )
        self.existing = existing


# -------------------------------------------------------------------------------------------------------- rows


@dataclass(frozen=True, slots=True)
class DeviceRow:
    address: str
    name: str
    samples: int
    key_share: int
    state: str
    last_seen: float | None
    registered_tx: str | None


@dataclass(frozen=True, slots=True)
class RoundRow:
    """A round. ``aggregate`` is ``None`` unless it was asked for (``with_aggregate=True``) and the round is
    committed; ``aggregate_hash`` tells whether there is one without loading it."""

    round: int
    status: str
    base_hash: bytes
    total_samples: int
    opened_at: float
    deadline_at: float
    extensions: int
    open_tx: bytes | None
    chain_deadline_block: int | None
    closed_at: float | None
    aggregate_hash: bytes | None
    merkle_root: bytes | None
    count: int | None
    weight_num: int | None
    commit_tx: bytes | None
    commit_gas: int | None
    published: bool
    reason: str | None
    aggregate: bytes | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class UpdateRow:
    """A stored update. ``payload`` is ``None`` unless it was asked for (``with_payload=True``)."""

    id: int
    round: int
    device: str
    payload_hash: bytes
    samples: int
    compute_ms: int
    signature: bytes
    wire_bytes: int
    received_at: float
    status: str
    tx_hash: bytes | None
    block_number: int | None
    log_index: int | None
    gas_used: int | None
    reason: str | None
    detail: str | None
    payload: bytes | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class OutboxRow:
    id: int
    kind: str
    round: int | None
    device: str | None
    state: str
    tx_hash: bytes | None
    attempts: int
    error: str | None
    created_at: float
    updated_at: float


@dataclass(frozen=True, slots=True)
class ReportRow:
    round: int
    device: str
    samples: int
    loss: float
    accuracy: float | None
    at: float


@dataclass(frozen=True, slots=True)
class RejectionRow:
    id: int
    at: float
    round: int | None
    device: str | None
    reason: str
    detail: str


# ------------------------------------------------------------------------------------------------------ schema


class _UInt64(TypeDecorator[int]):
    """An unsigned 64-bit integer (the wire's uint range) kept exactly in a signed BIGINT column.

    Devices sign ``samples`` and ``compute_ms`` as uint64 and hostile messages carry any uint64 round, so a value
    >= 2**63 must store and read back exactly instead of overflowing the column, failing the insert and
    redelivering the same poison message forever. Values >= 2**63 are stored as their two's-complement negative;
    storage is exact, SQL comparisons and sums over such values are not (nothing here sorts or sums them)."""

    impl = BigInteger
    cache_ok = True

    def process_bind_param(self, value: int | None, dialect: Dialect) -> int | None:
        if value is None:
            return None
        return value - _UINT64_LIMIT if value >= _INT64_LIMIT else value

    def process_result_value(self, value: int | None, dialect: Dialect) -> int | None:
        if value is None:
            return None
        return value + _UINT64_LIMIT if value < 0 else value


# SQLite only auto-increments a column declared exactly INTEGER PRIMARY KEY; PostgreSQL wants BIGINT.
_BIGINT = BigInteger().with_variant(Integer(), "sqlite")
_ADDRESS = String(42)
_SHORT = String(16)

# Deterministic constraint names, so a later migration can alter or drop them by name on PostgreSQL.
_NAMING: Final = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class _Base(DeclarativeBase):
    metadata = MetaData(naming_convention=_NAMING)
    type_annotation_map: ClassVar[dict[Any, Any]] = {
        int: _BIGINT,
        float: Double(),
        bytes: LargeBinary(),
        str: Text(),
    }


class _SchemaMeta(_Base):
    __tablename__ = "schema_meta"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    version: Mapped[int]
    migrated_at: Mapped[float]


class _Device(_Base):
    __tablename__ = "devices"

    address: Mapped[str] = mapped_column(_ADDRESS, primary_key=True)
    name: Mapped[str]
    samples: Mapped[int]
    key_share: Mapped[int]
    state: Mapped[str] = mapped_column(_SHORT)
    last_seen: Mapped[float | None]
    registered_tx: Mapped[str | None] = mapped_column(String(66))


class _Round(_Base):
    __tablename__ = "rounds"
    __table_args__ = (Index("ix_rounds_status_round", "status", "round"),)

    round: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    status: Mapped[str] = mapped_column(_SHORT)
    base_hash: Mapped[bytes]
    total_samples: Mapped[int]
    opened_at: Mapped[float]
    deadline_at: Mapped[float]
    extensions: Mapped[int]
    open_tx: Mapped[bytes | None]
    chain_deadline_block: Mapped[int | None]
    closed_at: Mapped[float | None]
    aggregate: Mapped[bytes | None] = mapped_column(deferred=True)
    aggregate_hash: Mapped[bytes | None]
    merkle_root: Mapped[bytes | None]
    count: Mapped[int | None]
    weight_num: Mapped[int | None]
    commit_tx: Mapped[bytes | None]
    commit_gas: Mapped[int | None]
    published: Mapped[bool]
    reason: Mapped[str | None]


class _Update(_Base):
    __tablename__ = "updates"
    __table_args__ = (
        UniqueConstraint("round", "device"),
        Index("ix_updates_round_status", "round", "status"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    round: Mapped[int] = mapped_column(ForeignKey("rounds.round"))
    device: Mapped[str] = mapped_column(_ADDRESS, ForeignKey("devices.address"))
    payload_hash: Mapped[bytes]
    samples: Mapped[int] = mapped_column(_UInt64())
    compute_ms: Mapped[int] = mapped_column(_UInt64())
    signature: Mapped[bytes]
    payload: Mapped[bytes] = mapped_column(deferred=True)
    wire_bytes: Mapped[int]
    received_at: Mapped[float]
    status: Mapped[str] = mapped_column(_SHORT)
    tx_hash: Mapped[bytes | None]
    block_number: Mapped[int | None]
    log_index: Mapped[int | None]
    gas_used: Mapped[int | None]
    reason: Mapped[str | None]
    detail: Mapped[str | None]


class _Outbox(_Base):
    """``dedup_key`` ('submit/3/0xAb..', 'open_round/4/-') is the idempotency key: SQL treats NULLs in a UNIQUE
    constraint as distinct, so UNIQUE(kind, round, device) would let 'open_round' rows (device NULL) repeat."""

    __tablename__ = "outbox"
    __table_args__ = (
        Index("ix_outbox_state_id", "state", "id"),
        Index("ix_outbox_round_state", "round", "state"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(_SHORT)
    round: Mapped[int | None] = mapped_column(ForeignKey("rounds.round"))
    device: Mapped[str | None] = mapped_column(_ADDRESS, ForeignKey("devices.address"))
    dedup_key: Mapped[str] = mapped_column(String(128), unique=True)
    state: Mapped[str] = mapped_column(_SHORT)
    tx_hash: Mapped[bytes | None]
    attempts: Mapped[int]
    error: Mapped[str | None]
    created_at: Mapped[float]
    updated_at: Mapped[float]


class _Report(_Base):
    __tablename__ = "reports"

    round: Mapped[int] = mapped_column(ForeignKey("rounds.round"), primary_key=True, autoincrement=False)
    device: Mapped[str] = mapped_column(_ADDRESS, ForeignKey("devices.address"), primary_key=True)
    samples: Mapped[int] = mapped_column(_UInt64())
    loss: Mapped[float]
    accuracy: Mapped[float | None]
    at: Mapped[float]


class _Rejection(_Base):
    """Rejected messages come from anyone: round is any uint64, device any topic segment (no foreign keys)."""

    __tablename__ = "rejections"

    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[float]
    round: Mapped[int | None] = mapped_column(_UInt64())
    device: Mapped[str | None]
    reason: Mapped[str]
    detail: Mapped[str]


class _Enrollment(_Base):
    """One row per redeemed enrollment token: its id is unique, so a token is used once. ``bundle`` is the answer
    already sealed to the device's key, kept so a device whose answer was lost can ask again with the same token
    and key (it is useless to anyone else)."""

    __tablename__ = "enrollments"

    token_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str]
    address: Mapped[str] = mapped_column(_ADDRESS)
    state: Mapped[str] = mapped_column(_SHORT)  # pending | done
    at: Mapped[float]
    bundle: Mapped[str | None]


# -------------------------------------------------------------------------------------------------- migrations

Migration = Callable[[Connection], None]
_META: Final = _Base.metadata.tables["schema_meta"]


def _create_schema(conn: Connection) -> None:
    """Version 0 -> latest: a fresh database gets every table of the current models in one go and is then
    stamped with the latest version (Alembic's create-and-stamp), so the upgrade steps below never run on it."""
    _Base.metadata.create_all(conn)


def _add_enrollments(conn: Connection) -> None:
    """Version 1 -> 2: the enrollments table (issue 6: devices join through one-time tokens)."""
    _Enrollment.__table__.create(conn)  # type: ignore[attr-defined]


MIGRATIONS: tuple[Migration, ...] = (_create_schema, _add_enrollments)
"""``MIGRATIONS[0]`` creates the current schema on an empty database; ``MIGRATIONS[v]`` (v >= 1) upgrades a
version-v database to v + 1 and must leave it exactly as ``_create_schema`` would (same tables, columns,
indexes), keeping every row. The schema version is ``len(MIGRATIONS)``. To change the schema: change the models
and append one step; never edit a released step."""

SCHEMA_VERSION: Final = len(MIGRATIONS)


# ------------------------------------------------------------------------------------------------ URL handling


def _redact(url: str) -> str:
    """``url`` with any password replaced by ``***``, even when the URL does not parse."""
    return re.sub(r"(://[^:/@?#]*:)[^@/?#]*@", r"\1***@", url)


def _resolve_url(url: str) -> URL:
    """Parse and normalise: ``postgresql://`` and ``postgres://`` mean psycopg 3, the driver that is installed."""
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError, TypeError):
        raise StoreError(
            f"cannot parse the database URL {_redact(str(url))!r}: use sqlite:///path/to/gateway.db "
            "or postgresql://user:password@host:5432/database"
        ) from None
    backend, _, driver = parsed.drivername.partition("+")
    if backend in ("postgresql", "postgres"):
        if driver not in ("", "psycopg"):
            raise StoreError(
                f"database URL {parsed.render_as_string(hide_password=True)!r}: the PostgreSQL driver is psycopg 3; "
                "write postgresql:// or postgresql+psycopg://"
            )
        return parsed.set(drivername="postgresql+psycopg")
    if backend == "sqlite" and driver in ("", "pysqlite"):
        return parsed
    raise StoreError(
        f"unsupported database URL {parsed.render_as_string(hide_password=True)!r}: "
        "use sqlite:///path/to/gateway.db or postgresql://user:password@host:5432/database"
    )


def _is_memory(url: URL) -> bool:
    return url.database in (None, "", ":memory:") or url.query.get("mode") == "memory"


def _on_sqlite_connect(dbapi_connection: Any, _record: Any) -> None:
    """Per-connection SQLite settings: durability, integrity, and waiting instead of failing on a lock.

    ``isolation_level = None`` stops the sqlite3 module from issuing (or skipping) BEGIN itself; the ``begin``
    listener issues it, so SELECTs are inside the transaction and DDL is transactional (migrations are atomic)."""
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys = ON")
        mode = cursor.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode not in ("wal", "memory"):
            log.warning("SQLite refused WAL journal mode (got %r): writers will block readers", mode)
        # FULL: the WAL is fsynced at every commit, so an acknowledged update survives a power cut.
        cursor.execute("PRAGMA synchronous = FULL")
        # 1 MB blobs make a large WAL; cap what stays on disk after a checkpoint.
        cursor.execute("PRAGMA journal_size_limit = 67108864")
    finally:
        cursor.close()


def _on_sqlite_begin(conn: Connection) -> None:
    """Writers take the write lock up front (BEGIN IMMEDIATE): a deferred transaction that reads and then writes
    fails at once with SQLITE_BUSY if another writer got in between, and busy_timeout cannot help it."""
    immediate = conn.get_execution_options().get(_WRITE_OPTION, False)
    conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


# ------------------------------------------------------------------------------------------- argument checks


def _int(name: str, value: object, limit: int = _INT64_LIMIT) -> int:
    # type() rather than isinstance(): a bool is an int subclass and must not pass as a number.
    if type(value) is not int or not 0 <= value < limit:
        raise StoreError(f"{name} must be an integer in [0, {limit}), got {value!r:.60}")
    return value


def _key(value: object) -> int | None:
    """``value`` if a stored row can have it as a round or id, else None. Lookups by a key no row can have (a
    hostile uint64 round >= 2**63) must find nothing, not overflow the driver (SQLite raises OverflowError)."""
    return value if type(value) is int and 0 <= value < _INT64_LIMIT else None


def _opt_int(name: str, value: object) -> int | None:
    return None if value is None else _int(name, value)


def _real(name: str, value: object, what: str = "a finite number") -> float:
    if type(value) not in (int, float) or not math.isfinite(cast(float, value)):
        raise StoreError(f"{name} must be {what}, got {value!r:.60}")
    return float(cast(float, value))


def _time(name: str, value: object) -> float:
    return _real(name, value, "a finite epoch time in seconds")


def _bytes(name: str, value: object, exact: int | None = None) -> bytes:
    if not isinstance(value, bytes | bytearray | memoryview):
        raise StoreError(f"{name} must be bytes, got {type(value).__name__}")
    data = bytes(value)
    if exact is not None and len(data) != exact:
        raise StoreError(f"{name} must be {exact} bytes, got {len(data)}")
    return data


def _address(value: object, what: str = "device") -> str:
    """A device address in its checksummed (EIP-55) form, whatever case it came in: one device, one key."""
    if type(value) is not str or not _ADDRESS_RE.fullmatch(value):
        raise StoreError(f"{what} must be an Ethereum address (0x and 40 hex digits), got {value!r:.60}")
    return str(to_checksum_address(value))


def _choice(name: str, value: object, allowed: Collection[str]) -> str:
    if type(value) is not str or value not in allowed:
        raise StoreError(f"{name} must be one of {sorted(allowed)}, got {value!r:.40}")
    return value


def _text(value: object, limit: int = TEXT_MAX_CHARS) -> str:
    """Any text made storable: bounded, no NUL (PostgreSQL text cannot hold it), no lone surrogates (UTF-8
    cannot encode them). Rejection details echo what hostile devices sent; that must never fail an insert."""
    s = str(value)[:limit].replace("\x00", "\\x00")
    return s.encode("utf-8", "backslashreplace").decode("utf-8")


def _dedup_key(kind: str, round: int | None, device: str | None) -> str:
    return f"{kind}/{'-' if round is None else round}/{device or '-'}"


@dataclass(frozen=True, slots=True)
class _NewUpdate:
    round: int
    device: str
    payload_hash: bytes
    samples: int
    compute_ms: int
    signature: bytes
    payload: bytes
    wire_bytes: int
    received_at: float


def _new_update(
    *,
    round: int,
    device: str,
    payload_hash: bytes,
    samples: int,
    compute_ms: int,
    signature: bytes,
    payload: bytes,
    wire_bytes: int,
    received_at: float,
) -> _NewUpdate:
    """Checks one update's fields; keyword-only so a wrong or missing dict key is a TypeError naming it."""
    return _NewUpdate(
        round=_int("round", round),
        device=_address(device),
        payload_hash=_bytes("payload_hash", payload_hash, 32),
        samples=_int("samples", samples, _UINT64_LIMIT),
        compute_ms=_int("compute_ms", compute_ms, _UINT64_LIMIT),
        signature=_bytes("signature", signature, 65),
        payload=_bytes("payload", payload),
        wire_bytes=_int("wire_bytes", wire_bytes),
        received_at=_time("received_at", received_at),
    )


# ------------------------------------------------------------------------------------------------ conversions


_Row = TypeVar("_Row", DeviceRow, RoundRow, UpdateRow, OutboxRow, ReportRow, RejectionRow)
_BLOBS: Final = frozenset({"payload", "aggregate"})


def _row(cls: type[_Row], obj: _Base, with_blob: bool = False) -> _Row:
    """A detached copy of ``obj`` as ``cls`` (same field names). Blob fields are read only when asked for:
    touching a deferred attribute would load the megabyte it is deferred to avoid."""
    values: dict[str, Any] = {
        f.name: getattr(obj, f.name) if f.name not in _BLOBS or with_blob else None for f in fields(cls)
    }
    return cls(**values)


# ------------------------------------------------------------------------------------------------------- store


class Store:
    """The gateway's database. Opening it connects, checks the schema version and migrates; every method is one
    committed transaction. See the module docstring for the guarantees."""

    def __init__(self, url: str, *, echo: bool = False) -> None:
        resolved = _resolve_url(url)
        self._url = resolved
        self._safe_url = resolved.render_as_string(hide_password=True)
        self._password = resolved.password if isinstance(resolved.password, str) else None
        self._closed = False
        self._close_lock = threading.Lock()
        self._engine = self._create_engine(resolved, echo)
        try:
            self._probe()
            self._version = self._migrate()
        except BaseException:
            self._engine.dispose()
            raise
        self._reader = sessionmaker(bind=self._engine, expire_on_commit=False)
        self._writer = sessionmaker(
            bind=self._engine.execution_options(**{_WRITE_OPTION: True}), expire_on_commit=False
        )
        log.info("store open: %s (schema version %d)", self._safe_url, self._version)

    def __repr__(self) -> str:
        return f"Store({self._safe_url!r})"

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    @property
    def schema_version(self) -> int:
        """The schema version of the open database (always this code's latest once open)."""
        return self._version

    @property
    def url(self) -> str:
        """The database URL with the password masked: safe to log or show."""
        return self._safe_url

    def close(self) -> None:
        """Closes every pooled connection. Idempotent; any later call raises :class:`StoreError`."""
        with self._close_lock:
            if not self._closed:
                self._closed = True
                self._engine.dispose()

    # --------------------------------------------------------------------------------------------- plumbing

    def _create_engine(self, url: URL, echo: bool) -> Engine:
        if url.get_backend_name() == "sqlite":
            if _is_memory(url):
                # One shared connection: a pool would give every connection (and thread) its own empty database.
                engine = create_engine(
                    url, echo=echo, poolclass=StaticPool, connect_args={"check_same_thread": False}
                )
            else:
                if "uri" not in url.query:
                    directory = Path(url.database or "").resolve().parent
                    if not directory.is_dir():
                        raise StoreError(
                            f"cannot open the SQLite database {self._safe_url}: directory {directory} does not "
                            "exist (create it, e.g. the service's StateDirectory)"
                        )
                engine = create_engine(url, echo=echo)
            event.listen(engine, "connect", _on_sqlite_connect)
            event.listen(engine, "begin", _on_sqlite_begin)
            return engine
        connect_args: dict[str, Any] = {}
        if "connect_timeout" not in url.query:
            connect_args["connect_timeout"] = PG_CONNECT_TIMEOUT_S
        if "application_name" not in url.query:
            connect_args["application_name"] = "bdn-gateway"
        try:
            # pre_ping: a restarted PostgreSQL leaves dead pooled connections; test each one before use.
            return create_engine(url, echo=echo, pool_pre_ping=True, connect_args=connect_args)
        except NoSuchModuleError:
            raise StoreError("PostgreSQL needs psycopg 3: pip install 'psycopg[binary]'") from None

    def _scrub(self, message: str) -> str:
        if self._password:
            for secret in {self._password, quote(self._password, safe="")}:
                message = message.replace(secret, "***")
        return message

    def _driver_message(self, exc: BaseException) -> str:
        """The database's own words, without SQLAlchemy's SQL and parameters (1 MB blobs) or any password."""
        orig = exc.orig if isinstance(exc, DBAPIError) and exc.orig is not None else exc
        text_ = str(orig).strip() or type(orig).__name__
        return self._scrub(" ".join(text_.split()))

    def _probe(self) -> None:
        """One round trip at open, so a wrong URL fails here with advice instead of later in the ingest path."""
        try:
            with self._engine.connect() as conn:
                conn.exec_driver_sql("SELECT 1")
        except SQLAlchemyError as exc:
            reason = self._driver_message(exc)
            if self._url.get_backend_name() == "sqlite":
                advice = "check that the path is right and that the gateway's user may read and write it"
                raise StoreUnavailable(
                    f"cannot open the SQLite database {self._safe_url}: {reason}; {advice}"
                ) from None
            advice = (
                "check that PostgreSQL is running and reachable at that host and port, that the database "
                "exists, and that the user and password are right (pg_hba.conf decides who may connect)"
            )
            raise StoreUnavailable(
                f"cannot connect to PostgreSQL at {self._safe_url}: {reason}; {advice}"
            ) from None

    def _migrate(self) -> int:
        """Brings the schema to ``len(MIGRATIONS)`` in one transaction, under a lock so that two processes opening
        a fresh database at once do not both create it."""
        latest = len(MIGRATIONS)
        found = 0
        try:
            with self._engine.execution_options(**{_WRITE_OPTION: True}).begin() as conn:
                if conn.dialect.name == "postgresql":
                    conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_MIGRATION_LOCK})
                tables = set(inspect(conn).get_table_names())
                if _SchemaMeta.__tablename__ in tables:
                    found = conn.execute(select(_SchemaMeta.version).where(_SchemaMeta.id == 1)).scalar() or 0
                ours = sorted(tables & (set(_Base.metadata.tables) - {_SchemaMeta.__tablename__}))
                if found == 0 and ours:
                    raise StoreError(
                        f"{self._safe_url} has tables {', '.join(ours)} but no schema version: it was not created "
                        "by this store (or is damaged); refusing to touch it. Point the gateway at another database."
                    )
                if found > latest:
                    raise StoreError(
                        f"{self._safe_url} has schema version {found}, newer than this gateway's {latest}: it was "
                        "written by a newer release. Upgrade the gateway software; refusing to open it."
                    )
                if found == latest:
                    return found
                steps = MIGRATIONS[:1] if found == 0 else MIGRATIONS[found:]
                for step in steps:
                    step(conn)
                stamp = {"version": latest, "migrated_at": time.time()}
                if found == 0:
                    _META.create(conn, checkfirst=True)
                    conn.execute(_META.insert().values(id=1, **stamp))
                else:
                    conn.execute(_META.update().where(_SchemaMeta.id == 1).values(**stamp))
        except StoreError:
            raise
        except Exception as exc:
            raise StoreError(
                f"migrating {self._safe_url} from schema version {found} to {latest} failed, nothing was changed: "
                f"{type(exc).__name__}: {self._driver_message(exc)}"
            ) from exc
        log.info("store schema of %s migrated from version %d to %d", self._safe_url, found, latest)
        return latest

    @contextmanager
    def _session(self, what: str, *, write: bool) -> Iterator[Session]:
        """One transaction: commits when the block ends, rolls back on any exception, and turns database errors
        into StoreError / StoreUnavailable that say what was being done."""
        if self._closed:
            raise StoreError(f"{what}: the store is closed")
        factory = self._writer if write else self._reader
        try:
            with factory.begin() as session:
                yield session
        except StoreError:
            raise
        except (OperationalError, InterfaceError, DisconnectionError) as exc:
            raise StoreUnavailable(
                f"{what}: database {self._safe_url} unavailable: {self._driver_message(exc)}"
            ) from exc
        except SQLAlchemyError as exc:
            raise StoreError(f"{what}: {self._driver_message(exc)}") from exc

    def _write(self, what: str, work: Callable[[Session], _T]) -> _T:
        """Runs ``work`` in a write transaction, once more if a concurrent writer won a uniqueness race (the
        second run sees that writer's row and takes the idempotent path)."""
        for attempt in (1, 2):
            try:
                with self._session(what, write=True) as session:
                    return work(session)
            except StoreError as exc:
                if attempt == 2 or not isinstance(exc.__cause__, IntegrityError):
                    raise
        raise AssertionError("unreachable")

    @staticmethod
    def _require_round(session: Session, round: int) -> _Round:
        row = session.get(_Round, round)
        if row is None:
            raise StoreError(f"round {round} is not in the store (open_round first)")
        return row

    @staticmethod
    def _require_device(session: Session, address: str) -> _Device:
        row = session.get(_Device, address)
        if row is None:
            raise StoreError(f"device {address} is not in the store (upsert_devices first)")
        return row

    @staticmethod
    def _get_update(session: Session, round: int, device: str, with_payload: bool = False) -> _Update | None:
        stmt = select(_Update).where(_Update.round == round, _Update.device == device)
        if with_payload:
            stmt = stmt.options(undefer(_Update.payload))
        return session.scalars(stmt).one_or_none()

    # ------------------------------------------------------------------------------------------ enrollments

    def claim_enrollment(self, token_id: str, name: str, address: str, at: float) -> tuple[str, str | None]:
        """Claim a token for ``address``. Returns ``("new", None)`` for a first use, ``("pending", None)`` when
        the same device retries an enrollment that did not finish, ``("done", bundle)`` when it asks again for
        an answer it already got. Any other reuse raises :class:`EnrollmentUsed`."""
        device = _address(address)
        label = _text(name, 200)

        def work(s: Session) -> tuple[str, str | None]:
            row = s.get(_Enrollment, token_id)
            if row is None:
                s.add(
                    _Enrollment(
                        token_id=token_id, name=label, address=device, state="pending", at=at, bundle=None
                    )
                )
                return "new", None
            if row.address != device:
                raise EnrollmentUsed(f"enrollment token {token_id[:8]}… was already used by another device")
            return row.state, row.bundle

        return self._write("claiming an enrollment token", work)

    def finish_enrollment(self, token_id: str, bundle: str) -> None:
        with self._session("finishing an enrollment", write=True) as s:
            row = s.get(_Enrollment, token_id)
            if row is None:
                raise StoreError(f"enrollment {token_id[:8]}… was never claimed")
            row.state, row.bundle = "done", bundle

    # ---------------------------------------------------------------------------------------------- devices

    def upsert_devices(self, devices: Iterable[tuple[str, str, int, int]]) -> None:
        """Inserts or updates ``(address, name, samples, key_share)`` for each fleet device. State, last_seen and
        registered_tx are kept: they are what the gateway learned, the fleet file does not know them."""
        entries: dict[str, tuple[str, int, int]] = {}
        for address, name, samples, key_share in devices:
            entries[_address(address)] = (
                _text(name, 200),
                _int("samples", samples),
                _int("key_share", key_share),
            )

        def work(s: Session) -> None:
            known = {d.address: d for d in s.scalars(select(_Device).where(_Device.address.in_(entries)))}
            for address, (name, samples, key_share) in entries.items():
                row = known.get(address)
                if row is None:
                    s.add(
                        _Device(
                            address=address,
                            name=name,
                            samples=samples,
                            key_share=key_share,
                            state="unknown",
                            last_seen=None,
                            registered_tx=None,
                        )
                    )
                else:
                    row.name, row.samples, row.key_share = name, samples, key_share

        if entries:
            self._write("upserting devices", work)

    def set_device_registered(self, address: str, tx_hash: str | bytes) -> None:
        """Remembers the transaction that registered the device on chain (hex string; bytes are converted)."""
        device = _address(address)
        if isinstance(tx_hash, bytes | bytearray):
            tx_hash = "0x" + bytes(tx_hash).hex()
        if type(tx_hash) is not str or not re.fullmatch(r"0x[0-9a-fA-F]{64}", tx_hash):
            raise StoreError(f"tx_hash must be 0x and 64 hex digits, got {tx_hash!r:.80}")
        with self._session(f"recording the registration of {device}", write=True) as s:
            self._require_device(s, device).registered_tx = tx_hash.lower()

    def set_device_state(self, address: str, state: str, at: float) -> bool:
        """Records a device's last state message. An unknown or malformed address (the topic is device-chosen)
        changes nothing and returns False."""
        _choice("state", state, DEVICE_STATES)
        seen = _time("at", at)
        try:
            device = _address(address)
        except StoreError:
            return False
        with self._session(f"setting the state of {device}", write=True) as s:
            row = s.get(_Device, device)
            if row is None:
                return False
            row.state, row.last_seen = state, seen
            return True

    def devices(self) -> list[DeviceRow]:
        """Every known device, by address."""
        with self._session("listing devices", write=False) as s:
            return [_row(DeviceRow, d) for d in s.scalars(select(_Device).order_by(_Device.address))]

    # ----------------------------------------------------------------------------------------------- rounds

    def open_round(
        self, round: int, base_hash: bytes, total_samples: int, opened_at: float, deadline_at: float
    ) -> RoundRow:
        """Creates round ``round`` with status 'open'. Opening it again with the same base returns the stored row
        unchanged (a restart re-runs the open step); a different base is refused: one round, one base model."""
        r = _int("round", round)
        base = _bytes("base_hash", base_hash, 32)
        total = _int("total_samples", total_samples)
        opened, deadline = _time("opened_at", opened_at), _time("deadline_at", deadline_at)

        def work(s: Session) -> RoundRow:
            row = s.get(_Round, r)
            if row is not None:
                if row.base_hash != base:
                    raise StoreError(
                        f"round {r} already exists with base 0x{row.base_hash.hex()}, not 0x{base.hex()}"
                    )
                return _row(RoundRow, row)
            row = _Round(
                round=r,
                status="open",
                base_hash=base,
                total_samples=total,
                opened_at=opened,
                deadline_at=deadline,
                extensions=0,
                published=False,
            )
            s.add(row)
            s.flush()
            return _row(RoundRow, row)

        return self._write(f"opening round {r}", work)

    def set_round_chain(self, round: int, open_tx: bytes, chain_deadline_block: int) -> None:
        """Records the round's ``openRound`` transaction and its on-chain deadline block."""
        round = _int("round", round)
        tx = _bytes("open_tx", open_tx, 32)
        block = _int("chain_deadline_block", chain_deadline_block)
        with self._session(f"recording the chain opening of round {round}", write=True) as s:
            row = self._require_round(s, round)
            row.open_tx, row.chain_deadline_block = tx, block

    def extend_round(self, round: int, deadline_at: float) -> None:
        """Moves an open (or closing) round's deadline and counts the extension."""
        round, deadline = _int("round", round), _time("deadline_at", deadline_at)
        with self._session(f"extending round {round}", write=True) as s:
            row = self._require_round(s, round)
            if row.status not in ("open", "closing"):
                raise StoreError(f"round {round} is {row.status}: its deadline can no longer move")
            row.deadline_at = deadline
            row.extensions += 1

    def set_round_status(self, round: int, status: str, reason: str = "", *, at: float | None = None) -> None:
        """Sets 'open', 'closing' or 'skipped' (with ``reason``). 'committed' goes through :meth:`commit_round`,
        which stores what was committed; committed and skipped are final, so only a repeat of them is accepted.
        ``closed_at`` of a skipped round is ``at`` (default: now)."""
        round = _int("round", round)
        _choice("status", status, ROUND_STATUSES - {"committed"})
        with self._session(f"setting round {round} to {status}", write=True) as s:
            row = self._require_round(s, round)
            if row.status in ("committed", "skipped") and row.status != status:
                raise StoreError(f"round {round} is already {row.status}; it cannot become {status}")
            row.status = status
            if reason:
                row.reason = _text(reason)
            if status == "skipped" and row.closed_at is None:
                row.closed_at = time.time() if at is None else _time("at", at)

    def commit_round(
        self,
        round: int,
        *,
        aggregate: bytes,
        aggregate_hash: bytes,
        merkle_root: bytes,
        count: int,
        weight_num: int,
        commit_tx: bytes,
        commit_gas: int,
        closed_at: float,
    ) -> None:
        """Stores the committed global block and sets the round 'committed'. Repeating it with the same aggregate
        hash is a no-op (restart after the commit); a different one is refused: the chain holds only one."""
        round = _int("round", round)
        values = {
            "aggregate": _bytes("aggregate", aggregate),
            "aggregate_hash": _bytes("aggregate_hash", aggregate_hash, 32),
            "merkle_root": _bytes("merkle_root", merkle_root, 32),
            "count": _int("count", count),
            "weight_num": _int("weight_num", weight_num),
            "commit_tx": _bytes("commit_tx", commit_tx, 32),
            "commit_gas": _int("commit_gas", commit_gas),
            "closed_at": _time("closed_at", closed_at),
        }
        with self._session(f"committing round {round}", write=True) as s:
            row = self._require_round(s, round)
            if row.status == "committed":
                if row.aggregate_hash != values["aggregate_hash"]:
                    raise StoreError(
                        f"round {round} is already committed with aggregate hash 0x{(row.aggregate_hash or b'').hex()}"
                    )
                return
            if row.status == "skipped":
                raise StoreError(f"round {round} was skipped; it cannot be committed")
            for name, value in values.items():
                setattr(row, name, value)
            row.status = "committed"

    def mark_published(self, round: int) -> None:
        """Notes that the round's global block was published (retained) over MQTT."""
        round = _int("round", round)
        with self._session(f"marking round {round} published", write=True) as s:
            row = self._require_round(s, round)
            if row.status != "committed":
                raise StoreError(
                    f"round {round} is {row.status}: only a committed round has a block to publish"
                )
            row.published = True

    def get_round(self, round: int, *, with_aggregate: bool = False) -> RoundRow | None:
        """One round, or None; the ~1 MB aggregate only with ``with_aggregate=True``."""
        if _key(round) is None:
            return None
        stmt = select(_Round).where(_Round.round == round)
        return self._one_round(f"reading round {round}", stmt, with_aggregate)

    def latest_round(self) -> RoundRow | None:
        """The highest-numbered round in any status, or None before the first."""
        return self._one_round(
            "reading the latest round", select(_Round).order_by(_Round.round.desc()).limit(1)
        )

    def last_committed_round(self, *, with_aggregate: bool = False) -> RoundRow | None:
        """The highest committed round: the next round builds on its aggregate hash (docs/protocol.md)."""
        stmt = select(_Round).where(_Round.status == "committed").order_by(_Round.round.desc()).limit(1)
        return self._one_round("reading the last committed round", stmt, with_aggregate)

    def _one_round(self, what: str, stmt: Any, with_aggregate: bool = False) -> RoundRow | None:
        if with_aggregate:
            stmt = stmt.options(undefer(_Round.aggregate))
        with self._session(what, write=False) as s:
            row = s.scalars(stmt).one_or_none()
            return None if row is None else _row(RoundRow, row, with_aggregate)

    def rounds(self) -> list[RoundRow]:
        """Every round in order, without aggregates."""
        with self._session("listing rounds", write=False) as s:
            return [_row(RoundRow, r) for r in s.scalars(select(_Round).order_by(_Round.round))]

    # ---------------------------------------------------------------------------------------------- updates

    def add_update(
        self,
        *,
        round: int,
        device: str,
        payload_hash: bytes,
        samples: int,
        compute_ms: int,
        signature: bytes,
        payload: bytes,
        wire_bytes: int,
        received_at: float,
    ) -> UpdateRow:
        """Stores an accepted update (status 'stored') and its 'submit' outbox row in one transaction; once this
        returns, the MQTT message may be acknowledged. Raises :class:`DuplicateUpdate` when the round already has
        an update from the device. The returned row has no payload (the caller holds it)."""
        result = self.add_updates(
            [
                {
                    "round": round,
                    "device": device,
                    "payload_hash": payload_hash,
                    "samples": samples,
                    "compute_ms": compute_ms,
                    "signature": signature,
                    "payload": payload,
                    "wire_bytes": wire_bytes,
                    "received_at": received_at,
                }
            ]
        )[0]
        if isinstance(result, DuplicateUpdate):
            raise result
        return result

    def add_updates(self, items: Sequence[Mapping[str, Any]]) -> list[UpdateRow | DuplicateUpdate]:
        """:meth:`add_update` for many updates in ONE transaction (one fsync for the batch: the ingest path's
        throughput). Each item has add_update's keyword arguments. The result lists, in order, the stored row or a
        :class:`DuplicateUpdate` (also for a repeat within the batch). An invalid item, an unknown round or device
        raises and stores nothing."""
        news = [_new_update(**item) for item in items]
        if not news:
            return []
        return self._write(f"storing {len(news)} update(s)", lambda s: self._insert_updates(s, news))

    def _insert_updates(self, s: Session, news: list[_NewUpdate]) -> list[UpdateRow | DuplicateUpdate]:
        rounds = {n.round for n in news}
        devices = {n.device for n in news}
        for r in sorted(rounds - set(s.scalars(select(_Round.round).where(_Round.round.in_(rounds))))):
            raise StoreError(f"round {r} is not in the store (open_round first)")
        for d in sorted(
            devices - set(s.scalars(select(_Device.address).where(_Device.address.in_(devices))))
        ):
            raise StoreError(f"device {d} is not in the store (upsert_devices first)")
        existing = {
            (u.round, u.device): u
            for u in s.scalars(select(_Update).where(_Update.round.in_(rounds), _Update.device.in_(devices)))
        }
        keys = [_dedup_key("submit", n.round, n.device) for n in news]
        queued = set(s.scalars(select(_Outbox.dedup_key).where(_Outbox.dedup_key.in_(keys))))
        now = time.time()
        results: list[tuple[bool, _Update]] = []
        for n, key in zip(news, keys, strict=True):
            old = existing.get((n.round, n.device))
            if old is not None:
                results.append((False, old))
                continue
            row = _Update(
                round=n.round,
                device=n.device,
                payload_hash=n.payload_hash,
                samples=n.samples,
                compute_ms=n.compute_ms,
                signature=n.signature,
                payload=n.payload,
                wire_bytes=n.wire_bytes,
                received_at=n.received_at,
                status="stored",
            )
            s.add(row)
            existing[(n.round, n.device)] = row
            results.append((True, row))
            if key not in queued:
                queued.add(key)
                s.add(
                    _Outbox(
                        kind="submit",
                        round=n.round,
                        device=n.device,
                        dedup_key=key,
                        state="pending",
                        attempts=0,
                        created_at=now,
                        updated_at=now,
                    )
                )
        s.flush()
        return [_row(UpdateRow, u) if new else DuplicateUpdate(_row(UpdateRow, u)) for new, u in results]

    def get_update(self, round: int, device: str, *, with_payload: bool = False) -> UpdateRow | None:
        """One update, or None; the ~1 MB payload only with ``with_payload=True``."""
        address = _address(device)
        if _key(round) is None:
            return None
        with self._session(f"reading the update of {address} in round {round}", write=False) as s:
            row = self._get_update(s, round, address, with_payload)
            return None if row is None else _row(UpdateRow, row, with_payload)

    def mark_recorded(
        self, round: int, device: str, *, tx_hash: bytes, block_number: int, log_index: int, gas_used: int
    ) -> None:
        """The chain recorded the update: status 'recorded' with where (block, log index), and its outbox row
        'done', in one transaction. Also accepted for an update marked rejected: the chain is the truth."""
        self.mark_recorded_many([(round, device, tx_hash, block_number, log_index, gas_used)])

    def mark_recorded_many(self, items: Sequence[tuple[int, str, bytes, int, int, int]]) -> None:
        """:meth:`mark_recorded` for a relay batch of (round, device, tx_hash, block, log index, gas) in ONE
        transaction: one commit (one fsync) per batch instead of per update."""
        checked = [
            (
                _int("round", r),
                _address(d),
                _bytes("tx_hash", tx, 32),
                _int("block_number", b),
                _int("log_index", i),
                _int("gas_used", g),
            )
            for r, d, tx, b, i, g in items
        ]
        if not checked:
            return
        with self._session(f"recording {len(checked)} update(s) on chain", write=True) as s:
            for round, address, tx, block, index, gas in checked:
                row = self._get_update(s, round, address)
                if row is None:
                    raise StoreError(f"round {round} has no update from {address}")
                row.status, row.tx_hash, row.block_number, row.log_index, row.gas_used = (
                    "recorded",
                    tx,
                    block,
                    index,
                    gas,
                )
                row.reason = row.detail = None
                outbox = self._submit_row(s, round, address)
                outbox.state, outbox.tx_hash, outbox.error = "done", tx, None

    def mark_rejected(self, round: int, device: str, reason: str, detail: str) -> None:
        """The update will not be recorded (e.g. the contract reverted): status 'rejected' and its outbox row
        'failed', in one transaction. Refused for a recorded update: it is on chain."""
        round, address = _int("round", round), _address(device)
        with self._session(f"rejecting the update of {address} in round {round}", write=True) as s:
            row = self._get_update(s, round, address)
            if row is None:
                raise StoreError(f"round {round} has no update from {address}")
            if row.status == "recorded":
                raise StoreError(
                    f"the update of {address} in round {round} is recorded on chain "
                    f"(tx 0x{(row.tx_hash or b'').hex()}); it cannot be rejected"
                )
            row.status, row.reason, row.detail = "rejected", _text(reason, 64), _text(detail)
            outbox = self._submit_row(s, round, address)
            outbox.state, outbox.error = "failed", _text(f"{reason}: {detail}")

    @staticmethod
    def _submit_row(s: Session, round: int, device: str) -> _Outbox:
        """The update's 'submit' outbox row (recreated if it went missing, so update and outbox stay in step)."""
        key = _dedup_key("submit", round, device)
        now = time.time()
        row = s.scalars(select(_Outbox).where(_Outbox.dedup_key == key)).one_or_none()
        if row is None:
            row = _Outbox(
                kind="submit",
                round=round,
                device=device,
                dedup_key=key,
                attempts=0,
                created_at=now,
                state="pending",
            )
            s.add(row)
        row.updated_at = now
        return row

    def recorded_updates(self, round: int, *, with_payload: bool = False) -> list[UpdateRow]:
        """The round's recorded updates in chain order (block number, log index): the order of the Merkle leaves
        and of the global block's device list."""
        if _key(round) is None:
            return []
        stmt = (
            select(_Update)
            .where(_Update.round == round, _Update.status == "recorded")
            .order_by(_Update.block_number, _Update.log_index, _Update.id)
        )
        if with_payload:
            stmt = stmt.options(undefer(_Update.payload))
        with self._session(f"listing the recorded updates of round {round}", write=False) as s:
            return [_row(UpdateRow, u, with_payload) for u in s.scalars(stmt)]

    def update_counts(self, round: int) -> dict[str, int]:
        """Updates of the round per status; every status is present (0 when none)."""
        stats = self.round_stats([round]).get(round, {})
        return {status: int(stats.get(status, 0)) for status in UPDATE_STATUSES}

    # ----------------------------------------------------------------------------------------------- outbox

    def enqueue(self, kind: str, round: int | None = None, device: str | None = None) -> OutboxRow:
        """Queues a chain transaction ('open_round', 'commit', 'register'; 'submit' rows come with their update).
        Idempotent on (kind, round, device): a repeat returns the existing row in whatever state it is. The round
        and device must be in the store."""
        _choice("kind", kind, OUTBOX_KINDS)
        r = _opt_int("round", round)
        address = None if device is None else _address(device)
        key = _dedup_key(kind, r, address)

        def work(s: Session) -> OutboxRow:
            row = s.scalars(select(_Outbox).where(_Outbox.dedup_key == key)).one_or_none()
            if row is None:
                if r is not None:
                    self._require_round(s, r)
                if address is not None:
                    self._require_device(s, address)
                now = time.time()
                row = _Outbox(
                    kind=kind,
                    round=r,
                    device=address,
                    dedup_key=key,
                    state="pending",
                    attempts=0,
                    created_at=now,
                    updated_at=now,
                )
                s.add(row)
                s.flush()
            return _row(OutboxRow, row)

        return self._write(f"queueing {key}", work)

    def pending_outbox(self, kinds: Collection[str] | None = None, limit: int = 1000) -> list[OutboxRow]:
        """Entries still to send ('pending') or to confirm ('sent': check the chain for their tx hash), oldest
        first. On restart the relay reconciles the 'sent' ones before sending anything new."""
        stmt = select(_Outbox).where(_Outbox.state.in_(("pending", "sent")))
        if kinds is not None:
            stmt = stmt.where(_Outbox.kind.in_([_choice("kind", k, OUTBOX_KINDS) for k in kinds]))
        stmt = stmt.order_by(_Outbox.id).limit(_int("limit", limit))
        with self._session("listing the outbox", write=False) as s:
            return [_row(OutboxRow, o) for o in s.scalars(stmt)]

    def _outbox_change(self, outbox_id: int, what: str, change: Callable[[_Outbox], None]) -> None:
        outbox_id = _int("outbox_id", outbox_id)
        with self._session(f"{what} outbox entry {outbox_id}", write=True) as s:
            row = s.get(_Outbox, outbox_id)
            if row is None:
                raise StoreError(f"outbox entry {outbox_id} does not exist")
            change(row)
            row.updated_at = time.time()

    def mark_sent(self, outbox_id: int, tx_hash: bytes) -> None:
        """Records the signed transaction's hash and counts the attempt (state 'sent').

        Call it after signing and *before* broadcasting, and wait for it to return: the hash is known from the
        signed bytes, and a crash after this point leaves a 'sent' entry whose hash the relay looks up on chain
        (mined: done; unknown: send again — the contract is idempotent by round+device). Recording after the
        broadcast would leave a window where a mined transaction looks unsent and is sent twice. Allowed again on
        a 'sent' or 'failed' entry (a retry with a new transaction); a 'done' entry is final."""
        tx = _bytes("tx_hash", tx_hash, 32)

        def change(row: _Outbox) -> None:
            if row.state == "done":
                raise StoreError(
                    f"outbox entry {outbox_id} ({row.dedup_key}) is done; it cannot be sent again"
                )
            row.state, row.tx_hash, row.attempts = "sent", tx, row.attempts + 1

        self._outbox_change(outbox_id, "marking sent", change)

    def mark_done(self, outbox_id: int, tx_hash: bytes | None = None) -> None:
        """The transaction is mined (or reconciliation found the chain already has its effect): state 'done',
        final. For 'submit' entries use :meth:`mark_recorded`, which also records where the update landed."""
        tx = None if tx_hash is None else _bytes("tx_hash", tx_hash, 32)

        def change(row: _Outbox) -> None:
            row.state, row.error = "done", None
            if tx is not None:
                row.tx_hash = tx

        self._outbox_change(outbox_id, "marking done", change)

    def mark_failed(self, outbox_id: int, error: str) -> None:
        """The transaction will not succeed (a revert, or retries exhausted): state 'failed' with the reason."""
        message = _text(error)

        def change(row: _Outbox) -> None:
            if row.state == "done":
                raise StoreError(f"outbox entry {outbox_id} ({row.dedup_key}) is done; it cannot fail")
            row.state, row.error = "failed", message

        self._outbox_change(outbox_id, "marking failed", change)

    def outbox_pending_count(self, round: int | None = None) -> int:
        """Entries pending or sent, all or one round's: a round closes only when its count reaches 0."""
        stmt = select(func.count()).select_from(_Outbox).where(_Outbox.state.in_(("pending", "sent")))
        if round is not None:
            if _key(round) is None:
                return 0
            stmt = stmt.where(_Outbox.round == round)
        with self._session("counting the outbox", write=False) as s:
            return int(s.scalar(stmt) or 0)

    # ------------------------------------------------------------------------------------ reports, rejections

    def add_report(
        self, round: int, device: str, samples: int, loss: float, accuracy: float | None, at: float
    ) -> None:
        """Stores (or replaces) a device's report on the global model of ``round``."""
        round, address = _int("round", round), _address(device)
        n = _int("samples", samples, _UINT64_LIMIT)
        lo = _real("loss", loss)
        acc = None if accuracy is None else _real("accuracy", accuracy)
        when = _time("at", at)

        def work(s: Session) -> None:
            row = s.get(_Report, (round, address))
            if row is None:
                self._require_round(s, round)
                self._require_device(s, address)
                s.add(_Report(round=round, device=address, samples=n, loss=lo, accuracy=acc, at=when))
            else:
                row.samples, row.loss, row.accuracy, row.at = n, lo, acc, when

        self._write(f"storing the report of {address} on round {round}", work)

    def reports(self, round: int) -> list[ReportRow]:
        """The round's reports, by device."""
        if _key(round) is None:
            return []
        stmt = select(_Report).where(_Report.round == round).order_by(_Report.device)
        with self._session(f"listing the reports on round {round}", write=False) as s:
            return [_row(ReportRow, r) for r in s.scalars(stmt)]

    def add_rejection(
        self, at: float, round: int | None, device: str | None, reason: str, detail: str
    ) -> None:
        """Logs a rejected message. Round and device are what the message claimed (any uint64, any text); texts
        are bounded and made storable, so logging hostile input cannot fail. Call :meth:`prune_rejections` now
        and then to bound the table."""
        self.add_rejections([(at, round, device, reason, detail)])

    def add_rejections(self, items: Sequence[tuple[float, int | None, str | None, str, str]]) -> None:
        """:meth:`add_rejection` for a whole ingest batch in one transaction: under a flood of junk, one commit
        per rejected message was half of the gateway's work."""
        rows = [
            _Rejection(
                at=_time("at", at),
                round=None if round is None else _int("round", round, _UINT64_LIMIT),
                device=None if device is None else _text(device, 100),
                reason=_text(reason, 64),
                detail=_text(detail),
            )
            for at, round, device, reason, detail in items
        ]
        if rows:
            with self._session(f"logging {len(rows)} rejection(s)", write=True) as s:
                s.add_all(rows)

    def rejection_counts(self) -> dict[str, int]:
        """Logged rejections per reason (of those kept after pruning; metrics keep their own counters)."""
        stmt = select(_Rejection.reason, func.count()).group_by(_Rejection.reason)
        with self._session("counting rejections", write=False) as s:
            return {reason: n for reason, n in s.execute(stmt)}

    def recent_rejections(self, limit: int = 100) -> list[RejectionRow]:
        """The latest logged rejections, newest first."""
        stmt = select(_Rejection).order_by(_Rejection.id.desc()).limit(_int("limit", limit))
        with self._session("listing rejections", write=False) as s:
            return [_row(RejectionRow, r) for r in s.scalars(stmt)]

    def prune_rejections(self, keep: int = 10000) -> int:
        """Deletes all but the newest ``keep`` logged rejections; returns how many were deleted."""
        keep = _int("keep", keep)
        with self._session("pruning rejections", write=True) as s:
            cutoff = s.scalar(select(_Rejection.id).order_by(_Rejection.id.desc()).offset(keep).limit(1))
            if cutoff is None:
                return 0
            result = s.execute(
                delete(_Rejection).where(_Rejection.id <= cutoff).execution_options(synchronize_session=False)
            )
            return int(cast(CursorResult[Any], result).rowcount)

    # ------------------------------------------------------------------------------------ dashboard reads

    def recent_rounds(self, limit: int = 50) -> list[RoundRow]:
        """The latest ``limit`` rounds, newest first, without aggregates: the dashboard's timeline."""
        stmt = select(_Round).order_by(_Round.round.desc()).limit(_int("limit", limit))
        with self._session("listing recent rounds", write=False) as s:
            return [_row(RoundRow, r) for r in s.scalars(stmt)]

    def round_stats(self, rounds: Collection[int]) -> dict[int, dict[str, Any]]:
        """Per round of ``rounds``: stored updates per status, their wire bytes and gas, and the number and mean
        accuracy of the devices' reports. Two grouped queries, whatever the number of rounds, so a dashboard
        refresh stays cheap; every asked round is present (zeros and None when it has nothing)."""
        keys = sorted({k for k in (_key(r) for r in rounds) if k is not None})
        stats: dict[int, dict[str, Any]] = {
            r: {
                **dict.fromkeys(UPDATE_STATUSES, 0),
                "wire_bytes": 0,
                "update_gas": 0,
                "reports": 0,
                "accuracy": None,
            }
            for r in keys
        }
        if not keys:
            return stats
        updates = (
            select(
                _Update.round,
                _Update.status,
                func.count(),
                func.coalesce(func.sum(_Update.wire_bytes), 0),
                func.coalesce(func.sum(_Update.gas_used), 0),
            )
            .where(_Update.round.in_(keys))
            .group_by(_Update.round, _Update.status)
        )
        reports = (
            select(_Report.round, func.count(), func.avg(_Report.accuracy))
            .where(_Report.round.in_(keys))
            .group_by(_Report.round)
        )
        with self._session(f"summing the updates of {len(keys)} round(s)", write=False) as s:
            for round, status, n, wire, gas in s.execute(updates):
                row = stats[round]
                row[status] = int(n)
                row["wire_bytes"] += int(wire or 0)
                row["update_gas"] += int(gas or 0)
            for round, n, accuracy in s.execute(reports):
                stats[round]["reports"] = int(n)
                stats[round]["accuracy"] = None if accuracy is None else float(accuracy)
        return stats
