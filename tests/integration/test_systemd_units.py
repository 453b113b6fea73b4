"""The systemd units and their installer (DESIGN §8), as far as a machine without systemd as PID 1 allows.

- Each unit, rendered the way ``bdn provision install-service`` renders it (this venv's ``bdn`` in
  ``ExecStart=``), passes ``systemd-analyze verify`` without a word on stderr, and ``systemd-analyze security
  --offline=true`` rates its exposure at most 3.0.
- The installer's dry run prints its steps and changes nothing; a real run into a scratch root (``--root``,
  like DESTDIR) writes the files with their modes and owners, enables the unit offline, and keeps what the
  daemon wrote when it runs again.
- The daemons speak sd_notify for real: ``bdn gateway run``, ``bdn agent run`` and ``bdn chain dev`` as
  subprocesses send READY=1, keep sending WATCHDOG=1 (the agent also through a long training step) and
  STOPPING=1 on SIGTERM, to a datagram socket standing in for systemd.
- ``MemoryDenyWriteExecute=yes`` holds: those processes run under the kernel's PR_SET_MDWE (the same W^X
  refusal), and so does LiteRT inference on an exported model.
"""

from __future__ import annotations

import ctypes
import itertools
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from blockdeepnet.config import load_agent_config, load_gateway_config, toml_text
from blockdeepnet.crypto.threshold import deal
from cli.provision_service import install_service
from gateway.broker import free_port
from provisioning import services
from provisioning.localfleet import LocalFleet, create_local_fleet
from provisioning.services import (
    ROLES,
    TEMPLATE_BDN,
    Role,
    RunCommand,
    ServiceInstallError,
    Systemctl,
    plan_install,
    render_unit,
    run_plan,
    templates_dir,
    unit_name,
)
from tests.support.gateway import GatewayThread

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

BDN = Path(sys.executable).with_name("bdn")
DEALT = deal(1, 2, 512, allow_insecure=True)
MAX_EXPOSURE = 3.0
_PR_SET_MDWE, _PR_MDWE_REFUSE_EXEC_GAIN = 65, 1


@pytest.fixture(autouse=True)
def _checkout_counts_as_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    """This checkout and its venv may lie anywhere (CI clones into /tmp, a developer under /root or /home),
    where the sandbox would hide them from a real service. The installer rightly refuses that, so here the
    checkout stands in for an installed copy; every other path is still checked as in production."""
    checkout = (templates_dir().parent.resolve(), BDN.parent.parent.resolve(), BDN.parent.parent)
    real = services.hidden_from_service

    def hidden(path: Path) -> Path | None:
        if any(path == c or c in path.parents for c in checkout):
            return None
        return real(path)

    monkeypatch.setattr(services, "hidden_from_service", hidden)


def _analyze(*args: str) -> subprocess.CompletedProcess[str]:
    tool = shutil.which("systemd-analyze")
    assert tool, "systemd-analyze is missing: install Debian's systemd package"
    return subprocess.run([tool, *args], capture_output=True, text=True, timeout=30, check=False)


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each unit as the installer writes it, under its own name (verify checks the name too)."""
    folder = tmp_path_factory.mktemp("units")
    out: dict[str, Path] = {}
    for role in ROLES:
        path = folder / unit_name(role)
        path.write_text(render_unit(role, BDN))
        out[role] = path
    return out


@pytest.mark.parametrize("role", ROLES)
def test_verify_prints_nothing(rendered: dict[str, Path], role: str) -> None:
    done = _analyze("verify", str(rendered[role]))
    assert done.stderr == "" and done.returncode == 0, done.stderr


@pytest.mark.parametrize("role", ROLES)
def test_security_exposure_is_low(rendered: dict[str, Path], role: str) -> None:
    done = _analyze("security", "--offline=true", str(rendered[role]))
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", done.stdout)
    assert match, done.stdout + done.stderr
    assert float(match.group(1)) <= MAX_EXPOSURE, done.stdout


@pytest.mark.parametrize("role", ROLES)
def test_units_carry_the_service_contract(rendered: dict[str, Path], role: Role) -> None:
    """What the daemons' code relies on: notify + watchdog, the dedicated user, the state directory."""
    text = rendered[role].read_text()
    for line in (
        "Type=notify",
        "NotifyAccess=main",
        "Restart=on-failure",
        "User=bdn",
        f"StateDirectory=bdn/{role}",
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
        "PrivateTmp=yes",
        "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6",
        "MemoryDenyWriteExecute=yes",
        "CapabilityBoundingSet=",
    ):
        assert line in text.splitlines(), line
    assert re.search(r"^WatchdogSec=\d+", text, re.M)
    assert f"ExecStart={BDN} " in text
    # The shipped file is the same unit for bdn in /usr/local/bin: only ExecStart= differs.
    shipped = (templates_dir() / unit_name(role)).read_text()
    assert render_unit(role, Path(TEMPLATE_BDN)) == shipped


def test_extra_writable_paths_custom_user_and_odd_bdn_path_still_verify(tmp_path: Path) -> None:
    odd = tmp_path / "opt dir" / "b%n"
    odd.parent.mkdir()
    odd.write_text("#!/bin/sh\n")
    odd.chmod(0o755)
    unit = tmp_path / unit_name("gateway")
    unit.write_text(render_unit("gateway", odd, user="iot", read_write_paths=[Path("/etc/mosquitto")]))
    text = unit.read_text()
    assert "ReadWritePaths=-/etc/mosquitto" in text and "User=iot" in text and "Group=iot" in text
    done = _analyze("verify", str(unit))
    assert done.stderr == "", done.stderr
    with pytest.raises(ServiceInstallError, match=r"without \$"):
        render_unit("gateway", tmp_path / "b$x")


# ------------------------------------------------------------------------------------------- installer


def _fleet(
    root: Path,
    http_port: int = 0,
    gateway_extra: Mapping[str, Any] | None = None,
    agent_extra: Callable[[int], Mapping[str, Any]] | None = None,
) -> LocalFleet:
    return create_local_fleet(
        root,
        name=f"sd{secrets.token_hex(3)}",
        devices=3,
        threshold=1,
        holders=2,
        broker_port=free_port("127.0.0.1"),
        http_port=http_port,
        dealt=DEALT,
        gateway_extra=gateway_extra,
        agent_extra=agent_extra,
    )


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> LocalFleet:
    return _fleet(tmp_path_factory.mktemp("fleet") / "f")


def _user_exists(name: str) -> bool:
    import pwd

    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


@pytest.mark.parametrize("role", ROLES)
def test_dry_run_prints_the_steps_and_changes_nothing(fleet: LocalFleet, tmp_path: Path, role: str) -> None:
    config = {"gateway": fleet.gateway_config, "agent": fleet.devices[0].config}.get(role)
    units = tmp_path / "units"
    before = (_user_exists("bdn"), Path("/etc/bdn").exists(), Path(f"/var/lib/bdn/{role}").exists())
    args = [role, "--dry-run", "--unit-dir", str(units)] + (["--config", str(config)] if config else [])
    result = CliRunner().invoke(install_service, args)
    assert result.exit_code == 0, result.output
    out = result.output
    assert f"{units}/bdn-{role}.service" in out
    assert "systemctl daemon-reload" in out and f"systemctl enable --now --no-block {units}" in out
    assert f"ExecStart={BDN} " in out  # the unit's text is shown
    assert ("useradd --system" in out) == (not before[0])
    if config is not None:
        assert f'state_dir = "/var/lib/bdn/{role}"' in out
        secrets_shown = [
            f.read_text().strip()
            for f in config.parent.iterdir()
            if f.suffix in (".key", ".password") or f.name == "share.json"
        ]
        assert secrets_shown and not any(secret in out for secret in secrets_shown)
    assert not units.exists()
    after = (_user_exists("bdn"), Path("/etc/bdn").exists(), Path(f"/var/lib/bdn/{role}").exists())
    assert after == before


def test_bdn_provision_has_the_command(tmp_path: Path) -> None:
    from cli.main import cli

    result = CliRunner().invoke(
        cli, ["provision", "install-service", "chain-dev", "--dry-run", "--unit-dir", str(tmp_path)]
    )
    assert result.exit_code == 0, (
        f"cli/provision.py must register cli.provision_service.install_service: {result.output}"
    )
    assert f"{tmp_path}/bdn-chain-dev.service" in result.output


def _scratch_root(tmp_path: Path, groups: str = "") -> Path:
    """A tree with the bdn user (this process's uid, so no privilege is needed to chown to it)."""
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    uid, gid = os.getuid(), os.getgid()
    (root / "etc" / "passwd").write_text(f"bdn:x:{uid}:{gid}::/var/lib/bdn:/usr/sbin/nologin\n")
    (root / "etc" / "group").write_text(f"bdn:x:{gid}:\n{groups}")
    return root


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o7777


def test_install_gateway_into_a_scratch_root(fleet: LocalFleet, tmp_path: Path) -> None:
    root = _scratch_root(tmp_path)
    steps = plan_install("gateway", fleet.gateway_config, BDN, root=root)
    assert not any(isinstance(s, RunCommand) and s.argv[0] == "useradd" for s in steps)
    run_plan(steps)

    etc, state = root / "etc/bdn/gateway", root / "var/lib/bdn/gateway"
    unit = root / "etc/systemd/system/bdn-gateway.service"
    assert _mode(etc) == 0o700 and _mode(state) == 0o700 and _mode(unit) == 0o644
    for f in ("gateway.toml", "gateway.key", "broker.password"):
        assert _mode(etc / f) == 0o600, f
    for f in ("fleet.json", "amqtt-users"):  # rewritten by the gateway at run time: writable state
        assert _mode(state / f) == 0o600, f
    gw_dir = fleet.gateway_config.parent
    assert (etc / "gateway.key").read_bytes() == (gw_dir / "gateway.key").read_bytes()
    assert (etc / "gateway.key").stat().st_uid == os.getuid()
    assert f"ExecStart={BDN} gateway run --config /etc/bdn/gateway/gateway.toml" in unit.read_text()
    wants = root / "etc/systemd/system/multi-user.target.wants/bdn-gateway.service"
    assert wants.is_symlink() and os.readlink(wants) == "/etc/systemd/system/bdn-gateway.service"

    cfg = load_gateway_config(etc / "gateway.toml")  # the paths name the final locations
    assert cfg.state_dir == Path("/var/lib/bdn/gateway")
    assert cfg.fleet_file == Path("/var/lib/bdn/gateway/fleet.json")
    assert cfg.broker.users_file == Path("/var/lib/bdn/gateway/amqtt-users")
    assert cfg.key_file == etc / "gateway.key" and cfg.broker.password_file == etc / "broker.password"

    # Running it again (an upgrade) rewrites the configuration but keeps what the daemon wrote.
    (state / "fleet.json").write_text('{"written": "by the gateway"}')
    run_plan(plan_install("gateway", fleet.gateway_config, BDN, root=root))
    assert (state / "fleet.json").read_text() == '{"written": "by the gateway"}'


def test_install_agent_moves_its_state_and_joins_the_device_groups(tmp_path: Path) -> None:
    local = _fleet(tmp_path / "fleet")
    device = local.devices[0]  # a key holder: key file, share file, broker password
    old_state = device.folder / "state"
    (old_state / "sealed").mkdir(parents=True)
    (old_state / "agent-state.cbor").write_bytes(b"model and rounds")
    root = _scratch_root(tmp_path, groups="gpio:x:997:\n")
    steps = plan_install("agent", device.config, BDN, root=root)
    joins = [s for s in steps if isinstance(s, RunCommand) and s.argv[0] == "usermod"]
    assert [s.argv for s in joins] == [
        ("usermod", "--prefix", str(root), "--append", "--groups", "gpio", "bdn")
    ]
    run_plan(steps)

    assert "gpio:x:997:bdn" in (root / "etc/group").read_text()
    etc, state = root / "etc/bdn/agent", root / "var/lib/bdn/agent"
    for f in ("agent.toml", "device.key", "share.json", "broker.password"):
        assert _mode(etc / f) == 0o600, f
    assert (state / "agent-state.cbor").read_bytes() == b"model and rounds"
    assert _mode(state / "agent-state.cbor") == 0o600 and _mode(state / "sealed") == 0o700
    cfg = load_agent_config(etc / "agent.toml")
    assert cfg.state_dir == Path("/var/lib/bdn/agent") and cfg.share_file == etc / "share.json"
    assert cfg.fleet_file == Path("/var/lib/bdn/agent/fleet.json") and (state / "fleet.json").is_file()


@pytest.mark.skipif(os.geteuid() != 0, reason="useradd into a scratch tree needs root")
def test_the_service_user_is_created_when_missing(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/bash\n")
    (root / "etc/group").write_text("root:x:0:\n")
    run_plan(plan_install("chain-dev", None, BDN, root=root))
    entry = next(ln for ln in (root / "etc/passwd").read_text().splitlines() if ln.startswith("bdn:"))
    assert entry.endswith(":/var/lib/bdn:/usr/sbin/nologin")
    assert (root / "etc/systemd/system/multi-user.target.wants/bdn-chain-dev.service").is_symlink()


def test_paths_the_sandbox_would_hide_are_refused(tmp_path: Path) -> None:
    local = _fleet(tmp_path / "fleet")
    config = local.devices[1].config
    raw = tomllib.loads(config.read_text())
    raw["data"]["data_dir"] = "/tmp/mnist"  # read in place by the service, but PrivateTmp= hides /tmp
    config.write_text(toml_text(raw))
    with pytest.raises(ServiceInstallError, match=r"data\.data_dir /tmp/mnist lies under /tmp"):
        plan_install("agent", config, BDN, root=_scratch_root(tmp_path))
    with pytest.raises(
        ServiceInstallError, match=re.escape("the bdn executable /home/me/.venv/bin/bdn lies under /home")
    ):
        plan_install("chain-dev", None, Path("/home/me/.venv/bin/bdn"), root=_scratch_root(tmp_path / "2"))


def test_without_root_the_command_refuses(fleet: LocalFleet, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    result = CliRunner().invoke(install_service, ["gateway", "--config", str(fleet.gateway_config)])
    assert result.exit_code == 2 and "needs root" in result.output


@pytest.mark.skipif(Path("/run/systemd/system").is_dir(), reason="systemd runs here")
def test_without_a_running_systemd_the_error_says_how_to_start_it_later(tmp_path: Path) -> None:
    unit = tmp_path / "bdn-gateway.service"
    step = Systemctl(("systemctl", "daemon-reload"), "reload", Path("/"), unit, "systemctl enable --now x")
    with pytest.raises(
        ServiceInstallError, match=f"systemd is not running.*written to {unit}.*enable --now x"
    ):
        step.run()


# ------------------------------------------------------------------------------- the daemons notify


def _mdwe_available() -> bool:
    done = subprocess.run(
        [sys.executable, "-c", f"import ctypes; exit(ctypes.CDLL(None).prctl({_PR_SET_MDWE}, 1, 0, 0, 0))"],
        check=False,
    )
    return done.returncode == 0


MDWE = _mdwe_available()


def _sandbox_child() -> None:
    """In the child before exec: die with the test, and refuse W+X memory the way MemoryDenyWriteExecute=
    does (inherited across exec) when the kernel has PR_SET_MDWE."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if MDWE and libc.prctl(_PR_SET_MDWE, _PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "PR_SET_MDWE")


@dataclass
class Systemd:
    """The notify socket of a fake systemd, and what arrived on it (each message with its arrival time)."""

    path: Path
    sock: socket.socket
    got: list[tuple[float, str]] = field(default_factory=list)

    def wait_for(self, needle: str, proc: subprocess.Popen[bytes], log: Path, timeout: float) -> float:
        """Receive until a message contains ``needle``; its arrival time."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.receive(0.2)
            for at, msg in self.got:
                if needle in msg:
                    return at
            assert proc.poll() is None, f"exited {proc.returncode}:\n{log.read_text()[-3000:]}"
        raise AssertionError(f"no {needle!r} within {timeout} s; got {self.got}\n{log.read_text()[-3000:]}")

    def receive(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                self.got.append((time.monotonic(), self.sock.recv(4096).decode()))
            except TimeoutError:
                return

    def pings(self, after: float) -> list[float]:
        return [at for at, msg in self.got if msg == "WATCHDOG=1" and at > after]


@pytest.fixture
def systemd(tmp_path: Path) -> Iterator[Systemd]:
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        yield Systemd(path, sock)


WATCHDOG_S = 2.0


def _spawn(args: list[str], systemd: Systemd, log: Path) -> subprocess.Popen[bytes]:
    """``bdn ARGS`` as systemd would start it: $NOTIFY_SOCKET, $WATCHDOG_USEC and $WATCHDOG_PID (its own
    pid, set by a shell that then execs bdn in its place)."""
    env = {
        **os.environ,
        "NOTIFY_SOCKET": str(systemd.path),
        "WATCHDOG_USEC": str(int(WATCHDOG_S * 1e6)),
        "OMP_NUM_THREADS": "1",
    }
    with log.open("wb") as out:
        return subprocess.Popen(
            ["/bin/sh", "-c", 'WATCHDOG_PID=$$ exec "$0" "$@"', str(BDN), *args],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            preexec_fn=_sandbox_child,
        )


def _stop(proc: subprocess.Popen[bytes], systemd: Systemd, log: Path, timeout: float = 30) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        assert proc.wait(timeout) == 0, log.read_text()[-3000:]
    finally:
        proc.kill()
    systemd.receive(0.2)
    assert "STOPPING=1" in [m for _, m in systemd.got], systemd.got


def _steady(pings: list[float]) -> None:
    gaps = [b - a for a, b in itertools.pairwise(pings)]
    assert len(pings) >= 3 and max(gaps) < WATCHDOG_S, gaps


def test_gateway_sends_ready_watchdog_and_stopping(tmp_path: Path, systemd: Systemd) -> None:
    http = free_port("127.0.0.1")
    local = _fleet(tmp_path / "fleet", http_port=http)
    log = tmp_path / "gateway.log"
    proc = _spawn(["gateway", "run", "--config", str(local.gateway_config)], systemd, log)
    try:
        ready = systemd.wait_for("READY=1", proc, log, timeout=45)
        # READY means serving: the HTTP endpoint (started last, after broker, store, chain, MQTT) answers.
        with urllib.request.urlopen(f"http://127.0.0.1:{http}/healthz", timeout=5) as resp:
            assert resp.status in (200, 503)
        systemd.receive(3 * WATCHDOG_S / 2)
        _steady([ready, *systemd.pings(ready)])
        _stop(proc, systemd, log)
    finally:
        proc.kill()
    assert next(m for _, m in systemd.got if m.startswith("READY=1")).startswith("READY=1\nSTATUS=fleet ")


def test_agent_sends_ready_after_connecting_and_pings_through_training(
    tmp_path: Path, systemd: Systemd
) -> None:
    http = free_port("127.0.0.1")
    local = _fleet(
        tmp_path / "fleet",
        http_port=http,
        gateway_extra={"rounds": {"min_updates": 1}},
        # Fifteen epochs (a fraction of a second each here): one step clearly longer than the watchdog interval.
        agent_extra=lambda _k: {"chain_rpc": f"http://127.0.0.1:{http}/rpc", "train": {"local_epochs": 15}},
    )
    log = tmp_path / "agent.log"
    with GatewayThread(local.gateway_config):
        proc = _spawn(["agent", "run", "--config", str(local.devices[2].config)], systemd, log)
        try:
            ready = systemd.wait_for("READY=1", proc, log, timeout=40)
            assert "connected to 127.0.0.1" in next(m for _, m in systemd.got if m.startswith("READY=1"))
            # The gateway has a round open: the agent trains, encrypts and publishes in one heavy step during
            # which its loop does not turn; the watchdog must not notice.
            trained: float | None = None
            deadline = time.monotonic() + 45
            while "update published" not in log.read_text() and time.monotonic() < deadline:
                if trained is None and "training on" in log.read_text():
                    trained = time.monotonic()
                systemd.receive(0.25)
                assert proc.poll() is None, log.read_text()[-3000:]
            assert trained is not None and "update published" in log.read_text(), log.read_text()[-3000:]
            assert time.monotonic() - trained > WATCHDOG_S + 0.5  # the step really outlasted the interval
            systemd.receive(1.0)
            _steady([ready, *systemd.pings(ready)])
            _stop(proc, systemd, log)
        finally:
            proc.kill()


def test_chain_dev_sends_ready_once_the_node_answers(tmp_path: Path, systemd: Systemd) -> None:
    port = free_port("127.0.0.1")
    log = tmp_path / "chain.log"
    proc = _spawn(["chain", "dev", "--data-dir", str(tmp_path / "chain"), "--port", str(port)], systemd, log)
    try:
        ready = systemd.wait_for("READY=1", proc, log, timeout=45)
        assert f"dev chain on http://127.0.0.1:{port}" in next(m for _, m in systemd.got if "READY" in m)
        systemd.receive(3 * WATCHDOG_S / 2)
        _steady([ready, *systemd.pings(ready)])
        _stop(proc, systemd, log)
    finally:
        proc.kill()
    assert (tmp_path / "chain" / "anvil-state.json").is_file()


@pytest.mark.skipif(not MDWE, reason="this kernel has no PR_SET_MDWE")
def test_litert_inference_runs_without_writable_executable_memory(tmp_path: Path) -> None:
    script = """
import mmap, sys
import numpy as np
try:
    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    sys.exit("W+X memory was granted: PR_SET_MDWE is not in force")
except PermissionError:
    pass
import gateway.service, firmware_agent.agent, tpm2_pytss  # every extension module of both daemons loads
from blockdeepnet.learning.model import flatten, init_params
from firmware_agent.inference import TfliteModel
from firmware_agent.tflite_export import write_tflite
path = write_tflite(sys.argv[1], flatten(init_params(np.random.default_rng(1))))
probs = TfliteModel(path).predict(np.zeros((4, 28, 28), np.uint8))
assert probs.shape == (4, 10) and np.allclose(probs.sum(axis=1), 1, atol=1e-4), probs
print("ok")
"""
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "model.tflite")],
        capture_output=True,
        text=True,
        timeout=50,
        preexec_fn=_sandbox_child,
        check=False,
    )
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stdout + done.stderr
