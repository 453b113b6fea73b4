"""Issue 6 acceptance: a fleet stood up from the command line only, as an operator would.

``bdn provision init`` (anvil chain, Mosquitto with the generated TLS config, password file and ACL) →
``bdn gateway run`` → three ``bdn provision enroll`` QR codes → ``bdn agent enroll --qr`` on each device, two
of them sealing their secrets to their own swtpm → ``bdn agent run`` × 3 → two rounds committed on chain, every
device ends with the same model. Along the way a reused, a forged and an expired token are refused and
register nothing. Each agent's peak RSS (VmHWM) is read before it stops and must stay under 150 MB.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from blockdeepnet.config import load_gateway_config, toml_text
from blockdeepnet.data import load_fashion_mnist
from blockdeepnet.enrollment import EnrollmentToken
from blockdeepnet.fleet import Fleet
from cli.main import cli
from firmware_agent.chainview import ChainView
from gateway.broker import free_port
from gateway.store import Store
from provisioning.anvil import AnvilProcess
from tests.support.gateway_process import GatewayProcess
from tests.support.swtpm import Swtpm

pytestmark = [pytest.mark.integration, pytest.mark.timeout(480)]

SAMPLES = 64
RSS_LIMIT_MB = 150


def _bdn(*args: str) -> str:
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    assert result.exit_code == 0, f"bdn {' '.join(args)} -> {result.exit_code}: {result.output}"
    return result.output


def _bdn_fails(*args: str) -> str:
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    assert result.exit_code == 2, f"bdn {' '.join(args)} should have failed: {result.output}"
    return result.output


def _wait_port(port: int, proc: subprocess.Popen[bytes], what: str, timeout: float = 20.0) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"{what} exited with {proc.returncode}"
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise AssertionError(f"{what} never listened on {port}")


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def test_fleet_from_the_command_line(tmp_path: Path) -> None:
    data = load_fashion_mnist()
    npz = []
    for k in range(3):
        path = tmp_path / f"data{k}.npz"
        sl = slice(k * SAMPLES, (k + 1) * SAMPLES)
        np.savez(path, x=data.train_x[sl], y=data.train_y[sl])
        npz.append(path)
    root = tmp_path / "fleet"
    mqtt_port, http_port = free_port("127.0.0.1"), free_port("127.0.0.1")
    procs: list[subprocess.Popen[bytes]] = []
    with (
        AnvilProcess(state_file=tmp_path / "chain.json") as anvil,
        Swtpm(tmp_path / "tpm0") as tpm0,
        Swtpm(tmp_path / "tpm1") as tpm1,
    ):
        # fmt: off
        _bdn("provision", "init", "--fleet", "onboard", "--key-holders", "2", "--threshold", "2",
             "--chain", "rpc", "--chain-url", anvil.url, "--broker", "mosquitto",
             "--broker-port", str(mqtt_port), "--http-port", str(http_port), "--devices", "3",
             "--key-bits", "512", "--dir", str(root))
        # fmt: on
        assert "--force" in _bdn_fails(
            "provision",
            "init",
            "--fleet",
            "onboard",
            "--key-holders",
            "2",
            "--threshold",
            "2",
            "--dir",
            str(root),
        )  # fmt: skip
        gw_toml = root / "gateway" / "gateway.toml"
        raw = tomllib.loads(gw_toml.read_text())
        raw["rounds"].update(max_rounds=2, min_updates=3, deadline_s=60.0)
        gw_toml.write_text(toml_text(raw))
        cfg = load_gateway_config(gw_toml)

        broker = subprocess.Popen(
            ["mosquitto", "-c", str(root / "broker" / "mosquitto.conf")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        procs.append(broker)
        gateway = GatewayProcess(gw_toml, tmp_path / "gateway.log", http_port)
        try:
            _wait_port(mqtt_port, broker, "mosquitto")
            gateway.start()

            # Tokens: three good ones, and three that must be refused with nothing registered.
            pngs = []
            for k in range(3):
                out = _bdn("provision", "enroll", "--dir", str(root), "--device", f"dev{k}")
                assert f"key share {k + 1}" in out if k < 2 else "no key share" in out
                pngs.append(root / "enroll" / f"dev{k}.png")
            expired = _bdn("provision", "enroll", "--dir", str(root), "--device", "late", "--ttl", "0.0003")
            expired_token = expired.split("token: ")[1].strip()
            forged = EnrollmentToken.decode(expired_token)
            forged_token = EnrollmentToken(
                **{**forged.__dict__, "device": "intruder", "expires": forged.expires + 3600}
            ).encode()
            time.sleep(1.5)

            device_dirs = [tmp_path / "devices" / f"dev{k}" for k in range(3)]
            secrets_args = [
                ["--secrets", "tpm", "--tcti", tpm0.tcti],
                ["--secrets", "tpm", "--tcti", tpm1.tcti],
                ["--secrets", "files"],
            ]
            for k in range(3):
                out = _bdn("agent", "enroll", "--qr", str(pngs[k]), "--dir", str(device_dirs[k]),
                           "--data-npz", str(npz[k]), *secrets_args[k])  # fmt: skip
                assert "enrolled as" in out

            reuse = _bdn_fails("agent", "enroll", "--qr", str(pngs[2]), "--dir", str(tmp_path / "again"),
                               "--data-npz", str(npz[2]), "--secrets", "files")  # fmt: skip
            assert "refused" in reuse and ("used" in reuse or "enrolled already" in reuse)
            assert "expired" in _bdn_fails("agent", "enroll", "--token", expired_token, "--dir",
                                           str(tmp_path / "x1"), "--data-npz", str(npz[0]), "--secrets", "files")  # fmt: skip
            assert "forged" in _bdn_fails("agent", "enroll", "--token", forged_token, "--dir",
                                          str(tmp_path / "x2"), "--data-npz", str(npz[0]), "--secrets", "files")  # fmt: skip

            fleet = Fleet.load(root / "fleet.json")
            assert [d.name for d in fleet.devices] == ["dev0", "dev1", "dev2"]
            assert [d.key_share for d in fleet.devices] == [1, 2, 0]
            assert not list((root / "gateway" / "shares").iterdir()), "handed-out shares stay on the gateway"
            chain = ChainView.from_url(anvil.url, fleet.chain.contract, chain_id=fleet.chain.chain_id)
            for d in fleet.devices:
                assert chain.device_registered(d.address) == (True, d.key_share)

            for k in (0, 1):  # sealed: no plain key or share file on those devices
                assert not (device_dirs[k] / "device.key").exists()
                assert not (device_dirs[k] / "share.json").exists()
                status = _bdn("agent", "keys", "--config", str(device_dirs[k] / "agent.toml"), "--status")
                assert "tpm" in status.lower()

            env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
            agents = []
            for k in range(3):
                log = (tmp_path / f"agent{k}.log").open("wb")
                agents.append(
                    subprocess.Popen(
                        [
                            sys.executable,
                            "-m",
                            "cli.main",
                            "agent",
                            "run",
                            "--config",
                            str(device_dirs[k] / "agent.toml"),
                        ],
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        env=env,
                    )
                )
            procs.extend(agents)

            store = Store(cfg.store_url)
            try:
                deadline = time.monotonic() + 300
                while True:
                    reports = {(r.round, r.device) for n in (1, 2) for r in store.reports(n)}
                    if all((2, d.address) in reports for d in fleet.devices):
                        break
                    for k, a in enumerate(agents):
                        assert a.poll() is None, (tmp_path / f"agent{k}.log").read_text()[-3000:]
                    assert time.monotonic() < deadline, f"reports so far: {sorted(reports)}"
                    time.sleep(1.0)
            finally:
                store.close()
            rss = [_peak_rss_mb(a.pid) for a in agents]
            for r in (1, 2):
                info = chain.round_info(r)
                assert info.committed and info.count == 3
            print(json.dumps({"agent_peak_rss_mb": [round(x, 1) for x in rss]}))
            assert max(rss) <= RSS_LIMIT_MB, rss
        finally:
            for p in reversed(procs):
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM)
            if gateway.running:
                gateway.stop()
            for p in procs:
                try:
                    p.wait(20)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(5)
