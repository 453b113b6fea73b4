"""Fixtures for tests against real external programs."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from provisioning.anvil import AnvilProcess


@pytest.fixture(scope="module")
def anvil() -> Iterator[AnvilProcess]:
    """A real anvil node on a free port, stopped after the module."""
    with AnvilProcess() as node:
        yield node
