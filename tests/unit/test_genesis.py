"""QBFT genesis and validator keys (`bdn chain genesis`), checked structurally: no Besu or GoQuorum here."""

from __future__ import annotations

import json
import os
import stat
import warnings
from pathlib import Path

import pytest
import rlp
from click.testing import CliRunner
from eth_account import Account

from cli.chain import chain
from provisioning.genesis import (
    BFT_MIX_HASH,
    ConsortiumExistsError,
    QbftGenesisWarning,
    besu_genesis,
    decode_qbft_extra_data,
    fault_tolerance,
    generate_validator_keys,
    goquorum_genesis,
    parse_qbft_extra_data,
    qbft_extra_data,
    write_consortium,
)

# The QBFT genesis of Besu's documentation ("Configure QBFT consensus", block header validator selection).
BESU_DOC_VALIDATORS = [
    "0x64a702e6263b7297a96638cac6ae65e6541f4169",
    "0x3923390ad55e90c237593b3b0e401f3b08a03185",
    "0xaefdb9a738c9f433e5b6b212a6d62f6370c2f692",
    "0xc7eeb9a4e00ce683cf93039b212648e01c6c6b78",
]
BESU_DOC_EXTRA_DATA = (
    "0xf87aa00000000000000000000000000000000000000000000000000000000000000000f85494"
    "64a702e6263b7297a96638cac6ae65e6541f416994"
    "3923390ad55e90c237593b3b0e401f3b08a0318594"
    "aefdb9a738c9f433e5b6b212a6d62f6370c2f69294"
    "c7eeb9a4e00ce683cf93039b212648e01c6c6b78"
    "c080c0"
)
# The Quorum developer quickstart's QBFT genesis, identical for its Besu and its GoQuorum network.
QUICKSTART_VALIDATORS = [
    "0x93917cadbace5dfce132b991732c6cda9bcc5b8a",
    "0x27a97c9aaf04f18f3014c32e036dd0ac76da5f18",
    "0xce412f988377e31f4d0ff12d74df73b51c42d0ca",
    "0x98c1334496614aed49d2e81526d089f7264fed9c",
]
QUICKSTART_EXTRA_DATA = (
    "0xf87aa00000000000000000000000000000000000000000000000000000000000000000f85494"
    "93917cadbace5dfce132b991732c6cda9bcc5b8a94"
    "27a97c9aaf04f18f3014c32e036dd0ac76da5f1894"
    "ce412f988377e31f4d0ff12d74df73b51c42d0ca94"
    "98c1334496614aed49d2e81526d089f7264fed9c"
    "c080c0"
)
# Besu's IBFT 2.0 tutorial genesis: same list but the round is 4 fixed bytes and the vote a byte string.
IBFT2_EXTRA_DATA = (
    "0xf87ea00000000000000000000000000000000000000000000000000000000000000000f85494"
    "8539c5c368dda69bc541299a5293836ca9e3a36194b97ccc82acb5d04c557e6363e283e2f0a44c0f8b94"
    "2e7427a308b7e04f53cbceec3d2a9ff6955b7b4594b7108387430622ffebe9c9777bbe5c7d647f9dea"
    "808400000000c0"
)

LONDON_FORKS = [
    "homesteadBlock",
    "eip150Block",
    "eip155Block",
    "eip158Block",
    "byzantiumBlock",
    "constantinopleBlock",
    "petersburgBlock",
    "istanbulBlock",
    "berlinBlock",
    "londonBlock",
]


def _addresses(n: int) -> list[str]:
    return [Account.create().address for _ in range(n)]


# --------------------------------------------------------------------------------------------- extraData


@pytest.mark.parametrize(
    ("validators", "expected"),
    [(BESU_DOC_VALIDATORS, BESU_DOC_EXTRA_DATA), (QUICKSTART_VALIDATORS, QUICKSTART_EXTRA_DATA)],
    ids=["besu-docs", "quorum-quickstart"],
)
def test_extra_data_matches_documented_vectors(validators: list[str], expected: str) -> None:
    assert "0x" + qbft_extra_data(validators).hex() == expected
    assert [v.lower() for v in decode_qbft_extra_data(expected)] == validators


def test_extra_data_structure() -> None:
    validators = _addresses(7)
    items = rlp.decode(qbft_extra_data(validators))
    assert isinstance(items, list) and len(items) == 5
    vanity, encoded, vote, round_, seals = items
    assert vanity == b"\x00" * 32
    assert [len(v) for v in encoded] == [20] * 7
    assert vote == [] and seals == []
    assert round_ == b""  # round 0 as an RLP scalar (0x80), not IBFT 2.0's 4 zero bytes
    parsed = parse_qbft_extra_data(qbft_extra_data(validators))
    assert (parsed.vote, parsed.round, parsed.seals) == (None, 0, [])


@pytest.mark.parametrize("n", [1, 4, 13])
def test_extra_data_round_trips_in_order(n: int) -> None:
    validators = _addresses(n)  # checksum case, random order
    assert decode_qbft_extra_data(qbft_extra_data(validators)) == validators
    assert decode_qbft_extra_data("0x" + qbft_extra_data(validators).hex()) == validators
    assert decode_qbft_extra_data(qbft_extra_data(validators).hex()) == validators  # without 0x


def test_address_case_does_not_change_extra_data() -> None:
    checksum = _addresses(4)
    lower = [a.lower() for a in checksum]
    upper = ["0x" + a[2:].upper() for a in checksum]
    assert qbft_extra_data(checksum) == qbft_extra_data(lower) == qbft_extra_data(upper)
    assert decode_qbft_extra_data(qbft_extra_data(lower)) == checksum  # decoded as EIP-55 checksums


def test_bad_checksum_is_rejected() -> None:
    good = "0x64A702E6263b7297a96638cAc6aE65e6541F4169"
    bad = good[:2] + good[2].lower() + good[3:].swapcase()
    with pytest.raises(ValueError, match="checksum"):
        qbft_extra_data([bad])


@pytest.mark.parametrize(
    ("validators", "message"),
    [
        ([], "empty"),
        (["0x1234"], "not an Ethereum address"),
        (["not an address"], "not an Ethereum address"),
        (
            ["0x64a702e6263b7297a96638cac6ae65e6541f4169", "0x64A702E6263b7297a96638cAc6aE65e6541F4169"],
            "listed twice",
        ),
    ],
)
def test_bad_validator_lists_are_rejected(validators: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        qbft_extra_data(validators)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ("", "empty"),
        ("0xzz", "not valid hex"),
        ("0x" + rlp.encode([b"\x00" * 32, [], [], 0]).hex(), "5 items"),
        ("0x" + rlp.encode([b"\x00" * 31, [], [], 0, []]).hex(), "vanity"),
        ("0x" + rlp.encode([b"\x00" * 32, [b"\x01" * 19], [], 0, []]).hex(), "20-byte"),
        (IBFT2_EXTRA_DATA, "IBFT 2.0"),
        ("0x" + rlp.encode([b"\x00" * 32, [], [], b"\x00\x00\x00\x00", []]).hex(), "IBFT 2.0"),
        (BESU_DOC_EXTRA_DATA + "00", "not valid RLP"),
    ],
)
def test_malformed_extra_data_is_rejected(data: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        decode_qbft_extra_data(data)


# ----------------------------------------------------------------------------------------------- genesis


def test_besu_genesis_fields() -> None:
    validators = _addresses(4)
    gateway = Account.create().address
    g = besu_genesis(validators, chain_id=4242, block_period_s=3, gateway_address=gateway.lower())
    config = g["config"]
    assert config["chainId"] == 4242
    assert all(config[fork] == 0 for fork in LONDON_FORKS)
    assert not any("shanghai" in key.lower() or "cancun" in key.lower() for key in config)  # no PUSH0
    assert config["zeroBaseFee"] is True
    assert config["qbft"] == {"blockperiodseconds": 3, "epochlength": 30000, "requesttimeoutseconds": 10}
    assert "isQuorum" not in config
    assert g["difficulty"] == "0x1"
    assert g["mixHash"] == BFT_MIX_HASH
    assert int(g["gasLimit"], 16) > 10_000_000
    assert decode_qbft_extra_data(g["extraData"]) == validators
    assert g["alloc"] == {gateway: {"balance": hex(10**24)}}
    json.dumps(g)  # serialisable as is


def test_goquorum_genesis_fields() -> None:
    validators = _addresses(5)
    g = goquorum_genesis(validators, chain_id=10, block_period_s=1)
    config = g["config"]
    assert config["chainId"] == 10
    assert config["isQuorum"] is True
    assert all(config[fork] == 0 for fork in LONDON_FORKS)
    qbft = config["qbft"]
    assert qbft["blockperiodseconds"] == 1
    assert qbft["epochlength"] == 30000
    assert qbft["ceil2Nby3Block"] == 0
    assert qbft["policy"] == 0
    assert config["txnSizeLimit"] == 64
    assert config["maxCodeSizeConfig"] == [{"block": 0, "size": 64}]
    assert g["difficulty"] == "0x1" and g["mixHash"] == BFT_MIX_HASH
    assert decode_qbft_extra_data(g["extraData"]) == validators
    assert g["alloc"] == {}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"chain_id": 0}, "chain id"),
        ({"chain_id": 2**60}, "chain id"),
        ({"block_period_s": 0}, "block period"),
        ({"request_timeout_s": -1}, "request timeout"),
        ({"gateway_address": "0xnope"}, "not an Ethereum address"),
    ],
)
@pytest.mark.parametrize("build", [besu_genesis, goquorum_genesis])
def test_bad_genesis_parameters_are_rejected(build: object, kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build(_addresses(4), **kwargs)  # type: ignore[operator]


def test_fault_tolerance() -> None:
    assert [fault_tolerance(n) for n in (1, 3, 4, 6, 7, 10)] == [0, 0, 1, 1, 2, 3]


# ------------------------------------------------------------------------------------------------- keys


def test_generated_keys_are_distinct_and_consistent() -> None:
    keys = generate_validator_keys(5)
    assert len({k.address for k in keys}) == 5
    assert [k.address.lower() for k in keys] == sorted(k.address.lower() for k in keys)
    for k in keys:
        assert Account.from_key(k.private_key).address == k.address
        assert len(k.private_key) == 32 and len(bytes.fromhex(k.public_key)) == 64
        assert k.private_key.hex() not in repr(k)


def test_fewer_than_four_validators_warns_but_works() -> None:
    with pytest.warns(QbftGenesisWarning, match="at least 4"):
        keys = generate_validator_keys(1)
    assert len(keys) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error", QbftGenesisWarning)
        generate_validator_keys(4)


@pytest.mark.parametrize("n", [0, -1])
def test_no_validators_is_an_error(n: int) -> None:
    with pytest.raises(ValueError, match="at least 1 validator"):
        generate_validator_keys(n)


# ------------------------------------------------------------------------------------------------ files


@pytest.mark.parametrize("client", ["besu", "goquorum"])
def test_write_consortium(tmp_path: Path, client: str) -> None:
    out = tmp_path / "net"
    files = write_consortium(out, 4, client, chain_id=777, block_period=5)  # type: ignore[arg-type]
    genesis = json.loads(files.genesis.read_text())
    assert genesis["config"]["chainId"] == 777
    assert genesis["config"]["qbft"]["blockperiodseconds"] == 5
    assert ("isQuorum" in genesis["config"]) == (client == "goquorum")
    assert decode_qbft_extra_data(genesis["extraData"]) == [v.address for v in files.validators]
    assert sorted(p.name for p in out.iterdir()) == [
        "genesis.json",
        "validator-1",
        "validator-2",
        "validator-3",
        "validator-4",
    ]
    for v in files.validators:
        assert stat.S_IMODE(v.directory.stat().st_mode) == 0o700
        assert stat.S_IMODE(v.key.stat().st_mode) == 0o600
        assert sorted(p.name for p in v.directory.iterdir()) == ["address", "key", "key.pub"]
        key_text = v.key.read_text()
        assert len(key_text) == 64 and bytes.fromhex(key_text)  # nothing but the key: no 0x, no newline
        assert Account.from_key(bytes.fromhex(key_text)).address == v.address
        assert v.address_file.read_text().strip() == v.address
        assert key_text not in v.public_key.read_text()
        assert key_text not in files.genesis.read_text()


@pytest.mark.filterwarnings("ignore::provisioning.genesis.QbftGenesisWarning")
def test_key_mode_ignores_a_permissive_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        files = write_consortium(tmp_path / "net", 1, "besu")
    finally:
        os.umask(old)
    assert stat.S_IMODE(files.validators[0].key.stat().st_mode) == 0o600
    assert stat.S_IMODE(files.validators[0].directory.stat().st_mode) == 0o700


def test_refuses_to_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "net"
    first = write_consortium(out, 4, "besu")
    old_key = first.validators[0].key.read_text()
    with pytest.raises(ConsortiumExistsError, match="not empty"):
        write_consortium(out, 4, "besu")
    assert first.validators[0].key.read_text() == old_key  # untouched

    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(ConsortiumExistsError):
        write_consortium(other, 4, "besu")


def test_force_replaces_only_the_consortium(tmp_path: Path) -> None:
    out = tmp_path / "net"
    write_consortium(out, 5, "besu")
    (out / "notes.txt").write_text("keep me")
    second = write_consortium(out, 4, "goquorum", force=True)
    names = sorted(p.name for p in out.iterdir())
    assert names == ["genesis.json", "notes.txt", *(f"validator-{i}" for i in range(1, 5))]
    assert (out / "notes.txt").read_text() == "keep me"
    genesis = json.loads(second.genesis.read_text())
    assert genesis["config"]["isQuorum"] is True
    assert decode_qbft_extra_data(genesis["extraData"]) == [v.address for v in second.validators]


def test_invalid_input_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "net"
    with pytest.raises(ValueError, match="chain id"):
        write_consortium(out, 4, "besu", chain_id=0)
    with pytest.raises(ValueError, match="unknown client"):
        write_consortium(out, 4, "geth")  # type: ignore[arg-type]
    assert not out.exists()


# --------------------------------------------------------------------------------------------------- CLI


def _keys_under(out: Path) -> list[str]:
    return [p.read_text() for p in sorted(out.glob("validator-*/key"))]


@pytest.mark.parametrize("client", ["besu", "goquorum"])
def test_cli_writes_files_and_never_prints_a_key(tmp_path: Path, client: str) -> None:
    out = tmp_path / "net"
    gateway = Account.create().address
    result = CliRunner().invoke(
        chain,
        [
            "genesis",
            "--validators",
            "4",
            "--client",
            client,
            "--chain-id",
            "2024",
            "--block-period",
            "3",
            "--gateway",
            gateway,
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    keys = _keys_under(out)
    assert len(keys) == 4
    for key in keys:
        assert key not in result.output
        assert key.upper() not in result.output.upper()
    genesis = json.loads((out / "genesis.json").read_text())
    assert genesis["config"]["chainId"] == 2024
    assert genesis["config"]["qbft"]["blockperiodseconds"] == 3
    assert gateway in genesis["alloc"]
    assert str(out / "genesis.json") in result.output
    assert ("besu --data-path" if client == "besu" else "geth --datadir") in result.output
    for address in decode_qbft_extra_data(genesis["extraData"]):
        assert address in result.output


def test_cli_one_validator_warns(tmp_path: Path) -> None:
    result = CliRunner().invoke(chain, ["genesis", "--validators", "1", "--out", str(tmp_path / "dev")])
    assert result.exit_code == 0, result.output
    assert "warning:" in result.output and "at least 4" in result.output


def test_cli_refuses_to_overwrite_then_force(tmp_path: Path) -> None:
    out = tmp_path / "net"
    runner = CliRunner()
    assert runner.invoke(chain, ["genesis", "--out", str(out)]).exit_code == 0
    before = _keys_under(out)
    refused = runner.invoke(chain, ["genesis", "--out", str(out)])
    assert refused.exit_code == 2
    assert "--force" in refused.output and "Traceback" not in refused.output
    assert len(refused.output.strip().splitlines()) == 1
    assert _keys_under(out) == before
    forced = runner.invoke(chain, ["genesis", "--out", str(out), "--force"])
    assert forced.exit_code == 0, forced.output
    assert set(_keys_under(out)).isdisjoint(before)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--validators", "0"], "at least 1 validator"),
        (["--chain-id", "0"], "chain id"),
        (["--block-period", "0"], "block period"),
        (["--gateway", "0x123"], "not an Ethereum address"),
    ],
)
def test_cli_bad_input_exits_2_with_one_line(tmp_path: Path, args: list[str], message: str) -> None:
    out = tmp_path / "net"
    result = CliRunner().invoke(chain, ["genesis", "--out", str(out), *args])
    assert result.exit_code == 2
    assert message in result.output
    assert result.output.startswith("error: ") and len(result.output.strip().splitlines()) == 1
    assert not out.exists()


def test_cli_unknown_client_is_a_usage_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(chain, ["genesis", "--client", "geth", "--out", str(tmp_path / "n")])
    assert result.exit_code == 2
