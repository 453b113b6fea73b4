"""``bdn provision enroll``: issue a one-time enrollment token for a device and render it as a QR code.

Run on the gateway host, against the fleet folder ``bdn provision init`` made. The token names the key share
reserved for the device: the lowest share still on the gateway that no other live token reserves
(``enroll/issued.json`` records what was issued; it holds no secret, the token's tag is made with
``gateway/token.key``). The gateway checks everything again when the token is redeemed.
"""

from __future__ import annotations

import io
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import segno

from blockdeepnet.config import ConfigError, load_gateway_config
from blockdeepnet.enrollment import EnrollmentToken, ca_fingerprint, issue_token
from blockdeepnet.fleet import Fleet, FleetError
from blockdeepnet.private_files import write_private_atomic


class TokenError(Exception):
    """No token can be issued as asked; the message says why."""


@dataclass(frozen=True)
class IssuedToken:
    token: EnrollmentToken
    text: str
    png: Path
    terminal: str  # the QR code drawn with block characters


def _issued(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise TokenError(f"{path} is damaged ({exc}); move it aside to continue") from None
    return list(data) if isinstance(data, list) else []


def issue_enrollment(
    fleet_dir: Path,
    device: str,
    *,
    key_share: str = "auto",
    ttl_s: int = 24 * 3600,
    gateway_url: str = "",
    png: Path | None = None,
    now: float | None = None,
) -> IssuedToken:
    """Make, record and render a token for ``device``. ``key_share``: ``auto`` (a free share while any is
    left), ``none``, or a holder index."""
    now = time.time() if now is None else now
    try:
        cfg = load_gateway_config(fleet_dir / "gateway" / "gateway.toml")
        fleet = Fleet.load(cfg.fleet_file)
    except (ConfigError, FleetError) as exc:
        raise TokenError(f"{fleet_dir} is not a fleet folder made by `bdn provision init`: {exc}") from None
    e = cfg.enroll
    if not e.enabled or e.token_key_file is None or e.shares_dir is None or e.ca_file is None:
        raise TokenError(f"enrollment is not enabled in {fleet_dir / 'gateway' / 'gateway.toml'} ([enroll])")
    if any(d.name == device for d in fleet.devices):
        raise TokenError(f"a device named {device!r} is enrolled already; pick another name")
    ledger = fleet_dir / "enroll" / "issued.json"
    issued = _issued(ledger)
    live = [t for t in issued if t.get("expires", 0) > now]
    if any(t.get("device") == device for t in live):
        raise TokenError(f"a token for {device!r} is outstanding already (it expires later); use that one")

    taken = {d.key_share for d in fleet.devices if d.key_share} | {t.get("key_share") for t in live}
    on_gateway = sorted(int(p.stem.split("-")[1]) for p in e.shares_dir.glob("share-*.json"))
    if key_share in ("none", "0"):
        share = 0
    elif key_share == "auto":
        share = next((k for k in on_gateway if k not in taken), 0)
    else:
        try:
            share = int(key_share)
        except ValueError:
            raise TokenError(f"--key-share must be auto, none or a holder index, got {key_share!r}") from None
        if share not in on_gateway or share in taken:
            raise TokenError(
                f"key share {share} is not free (free: {[k for k in on_gateway if k not in taken]})"
            )

    host = cfg.http.host
    if host in ("0.0.0.0", "::") and e.broker_host:  # listening everywhere: name the host devices know
        host = e.broker_host
    if not gateway_url and (cfg.http.port == 0 or host in ("0.0.0.0", "::")):
        raise TokenError(
            f"gateway.toml does not say where devices reach the gateway (http {cfg.http.host}:{cfg.http.port}): "
            "pass --gateway-url http://HOST:PORT"
        )
    url = gateway_url or f"http://{host}:{cfg.http.port}"
    try:
        token = issue_token(
            bytes.fromhex(e.token_key_file.read_text().strip()),
            fleet=fleet.name,
            gateway_url=url,
            gateway=fleet.gateway,
            ca_sha256=ca_fingerprint(e.ca_file.read_bytes()),
            device=device,
            key_share=share,
            ttl_s=ttl_s,
            now=now,
        )
    except ValueError as exc:
        raise TokenError(str(exc)) from None
    text = token.encode()
    issued.append(
        {"device": device, "token_id": token.token_id, "key_share": share, "expires": token.expires}
    )
    write_private_atomic(ledger, json.dumps(issued, indent=1))

    qr = segno.make(text, error="m")
    png = png or fleet_dir / "enroll" / f"{device}.png"
    qr.save(str(png), scale=4, border=4)
    png.chmod(0o600)  # a live token: whoever holds it can join the fleet once
    return IssuedToken(token, text, png, qr_terminal(qr))


def qr_terminal(qr: segno.QRCode) -> str:
    """The QR code as text for a terminal (segno's compact half-block rendering)."""
    buf = io.StringIO()
    qr.terminal(out=buf, compact=True)
    return buf.getvalue()
