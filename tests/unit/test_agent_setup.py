"""Set-up errors of the agent: secret files, key shares, fleet membership, data, state folder, chain, CLI.

Each is found before the agent connects anywhere and is one clear message; none contains key material.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from blockdeepnet.config import AgentConfig
from blockdeepnet.crypto.threshold import KeyShare, ThresholdPublicKey, deal
from blockdeepnet.eip712 import new_device_key
from blockdeepnet.fleet import ChainInfo
from cli.agent import agent as agent_cli
from firmware_agent import Agent, AgentSetupError
from firmware_agent.keys import load_device_key, load_key_share
from firmware_agent.service import build_agent
from tests.unit.test_agent_support import FleetFiles, write_fleet, write_private


@pytest.fixture(scope="module")
def dealt() -> tuple[ThresholdPublicKey, list[KeyShare]]:
    return deal(2, 3, 512, allow_insecure=True)


@pytest.fixture
def files(tmp_path: Path, dealt: tuple[ThresholdPublicKey, list[KeyShare]]) -> FleetFiles:
    return write_fleet(tmp_path, "setup-test", *dealt, devices=4)


# --- secret files -----------------------------------------------------------------------------------------


def test_device_key_is_read_with_or_without_prefix(tmp_path: Path) -> None:
    key, address = new_device_key()
    for text in (key.hex(), "0x" + key.hex() + "\n", "  " + key.hex().upper() + "  \n"):
        loaded = load_device_key(write_private(tmp_path / "k", text))
        assert loaded.address == address and loaded.private_key == key
        assert key.hex() not in repr(loaded)


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_secret_files_readable_by_others_are_refused(tmp_path: Path, mode: int) -> None:
    key, _ = new_device_key()
    path = write_private(tmp_path / "device.key", key.hex(), mode)
    with pytest.raises(AgentSetupError, match="chmod 600") as err:
        load_device_key(path)
    assert key.hex() not in str(err.value)


def test_bad_device_keys_are_refused_without_echoing_them(tmp_path: Path) -> None:
    cases = {"12" * 31: "64 hex digits", "zz" * 32: "not hold a valid", "00" * 32: "not hold a valid"}
    for text, message in cases.items():
        with pytest.raises(AgentSetupError, match=message) as err:
            load_device_key(write_private(tmp_path / "k", text))
        assert text not in str(err.value)
    with pytest.raises(AgentSetupError, match="does not exist"):
        load_device_key(tmp_path / "missing.key")


def test_a_symlinked_key_file_is_refused(tmp_path: Path) -> None:
    key, _ = new_device_key()
    target = write_private(tmp_path / "real.key", key.hex())
    os.symlink(target, tmp_path / "link.key")
    with pytest.raises(AgentSetupError, match="symlink"):
        load_device_key(tmp_path / "link.key")


def test_key_share_must_be_this_fleets_and_this_devices(
    tmp_path: Path, dealt: tuple[ThresholdPublicKey, list[KeyShare]]
) -> None:
    tpk, shares = dealt
    path = write_private(tmp_path / "share.json", json.dumps(shares[1].to_dict()))
    assert load_key_share(path, tpk, 2).index == 2
    with pytest.raises(AgentSetupError, match=r"holds share 2, but fleet\.json assigns this device share 3"):
        load_key_share(path, tpk, 3)
    other, _ = deal(2, 3, 512, allow_insecure=True)
    with pytest.raises(AgentSetupError, match=f"the fleet's key is {other.fingerprint}"):
        load_key_share(path, other, 2)
    write_private(tmp_path / "junk.json", '{"index": 1}')
    with pytest.raises(AgentSetupError, match="not a KeyShare JSON") as err:
        load_key_share(tmp_path / "junk.json", tpk, 1)
    assert shares[1].to_dict()["secret"] not in str(err.value)


# --- the agent's view of its fleet ------------------------------------------------------------------------


def test_a_well_formed_device_constructs(files: FleetFiles) -> None:
    a = Agent(files.config(0))
    try:
        assert a.address == files.devices[0].address and a.is_holder and a.holder_index == 1
        assert a.applied_round == 0 and a.base_hash == files.fleet.initial_model_hash()
    finally:
        a.close()
    b = Agent(files.config(3))  # no share left for the fourth device: an ordinary member
    b.close()
    assert not b.is_holder


def test_a_device_outside_the_fleet_is_refused(files: FleetFiles) -> None:
    key, address = new_device_key()
    write_private(files.devices[0].config_path.parent / "device.key", key.hex())
    with pytest.raises(AgentSetupError, match=rf"device {address} .* is not listed"):
        Agent(files.config(0))


def test_holder_and_share_file_must_agree(files: FleetFiles) -> None:
    cfg = files.config(0)
    with pytest.raises(AgentSetupError, match="key holder 1, but share_file is not set"):
        Agent(dataclasses.replace(cfg, share_file=None))
    with pytest.raises(AgentSetupError, match=r"does not list .* as a key holder"):
        Agent(dataclasses.replace(files.config(3), share_file=cfg.share_file))


def test_more_local_samples_than_declared_is_refused(
    tmp_path: Path, dealt: tuple[ThresholdPublicKey, list[KeyShare]]
) -> None:
    files = write_fleet(tmp_path, "declared", *dealt, devices=1, samples=40, declared=30)
    with pytest.raises(AgentSetupError, match="40 samples, more than the 30"):
        Agent(files.config(0))


def test_state_folder_is_locked_and_tied_to_its_fleet(
    tmp_path: Path, files: FleetFiles, dealt: tuple[ThresholdPublicKey, list[KeyShare]]
) -> None:
    first = Agent(files.config(0))
    try:
        with pytest.raises(AgentSetupError, match="in use by another running agent"):
            Agent(files.config(0))
    finally:
        first.close()
    other = write_fleet(tmp_path / "other", "other-fleet", *dealt, devices=1)
    cfg = dataclasses.replace(other.config(0), state_dir=files.config(0).state_dir)
    with pytest.raises(AgentSetupError, match="belongs to fleet setup-test"):
        Agent(cfg)


def test_an_embedded_chain_needs_chain_rpc(
    tmp_path: Path, dealt: tuple[ThresholdPublicKey, list[KeyShare]]
) -> None:
    embedded = ChainInfo(kind="embedded", chain_id=5, contract="0x" + "22" * 20)
    files = write_fleet(tmp_path, "embedded", *dealt, devices=1, chain=embedded)
    with pytest.raises(AgentSetupError, match="set chain_rpc"):
        Agent(files.config(0))
    cfg: AgentConfig = dataclasses.replace(files.config(0), chain_rpc="http://127.0.0.1:9/rpc")
    Agent(cfg).close()


def test_missing_data_and_bad_config_are_setup_errors(files: FleetFiles) -> None:
    (files.devices[0].config_path.parent / "data.npz").unlink()
    with pytest.raises(AgentSetupError, match=r"training data file .* does not exist"):
        Agent(files.config(0))
    bad = files.devices[1].config_path
    bad.write_text(bad.read_text().replace("[broker]", "recipt_timeout_s = 3\n[broker]"))
    with pytest.raises(AgentSetupError, match="unknown key\\(s\\) recipt_timeout_s"):
        build_agent(bad)


def test_cli_reports_setup_errors_in_one_line_with_status_2(files: FleetFiles) -> None:
    key_file = files.devices[0].config_path.parent / "device.key"
    os.chmod(key_file, 0o644)
    result = CliRunner().invoke(agent_cli, ["run", "--config", str(files.devices[0].config_path)])
    assert result.exit_code == 2
    assert "chmod 600" in result.output and "Traceback" not in result.output
    assert files.devices[0].key.hex() not in result.output
    missing = CliRunner().invoke(agent_cli, ["run", "--config", str(files.devices[0].config_path) + ".nope"])
    assert missing.exit_code == 2 and "cannot read config file" in missing.output


# --- status button: join next round -----------------------------------------------------------------------


def test_with_join_button_a_round_is_taken_only_after_a_press(files: FleetFiles) -> None:
    events: list[str] = []
    cfg = files.config(3)
    attended = Agent(
        dataclasses.replace(cfg, status=dataclasses.replace(cfg.status, backend="mock", join="button")),
        on_event=lambda name, _data: events.append(name),
    )
    always = Agent(files.config(2))
    try:
        assert always._may_join(1) and always._may_join(2)  # join = auto: every round
        assert not attended._may_join(1)
        assert events == ["waiting_for_button"]
        attended.request_join()
        assert attended._may_join(1)  # the press is used up by this round...
        assert not attended._may_join(2)  # ...and the next one waits for another
        attended.request_join()
        assert attended._may_join(2)
    finally:
        attended.close()
        always.close()


def test_join_button_needs_a_button(files: FleetFiles) -> None:
    from blockdeepnet.config import ConfigError, agent_config

    with pytest.raises(ConfigError, match="needs a button"):
        agent_config(
            {
                "fleet_file": "f",
                "state_dir": "s",
                "key_file": "k",
                "status": {"backend": "off", "join": "button"},
            },
            Path("."),
        )
    with pytest.raises(ConfigError, match=r"status\.join"):
        agent_config(
            {"fleet_file": "f", "state_dir": "s", "key_file": "k", "status": {"join": "sometimes"}}, Path(".")
        )


# --- a block from before later enrollments ----------------------------------------------------------------


def test_a_block_weighted_by_an_earlier_smaller_fleet_is_still_the_fleets(files: FleetFiles) -> None:
    from blockdeepnet.wire import GlobalBlock

    a = Agent(files.config(0))
    try:
        devices = [d.address for d in files.devices]  # 4 devices of 64 samples: prefix totals 64..256
        block = GlobalBlock(
            round=1,
            aggregate=b"\x01" * a.tpk.public_key.ciphertext_bytes * a.ciphertext_count,
            devices=devices[:2],
            total_weight_num=64,  # (the chain check, not this one, holds the numerator to the commit)
            total_weight_den=128,
            merkle_root=b"\x00" * 32,
            commit_tx=None,
        )
        assert a._precheck_global(block) == ""  # the fleet of the first two devices
        for den in (192, 256):  # rounds opened after a third / fourth device enrolled
            assert a._precheck_global(dataclasses.replace(block, total_weight_den=den)) == ""
        for den in (64, 100, 320):  # too few for the listed devices, no prefix, more than the fleet holds
            assert "weight denominator" in a._precheck_global(
                dataclasses.replace(block, total_weight_den=den)
            )
    finally:
        a.close()
