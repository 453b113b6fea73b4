"""``bdn provision init`` and ``bdn provision enroll`` through the real CLI (click's test runner), with the
generated Mosquitto configuration started for real."""

from __future__ import annotations

import json
import os
import shlex
import socket
import stat
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from blockdeepnet.config import load_gateway_config
from blockdeepnet.crypto.threshold import KeyShare
from blockdeepnet.enrollment import EnrollmentToken, ca_fingerprint
from blockdeepnet.fleet import DeviceEntry, Fleet
from blockdeepnet.wire import Topics
from cli.main import cli
from provisioning.enroll_token import issue_enrollment
from tests.support.mosquitto import _die_with_parent, free_port, mosquitto_binary
from tests.support.mqtt import MqttTestClient

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def _run(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def _init(root: Path, *extra: str, name: str = "farm", holders: int = 3, threshold: int = 2) -> Result:
    return _run(
        "provision",
        "init",
        "--fleet",
        name,
        "--key-holders",
        str(holders),
        "--threshold",
        str(threshold),
        "--key-bits",
        "512",
        "--dir",
        str(root),
        *extra,
    )


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _unwrapped(text: str) -> str:
    """Rich wraps long lines (paths) at the terminal width, 80 columns under the test runner."""
    return text.replace("\n", "")


def _one_line_error(result: Result) -> str:
    assert result.exit_code == 2, result.output
    text = result.stderr.strip()
    assert text.startswith("error:") and "\n" not in text and "Traceback" not in result.output, text
    return text


SECRETS = [
    "gateway/gateway.key",
    "gateway/token.key",
    "gateway/gateway-tls.key",
    "gateway/broker.password",
    "ca/ca.key",
    "broker/monitor.password",
    "gateway/shares/share-1.json",
    "gateway/shares/share-2.json",
    "gateway/shares/share-3.json",
]
FOLDERS = ["", "gateway", "gateway/shares", "gateway/state", "ca", "broker", "enroll"]


def _check_common(root: Path, result: Result) -> Fleet:
    assert result.exit_code == 0, result.output
    for rel in FOLDERS:
        assert (root / rel).is_dir() and _mode(root / rel) == 0o700, rel
    for rel in SECRETS:
        assert (root / rel).is_file() and _mode(root / rel) == 0o600, rel
    assert not _mode(root / "fleet.json") & 0o022 and not _mode(root / "ca/ca.pem") & 0o022

    fleet = Fleet.load(root / "fleet.json")
    assert fleet.name == "farm" and fleet.devices == ()
    assert (fleet.public_key.threshold, fleet.public_key.holders) == (2, 3)
    assert fleet.public_key.public_key.bits == 512 and fleet.chain.kind == "embedded"
    gateway_key = (root / "gateway/gateway.key").read_text().strip()
    from eth_account import Account

    assert Account.from_key(gateway_key).address == fleet.gateway
    assert len(bytes.fromhex((root / "gateway/token.key").read_text().strip())) == 32
    for k in (1, 2, 3):
        share = KeyShare.from_dict(json.loads((root / f"gateway/shares/share-{k}.json").read_text()))
        assert share.index == k and share.public.to_dict() == fleet.public_key.to_dict()
    assert sorted(p.name for p in (root / "gateway/shares").iterdir()) == [
        f"share-{k}.json" for k in (1, 2, 3)
    ]
    cfg = load_gateway_config(root / "gateway/gateway.toml")
    assert cfg.fleet_file == (root / "fleet.json").resolve() or cfg.fleet_file.samefile(root / "fleet.json")
    assert cfg.key_file.samefile(root / "gateway/gateway.key")
    assert cfg.enroll.enabled and cfg.enroll.token_key_file is not None and cfg.enroll.shares_dir is not None
    assert cfg.enroll.token_key_file.samefile(root / "gateway/token.key")
    assert cfg.enroll.shares_dir.samefile(root / "gateway/shares")
    assert cfg.enroll.ca_file is not None and cfg.enroll.ca_file.samefile(root / "ca/ca.pem")
    assert cfg.broker.password_file is not None and cfg.broker.password_file.samefile(
        root / "gateway/broker.password"
    )
    assert cfg.broker.password() and cfg.broker.username == "gateway"
    return fleet


def _wait_listening(port: int, proc: subprocess.Popen[bytes], log: Path, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(
                f"mosquitto exited with {proc.returncode}: {log.read_text(errors='replace')}"
            )
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"mosquitto did not listen on {port}")


def _connects(port: int, ca: Path, user: str, password: str) -> bool:
    client = MqttTestClient("127.0.0.1", port, username=user, password=password, tls_ca=ca)
    try:
        reason = client.try_connect(timeout=10)
        return reason is not None and not reason.is_failure
    finally:
        client.close()


def test_init_with_mosquitto_writes_a_fleet_folder_whose_broker_config_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "fleet"
    port = free_port()
    monkeypatch.chdir(tmp_path)  # a relative --dir, as an operator would type it
    result = _init(Path("fleet"), "--broker", "mosquitto", "--broker-port", str(port))
    fleet = _check_common(root, result)
    for rel in ("broker/broker.key", "broker/mosquitto.passwd", "broker/mosquitto.acl"):
        assert _mode(root / rel) == 0o600, rel
    assert not (root / "broker/amqtt-users").exists()
    assert str(root / "broker/mosquitto.conf") in _unwrapped(result.stderr)

    cfg = load_gateway_config(root / "gateway/gateway.toml")
    assert cfg.broker.mode == "external" and cfg.broker.port == port and cfg.rounds.min_devices == 0
    assert cfg.broker.tls_ca is not None and cfg.broker.tls_ca.samefile(root / "ca/ca.pem")
    assert cfg.broker.tls_cert is not None and cfg.broker.tls_key is not None
    assert cfg.enroll.mosquitto_passwd is not None and cfg.enroll.mosquitto_acl is not None
    assert cfg.enroll.mosquitto_passwd.samefile(root / "broker/mosquitto.passwd")
    acl = (root / "broker/mosquitto.acl").read_text()
    assert "user gateway" in acl and "user monitor" in acl

    conf = root / "broker/mosquitto.conf"
    text = conf.read_text()
    assert "allow_anonymous false" in text and f"listener {port} 127.0.0.1" in text
    queued = next(
        int(line.split()[1]) for line in text.splitlines() if line.startswith("max_queued_messages")
    )
    assert queued > 1000  # DESIGN §6: the default 1000 drops QoS 1 messages silently
    ca = root / "ca/ca.pem"
    gateway_password = (root / "gateway/broker.password").read_text().strip()
    monitor_password = (root / "broker/monitor.password").read_text().strip()

    out = (tmp_path / "mosquitto.out").open("wb")
    proc = subprocess.Popen(
        [mosquitto_binary(), "-c", str(conf)],
        cwd="/",  # the config must not depend on the working directory (systemd starts it from /)
        stdin=subprocess.DEVNULL,
        stdout=out,
        stderr=subprocess.STDOUT,
        preexec_fn=_die_with_parent,
    )
    try:
        _wait_listening(port, proc, tmp_path / "mosquitto.out")
        assert _connects(port, ca, "gateway", gateway_password)
        assert _connects(port, ca, "monitor", monitor_password)
        assert not _connects(port, ca, "gateway", monitor_password)
        assert not _connects(port, ca, "gateway", gateway_password + "x")

        # The ACL is in force: the gateway may publish the round, the monitor may not (it only reads).
        topics = Topics(fleet.name)
        with (
            MqttTestClient(
                "127.0.0.1", port, username="monitor", password=monitor_password, tls_ca=ca
            ) as mon,
            MqttTestClient("127.0.0.1", port, username="gateway", password=gateway_password, tls_ca=ca) as gw,
        ):
            mon.connect()
            gw.connect()
            assert mon.subscribe(topics.round()) != 0x80
            gw.publish(topics.round(), b"opened")
            assert mon.expect(topics.round(), b"opened").payload == b"opened"
            mon.publish(topics.round(), b"forged")
            assert b"forged" not in [m.payload for m in mon.drain(wait=0.5)]

        # Plain MQTT (no TLS) is not served on the port.
        plain = MqttTestClient("127.0.0.1", port, username="gateway", password=gateway_password)
        try:
            refused = plain.try_connect(timeout=5)
        except (TimeoutError, OSError):
            refused = None
        finally:
            plain.close()
        assert refused is None or refused.is_failure

        # The reload command the gateway runs after an enrollment finds the broker through its pid file.
        pid_file = root / "broker/mosquitto.pid"
        assert int(pid_file.read_text()) == proc.pid
        reload = shlex.split(cfg.enroll.broker_reload)
        done = subprocess.run(reload, cwd="/", capture_output=True, text=True, timeout=30, check=False)
        assert done.returncode == 0, done.stderr
        time.sleep(0.5)
        assert proc.poll() is None
        assert _connects(port, ca, "gateway", gateway_password)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        out.close()


def test_init_with_the_embedded_broker(tmp_path: Path) -> None:
    root = tmp_path / "fleet"
    _check_common(root, _init(root, "--broker", "embedded", "--broker-port", "18883", "--devices", "2"))
    assert _mode(root / "broker/amqtt-users") == 0o600
    assert not (root / "broker/mosquitto.conf").exists() and not (root / "broker/mosquitto.passwd").exists()
    users = (root / "broker/amqtt-users").read_text().splitlines()
    assert sorted(line.split(":")[0] for line in users) == ["gateway", "monitor"]
    assert all(line.split(":", 1)[1].startswith("$argon2") for line in users)
    cfg = load_gateway_config(root / "gateway/gateway.toml")
    assert cfg.broker.mode == "embedded" and cfg.broker.port == 18883
    assert cfg.broker.users_file is not None and cfg.broker.users_file.samefile(root / "broker/amqtt-users")
    assert cfg.enroll.mosquitto_passwd is None and cfg.enroll.broker_reload == ""
    assert cfg.rounds.min_devices == 2


def test_init_refuses_an_existing_fleet_and_force_moves_it_aside(tmp_path: Path) -> None:
    root = tmp_path / "fleet"
    assert _init(root, "--broker", "embedded").exit_code == 0
    first = Fleet.load(root / "fleet.json")
    first_key = (root / "gateway/gateway.key").read_text()

    again = _init(root, "--broker", "embedded")
    assert "--force" in _one_line_error(again)
    assert (root / "gateway/gateway.key").read_text() == first_key  # untouched

    forced = _init(root, "--broker", "embedded", "--force")
    assert forced.exit_code == 0, forced.output
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("fleet.old-")]
    assert len(aside) == 1 and str(aside[0]) in _unwrapped(forced.stderr)
    assert (aside[0] / "gateway/gateway.key").read_text() == first_key
    assert Fleet.load(aside[0] / "fleet.json").public_key.to_dict() == first.public_key.to_dict()
    assert Fleet.load(root / "fleet.json").gateway != first.gateway  # a new fleet, new keys

    stray = tmp_path / "other"
    stray.mkdir()
    (stray / "notes.txt").write_text("mine")
    assert "--force" in _one_line_error(_init(stray, "--broker", "embedded"))
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _init(empty, "--broker", "embedded").exit_code == 0  # an empty folder is fine


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (("--key-holders", "2", "--threshold", "3"), "threshold"),
        (("--key-holders", "2", "--threshold", "0"), "threshold"),
        (("--fleet", "bad name!"), "fleet name"),
        (("--fleet", "a/b"), "fleet name"),
        (("--chain", "rpc"), "--chain-url"),
        (("--chain", "rpc", "--chain-url", "ftp://node"), "http"),
        (("--chain", "mainnet"), "--chain"),
        (("--key-bits", "256"), "--key-bits"),
        (("--broker-port", "70000"), "port"),
        (("--owner", "no-such-user-bdn"), "no-such-user-bdn"),
    ],
)
def test_init_bad_inputs_are_one_line_errors(tmp_path: Path, args: tuple[str, ...], says: str) -> None:
    root = tmp_path / "fleet"
    base = {"--fleet": "farm", "--key-holders": "3", "--threshold": "2"}
    merged = dict(base)
    extra: list[str] = []
    it = iter(args)
    for flag in it:
        value = next(it)
        if flag in base:
            merged[flag] = value
        else:
            extra += [flag, value]
    result = _run(
        "provision",
        "init",
        *[x for kv in merged.items() for x in kv],
        "--key-bits",
        "512",
        "--dir",
        str(root),
        *extra,
    )
    assert says in _one_line_error(result)
    assert not root.exists() or not any(root.iterdir())  # nothing half-made


# ------------------------------------------------------------------------------------------------ enroll


@pytest.fixture(scope="module")
def fleet_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("enroll") / "fleet"
    result = _init(root, "--broker", "embedded", "--http-port", "8099")
    assert result.exit_code == 0, result.output
    return root


def _fresh_fleet(tmp_path: Path, fleet_root: Path) -> Path:
    """A private copy of the module's fleet (init is the slow part)."""
    import shutil

    root = tmp_path / "fleet"
    shutil.copytree(fleet_root, root, symlinks=True)
    return root


def _enroll(root: Path, device: str, *extra: str) -> Result:
    return _run("provision", "enroll", "--dir", str(root), "--device", device, *extra)


def _token_of(result: Result) -> EnrollmentToken:
    assert result.exit_code == 0, result.output
    line = next(x for x in result.stdout.splitlines() if x.startswith("token: "))
    return EnrollmentToken.decode(line.removeprefix("token: "))


def test_enroll_writes_a_qr_code_of_a_valid_token(tmp_path: Path, fleet_root: Path) -> None:
    import zxingcpp
    from PIL import Image

    root = _fresh_fleet(tmp_path, fleet_root)
    png = tmp_path / "pi-1.png"
    result = _enroll(root, "pi-1", "--png", str(png), "--ttl", "2")
    token = _token_of(result)
    assert _mode(png) == 0o600
    with Image.open(png) as image:
        codes = zxingcpp.read_barcodes(image.convert("L"))
    assert [c.format for c in codes] == [zxingcpp.BarcodeFormat.QRCode]
    assert codes[0].text == token.encode()
    from firmware_agent.enroll import read_qr  # needs firmware_agent.vault

    assert read_qr(png) == token.encode()

    fleet = Fleet.load(root / "fleet.json")
    assert token.fleet == "farm" and token.device == "pi-1" and token.gateway == fleet.gateway
    assert token.gateway_url == "http://127.0.0.1:8099"
    assert token.ca_sha256 == ca_fingerprint((root / "ca/ca.pem").read_bytes())
    assert token.verify_mac(bytes.fromhex((root / "gateway/token.key").read_text().strip()))
    assert abs(token.expires - (time.time() + 2 * 3600)) < 60
    issued = (root / "enroll/issued.json").read_text()
    assert token.token_id in issued and token.mac not in issued  # the ledger holds no usable token
    assert _mode(root / "enroll/issued.json") == 0o600

    default = _token_of(_enroll(root, "pi-2", "--gateway-url", "http://gw.example:80"))
    assert default.gateway_url == "http://gw.example:80"
    assert (root / "enroll/pi-2.png").is_file()


def test_enroll_assigns_key_shares_and_refuses_duplicates(tmp_path: Path, fleet_root: Path) -> None:
    root = _fresh_fleet(tmp_path, fleet_root)
    assert _token_of(_enroll(root, "none-1", "--key-share", "none")).key_share == 0
    shares = [_token_of(_enroll(root, f"d{k}")).key_share for k in range(1, 6)]
    assert shares == [1, 2, 3, 0, 0]

    assert "outstanding" in _one_line_error(_enroll(root, "d1"))
    assert "not free" in _one_line_error(_enroll(root, "d9", "--key-share", "2"))
    assert "auto, none" in _one_line_error(_enroll(root, "d9", "--key-share", "two"))
    assert "--ttl" in _one_line_error(_enroll(root, "d9", "--ttl", "0"))
    _one_line_error(_enroll(root, "bad name"))

    # A device that enrolled (it is in fleet.json) cannot get a second token under its name.
    fleet = Fleet.load(root / "fleet.json")
    entry = DeviceEntry("0x" + "12" * 20, 64, 0, "joined")
    replace(fleet, devices=(entry,)).save(root / "fleet.json")
    assert "enrolled already" in _one_line_error(_enroll(root, "joined"))


def test_expired_tokens_free_their_name_and_share(tmp_path: Path, fleet_root: Path) -> None:
    root = _fresh_fleet(tmp_path, fleet_root)
    old = issue_enrollment(root, "late", ttl_s=60, now=time.time() - 3600)
    assert old.token.key_share == 1 and old.token.expired()
    again = _token_of(_enroll(root, "late"))
    assert again.key_share == 1 and again.token_id != old.token.token_id and not again.expired()
    # A share handed out (its file gone from the gateway) is never offered again.
    os.unlink(root / "gateway/shares/share-2.json")
    assert _token_of(_enroll(root, "next")).key_share == 3
    assert "not free" in _one_line_error(_enroll(root, "other", "--key-share", "2"))


def test_enroll_outside_a_fleet_folder_is_a_one_line_error(tmp_path: Path) -> None:
    assert "not a fleet folder" in _one_line_error(_enroll(tmp_path, "pi-1"))
