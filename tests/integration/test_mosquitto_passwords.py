"""The ``$7$`` password lines blockdeepnet.mosquitto_users writes, checked by a real Mosquitto 2."""

from __future__ import annotations

import base64
import hashlib
import os
import signal
import stat
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from blockdeepnet.mosquitto_users import mosquitto_hash, set_user
from blockdeepnet.private_files import write_private_atomic
from tests.support.mosquitto import MosquittoProcess
from tests.support.mqtt import MqttTestClient

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

Factory = Callable[..., MosquittoProcess]


def _accepted(broker: MosquittoProcess, user: str, password: str) -> bool:
    client = MqttTestClient(broker.host, broker.port, username=user, password=password)
    try:
        reason = client.try_connect(timeout=10)
        return reason is not None and not reason.is_failure
    finally:
        client.close()


def _wait_until(check: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.2)
    return False


def test_hash_format_is_pbkdf2_sha512() -> None:
    salt = b"0123456789ab"
    line = mosquitto_hash("pw", salt=salt)
    _, kind, iterations, b64salt, b64hash = line.split("$")
    assert (kind, iterations) == ("7", "101")
    assert base64.b64decode(b64salt) == salt
    assert base64.b64decode(b64hash) == hashlib.pbkdf2_hmac("sha512", b"pw", salt, 101, dklen=64)
    assert mosquitto_hash("pw") != mosquitto_hash("pw")  # a fresh salt each time


def test_mosquitto_checks_passwords_written_by_set_user(tmp_path: Path, mosquitto_factory: Factory) -> None:
    passwd = tmp_path / "passwd"
    set_user(passwd, "gateway", "gw-secret")
    set_user(passwd, "0xAbC0000000000000000000000000000000000001", "dev-secret")
    assert stat.S_IMODE(passwd.stat().st_mode) == 0o600
    broker = mosquitto_factory(password_file=passwd, allow_anonymous=False)
    assert _accepted(broker, "gateway", "gw-secret")
    assert _accepted(broker, "0xAbC0000000000000000000000000000000000001", "dev-secret")
    assert not _accepted(broker, "gateway", "gw-secret2")
    assert not _accepted(broker, "gateway", "dev-secret")  # another user's password
    assert not _accepted(broker, "nobody", "gw-secret")


def test_set_user_replaces_a_password_and_sighup_reloads(tmp_path: Path, mosquitto_factory: Factory) -> None:
    passwd = tmp_path / "passwd"
    set_user(passwd, "gateway", "old")
    set_user(passwd, "monitor", "watch")
    set_user(passwd, "gateway", "new")
    lines = passwd.read_text().splitlines()
    assert [line.split(":")[0] for line in lines] == ["monitor", "gateway"]  # replaced, not duplicated
    broker = mosquitto_factory(password_file=passwd, allow_anonymous=False)
    assert _accepted(broker, "gateway", "new")
    assert not _accepted(broker, "gateway", "old")
    assert _accepted(broker, "monitor", "watch")

    # A device joins while the broker runs: unknown until the broker is told to reload.
    set_user(passwd, "device-1", "dev-pw")
    assert not _accepted(broker, "device-1", "dev-pw")
    assert broker.proc is not None
    os.kill(broker.proc.pid, signal.SIGHUP)
    assert _wait_until(lambda: _accepted(broker, "device-1", "dev-pw")), broker.log_tail()
    assert broker.running
    assert not _accepted(broker, "device-1", "wrong")
    assert _accepted(broker, "monitor", "watch")

    set_user(passwd, "device-1", "rotated")
    os.kill(broker.proc.pid, signal.SIGHUP)
    assert _wait_until(lambda: not _accepted(broker, "device-1", "dev-pw")), broker.log_tail()
    assert _accepted(broker, "device-1", "rotated")


@pytest.mark.parametrize(
    ("user", "password"),
    [("", "x"), ("a:b", "x"), ("a b", "x"), ("u" * 129, "x"), ("user", ""), ("user", "two\nlines")],
)
def test_set_user_refuses_lines_that_would_corrupt_the_file(tmp_path: Path, user: str, password: str) -> None:
    passwd = tmp_path / "passwd"
    set_user(passwd, "gateway", "gw")
    before = passwd.read_text()
    with pytest.raises(ValueError):
        set_user(passwd, user, password)
    assert passwd.read_text() == before


def test_write_private_atomic_replaces_with_mode_0600(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_text("old")
    path.chmod(0o644)
    write_private_atomic(path, "new")
    assert path.read_text() == "new" and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]  # no temporary file left behind
