"""The gateway store on a real PostgreSQL: the same behaviour checks as on SQLite (tests/unit/test_store.py's
:class:`StoreBehaviour`), each test in a database of its own that is dropped afterwards.

The server comes from ``$BDN_TEST_POSTGRES`` (default ``postgresql://postgres@127.0.0.1:5432/test``); the user
must be allowed to create databases.
"""

from __future__ import annotations

import pytest
from sqlalchemy.engine import make_url

from gateway.store import Store, StoreUnavailable
from tests.unit.test_store import FLEET, StoreBehaviour

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


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
