"""Free and taken TCP ports, by bind tests (standard library only).

A bind test rather than a connect test: it also catches a socket that is bound but not yet accepting and a
listener on the wildcard address, and it never talks to whatever holds the port. ``SO_REUSEADDR`` as
``asyncio.start_server`` and Mosquitto set it: a port held only by TIME_WAIT leftovers counts as free.
A port found free may still be taken by another process before it is used: prefer port 0 where the listener
can report what it got.
"""

from __future__ import annotations

import errno
import socket
from typing import Any


def bind_addresses(host: str, port: int) -> list[tuple[int, tuple[Any, ...]]]:
    """(family, sockaddr) for every address ``host`` resolves to; ``socket.gaierror`` if it does not."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    return [(family, addr) for family, _, _, _, addr in infos]


def try_bind(family: int, addr: tuple[Any, ...]) -> None:
    """Bind (and release) a listening-style socket at ``addr``; ``OSError`` says why it cannot."""
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(addr)


def port_in_use(host: str, port: int) -> bool:
    """Whether listening on ``host:port`` would fail because something else holds the port."""
    for family, addr in bind_addresses(host, port):
        try:
            try_bind(family, addr)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return True
            raise
    return False


def free_port(host: str = "127.0.0.1") -> int:
    """A port that is free on ``host`` right now."""
    family, addr = bind_addresses(host, 0)[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind(addr)
        return int(s.getsockname()[1])


def free_port_pair(host: str = "127.0.0.1") -> int:
    """A port P such that P and P + 1 are both free on ``host`` right now (swtpm: server and control)."""
    for _ in range(100):
        port = free_port(host)
        if port < 65535 and not port_in_use(host, port) and not port_in_use(host, port + 1):
            return port
    raise RuntimeError(f"no two adjacent free ports on {host}")
