"""The TPM vault against real software TPMs (Debian's swtpm, one per test from tests.support.swtpm).

Sealed secrets must come back byte for byte through a new ESAPI context, must not unseal on another TPM
(another swtpm has other primary seeds), and the agent and ``bdn agent keys`` must work on top of them.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner

from blockdeepnet.config import AgentConfig, agent_config
from blockdeepnet.crypto.threshold import KeyShare, ThresholdPublicKey, deal
from blockdeepnet.eip712 import new_device_key
from cli.agent import agent as agent_cli
from firmware_agent import Agent, AgentSetupError
from firmware_agent.keys import load_device_key_from, load_key_share_from
from firmware_agent.vault import DEVICE_KEY, KEY_SHARE, TpmVault, open_vault
from tests.support.swtpm import Swtpm, free_port_pair
from tests.unit.test_agent_support import FleetFiles, write_fleet

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


@pytest.fixture(scope="module")
def dealt() -> tuple[ThresholdPublicKey, list[KeyShare]]:
    return deal(2, 3, 512, allow_insecure=True)


def _share_bytes(share: KeyShare) -> bytes:
    return json.dumps(share.to_dict()).encode()


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _tpm_agent_config(files: FleetFiles, i: int, tcti: str) -> AgentConfig:
    raw = {
        "fleet_file": "../fleet.json",
        "state_dir": "state",
        "secrets": {"backend": "tpm", "tcti": tcti},
        "broker": {"host": "127.0.0.1", "port": 1883},
        "data": {"source": "npz", "path": "data.npz"},
    }
    return agent_config(raw, files.devices[i].config_path.parent)


def test_sealed_secrets_unseal_through_a_new_context(
    tmp_path: Path, swtpm: str, dealt: tuple[ThresholdPublicKey, list[KeyShare]]
) -> None:
    tpk, shares = dealt
    key, address = new_device_key()
    share = _share_bytes(shares[1])
    vault = TpmVault(swtpm, tmp_path / "sealed")
    assert not vault.has(DEVICE_KEY)
    vault.put(DEVICE_KEY, key)
    vault.put(KEY_SHARE, share)
    assert vault.has(DEVICE_KEY) and vault.has(KEY_SHARE)

    sealed = tmp_path / "sealed"
    assert _mode(sealed) == 0o700
    names = sorted(p.name for p in sealed.iterdir())
    assert names == [f"{n}{s}" for n in (DEVICE_KEY, KEY_SHARE) for s in (".enc", ".priv", ".pub")]
    for path in sealed.iterdir():
        assert _mode(path) == 0o600
        blob = path.read_bytes()
        assert key not in blob and key.hex().encode() not in blob and b"secret" not in blob

    fresh = TpmVault(swtpm, sealed)  # nothing is cached: every call is a new ESAPI context and primary
    assert fresh.get(DEVICE_KEY) == key and fresh.get(KEY_SHARE) == share
    assert load_device_key_from(fresh).address == address
    assert load_key_share_from(fresh, tpk, 2).index == 2
    for _ in range(8):  # objects are flushed each time: swtpm has only three transient slots
        fresh.get(DEVICE_KEY)
    status = fresh.status()
    assert status.kind == "tpm" and status.names == (DEVICE_KEY, KEY_SHARE) and status.warning == ""
    assert swtpm in status.where and str(sealed) in status.where
    assert key.hex() not in repr(status) + repr(fresh)

    replacement, _ = new_device_key()
    fresh.put(DEVICE_KEY, replacement)
    assert vault.get(DEVICE_KEY) == replacement


def test_blobs_do_not_unseal_on_another_tpm(tmp_path: Path, swtpm_factory: Callable[[], Swtpm]) -> None:
    first, second = swtpm_factory(), swtpm_factory()
    key, _ = new_device_key()
    TpmVault(first.tcti, tmp_path / "sealed").put(DEVICE_KEY, key)
    shutil.copytree(tmp_path / "sealed", tmp_path / "copied")
    with pytest.raises(AgentSetupError, match="sealed by another TPM") as err:
        TpmVault(second.tcti, tmp_path / "copied").get(DEVICE_KEY)
    assert key.hex() not in str(err.value)
    assert TpmVault(first.tcti, tmp_path / "copied").get(DEVICE_KEY) == key  # the copy itself is intact


def test_damaged_or_mismatched_blobs_are_refused(tmp_path: Path, swtpm: str) -> None:
    vault = TpmVault(swtpm, tmp_path / "sealed")
    vault.put(DEVICE_KEY, os.urandom(32))
    vault.put(KEY_SHARE, b'{"share": 1}')
    sealed = tmp_path / "sealed"
    enc = {n: (sealed / f"{n}.enc").read_bytes() for n in (DEVICE_KEY, KEY_SHARE)}
    (sealed / f"{DEVICE_KEY}.enc").write_bytes(enc[KEY_SHARE])
    with pytest.raises(AgentSetupError, match="does not decrypt under its sealed key"):
        vault.get(DEVICE_KEY)
    (sealed / f"{DEVICE_KEY}.enc").write_bytes(enc[DEVICE_KEY])
    (sealed / f"{DEVICE_KEY}.priv").write_bytes(b"\x00\x05abc")
    with pytest.raises(AgentSetupError, match=r"device-key\.priv is not a TPM blob"):
        vault.get(DEVICE_KEY)
    (sealed / f"{DEVICE_KEY}.priv").unlink()
    with pytest.raises(AgentSetupError, match=r"incomplete \(device-key\.priv missing\)"):
        vault.get(DEVICE_KEY)
    with pytest.raises(AgentSetupError, match=r"no device key is sealed in .*bdn agent keys --import"):
        TpmVault(swtpm, tmp_path / "empty").get(DEVICE_KEY)
    os.chmod(sealed / f"{KEY_SHARE}.enc", 0o644)
    with pytest.raises(AgentSetupError, match="chmod 600"):
        vault.get(KEY_SHARE)


def test_an_unreachable_tpm_is_a_clear_error(tmp_path: Path) -> None:
    vault = TpmVault(f"swtpm:host=127.0.0.1,port={free_port_pair()}", tmp_path / "sealed")
    with pytest.raises(AgentSetupError, match=r"cannot reach the TPM at secrets\.tcti = .*is swtpm running"):
        vault.put(DEVICE_KEY, os.urandom(32))
    assert not (tmp_path / "sealed").exists()  # nothing half-written
    assert "cannot reach the TPM" in vault.status().warning
    with pytest.raises(AgentSetupError, match=r"cannot reach the TPM at secrets\.tcti = 'nosuchtcti:x'"):
        TpmVault("nosuchtcti:x", tmp_path / "sealed").put(DEVICE_KEY, os.urandom(32))


def test_the_agent_loads_its_key_and_share_from_the_tpm(
    tmp_path: Path, swtpm: str, dealt: tuple[ThresholdPublicKey, list[KeyShare]]
) -> None:
    files = write_fleet(tmp_path, "tpm-fleet", *dealt, devices=4)
    holder, member = _tpm_agent_config(files, 2, swtpm), _tpm_agent_config(files, 3, swtpm)
    assert holder.key_file is None and holder.share_file is None  # nothing but the TPM to read from

    vault = open_vault(holder)
    vault.put(DEVICE_KEY, files.devices[2].key)
    with pytest.raises(
        AgentSetupError, match=r"key holder 3, but no key share is held in .*sealed/key-share"
    ):
        Agent(holder)
    vault.put(KEY_SHARE, _share_bytes(files.shares[2]))
    a = Agent(holder)
    try:
        assert a.address == files.devices[2].address and a.is_holder and a.holder_index == 3
    finally:
        a.close()

    open_vault(member).put(DEVICE_KEY, files.devices[3].key)
    b = Agent(member)
    b.close()
    assert b.address == files.devices[3].address and not b.is_holder


def test_bdn_agent_keys_imports_plain_files_and_reports_status(
    tmp_path: Path, swtpm: str, dealt: tuple[ThresholdPublicKey, list[KeyShare]]
) -> None:
    files = write_fleet(
        tmp_path, "cli-fleet", *dealt, devices=1, extra_toml=f'[secrets]\nbackend = "tpm"\ntcti = "{swtpm}"\n'
    )
    device = files.devices[0]
    config, folder = str(device.config_path), device.config_path.parent
    runner = CliRunner()

    before = runner.invoke(agent_cli, ["keys", "--config", config, "--status"])
    assert before.exit_code == 0, before.output
    assert "backend: tpm" in before.output and "holds:   nothing" in before.output

    imported = runner.invoke(agent_cli, ["keys", "--config", config, "--import"])
    assert imported.exit_code == 0, imported.output
    assert "shred -u" in imported.output and (folder / "device.key").exists()

    again = runner.invoke(agent_cli, ["keys", "--config", config, "--import", "--remove-plain"])
    assert again.exit_code == 0, again.output
    assert "already held" in again.output
    assert not (folder / "device.key").exists() and not (folder / "share.json").exists()

    status = runner.invoke(agent_cli, ["keys", "--config", config, "--status"])
    assert status.exit_code == 0, status.output
    assert "backend: tpm" in status.output and swtpm in status.output
    assert "holds:   device-key, key-share" in status.output and "warning" not in status.output
    for text in (before.output, imported.output, again.output, status.output):
        assert device.key.hex() not in text and str(dealt[1][0].to_dict()["secret"]) not in text

    a = Agent(files.config(0))  # key_file and share_file are gone: the TPM is all it reads
    try:
        assert a.address == device.address and a.holder_index == 1
    finally:
        a.close()

    other, _ = new_device_key()
    (folder / "device.key").write_text(other.hex())
    os.chmod(folder / "device.key", 0o600)
    refused = runner.invoke(agent_cli, ["keys", "--config", config, "--import"])
    assert refused.exit_code == 2 and "not listed" in refused.output

    offline = f"swtpm:host=127.0.0.1,port={free_port_pair()}"
    device.config_path.write_text(device.config_path.read_text().replace(swtpm, offline))
    unreachable = runner.invoke(agent_cli, ["keys", "--config", config, "--status"])
    assert unreachable.exit_code == 0 and "warning: cannot reach the TPM" in unreachable.output


def test_bdn_agent_keys_refuses_to_replace_a_different_sealed_key(
    tmp_path: Path, swtpm: str, dealt: tuple[ThresholdPublicKey, list[KeyShare]]
) -> None:
    files = write_fleet(
        tmp_path, "cli-fleet", *dealt, devices=1, extra_toml=f'[secrets]\nbackend = "tpm"\ntcti = "{swtpm}"\n'
    )
    sealed_earlier, _ = new_device_key()
    open_vault(files.config(0)).put(DEVICE_KEY, sealed_earlier)
    result = CliRunner().invoke(
        agent_cli, ["keys", "--config", str(files.devices[0].config_path), "--import"]
    )
    assert result.exit_code == 2 and "already holds a different device-key" in result.output
    assert open_vault(files.config(0)).get(DEVICE_KEY) == sealed_earlier
    assert (files.devices[0].config_path.parent / "device.key").exists()
