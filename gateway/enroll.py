"""``POST /enroll``: a device redeems its one-time token and joins the fleet (DESIGN §8, docs/enrollment.md).

Checks, in order, each refusal a 4xx answer with a reason code and a log line, nothing registered:
size and schema (:meth:`EnrollRequest.parse`) → the token is for this fleet and gateway and its tag verifies
under the fleet's token key (``forged``) → not expired → the proof of key possession → the name and address are
not enrolled already → the token is unused (claimed in the store; the same device may retry) → the reserved key
share is still here. Then: register on chain, add the device to ``fleet.json``, give it MQTT credentials and
ACL rights (Mosquitto's files rewritten, ``broker_reload`` run), seal the answer to the device's key and sign
it, mark the token done, delete the handed-out share file. A crash between steps is resumed by the device's
retry: every step is idempotent (registration checks the chain first, the fleet entry is added once).
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import shlex
import subprocess
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from blockdeepnet.acl import AclRules, mosquitto_acl
from blockdeepnet.crypto.threshold import KeyShare
from blockdeepnet.enrollment import EnrollmentError, EnrollmentToken, EnrollRequest, seal_bundle
from blockdeepnet.fleet import DeviceEntry, Fleet
from blockdeepnet.logs import fields
from blockdeepnet.mosquitto_users import set_user
from blockdeepnet.private_files import write_private_atomic
from gateway.store import EnrollmentUsed

if TYPE_CHECKING:
    from gateway.service import Gateway

log = logging.getLogger(__name__)

_STATUS = {
    "malformed": 400,
    "too_large": 413,
    "bad_signature": 401,
    "forged": 401,
    "wrong_fleet": 403,
    "expired": 403,
    "used": 409,
    "name_taken": 409,
    "already_enrolled": 409,
    "no_share": 409,
    "fleet_full": 409,
    "unavailable": 503,
}


class Enroller:
    """Redeems tokens for one gateway; one enrollment at a time (they rewrite shared files)."""

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw
        cfg = gw.cfg.enroll
        assert cfg.token_key_file is not None and cfg.shares_dir is not None
        self.cfg = cfg
        self._token_key = bytes.fromhex(cfg.token_key_file.read_text().strip())
        self._lock = asyncio.Lock()

    async def handle(self, body: bytes) -> tuple[int, dict[str, Any]]:
        """HTTP status and JSON answer for one request body."""
        async with self._lock:
            try:
                answer = await self._redeem(body)
            except EnrollmentError as exc:
                log.warning("enrollment refused (%s): %s", exc.code, exc)
                return _STATUS.get(exc.code, 400), {"error": exc.code, "message": str(exc)}
        return 200, answer

    async def _redeem(self, body: bytes) -> dict[str, Any]:
        gw = self.gw
        request = EnrollRequest.parse(body)
        token = EnrollmentToken.decode(request.token)
        if token.fleet != gw.fleet.name:
            raise EnrollmentError(
                "wrong_fleet", f"the token is for fleet {token.fleet!r}, this is {gw.fleet.name!r}"
            )
        if token.gateway != gw.fleet.gateway or not token.verify_mac(self._token_key):
            raise EnrollmentError(
                "forged", "the token was not issued for this fleet (its tag does not verify)"
            )
        if token.expired():
            raise EnrollmentError("expired", "the token has expired: ask the operator for a new one")
        public_key = request.public_key(token)
        address = request.address
        fleet = gw.fleet
        by_name = next((d for d in fleet.devices if d.name == token.device), None)
        if by_name is not None and by_name.address != address:
            raise EnrollmentError("name_taken", f"a device named {token.device!r} is enrolled already")
        known = fleet.device(address)
        if known is not None and known.name != token.device:
            raise EnrollmentError("already_enrolled", f"{address} is enrolled already as {known.name!r}")
        try:
            state, sealed = await asyncio.to_thread(
                gw.store.claim_enrollment, token.token_id, token.device, address, time.time()
            )
        except EnrollmentUsed as exc:
            raise EnrollmentError("used", str(exc)) from None
        if state == "done" and sealed is not None:
            log.info(
                "enrollment of %s (%s) answered again", token.device, address, extra=fields(device=address)
            )
            return dict(json.loads(sealed))

        share = self._share(token.key_share) if token.key_share else None
        if known is None:
            if len(fleet.devices) >= fleet.layout.max_devices:
                raise EnrollmentError(
                    "fleet_full", f"the fleet holds its maximum of {fleet.layout.max_devices} devices"
                )
            entry = DeviceEntry(address, request.samples, token.key_share, token.device)
            fleet = replace(fleet, devices=(*fleet.devices, entry))
        try:
            registered = await asyncio.to_thread(gw.chain.register_missing, [(address, token.key_share)])
        except Exception as exc:  # chain outage: the device retries with the same token
            raise EnrollmentError("unavailable", f"the chain is unreachable, try again: {exc}") from None
        await gw.adopt_fleet(fleet)
        for addr, tx in registered:
            await asyncio.to_thread(gw.store.set_device_registered, addr, tx)
        password = secrets.token_urlsafe(24)
        if self.cfg.mosquitto_passwd is not None:
            await asyncio.to_thread(self._grant_mosquitto_access, fleet, address, password)
        elif gw.embedded_broker is not None:
            # On the loop the broker runs on: its plugins' tables are changed between two of its reads.
            gw.embedded_broker.allow(address, password, self._acl_rules(fleet))

        contents = {
            "fleet": fleet.to_dict(),
            "broker": {
                "host": self.cfg.broker_host or gw.cfg.broker.host,
                "port": self.cfg.broker_port or gw.broker_port,
                "username": address,
                "password": password,
                "tls": gw.cfg.broker.tls_ca is not None,
            },
            "ca_pem": self.cfg.ca_file.read_text() if self.cfg.ca_file is not None else "",
            "key_share": share.to_dict() if share is not None else None,
            "gateway_url": token.gateway_url,
        }
        answer = seal_bundle(contents, public_key, token.token_id, gw.chain.ledger.account.key)
        await asyncio.to_thread(gw.store.finish_enrollment, token.token_id, json.dumps(answer))
        if token.key_share:
            self._share_path(token.key_share).unlink(missing_ok=True)
        log.info(
            "enrolled %s as %s (samples %d, key share %s)",
            token.device,
            address,
            request.samples,
            token.key_share or "none",
            extra=fields(device=address, holder=token.key_share or None),
        )
        return answer

    def _share_path(self, index: int) -> Path:
        assert self.cfg.shares_dir is not None
        return self.cfg.shares_dir / f"share-{index}.json"

    def _share(self, index: int) -> KeyShare:
        path = self._share_path(index)
        try:
            share = KeyShare.from_dict(json.loads(path.read_text()))
        except FileNotFoundError:
            raise EnrollmentError(
                "no_share", f"key share {index} is not on this gateway any more (handed to another device?)"
            ) from None
        if share.index != index or share.public.to_dict() != self.gw.fleet.public_key.to_dict():
            raise EnrollmentError("no_share", f"{path} is not share {index} of this fleet's key")
        return share

    def _acl_rules(self, fleet: Fleet) -> AclRules:
        broker = self.gw.cfg.broker
        monitors = [u.strip() for u in broker.monitors.split(",") if u.strip()]
        return AclRules.build(
            self.gw.topics, broker.username or "gateway", [d.address for d in fleet.devices], monitors
        )

    def _grant_mosquitto_access(self, fleet: Fleet, address: str, password: str) -> None:
        """The device's password line and the regenerated ACL, then the reload command (Mosquitto reads both
        files again on SIGHUP)."""
        cfg = self.cfg
        assert cfg.mosquitto_passwd is not None and cfg.mosquitto_acl is not None
        set_user(cfg.mosquitto_passwd, address, password)
        write_private_atomic(cfg.mosquitto_acl, mosquitto_acl(self._acl_rules(fleet)))
        if cfg.broker_reload:
            self._reload_broker()

    def _reload_broker(self) -> None:
        command = shlex.split(self.cfg.broker_reload)
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise EnrollmentError("unavailable", f"broker reload {command[0]!r} failed: {exc}") from None
        if done.returncode != 0:
            raise EnrollmentError(
                "unavailable", f"broker reload exited {done.returncode}: {done.stderr.strip()[:200]}"
            )
