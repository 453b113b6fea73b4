"""Fixtures for tests against real external programs."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.integration.anvil_node import Anvil, free_port


@pytest.fixture(scope="module")
def anvil() -> Iterator[Anvil]:
    node = Anvil(free_port())
    try:
        yield node
    finally:
        node.stop()
