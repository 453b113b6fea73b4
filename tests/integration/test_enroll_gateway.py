"""``POST /enroll`` on a real gateway (in-process, embedded amqtt broker, embedded chain) on a fleet made by
``init_fleet``: good, repeated, forged, expired, malformed and oversized requests, key share hand-out, and the
enrolled device's broker rights."""

from __future__ import annotations

import json
import secrets
import shutil
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
from eth_account import Account
from eth_account.signers.local import LocalAccount

from blockdeepnet.config import toml_text
from blockdeepnet.crypto.threshold import KeyShare
from blockdeepnet.enrollment import (
    EnrollmentToken,
    EnrollRequest,
    ca_fingerprint,
    issue_token,
    open_bundle,
)
from blockdeepnet.fleet import Fleet
from blockdeepnet.wire import Topics
from provisioning.enroll_token import issue_enrollment
from provisioning.fleet_init import InitOptions, init_fleet
from tests.support.gateway import GatewayThread
from tests.support.mqtt import MqttTestClient

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One fleet folder (3 key holders, t = 2, 512-bit key, embedded broker and chain), copied per test."""
    root = tmp_path_factory.mktemp("template") / "fleet"
    init_fleet(
        InitOptions(
            name=f"enr{secrets.token_hex(3)}",
            root=root,
            holders=3,
            threshold=2,
            key_bits=512,
            broker="embedded",
            broker_port=1883,
            http_port=0,
        )
    )
    toml = root / "gateway/gateway.toml"
    raw = tomllib.loads(toml.read_text())
    raw["broker"]["port"] = 0  # any free port; the tests read the bound one from the gateway
    raw["http"]["port"] = 0
    toml.write_text(toml_text(raw))
    return root


@dataclass
class Site:
    root: Path
    gt: GatewayThread
    url: str

    @property
    def token_key(self) -> bytes:
        return bytes.fromhex((self.root / "gateway/token.key").read_text().strip())

    def fleet(self) -> Fleet:
        return Fleet.load(self.root / "fleet.json")

    def issue(self, device: str, **kwargs: Any) -> EnrollmentToken:
        return issue_enrollment(self.root, device, gateway_url=self.url, **kwargs).token

    def registered(self, address: str) -> tuple[bool, bool, int]:
        return self.gt.gw.chain.call_sync(lambda lg: lg.device_info(address))


@pytest.fixture
def site(template: Path, tmp_path: Path) -> Iterator[Site]:
    root = tmp_path / "fleet"
    shutil.copytree(template, root)
    with GatewayThread(root / "gateway/gateway.toml") as gt:
        yield Site(root, gt, f"http://127.0.0.1:{gt.gw.http_port}")
        assert gt.error is None


def _post(url: str, body: bytes) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(
        url + "/enroll", data=body, headers={"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        text = exc.read()
        try:
            return exc.code, json.loads(text)
        except ValueError:
            return exc.code, {"raw": text.decode(errors="replace")}


def _redeem(
    site: Site, token: EnrollmentToken, key: LocalAccount, samples: int = 64
) -> tuple[int, dict[str, Any]]:
    return _post(site.url, EnrollRequest.make(token, key.key, samples).to_json())


def _assert_nothing_registered(site: Site, key: LocalAccount, shares: list[int]) -> None:
    assert site.fleet().device(key.address) is None
    assert site.gt.gw.fleet.device(key.address) is None
    assert site.registered(key.address)[0] is False
    on_gateway = sorted(
        int(p.stem.split("-")[1]) for p in (site.root / "gateway/shares").glob("share-*.json")
    )
    assert on_gateway == shares


def test_a_good_enrollment_registers_the_device_and_answers_a_sealed_bundle(site: Site) -> None:
    token = site.issue("pi-1")
    assert token.key_share == 1
    device = Account.create()
    status, answer = _redeem(site, token, device, samples=321)
    assert status == 200, answer
    contents = open_bundle(answer, token, bytes(device.key))

    bundle_fleet = Fleet.from_dict(contents["fleet"])
    entry = bundle_fleet.device(device.address)
    assert entry is not None and (entry.name, entry.samples, entry.key_share) == ("pi-1", 321, 1)
    share = KeyShare.from_dict(contents["key_share"])
    assert share.index == 1 and share.public.to_dict() == bundle_fleet.public_key.to_dict()
    broker = contents["broker"]
    assert broker["username"] == device.address and broker["port"] == site.gt.gw.broker_port
    assert broker["password"] and broker["tls"] is False
    assert ca_fingerprint(contents["ca_pem"].encode()) == token.ca_sha256
    assert contents["gateway_url"] == site.url

    # Everywhere the gateway keeps its fleet: fleet.json, memory, /fleet, the chain.
    on_disk = site.fleet().device(device.address)
    assert on_disk == entry and site.gt.gw.fleet.device(device.address) == entry
    with urllib.request.urlopen(site.url + "/fleet", timeout=10) as r:
        assert Fleet.from_dict(json.loads(r.read())).device(device.address) == entry
    assert site.registered(device.address) == (True, False, 1)

    # The handed-out share is gone from the gateway; the others stay.
    shares = sorted(p.name for p in (site.root / "gateway/shares").iterdir())
    assert shares == ["share-2.json", "share-3.json"]

    # A retry by the same device (its answer was lost) gets the same answer; another device is refused
    # (by the name check, which gateway/enroll.py makes before the single-use claim; see the no_share test
    # for "used").
    status, again = _redeem(site, token, device, samples=321)
    assert status == 200 and again == answer
    thief = Account.create()
    status, refused = _redeem(site, token, thief)
    assert status == 409 and refused["error"] == "name_taken", refused
    _assert_nothing_registered(site, thief, [2, 3])
    assert len(site.fleet().devices) == 1


def test_a_device_without_a_key_share(site: Site) -> None:
    token = site.issue("sensor", key_share="none")
    device = Account.create()
    status, answer = _redeem(site, token, device)
    assert status == 200, answer
    contents = open_bundle(answer, token, bytes(device.key))
    assert contents["key_share"] is None
    assert site.registered(device.address) == (True, False, 0)
    assert len(list((site.root / "gateway/shares").iterdir())) == 3


@pytest.mark.parametrize(
    "change",
    [
        {"key_share": 3},
        {"device": "pi-99"},
        {"expires": 4_000_000_000},
        {"gateway_url": "http://evil.example"},
        {"ca_sha256": "00" * 32},
        {"token_id": "0" * 32},
        {"gateway": "0x" + "11" * 20},
    ],
)
def test_a_forged_token_is_refused_and_nothing_is_registered(site: Site, change: dict[str, Any]) -> None:
    token = site.issue("pi-1")
    forged = replace(token, **change)  # the tag is kept: it no longer matches
    device = Account.create()
    status, answer = _redeem(site, forged, device)
    assert status == 401 and answer["error"] == "forged", answer
    _assert_nothing_registered(site, device, [1, 2, 3])
    # The genuine token is still unused.
    status, answer = _redeem(site, token, device)
    assert status == 200, answer


def test_a_token_of_another_fleet_and_an_expired_token_are_refused(site: Site) -> None:
    device = Account.create()
    token = site.issue("pi-1")
    other = issue_token(
        site.token_key,
        fleet="otherfleet",
        gateway_url=site.url,
        gateway=token.gateway,
        ca_sha256=token.ca_sha256,
        device="pi-1",
        key_share=0,
        ttl_s=600,
    )
    status, answer = _redeem(site, other, device)
    assert status == 403 and answer["error"] == "wrong_fleet", answer

    expired = site.issue("pi-2", ttl_s=60, now=time.time() - 3600)
    status, answer = _redeem(site, expired, device)
    assert status == 403 and answer["error"] == "expired", answer
    _assert_nothing_registered(site, device, [1, 2, 3])


def test_bad_proofs_malformed_and_oversized_bodies(site: Site) -> None:
    token = site.issue("pi-1")
    device, other = Account.create(), Account.create()
    request = EnrollRequest.make(token, device.key, 64)
    bad_cases = [
        (replace(request, address=other.address).to_json(), 401, "bad_signature"),
        (replace(request, samples=65).to_json(), 401, "bad_signature"),
        (b"not json at all", 400, "malformed"),
        (b"{}", 400, "malformed"),
        (
            json.dumps({**json.loads(request.to_json()), "token": "bdn-enroll-1:AAAA"}).encode(),
            400,
            "malformed",
        ),
        (b'{"samples": ' + b"9" * 5000 + b"}", 400, "malformed"),
        (json.dumps({**json.loads(request.to_json()), "pad": "x" * 9000}).encode(), 413, "too_large"),
    ]
    for body, status, code in bad_cases:
        got, answer = _post(site.url, body)
        assert (got, answer.get("error")) == (status, code), (body[:60], answer)
    got, _ = _post(site.url, b"x" * 200_000)  # beyond the HTTP server's own limit
    assert got == 413
    _assert_nothing_registered(site, device, [1, 2, 3])
    _assert_nothing_registered(site, other, [1, 2, 3])
    status, answer = _post(site.url, request.to_json())  # the genuine request still works
    assert status == 200, answer


def test_names_addresses_and_shares_are_not_given_twice(site: Site) -> None:
    first = Account.create()
    status, _ = _redeem(site, site.issue("pi-1"), first)
    assert status == 200

    # A second token for the enrolled name (bdn provision enroll refuses to issue one; made by hand here).
    sample = site.issue("pi-2")
    duplicate = issue_token(
        site.token_key,
        fleet=sample.fleet,
        gateway_url=site.url,
        gateway=sample.gateway,
        ca_sha256=sample.ca_sha256,
        device="pi-1",
        key_share=0,
        ttl_s=600,
    )
    second = Account.create()
    status, answer = _redeem(site, duplicate, second)
    assert status == 409 and answer["error"] == "name_taken", answer
    _assert_nothing_registered(site, second, [2, 3])

    # The enrolled device cannot join again under another name.
    status, answer = _redeem(site, sample, first)
    assert status == 409 and answer["error"] == "already_enrolled", answer

    # A token that reserves share 1, which was handed out (its file is gone): no_share, nothing registered.
    again = issue_token(
        site.token_key,
        fleet=sample.fleet,
        gateway_url=site.url,
        gateway=sample.gateway,
        ca_sha256=sample.ca_sha256,
        device="pi-3",
        key_share=1,
        ttl_s=600,
    )
    status, answer = _redeem(site, again, second)
    assert status == 409 and answer["error"] == "no_share", answer
    _assert_nothing_registered(site, second, [2, 3])
    # That token is now claimed by ``second``: it retries and gets the same refusal; anyone else gets "used".
    status, answer = _redeem(site, again, second)
    assert status == 409 and answer["error"] == "no_share", answer
    third = Account.create()
    status, answer = _redeem(site, again, third)
    assert status == 409 and answer["error"] == "used", answer
    _assert_nothing_registered(site, third, [2, 3])
    assert [d.key_share for d in site.fleet().devices] == [1]


def _state(fleet: str, address: str) -> str:
    return Topics(fleet).state(address)


def test_enrolled_devices_get_broker_rights_and_round_one_waits_for_key_holders(site: Site) -> None:
    gt = site.gt
    port = gt.gw.broker_port
    assert port is not None
    fleet_name = site.fleet().name
    monitor_password = (site.root / "broker/monitor.password").read_text().strip()
    devices = [Account.create(), Account.create()]
    creds = []
    for k, device in enumerate(devices):
        assert gt.named("round_open") == []  # fewer than t = 2 key holders so far: no round
        token = site.issue(f"pi-{k}")
        status, answer = _redeem(site, token, device)
        assert status == 200, answer
        creds.append(open_bundle(answer, token, bytes(device.key))["broker"])
    gt.wait_for("round_open", timeout=60)  # two key holders enrolled: round 1 opens

    with MqttTestClient("127.0.0.1", port, username="monitor", password=monitor_password) as monitor:
        monitor.connect()
        assert monitor.subscribe(Topics(fleet_name).prefix + "#") != 0x80
        monitor.drain(wait=0.3)
        intruder = MqttTestClient(
            "127.0.0.1", port, username=devices[0].address, password=creds[1]["password"]
        )
        try:
            reason = intruder.try_connect()
            assert reason is None or reason.is_failure  # device 1's password is not device 0's
        finally:
            intruder.close()
        with MqttTestClient(
            "127.0.0.1", port, username=creds[0]["username"], password=creds[0]["password"]
        ) as dev:
            dev.connect()
            own, other = _state(fleet_name, devices[0].address), _state(fleet_name, devices[1].address)
            dev.publish(own, b"online")
            assert monitor.expect(own, b"online").payload == b"online"
            dev.publish(other, b"spoofed")
            dev.publish(Topics(fleet_name).round(), b"spoofed")
            time.sleep(0.5)
            assert b"spoofed" not in [m.payload for m in monitor.drain(wait=0.5)]


# ------------------------------------------------------------------------------- Mosquitto, as in production


def test_enrollment_with_mosquitto_rewrites_its_files_and_reloads_it(tmp_path: Path) -> None:
    """``--broker mosquitto``: the gateway adds the device to Mosquitto's password file and ACL and sends it
    SIGHUP (``broker_reload``); the device then connects over TLS with the CA from its bundle."""
    import subprocess

    from tests.support.mosquitto import _die_with_parent, free_port, mosquitto_binary

    root = tmp_path / "fleet"
    port = free_port()
    init_fleet(
        InitOptions(
            name=f"mq{secrets.token_hex(3)}",
            root=root,
            holders=2,
            threshold=2,
            key_bits=512,
            broker="mosquitto",
            broker_port=port,
            http_port=0,
        )
    )
    log = (tmp_path / "mosquitto.out").open("wb")
    proc = subprocess.Popen(
        [mosquitto_binary(), "-c", str(root / "broker/mosquitto.conf")],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        preexec_fn=_die_with_parent,
    )
    try:
        deadline = time.monotonic() + 15
        while not (root / "broker/mosquitto.pid").exists() or _closed(port):
            assert proc.poll() is None and time.monotonic() < deadline, "mosquitto did not start"
            time.sleep(0.05)
        with GatewayThread(root / "gateway/gateway.toml") as gt:
            site = Site(root, gt, f"http://127.0.0.1:{gt.gw.http_port}")
            token = site.issue("pi-1")
            device = Account.create()
            status, answer = _redeem(site, token, device)
            assert status == 200, answer
            contents = open_bundle(answer, token, bytes(device.key))
            broker = contents["broker"]
            assert broker["tls"] is True and broker["port"] == port and broker["username"] == device.address
            assert site.registered(device.address) == (True, False, 1)
            passwd = (root / "broker/mosquitto.passwd").read_text()
            assert f"{device.address}:$7$" in passwd
            assert f"user {device.address}" in (root / "broker/mosquitto.acl").read_text()

            ca = tmp_path / "device-ca.pem"
            ca.write_text(contents["ca_pem"])
            topics = Topics(token.fleet)
            monitor_password = (root / "broker/monitor.password").read_text().strip()
            with MqttTestClient(
                "127.0.0.1", port, username="monitor", password=monitor_password, tls_ca=ca
            ) as monitor:
                monitor.connect()
                monitor.subscribe(topics.prefix + "#")
                monitor.drain(wait=0.3)
                client = MqttTestClient(
                    "127.0.0.1", port, username=broker["username"], password=broker["password"], tls_ca=ca
                )
                deadline = time.monotonic() + 10  # the reload is asynchronous: Mosquitto reads on SIGHUP
                while True:
                    reason = client.try_connect()
                    if reason is not None and not reason.is_failure:
                        break
                    client.close()
                    assert time.monotonic() < deadline, f"the enrolled device is refused: {reason}"
                    time.sleep(0.2)
                    client = MqttTestClient(
                        "127.0.0.1", port, username=broker["username"], password=broker["password"], tls_ca=ca
                    )
                try:
                    own = topics.state(device.address)
                    client.publish(own, b"online")
                    assert monitor.expect(own, b"online").payload == b"online"
                    client.publish(topics.state(Account.create().address), b"spoofed")
                    client.publish(topics.round(), b"spoofed")
                    assert b"spoofed" not in [m.payload for m in monitor.drain(wait=0.8)]
                finally:
                    client.close()
            assert proc.poll() is None  # SIGHUP reloaded it, it did not stop
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _closed(port: int) -> bool:
    import socket

    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return False
    except OSError:
        return True


# --------------------------------------------------------------------------------------- the device's side


@pytest.fixture(scope="module")
def npz(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import numpy as np

    from blockdeepnet.data import load_fashion_mnist

    data = load_fashion_mnist()
    path = tmp_path_factory.mktemp("data") / "local.npz"
    np.savez(path, x=data.train_x[:64], y=data.train_y[:64])
    return path


def _agent_enroll(*args: str) -> Any:
    from click.testing import CliRunner

    from cli.main import cli

    return CliRunner().invoke(cli, ["agent", "enroll", *args], catch_exceptions=False)


def _enrolled_address(output: str) -> str:
    import re

    found = re.search(r"enrolled as (0x[0-9a-fA-F]{40})", output)
    assert found, output
    return found.group(1)


def test_agent_enroll_writes_a_device_folder_the_agent_runs_from(
    site: Site, npz: Path, tmp_path: Path
) -> None:
    import stat

    from blockdeepnet.config import load_agent_config
    from firmware_agent.keys import load_device_key, load_key_share
    from firmware_agent.service import build_agent

    gw = site.gt.gw
    first = issue_enrollment(site.root, "pi-1", gateway_url=site.url)
    folder = tmp_path / "pi-1"
    args = ["--dir", str(folder), "--data-npz", str(npz), "--secrets", "files"]
    result = _agent_enroll("--token", first.text, *args)
    assert result.exit_code == 0, result.output
    address = _enrolled_address(result.output)
    assert "key holder 1" in result.output and "64 samples" in result.output

    cfg = load_agent_config(folder / "agent.toml")
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert cfg.broker.username == address and cfg.broker.port == gw.broker_port
    assert (
        cfg.broker.password_file is not None
        and stat.S_IMODE(cfg.broker.password_file.stat().st_mode) == 0o600
    )
    assert cfg.broker.password() and cfg.broker.tls_ca is None  # the embedded broker speaks plain MQTT
    assert cfg.gateway_url == site.url and cfg.data.path == npz.resolve()
    assert cfg.chain_rpc == site.url + "/rpc"  # the embedded chain is read through the gateway
    fleet = Fleet.load(cfg.fleet_file)
    entry = fleet.device(address)
    assert entry is not None and (entry.samples, entry.key_share, entry.name) == (64, 1, "pi-1")
    assert cfg.key_file is not None and stat.S_IMODE(cfg.key_file.stat().st_mode) == 0o600
    assert load_device_key(cfg.key_file).address == address
    assert cfg.share_file is not None and stat.S_IMODE(cfg.share_file.stat().st_mode) == 0o600
    assert load_key_share(cfg.share_file, fleet.public_key, 1).index == 1
    assert site.registered(address) == (True, False, 1)

    # Enrolling again over an enrolled folder is refused (one line, exit 2), and changes nothing.
    before = (folder / "agent.toml").read_text()
    again = _agent_enroll("--token", first.text, *args)
    assert again.exit_code == 2 and "--force" in again.output
    assert (folder / "agent.toml").read_text() == before

    # The agent built from the folder starts and connects to the gateway's broker.
    events: list[tuple[str, dict[str, Any]]] = []
    agent = build_agent(folder / "agent.toml", on_event=lambda name, data: events.append((name, data)))
    agent.start()
    try:
        deadline = time.monotonic() + 30
        while not any(name == "connected" for name, _ in events):
            assert time.monotonic() < deadline, events
            assert not any(name == "error" for name, _ in events), events
            time.sleep(0.1)

        # A second device enrolls from the QR code (the second key holder: round 1 opens). The running agent
        # sees a sample total it does not know, fetches /fleet and accepts the newcomer the chain registered.
        second = issue_enrollment(site.root, "pi-2", gateway_url=site.url)
        folder2 = tmp_path / "pi-2"
        args2 = ["--dir", str(folder2), "--data-npz", str(npz), "--secrets", "files"]
        result = _agent_enroll("--qr", str(second.png), *args2)
        assert result.exit_code == 0, result.output
        address2 = _enrolled_address(result.output)
        assert site.registered(address2) == (True, False, 2)
        deadline = time.monotonic() + 60
        while not any(name == "fleet_grown" for name, _ in events):
            assert time.monotonic() < deadline, events
            time.sleep(0.1)
        assert not any(name == "round_refused" for name, _ in events), events
        assert Fleet.load(cfg.fleet_file).device(address2) is not None
    finally:
        agent.stop()
        agent.join(30)
        agent.close()

    # A device whose answer was lost retries with the same token: same key, same (stored) answer.
    (folder2 / "agent.toml").unlink()
    retry = _agent_enroll("--token", second.text, *args2)
    assert retry.exit_code == 0, retry.output
    assert _enrolled_address(retry.output) == address2
    assert len(site.fleet().devices) == 2


def test_agent_enroll_refuses_bad_tokens_without_writing_a_config(
    site: Site, npz: Path, tmp_path: Path
) -> None:
    token = site.issue("pi-1")
    folder = tmp_path / "dev"
    args = ["--dir", str(folder), "--data-npz", str(npz), "--secrets", "files"]
    forged = replace(token, key_share=3).encode()
    result = _agent_enroll("--token", forged, *args)
    assert result.exit_code == 2 and "forged" in result.output, result.output
    assert not (folder / "agent.toml").exists()
    result = _agent_enroll("--token", "bdn-enroll-1:garbage", *args)
    assert result.exit_code == 2 and "Traceback" not in result.output
    expired = issue_enrollment(site.root, "pi-9", gateway_url=site.url, ttl_s=60, now=time.time() - 3600)
    result = _agent_enroll("--token", expired.text, *args)
    assert result.exit_code == 2 and "expired" in result.output
    unreachable = replace(token, gateway_url="http://127.0.0.1:9")
    result = _agent_enroll("--token", unreachable.encode(), *args)
    assert result.exit_code == 2 and "cannot reach" in result.output
    assert not (folder / "agent.toml").exists()
    assert site.fleet().devices == ()
