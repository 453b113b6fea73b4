"""A throw-away PostgreSQL database per test, on the machine's server (``$BDN_TEST_POSTGRES``)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import psycopg
import pytest
from psycopg import sql
from sqlalchemy.engine import make_url

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
