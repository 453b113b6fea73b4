"""Pytest fixtures for real brokers. Register them once, in ``tests/conftest.py``::

    pytest_plugins = ["tests.support.fixtures"]

(or import the fixture names into a directory's conftest.py). Every broker is stopped at teardown.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.support.embedded import EmbeddedBrokerThread
from tests.support.mosquitto import MosquittoProcess


@pytest.fixture
def mosquitto_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., MosquittoProcess]]:
    """``make(**options) -> MosquittoProcess``: a started broker in a fresh directory; options are
    :class:`MosquittoProcess`'s keyword arguments (``password_file``, ``acl_file``, ``tls``, ``port`` ...)."""
    started: list[MosquittoProcess] = []

    def make(**options: Any) -> MosquittoProcess:
        broker = MosquittoProcess(tmp_path_factory.mktemp("mosquitto"), **options)
        started.append(broker)
        return broker.start()

    yield make
    for broker in reversed(started):
        broker.stop()


@pytest.fixture
def mosquitto(mosquitto_factory: Callable[..., MosquittoProcess]) -> MosquittoProcess:
    """A plain broker: anonymous clients, persistence on, DESIGN §6 queue limits."""
    return mosquitto_factory()


@pytest.fixture
def embedded_broker_factory() -> Iterator[Callable[..., EmbeddedBrokerThread]]:
    """``make(users_file=..., acl=..., port=0) -> EmbeddedBrokerThread``: the gateway's amqtt broker, started,
    on its own event loop in a thread."""
    started: list[EmbeddedBrokerThread] = []

    def make(**options: Any) -> EmbeddedBrokerThread:
        broker = EmbeddedBrokerThread(**options)
        started.append(broker)
        return broker.start()

    yield make
    for broker in reversed(started):
        broker.stop()
