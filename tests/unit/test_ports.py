"""The core's port helpers: a bind test sees listeners (and only them)."""

from __future__ import annotations

import socket

import pytest

from blockdeepnet.ports import free_port, free_port_pair, port_in_use


def test_a_listener_makes_its_port_taken_and_closing_frees_it() -> None:
    port = free_port()
    assert not port_in_use("127.0.0.1", port)
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", port))
        listener.listen()
        assert port_in_use("127.0.0.1", port)
    assert not port_in_use("127.0.0.1", port)


def test_a_wildcard_listener_takes_the_loopback_port_too() -> None:
    with socket.socket() as listener:
        listener.bind(("0.0.0.0", 0))
        listener.listen()
        assert port_in_use("127.0.0.1", listener.getsockname()[1])


def test_a_pair_is_two_adjacent_free_ports() -> None:
    port = free_port_pair()
    assert not port_in_use("127.0.0.1", port) and not port_in_use("127.0.0.1", port + 1)


def test_an_unknown_host_is_an_error_not_a_verdict() -> None:
    with pytest.raises(socket.gaierror):
        port_in_use("no-such-host.invalid", 80)
