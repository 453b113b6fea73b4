"""``bdn provision init``: stand a fleet up from nothing, in one folder the gateway's service user owns.

Layout (secrets 0600, folders 0700)::

    <root>/fleet.json                    public: fleet key, layout, chain, gateway; devices are added on enrollment
    <root>/ca/ca.pem, ca.key             the fleet CA (the key stays here to issue more certificates)
    <root>/gateway/gateway.toml          the gateway's configuration
    <root>/gateway/gateway.key           its Ethereum key (deploys the contract, registers devices, commits)
    <root>/gateway/gateway-tls.pem, .key its certificate (MQTT client over TLS)
    <root>/gateway/token.key             the MAC key of enrollment tokens
    <root>/gateway/shares/share-<k>.json key shares not yet handed out; each is deleted once its device has it
    <root>/gateway/broker.password       the gateway's MQTT password
    <root>/broker/...                    Mosquitto: mosquitto.conf, broker.pem/.key, mosquitto.passwd, mosquitto.acl;
                                         embedded: amqtt-users
    <root>/enroll/                       tokens issued (issued.json) and their QR codes

The threshold key is dealt here: :func:`blockdeepnet.crypto.threshold.deal` keeps the dealer's secret (the
factorisation and d) in local variables only, so it is gone once dealing returns; what remains are the l
shares, written straight to their files, and the public key.
"""

from __future__ import annotations

import json
import os
import pwd
import secrets
import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from eth_account import Account

from blockdeepnet.acl import AclRules, mosquitto_acl
from blockdeepnet.config import toml_text
from blockdeepnet.crypto.codec import SlotLayout
from blockdeepnet.crypto.threshold import deal
from blockdeepnet.fleet import FLEET_NAME_RE, ChainInfo, Fleet, contract_address
from blockdeepnet.ledger import EMBEDDED_CHAIN_ID, Ledger, LedgerError, rpc_web3
from blockdeepnet.mosquitto_users import set_user
from blockdeepnet.wire import BROKER_MESSAGE_MAX_BYTES, Topics
from provisioning.broker_credentials import write_amqtt_password_file
from provisioning.certs import create_ca, issue_server_cert
from provisioning.private_files import private_dir, write_private

Progress = Callable[[str], None]


class InitError(Exception):
    """The fleet cannot be created as asked; the message says what to change."""


@dataclass(frozen=True)
class InitOptions:
    name: str
    root: Path
    holders: int
    threshold: int
    key_bits: int = 2048
    chain_url: str | None = None  # None: the embedded chain
    broker: str = "mosquitto"  # or "embedded"
    broker_host: str = "127.0.0.1"
    broker_port: int = 8883
    http_host: str = "127.0.0.1"
    http_port: int = 8080
    min_devices: int = 0
    owner: str = ""  # the service user that will own the folder (root only); "" = the current user
    hostnames: tuple[str, ...] = ()
    model_seed: int = 7
    force: bool = False


@dataclass(frozen=True)
class InitResult:
    root: Path
    fleet: Fleet
    gateway_config: Path
    mosquitto_config: Path | None
    moved_aside: Path | None


def _check(opts: InitOptions) -> None:
    if not FLEET_NAME_RE.fullmatch(opts.name):
        raise InitError(f"fleet name {opts.name!r} must be 1..64 of A-Z a-z 0-9 _ -")
    if not 1 <= opts.threshold <= opts.holders:
        raise InitError(f"need 1 <= threshold <= key holders, got t={opts.threshold}, l={opts.holders}")
    if opts.holders > 64:
        raise InitError("at most 64 key holders")
    if opts.key_bits < 2048 and opts.key_bits not in (512, 1024):
        raise InitError("--key-bits must be 2048 or more (512 and 1024 are accepted for tests only)")
    if opts.broker not in ("mosquitto", "embedded"):
        raise InitError(f"--broker must be 'mosquitto' or 'embedded', got {opts.broker!r}")
    if opts.chain_url is not None and not opts.chain_url.startswith(("http://", "https://")):
        raise InitError(f"--chain rpc needs an http(s) JSON-RPC URL, got {opts.chain_url!r}")
    lowest = 0 if opts.broker == "embedded" else 1
    if not lowest <= opts.broker_port < 65536 or not 0 <= opts.http_port < 65536:
        raise InitError("ports must be 1..65535 (0 = any free one: the HTTP port, and the embedded broker's)")
    if opts.owner:
        try:
            pwd.getpwnam(opts.owner)
        except KeyError:
            raise InitError(
                f"user {opts.owner!r} does not exist: create it first (useradd --system {opts.owner})"
            ) from None
        if os.geteuid() != 0 and pwd.getpwnam(opts.owner).pw_uid != os.geteuid():
            raise InitError(f"only root can hand the fleet folder to user {opts.owner!r}")


def _clear_root(opts: InitOptions) -> Path | None:
    """An existing fleet is never overwritten in place: refused, or with ``force`` moved aside whole."""
    root = opts.root
    if not root.exists() or (root.is_dir() and not any(root.iterdir())):
        return None
    if not opts.force:
        raise InitError(
            f"{root} already holds a fleet (or other files): refusing to overwrite it; "
            "choose another --dir, or pass --force to move it aside and start over"
        )
    aside = root.with_name(f"{root.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
    root.rename(aside)
    return aside


def init_fleet(opts: InitOptions, progress: Progress = lambda _s: None) -> InitResult:
    """Create the whole fleet folder; see the module docstring for what lands where."""
    _check(opts)
    # Absolute paths: mosquitto.conf and broker_reload are used from other working directories (systemd).
    opts = replace(opts, root=opts.root.absolute())
    moved = _clear_root(opts)
    root = private_dir(opts.root)
    owner = opts.owner or pwd.getpwuid(os.geteuid()).pw_name

    progress(
        f"dealing a {opts.key_bits}-bit threshold Paillier key into {opts.holders} shares (t={opts.threshold})"
    )
    tpk, shares = deal(opts.threshold, opts.holders, opts.key_bits, allow_insecure=opts.key_bits < 2048)
    gw_dir = private_dir(root / "gateway")
    shares_dir = private_dir(gw_dir / "shares")
    for share in shares:
        write_private(shares_dir / f"share-{share.index}.json", json.dumps(share.to_dict()))
    del shares

    gateway = Account.create()
    write_private(gw_dir / "gateway.key", gateway.key.hex() + "\n")
    write_private(gw_dir / "token.key", secrets.token_hex(32) + "\n")
    if opts.chain_url is None:
        chain = ChainInfo("embedded", EMBEDDED_CHAIN_ID, contract_address(gateway.address, 0))
    else:
        progress(f"deploying the BlockDeepNet contract on {opts.chain_url}")
        try:
            ledger = Ledger.deploy(rpc_web3(opts.chain_url), gateway)
        except LedgerError as exc:
            raise InitError(f"cannot deploy the contract on {opts.chain_url}: {exc}") from exc
        chain = ChainInfo("rpc", ledger.chain_id(), ledger.address, url=opts.chain_url)
    fleet = Fleet(
        opts.name, chain, gateway.address, tpk, SlotLayout(tpk.public_key.bits), opts.model_seed, ()
    )
    fleet.save(root / "fleet.json")

    progress("creating the fleet CA and certificates")
    ca = create_ca(private_dir(root / "ca"), opts.name)
    hosts = list(dict.fromkeys([opts.broker_host, *opts.hostnames, "localhost"]))
    broker_dir = private_dir(root / "broker")
    issue_server_cert(ca, gw_dir, "gateway-tls", opts.name, [opts.http_host, *opts.hostnames])

    passwords = {"gateway": secrets.token_urlsafe(24), "monitor": secrets.token_urlsafe(24)}
    write_private(gw_dir / "broker.password", passwords["gateway"] + "\n")
    write_private(broker_dir / "monitor.password", passwords["monitor"] + "\n")
    broker: dict[str, Any] = {
        "host": opts.broker_host,
        "port": opts.broker_port,
        "username": "gateway",
        "password_file": "broker.password",
        "monitors": "monitor",
    }
    enroll: dict[str, Any] = {
        "enabled": True,
        "token_key_file": "token.key",
        "shares_dir": "shares",
        "ca_file": "../ca/ca.pem",
    }
    if opts.hostnames:  # the name devices reach this host by (the broker certificate carries it too)
        enroll["broker_host"] = opts.hostnames[0]
    mosquitto_conf: Path | None = None
    if opts.broker == "mosquitto":
        broker_cert = issue_server_cert(ca, broker_dir, "broker", opts.name, hosts)
        rules = AclRules.build(Topics(opts.name), "gateway", [], ["monitor"])
        (broker_dir / "mosquitto.acl").write_text(mosquitto_acl(rules))
        os.chmod(broker_dir / "mosquitto.acl", 0o600)
        for user, password in passwords.items():
            set_user(broker_dir / "mosquitto.passwd", user, password)
        mosquitto_conf = broker_dir / "mosquitto.conf"
        mosquitto_conf.write_text(
            _mosquitto_conf(opts, owner, broker_dir, ca.cert, broker_cert.cert, broker_cert.key)
        )
        broker.update(
            mode="external", tls_ca="../ca/ca.pem", tls_cert="gateway-tls.pem", tls_key="gateway-tls.key"
        )
        enroll.update(
            mosquitto_passwd="../broker/mosquitto.passwd",
            mosquitto_acl="../broker/mosquitto.acl",
            broker_reload=f"pkill -HUP -F {shlex.quote(str(broker_dir / 'mosquitto.pid'))}",
        )
    else:
        write_amqtt_password_file(broker_dir / "amqtt-users", passwords)
        broker.update(mode="embedded", users_file="../broker/amqtt-users")
    gw_cfg: dict[str, Any] = {
        "fleet_file": "../fleet.json",
        "key_file": "gateway.key",
        "state_dir": "state",
        "broker": broker,
        "http": {"host": opts.http_host, "port": opts.http_port},
        "rounds": {"min_devices": opts.min_devices},
        "enroll": enroll,
    }
    gateway_toml = gw_dir / "gateway.toml"
    gateway_toml.write_text(toml_text(gw_cfg))
    private_dir(root / "enroll")
    private_dir(gw_dir / "state")
    if opts.owner:
        _chown_tree(root, opts.owner)
    return InitResult(root, fleet, gateway_toml, mosquitto_conf, moved)


def _mosquitto_conf(opts: InitOptions, owner: str, folder: Path, ca: Path, cert: Path, key: Path) -> str:
    """A Mosquitto 2 configuration for this fleet: TLS only, no anonymous clients, the generated password file
    and ACL, persistence (QoS 1 messages survive a broker restart). It runs as the fleet's owner so it can
    read the files the gateway rewrites when a device enrolls (then it is sent SIGHUP to reload them)."""
    data = folder / "data"
    data.mkdir(mode=0o700, exist_ok=True)
    return "\n".join(
        [
            f"# Mosquitto for BlockDeepNet fleet {opts.name}, written by `bdn provision init`",
            f"user {owner}",
            f"pid_file {folder / 'mosquitto.pid'}",
            "per_listener_settings false",
            "allow_anonymous false",
            f"password_file {folder / 'mosquitto.passwd'}",
            f"acl_file {folder / 'mosquitto.acl'}",
            "persistence true",
            f"persistence_location {data}/",
            "max_queued_messages 100000",  # DESIGN §6: the default 1000 drops QoS 1 messages silently
            f"message_size_limit {BROKER_MESSAGE_MAX_BYTES}",
            f"log_dest file {folder / 'mosquitto.log'}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "connection_messages true",
            f"listener {opts.broker_port} {opts.broker_host}",
            f"cafile {ca}",
            f"certfile {cert}",
            f"keyfile {key}",
            "tls_version tlsv1.2",
            "require_certificate false",
            "",
        ]
    )


def _chown_tree(root: Path, user: str) -> None:
    entry = pwd.getpwnam(user)
    for path in [root, *root.rglob("*")]:
        os.chown(path, entry.pw_uid, entry.pw_gid, follow_symlinks=False)
