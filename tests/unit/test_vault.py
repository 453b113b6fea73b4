"""The files and keystore vaults (the TPM one is in tests/integration/test_tpm_vault.py, against swtpm).

What must hold: secrets round-trip byte for byte; files are 0600 in 0700 folders; loose modes, symlinks, a
wrong passphrase, damaged or swapped entries are refused with a message that says what to do; no message,
repr or status carries a secret; and the agent takes its key and share from whichever vault is configured.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import stat
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from blockdeepnet.config import agent_config
from blockdeepnet.crypto.threshold import KeyShare, ThresholdPublicKey, deal
from blockdeepnet.eip712 import new_device_key
from cli.agent import agent as agent_cli
from firmware_agent import Agent, AgentSetupError
from firmware_agent.keys import load_device_key, load_device_key_from, load_key_share_from
from firmware_agent.vault import (
    DEVICE_KEY,
    KEY_SHARE,
    FilesVault,
    KeystoreVault,
    TpmVault,
    Vault,
    open_vault,
)
from tests.unit.test_agent_support import FleetFiles, write_fleet, write_private


@pytest.fixture(scope="module")
def dealt() -> tuple[ThresholdPublicKey, list[KeyShare]]:
    return deal(2, 3, 512, allow_insecure=True)


def _share_bytes(share: KeyShare) -> bytes:
    return json.dumps(share.to_dict()).encode()


@pytest.fixture
def share_json(dealt: tuple[ThresholdPublicKey, list[KeyShare]]) -> bytes:
    return _share_bytes(dealt[1][0])


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _forms(secret: bytes) -> list[bytes]:
    """Ways a secret could leak into text: raw, hex (both cases), base64."""
    return [secret, secret.hex().encode(), secret.hex().upper().encode(), base64.b64encode(secret)]


def _assert_no_secret(text: str | bytes, *secrets: bytes) -> None:
    data = text.encode() if isinstance(text, str) else text
    for secret in secrets:
        for form in _forms(secret):
            assert form not in data


def _keystore(tmp_path: Path, passphrase: str = "correct horse battery staple") -> KeystoreVault:
    write_private(tmp_path / "passphrase", passphrase + "\n")
    return KeystoreVault(tmp_path / "store" / "keystore.json", tmp_path / "passphrase")


# --- files -------------------------------------------------------------------------------------------------


def test_files_vault_round_trips_in_the_historical_format(tmp_path: Path, share_json: bytes) -> None:
    key, address = new_device_key()
    vault = FilesVault(tmp_path / "keys" / "device.key", tmp_path / "keys" / "share.json")
    assert not vault.has(DEVICE_KEY) and not vault.has(KEY_SHARE)
    vault.put(DEVICE_KEY, key)
    vault.put(KEY_SHARE, share_json)
    assert (tmp_path / "keys" / "device.key").read_text() == key.hex() + "\n"
    assert (tmp_path / "keys" / "share.json").read_bytes() == share_json
    assert (
        _mode(tmp_path / "keys" / "device.key") == 0o600 and _mode(tmp_path / "keys" / "share.json") == 0o600
    )
    assert _mode(tmp_path / "keys") == 0o700
    assert vault.get(DEVICE_KEY) == key and vault.get(KEY_SHARE) == share_json
    assert load_device_key(tmp_path / "keys" / "device.key").address == address
    assert load_device_key_from(vault).address == address
    status = vault.status()
    assert status.kind == "files" and status.names == (DEVICE_KEY, KEY_SHARE)
    assert "not sealed: a copy of the disk is a copy of the key" in status.warning
    _assert_no_secret(repr(vault) + repr(status), key, share_json)


def test_files_vault_keeps_the_file_checks_and_their_messages(tmp_path: Path) -> None:
    key, _ = new_device_key()
    vault = FilesVault(tmp_path / "device.key", None)
    with pytest.raises(AgentSetupError, match=r"device key file .*device\.key does not exist"):
        vault.get(DEVICE_KEY)
    with pytest.raises(AgentSetupError, match="share_file is not set"):
        vault.put(KEY_SHARE, b"{}")
    assert not vault.has(KEY_SHARE)
    write_private(tmp_path / "device.key", key.hex(), 0o644)
    with pytest.raises(AgentSetupError, match="chmod 600") as err:
        vault.get(DEVICE_KEY)
    _assert_no_secret(str(err.value), key)
    write_private(tmp_path / "device.key", "zz" * 32)
    with pytest.raises(AgentSetupError, match=r"device key file .* does not hold a valid secp256k1") as err:
        load_device_key_from(vault)
    assert "zz" * 32 not in str(err.value)
    real = write_private(tmp_path / "real.key", key.hex())
    os.symlink(real, tmp_path / "link.key")
    with pytest.raises(AgentSetupError, match="symlink"):
        FilesVault(tmp_path / "link.key", None).get(DEVICE_KEY)


# --- keystore ----------------------------------------------------------------------------------------------


def test_keystore_round_trips_across_instances(tmp_path: Path, share_json: bytes) -> None:
    key, address = new_device_key()
    vault = _keystore(tmp_path)
    assert not vault.has(DEVICE_KEY)
    vault.put(DEVICE_KEY, key)
    vault.put(KEY_SHARE, share_json)
    path = tmp_path / "store" / "keystore.json"
    assert _mode(path) == 0o600 and _mode(path.parent) == 0o700
    assert sorted(p.name for p in path.parent.iterdir()) == ["keystore.json"]  # no temporary file left
    _assert_no_secret(path.read_bytes(), key, share_json, b"correct horse")

    again = KeystoreVault(path, tmp_path / "passphrase")  # derives the key afresh from the file's salt
    assert again.get(DEVICE_KEY) == key and again.get(KEY_SHARE) == share_json
    assert load_device_key_from(again).address == address
    status = again.status()
    assert status.kind == "keystore" and status.names == (DEVICE_KEY, KEY_SHARE)
    assert "not sealed" in status.warning and str(tmp_path / "passphrase") in status.warning
    assert "does not open" not in status.warning
    _assert_no_secret(repr(again) + repr(status), key, share_json, b"correct horse")


def test_keystore_salt_and_nonces_are_fresh(tmp_path: Path) -> None:
    secret = os.urandom(32)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    docs = []
    for sub in ("a", "b"):
        vault = _keystore(tmp_path / sub)
        vault.put(DEVICE_KEY, secret)
        docs.append(json.loads((tmp_path / sub / "store" / "keystore.json").read_text()))
    assert docs[0]["kdf"]["salt"] != docs[1]["kdf"]["salt"]
    assert docs[0]["entries"][DEVICE_KEY] != docs[1]["entries"][DEVICE_KEY]


def test_keystore_warns_once_per_open(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="firmware_agent.vault")
    vault = _keystore(tmp_path)
    vault.put(DEVICE_KEY, os.urandom(32))
    vault.get(DEVICE_KEY)
    vault.status()
    warnings = [
        r for r in caplog.records if r.name == "firmware_agent.vault" and r.levelno == logging.WARNING
    ]
    assert len(warnings) == 1
    assert "no TPM" in warnings[0].getMessage() and "passphrase" in warnings[0].getMessage()


def test_keystore_refuses_a_wrong_passphrase(tmp_path: Path) -> None:
    secret = os.urandom(32)
    _keystore(tmp_path).put(DEVICE_KEY, secret)
    write_private(tmp_path / "other", "not the passphrase\n")
    wrong = KeystoreVault(tmp_path / "store" / "keystore.json", tmp_path / "other")
    with pytest.raises(AgentSetupError, match="does not open keystore") as err:
        wrong.get(DEVICE_KEY)
    assert "not the passphrase" not in str(err.value)
    with pytest.raises(AgentSetupError, match="does not open keystore"):
        wrong.put(KEY_SHARE, b"{}")  # nor is a second passphrase mixed into the same file
    assert "does not open keystore" in wrong.status().warning
    assert (
        KeystoreVault(tmp_path / "store" / "keystore.json", tmp_path / "passphrase").get(DEVICE_KEY) == secret
    )


def test_keystore_detects_damaged_and_swapped_entries(tmp_path: Path) -> None:
    key = os.urandom(32)
    vault = _keystore(tmp_path)
    vault.put(DEVICE_KEY, key)
    vault.put(KEY_SHARE, b'{"a share": 1}')
    path = tmp_path / "store" / "keystore.json"
    original = json.loads(path.read_text())

    def rewrite(doc: Any) -> None:
        write_private(path, doc if isinstance(doc, str) else json.dumps(doc))

    flipped = json.loads(json.dumps(original))
    blob = bytearray(base64.b64decode(flipped["entries"][DEVICE_KEY]))
    blob[-1] ^= 1
    flipped["entries"][DEVICE_KEY] = base64.b64encode(bytes(blob)).decode()
    rewrite(flipped)
    with pytest.raises(AgentSetupError, match=r"device key entry of keystore .* is damaged"):
        vault.get(DEVICE_KEY)

    swapped = json.loads(json.dumps(original))
    entries = swapped["entries"]
    entries[DEVICE_KEY], entries[KEY_SHARE] = entries[KEY_SHARE], entries[DEVICE_KEY]
    rewrite(swapped)
    with pytest.raises(AgentSetupError, match="is damaged"):
        vault.get(DEVICE_KEY)  # the entry names are bound into the encryption

    for broken, message in [
        ("{not json", "not JSON"),
        ({**original, "format": "other"}, "damaged or not a BlockDeepNet keystore"),
        ({**original, "version": 2}, "has version 2; this agent reads version 1"),
        ({**original, "kdf": {**original["kdf"], "n": 1 << 30}}, "out of range"),
        ({**original, "kdf": {**original["kdf"], "salt": "!!"}}, "damaged"),
        ({**original, "entries": {"../x": "AAAA"}}, "damaged"),
    ]:
        rewrite(broken)
        with pytest.raises(AgentSetupError, match=message) as err:
            vault.get(DEVICE_KEY)
        _assert_no_secret(str(err.value), key)
    rewrite(original)
    assert vault.get(DEVICE_KEY) == key


def test_keystore_missing_file_entry_and_loose_modes(tmp_path: Path) -> None:
    vault = _keystore(tmp_path)
    with pytest.raises(AgentSetupError, match=r"keystore .* does not exist .*bdn agent keys --import"):
        vault.get(DEVICE_KEY)
    assert vault.status().names == ()
    vault.put(DEVICE_KEY, os.urandom(32))
    with pytest.raises(AgentSetupError, match="holds no key share"):
        vault.get(KEY_SHARE)
    os.chmod(tmp_path / "store" / "keystore.json", 0o644)
    with pytest.raises(AgentSetupError, match=r"keystore file .* chmod 600"):
        KeystoreVault(tmp_path / "store" / "keystore.json", tmp_path / "passphrase").get(DEVICE_KEY)
    os.chmod(tmp_path / "store" / "keystore.json", 0o600)
    os.chmod(tmp_path / "passphrase", 0o640)
    with pytest.raises(AgentSetupError, match=r"keystore passphrase file .* chmod 600"):
        KeystoreVault(tmp_path / "store" / "keystore.json", tmp_path / "passphrase").get(DEVICE_KEY)
    write_private(tmp_path / "empty", "\n")
    with pytest.raises(AgentSetupError, match="is empty"):
        KeystoreVault(tmp_path / "fresh.json", tmp_path / "empty").put(DEVICE_KEY, b"x")


def test_secret_names_cannot_leave_the_vault_folder(tmp_path: Path) -> None:
    for vault in (_keystore(tmp_path), TpmVault("swtpm:host=127.0.0.1,port=1", tmp_path / "sealed")):
        for name in ("../escape", "a/b", "", "x.pub", "A"):
            with pytest.raises(ValueError, match="secret name"):
                vault.put(name, b"s")
    with pytest.raises(ValueError, match="only device-key and key-share"):
        FilesVault(tmp_path / "k", None).put("other", b"s")


# --- choosing a vault from agent.toml ----------------------------------------------------------------------


def test_open_vault_follows_the_config(tmp_path: Path) -> None:
    write_private(tmp_path / "pass", "p\n")
    base = {"fleet_file": "fleet.json", "state_dir": "state"}
    files = open_vault(agent_config({**base, "key_file": "device.key"}, tmp_path))
    assert isinstance(files, FilesVault) and files.key_file == tmp_path / "device.key"
    assert files.share_file is None
    tpm = open_vault(agent_config({**base, "secrets": {"backend": "tpm", "tcti": "swtpm:port=1"}}, tmp_path))
    assert isinstance(tpm, TpmVault) and tpm.sealed_dir == tmp_path / "state" / "sealed"
    assert tpm.tcti == "swtpm:port=1"  # opening it did not contact that (absent) TPM
    store = open_vault(
        agent_config({**base, "secrets": {"backend": "keystore", "passphrase_file": "pass"}}, tmp_path)
    )
    assert isinstance(store, KeystoreVault) and store.keystore_file == tmp_path / "state" / "keystore.json"
    custom = open_vault(
        agent_config(
            {
                **base,
                "secrets": {"backend": "keystore", "passphrase_file": "pass", "keystore_file": "/k.json"},
            },
            tmp_path,
        )
    )
    assert isinstance(custom, KeystoreVault) and custom.keystore_file == Path("/k.json")


# --- the agent on a keystore -------------------------------------------------------------------------------


def _keystore_agent_config(files: FleetFiles, i: int) -> Any:
    folder = files.devices[i].config_path.parent
    write_private(folder / "passphrase", "device passphrase\n")
    raw = {
        "fleet_file": "../fleet.json",
        "state_dir": "state",
        "secrets": {"backend": "keystore", "passphrase_file": "passphrase"},
        "broker": {"host": "127.0.0.1", "port": 1883},
        "data": {"source": "npz", "path": "data.npz"},
    }
    return agent_config(raw, folder)


def _fill(vault: Vault, key: bytes, share: KeyShare | None) -> None:
    vault.put(DEVICE_KEY, key)
    if share is not None:
        vault.put(KEY_SHARE, _share_bytes(share))


def test_the_agent_takes_its_key_and_share_from_a_keystore(
    tmp_path: Path, dealt: tuple[ThresholdPublicKey, list[KeyShare]]
) -> None:
    files = write_fleet(tmp_path, "keystore-fleet", *dealt, devices=4)
    holder, member = _keystore_agent_config(files, 1), _keystore_agent_config(files, 3)
    _fill(open_vault(holder), files.devices[1].key, files.shares[1])
    _fill(open_vault(member), files.devices[3].key, None)
    a = Agent(holder)
    try:
        assert a.address == files.devices[1].address and a.is_holder and a.holder_index == 2
    finally:
        a.close()
    b = Agent(member)
    b.close()
    assert b.address == files.devices[3].address and not b.is_holder


def test_the_agent_refuses_a_keystore_that_disagrees_with_the_fleet(
    tmp_path: Path, dealt: tuple[ThresholdPublicKey, list[KeyShare]]
) -> None:
    files = write_fleet(tmp_path, "keystore-fleet", *dealt, devices=4)
    holder, member = _keystore_agent_config(files, 0), _keystore_agent_config(files, 3)
    _fill(open_vault(holder), files.devices[0].key, None)
    with pytest.raises(AgentSetupError, match=r"key holder 1, but no key share is held in .*keystore\.json"):
        Agent(holder)
    _fill(open_vault(holder), files.devices[0].key, files.shares[1])
    with pytest.raises(
        AgentSetupError,
        match=r"key share in keystore .* holds share 2, but fleet\.json assigns this device share 1",
    ) as err:
        Agent(holder)
    _assert_no_secret(str(err.value), files.devices[0].key)
    _fill(open_vault(member), files.devices[3].key, files.shares[0])
    with pytest.raises(AgentSetupError, match=r"a key share is held in .*, but fleet\.json does not list"):
        Agent(member)
    stranger, _ = new_device_key()
    open_vault(member).put(DEVICE_KEY, stranger)
    with pytest.raises(AgentSetupError, match=r"\(key .*keystore\.json\) is not listed in fleet file"):
        Agent(member)


def test_key_share_from_a_vault_is_checked_against_the_fleet(
    tmp_path: Path, dealt: tuple[ThresholdPublicKey, list[KeyShare]]
) -> None:
    tpk, shares = dealt
    vault = _keystore(tmp_path)
    vault.put(KEY_SHARE, json.dumps(shares[2].to_dict()).encode())
    assert load_key_share_from(vault, tpk, 3).index == 3
    other, _ = deal(2, 3, 512, allow_insecure=True)
    with pytest.raises(AgentSetupError, match=f"the fleet's key is {other.fingerprint}"):
        load_key_share_from(vault, other, 3)
    vault.put(KEY_SHARE, b'{"index": 3}')
    with pytest.raises(AgentSetupError, match=r"key share in keystore .* is not a KeyShare JSON document"):
        load_key_share_from(vault, tpk, 3)


# --- bdn agent keys on the files and keystore backends ------------------------------------------------------


def test_bdn_agent_keys_on_files_and_keystore(
    tmp_path: Path, dealt: tuple[ThresholdPublicKey, list[KeyShare]]
) -> None:
    files = write_fleet(tmp_path, "cli-fleet", *dealt, devices=1)
    device = files.devices[0]
    config, folder = str(device.config_path), device.config_path.parent
    runner = CliRunner()

    plain = runner.invoke(agent_cli, ["keys", "--config", config, "--status"])
    assert plain.exit_code == 0, plain.output
    assert "backend: files" in plain.output and "holds:   device-key, key-share" in plain.output
    assert "warning: not sealed: a copy of the disk is a copy of the key" in plain.output
    nowhere = runner.invoke(agent_cli, ["keys", "--config", config, "--import"])
    assert nowhere.exit_code == 2 and "nowhere to import to" in nowhere.output
    for flags in ([], ["--status", "--import"], ["--status", "--remove-plain"]):
        assert runner.invoke(agent_cli, ["keys", "--config", config, *flags]).exit_code == 2

    write_private(folder / "passphrase", "a long device passphrase\n")
    toml = device.config_path.read_text()
    device.config_path.write_text(
        toml.replace("[broker]", '[secrets]\nbackend = "keystore"\npassphrase_file = "passphrase"\n[broker]')
    )
    imported = runner.invoke(agent_cli, ["keys", "--config", config, "--import", "--remove-plain"])
    assert imported.exit_code == 0, imported.output
    assert not (folder / "device.key").exists() and not (folder / "share.json").exists()
    status = runner.invoke(agent_cli, ["keys", "--config", config, "--status"])
    assert status.exit_code == 0, status.output
    assert "backend: keystore" in status.output and "holds:   device-key, key-share" in status.output
    assert "warning: no TPM: not sealed: a copy of the disk is a copy of the key" in status.output
    for text in (plain.output, imported.output, status.output):
        _assert_no_secret(text, device.key, _share_bytes(files.shares[0]))
    a = Agent(files.config(0))
    try:
        assert a.address == device.address and a.holder_index == 1
    finally:
        a.close()

    write_private(folder / "passphrase", "another passphrase\n")
    wrong = runner.invoke(agent_cli, ["keys", "--config", config, "--status"])
    assert wrong.exit_code == 0 and "does not open keystore" in wrong.output
