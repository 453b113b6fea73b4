"""sd_notify client: real AF_UNIX datagram sockets (a path in a tmp dir, and an abstract name) receive what the
daemons would tell systemd."""

from __future__ import annotations

import itertools
import os
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from blockdeepnet import sdnotify
from blockdeepnet.sdnotify import Watchdog


class Listener:
    """What systemd does: a bound datagram socket; :meth:`messages` returns what arrived so far."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        sock.settimeout(0.05)

    def messages(self) -> list[str]:
        out = []
        while True:
            try:
                out.append(self.sock.recv(4096).decode())
            except TimeoutError:
                return out


class _Recorder:
    def __init__(self) -> None:
        self.times: list[float] = []
        self.lock = threading.Lock()

    def __call__(self, state: str) -> bool:
        assert state == "WATCHDOG=1"
        with self.lock:
            self.times.append(time.monotonic())
        return True


@pytest.fixture
def path_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Listener]:
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        yield Listener(sock)


@pytest.fixture
def abstract_socket(monkeypatch: pytest.MonkeyPatch) -> Iterator[Listener]:
    name = f"bdn-test-{secrets.token_hex(6)}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        yield Listener(sock)


def test_ready_status_stopping_reach_a_path_socket(path_socket: Listener) -> None:
    assert sdnotify.ready("up: broker on port 1883")
    assert sdnotify.status("round 3\nclosing")
    assert sdnotify.stopping()
    assert path_socket.messages() == [
        "READY=1\nSTATUS=up: broker on port 1883",
        "STATUS=round 3 closing",  # one line: a newline would start a bogus assignment
        "STOPPING=1",
    ]


def test_abstract_socket_name_with_at_sign(abstract_socket: Listener) -> None:
    assert sdnotify.ready()
    assert sdnotify.notify("WATCHDOG=1")
    assert abstract_socket.messages() == ["READY=1", "WATCHDOG=1"]


def test_no_socket_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sdnotify.ready() is False
    assert sdnotify.stopping() is False


def test_unreachable_or_unsupported_socket_is_reported_not_raised(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone.sock"))
    assert sdnotify.ready() is False
    monkeypatch.setenv("NOTIFY_SOCKET", "vsock:2:1234")
    assert sdnotify.ready() is False
    assert "gone.sock" in caplog.text and "vsock" in caplog.text


@pytest.mark.parametrize(
    ("usec", "pid", "expected"),
    [
        ("60000000", None, 60.0),
        ("500000", "self", 0.5),
        ("60000000", "other", None),  # inherited from a parent: not ours to ping
        ("0", None, None),
        ("soon", None, None),
        (None, None, None),
    ],
)
def test_watchdog_interval(
    monkeypatch: pytest.MonkeyPatch, usec: str | None, pid: str | None, expected: float | None
) -> None:
    for name, value in (("WATCHDOG_USEC", usec), ("WATCHDOG_PID", pid)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            mapped = {"self": str(os.getpid()), "other": str(os.getpid() + 1)}.get(value, value)
            monkeypatch.setenv(name, mapped)
    assert sdnotify.watchdog_interval() == expected


def test_watchdog_from_env_pings_the_socket(path_socket: Listener, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "2000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    wd = Watchdog.from_env()
    assert wd.enabled and wd.interval == 2.0 and wd.period == 1.0
    assert wd.kick() is True
    assert wd.kick() is False  # throttled
    assert path_socket.messages() == ["WATCHDOG=1"]


def test_kick_sends_at_most_one_ping_per_half_interval() -> None:
    now = [100.0]
    rec = _Recorder()
    wd = Watchdog(10.0, clock=lambda: now[0], send=rec)
    assert wd.due() and wd.kick()
    for t in (101.0, 104.9):
        now[0] = t
        assert not wd.due() and not wd.kick()
    now[0] = 105.0
    assert wd.kick()
    now[0] = 109.0
    assert not wd.kick()
    now[0] = 130.0  # a loop that was stuck: the next pass pings at once
    assert wd.kick()
    assert len(rec.times) == 3


def test_disabled_watchdog_does_nothing() -> None:
    rec = _Recorder()
    wd = Watchdog(None, send=rec)
    assert not wd.enabled and wd.period is None and not wd.due() and not wd.kick()
    with wd.patience(10):
        pass
    assert rec.times == []


def test_patience_keeps_pinging_through_a_long_step() -> None:
    rec = _Recorder()
    wd = Watchdog(0.4, send=rec)  # pings due every 0.2 s
    start = time.monotonic()
    with wd.patience(5.0):
        time.sleep(1.2)  # the step: the loop cannot kick meanwhile
    pings = [t - start for t in rec.times]
    assert len(pings) >= 4, pings
    gaps = [b - a for a, b in itertools.pairwise(pings)]
    assert max(gaps) < 0.4, gaps  # never as long as the watchdog interval


def test_patience_stops_pinging_once_the_budget_is_spent() -> None:
    rec = _Recorder()
    wd = Watchdog(0.4, send=rec)
    start = time.monotonic()
    with wd.patience(0.5):
        time.sleep(1.5)  # a step stuck past its budget: systemd must see the pings stop
    pings = [t - start for t in rec.times]
    during = [t for t in pings if t < 1.5]
    assert during and max(during) < 0.8, pings
    assert pings[-1] >= 1.5  # leaving the block pings again (the loop is back)


def test_patience_helper_thread_ends_when_idle() -> None:
    wd = Watchdog(0.2, send=_Recorder())
    with wd.patience(1.0):
        time.sleep(0.1)
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline and any(t.name == "sd-watchdog" for t in threading.enumerate()):
        time.sleep(0.02)
    assert not any(t.name == "sd-watchdog" for t in threading.enumerate())
    with wd.patience(1.0):  # and a later block starts a new one
        time.sleep(0.1)
        assert any(t.name == "sd-watchdog" for t in threading.enumerate())
