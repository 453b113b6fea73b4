"""The device's side of enrollment (``bdn agent enroll``) and of fleet growth (``GET /fleet``).

Enrolling: read the token (a QR code PNG, decoded with zxing-cpp, or the text), make the device's own
secp256k1 key and keep it in the configured vault *before* asking (a retry after a lost answer must use the
same key: the gateway answers a retry with the bundle it sealed to that key), prove possession, check the
signed, encrypted answer against the token (gateway address, CA fingerprint, fleet name, the reserved share),
then write the device's folder: ``fleet.json``, ``ca.pem``, ``broker.password``, ``agent.toml`` last (its
presence means "enrolled"), and the secrets into the vault (TPM, keystore or files).

Fleet growth: a device enrolled early holds a ``fleet.json`` without the devices that enrolled after it. When
a round announces a sample total it does not know, the agent fetches ``/fleet`` from the gateway and accepts it
only as a pure extension of its own (same key, chain, gateway, model; every device it knew unchanged), with
every newcomer registered on chain with the key share it claims (:func:`check_growth`).
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from blockdeepnet.config import ConfigError, agent_config, toml_text
from blockdeepnet.crypto.threshold import KeyShare
from blockdeepnet.eip712 import new_device_key
from blockdeepnet.enrollment import (
    MAX_BUNDLE_BYTES,
    EnrollmentError,
    EnrollmentToken,
    EnrollRequest,
    ca_fingerprint,
    device_address,
    open_bundle,
)
from blockdeepnet.fleet import Fleet, FleetError
from blockdeepnet.private_files import write_private_atomic
from firmware_agent.errors import AgentSetupError
from firmware_agent.trainer import load_local_data
from firmware_agent.vault import DEVICE_KEY, KEY_SHARE, open_vault

_TIMEOUT_S = 30.0


class EnrollFailed(Exception):
    """Enrollment did not complete; the message says why and what to do. Nothing was written as enrolled."""


@dataclass(frozen=True)
class Enrolled:
    address: str
    config: Path
    key_share: int
    vault: str
    samples: int


def read_qr(png: Path) -> str:
    """The text of the (one) QR code in an image file."""
    try:
        import zxingcpp
        from PIL import Image, UnidentifiedImageError
    except ImportError as exc:  # the agent extra
        raise EnrollFailed(
            f"reading QR codes needs zxing-cpp and pillow ({exc}): pip install zxing-cpp pillow"
        ) from None
    try:
        with Image.open(png) as image:
            found = zxingcpp.read_barcodes(image.convert("L"))
    except FileNotFoundError:
        raise EnrollFailed(f"QR image {png} does not exist") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise EnrollFailed(f"cannot read {png} as an image: {exc}") from None
    codes = [r.text for r in found if r.format == zxingcpp.BarcodeFormat.QRCode]
    if not codes:
        raise EnrollFailed(f"no QR code found in {png}")
    if len(codes) > 1:
        raise EnrollFailed(f"{png} holds {len(codes)} QR codes; crop it to the enrollment code")
    return str(codes[0])


def _post(url: str, body: bytes) -> Any:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=_TIMEOUT_S) as response:
            return json.loads(response.read(MAX_BUNDLE_BYTES * 2 + 1024))
    except urllib.error.HTTPError as exc:
        try:
            answer = json.loads(exc.read(4096))
            reason, message = answer["error"], answer["message"]
        except (ValueError, KeyError, TypeError):
            raise EnrollFailed(f"the gateway answered HTTP {exc.code} {exc.reason}") from None
        raise EnrollFailed(f"the gateway refused the enrollment ({reason}): {message}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise EnrollFailed(
            f"cannot reach the gateway at {url}: {reason}; check the network and retry"
        ) from None
    except json.JSONDecodeError:
        raise EnrollFailed(f"the gateway at {url} answered something that is not JSON") from None


def fetch_fleet(gateway_url: str) -> Fleet:
    """The gateway's current ``fleet.json`` (untrusted until :func:`check_growth` accepts it)."""
    url = gateway_url.rstrip("/") + "/fleet"
    try:
        with urllib.request.urlopen(url, timeout=_TIMEOUT_S) as response:
            return Fleet.from_dict(json.loads(response.read(MAX_BUNDLE_BYTES * 4)))
    except (urllib.error.URLError, OSError, ValueError, FleetError) as exc:
        raise EnrollFailed(f"cannot fetch the fleet from {url}: {exc}") from None


def check_growth(known: Fleet, fresh: Fleet, registered: Callable[[str], tuple[bool, int]]) -> str:
    """Why ``fresh`` is not an acceptable successor of ``known`` ("" if it is). ``registered(address)`` reads
    the chain: (registered and not revoked, key share)."""
    for name in ("name", "chain", "gateway", "layout", "model_seed"):
        if getattr(known, name) != getattr(fresh, name):
            return f"the gateway's fleet differs in {name}"
    if known.public_key.to_dict() != fresh.public_key.to_dict():
        return "the gateway's fleet has another public key"
    if fresh.devices[: len(known.devices)] != known.devices:
        return "the gateway's fleet changed devices this device already knew"
    for entry in fresh.devices[len(known.devices) :]:
        ok, share = registered(entry.address)
        if not ok or share != entry.key_share:
            return f"newcomer {entry.address} is not registered on chain with key share {entry.key_share}"
    return ""


def _check_bundle(
    contents: Mapping[str, Any], token: EnrollmentToken, address: str
) -> tuple[Fleet, KeyShare | None]:
    try:
        fleet = Fleet.from_dict(contents["fleet"])
        broker = contents["broker"]
        if not isinstance(broker, dict) or not isinstance(broker.get("password"), str):
            raise TypeError("broker")
    except (KeyError, TypeError, FleetError) as exc:
        raise EnrollFailed(f"the gateway's bundle is incomplete or malformed ({exc})") from None
    if fleet.name != token.fleet or fleet.gateway != token.gateway:
        raise EnrollFailed("the bundle describes another fleet or gateway than the token: refusing it")
    entry = fleet.device(address)
    if entry is None or entry.key_share != token.key_share:
        raise EnrollFailed(
            "the bundle's fleet does not list this device with the key share the token reserved"
        )
    ca_pem = contents.get("ca_pem") or ""
    if broker.get("tls") and (not ca_pem or ca_fingerprint(ca_pem.encode()) != token.ca_sha256):
        raise EnrollFailed(
            "the broker CA in the bundle does not match the fingerprint in the token: refusing it"
        )
    share = None
    if token.key_share:
        try:
            share = KeyShare.from_dict(contents["key_share"])
        except (KeyError, TypeError, ValueError):
            raise EnrollFailed("the bundle holds no valid key share, but the token reserved one") from None
        if share.index != token.key_share or share.public.to_dict() != fleet.public_key.to_dict():
            raise EnrollFailed("the key share in the bundle is not the reserved share of the fleet's key")
    return fleet, share


def enroll_device(
    token_text: str,
    folder: Path,
    *,
    data: Mapping[str, Any],
    secrets: Mapping[str, Any],
    force: bool = False,
    progress: Callable[[str], None] = lambda _s: None,
) -> Enrolled:
    """Redeem ``token_text`` and write the device's folder ``folder`` (see the module docstring).

    ``data`` and ``secrets`` are the ``[data]`` and ``[secrets]`` tables of the agent.toml to write."""
    try:
        token = EnrollmentToken.decode(token_text)
    except EnrollmentError as exc:
        raise EnrollFailed(str(exc)) from None
    if token.expired():
        raise EnrollFailed("the token has expired: ask the operator for a new one (bdn provision enroll)")
    config_path = folder / "agent.toml"
    if config_path.exists() and not force:
        raise EnrollFailed(f"{config_path} exists: this device is enrolled already (--force to enroll again)")
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(folder, 0o700)
    raw: dict[str, Any] = {
        "fleet_file": "fleet.json",
        "state_dir": "state",
        "gateway_url": token.gateway_url,
        "data": dict(data),
        "secrets": dict(secrets),
    }
    if raw["secrets"].get("backend", "files") == "files":
        raw.update(key_file="device.key", share_file="share.json" if token.key_share else None)
        raw = {k: v for k, v in raw.items() if v is not None}
    try:
        cfg = agent_config(raw, folder)
    except ConfigError as exc:
        raise EnrollFailed(f"agent settings: {exc}") from None
    try:
        samples = load_local_data(cfg.data).samples
        vault = open_vault(cfg)
        if vault.has(DEVICE_KEY) and not force:
            private = vault.get(DEVICE_KEY)  # a retry: the gateway sealed its answer to this key
            progress("reusing the device key made by an earlier attempt")
        else:
            private, _ = new_device_key()
            vault.put(DEVICE_KEY, private)
    except AgentSetupError as exc:
        raise EnrollFailed(str(exc)) from None
    address = device_address(private)
    progress(f"device key {address}; asking the gateway at {token.gateway_url}")
    request = EnrollRequest.make(token, private, samples)
    answer = _post(token.gateway_url.rstrip("/") + "/enroll", request.to_json())
    try:
        contents = open_bundle(answer, token, private)
    except EnrollmentError as exc:
        raise EnrollFailed(f"the gateway's answer is not acceptable: {exc}") from None
    fleet, share = _check_bundle(contents, token, address)

    broker = contents["broker"]
    if fleet.chain.kind == "embedded":  # the chain lives in the gateway: devices read it via its /rpc
        raw["chain_rpc"] = token.gateway_url.rstrip("/") + "/rpc"
    fleet.save(folder / "fleet.json")
    write_private_atomic(folder / "broker.password", broker["password"] + "\n")
    raw["broker"] = {"host": str(broker["host"]), "port": int(broker["port"]), "username": address}
    raw["broker"]["password_file"] = "broker.password"
    if broker.get("tls"):
        (folder / "ca.pem").write_text(contents["ca_pem"])
        raw["broker"]["tls_ca"] = "ca.pem"
    if share is not None:
        try:
            vault.put(KEY_SHARE, json.dumps(share.to_dict()).encode())
        except AgentSetupError as exc:
            raise EnrollFailed(str(exc)) from None
    write_private_atomic(config_path, toml_text(raw))
    return Enrolled(address, config_path, token.key_share, vault.kind, samples)
