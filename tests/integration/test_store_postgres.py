"""The gateway store on a real PostgreSQL: the same behaviour checks as on SQLite (tests/unit/test_store.py's
:class:`StoreBehaviour`), each test in a database of its own that is dropped afterwards.

The server comes from ``$BDN_TEST_POSTGRES`` (default ``postgresql://postgres@127.0.0.1:5432/test``); the user
must be allowed to create databases.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import psycopg
import pytest
from psycopg import sql
from sqlalchemy.engine import make_url

from gateway.store import Store, StoreUnavailable
from tests.unit.test_store import FLEET, StoreBehaviour

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

ADMIN_URL = os.environ.get("BDN_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")


def _admin() -> psycopg.Connection[tuple[object, ...]]:
    try:
        return psycopg.connect(ADMIN_URL, autocommit=True, connect_timeout=10)
    except psycopg.OperationalError as exc:
        safe = make_url(ADMIN_URL).render_as_string(hide_password=True)
        pytest.fail(
            f"PostgreSQL for the store tests is not reachable at {safe} (set $BDN_TEST_POSTGRES): {exc}"
        )


@pytest.fixture
def pg_database() -> Iterator[str]:
    """A fresh database ``bdn_store_<hex>``; yields its plain ``postgresql://`` URL, drops it (forcibly) after."""
    name = f"bdn_store_{uuid.uuid4().hex}"
    with _admin() as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield make_url(ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        with _admin() as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


class TestPostgresStore(StoreBehaviour):
    @pytest.fixture
    def db_url(self, pg_database: str) -> str:
        return pg_database


def test_a_missing_database_is_reported_with_advice_and_without_the_password(pg_database: str) -> None:
    url = make_url(pg_database).set(password="hunter2", database=f"{make_url(pg_database).database}_missing")
    with pytest.raises(StoreUnavailable) as caught:
        Store(url.render_as_string(hide_password=False))
    message = str(caught.value)
    assert "hunter2" not in message and "***" in message
    assert "does not exist" in message and "check that PostgreSQL is running" in message


def test_an_explicit_psycopg_url_opens_the_same_database(pg_database: str) -> None:
    with Store(pg_database) as plain:
        plain.upsert_devices(FLEET)
        with Store(pg_database.replace("postgresql://", "postgresql+psycopg://", 1)) as explicit:
            assert [d.address for d in explicit.devices()] == sorted(d[0] for d in FLEET)
