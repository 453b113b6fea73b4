"""The dashboard's audit of a committed round: :func:`blockdeepnet.audit.audit_round` on the chain's record and
the payloads the gateway stored, the same check ``bdn audit round`` makes from public material.

It runs in a worker thread (one at a time: summing ciphertexts is CPU work that must not crowd out the
gateway), and a finished result is cached per round: a committed round never changes. A chain that cannot be
read is reported, not cached, so the next visit tries again.
"""

from __future__ import annotations

import asyncio
import io
import logging
import shlex
import tarfile
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING
from urllib.parse import urlsplit, urlunsplit

from blockdeepnet.audit import audit_round, chain_record
from blockdeepnet.ledger import LedgerError
from gateway.store import StoreError

if TYPE_CHECKING:
    from gateway.service import Gateway

log = logging.getLogger("bdn.gateway.dashboard")

_CACHED_ROUNDS = 256


@dataclass(frozen=True)
class AuditedUpdate:
    device: str
    name: str
    payload_hash: str
    wire_bytes: int | None
    gas: int | None
    tx: str | None


@dataclass(frozen=True)
class AuditResult:
    round: int
    status: str  # "honest", "not honest", "not committed", "unknown round", "error"
    problems: list[str] = field(default_factory=list)
    checked: int = 0
    count: int = 0
    updates: list[AuditedUpdate] = field(default_factory=list)
    at: float = 0.0

    @property
    def final(self) -> bool:
        return self.status in ("honest", "not honest")


class Auditor:
    """Audits rounds for the dashboard, caching final results."""

    def __init__(self, gw: Gateway) -> None:
        self._gw = gw
        self._cache: OrderedDict[int, AuditResult] = OrderedDict()
        self._lock = asyncio.Lock()

    async def result(self, round_no: int) -> AuditResult:
        if (cached := self._cache.get(round_no)) is not None:
            return cached
        async with self._lock:
            if (cached := self._cache.get(round_no)) is not None:
                return cached
            result = await asyncio.to_thread(self._audit, round_no)
            if result.final:
                self._cache[round_no] = result
                while len(self._cache) > _CACHED_ROUNDS:
                    self._cache.popitem(last=False)
            return result

    def _audit(self, round_no: int) -> AuditResult:
        gw = self._gw
        now = time.time()
        try:
            row = gw.store.get_round(round_no)
            if row is None:
                return AuditResult(round_no, "unknown round", at=now)
            record = gw.chain.call_sync(lambda lg: chain_record(lg, round_no))
            if record is None:
                return AuditResult(round_no, "not committed", at=now)
            stored = gw.store.recorded_updates(round_no, with_payload=True)
        except (LedgerError, StoreError, OSError, ValueError) as exc:
            log.warning("dashboard audit of round %d failed: %s", round_no, exc)
            return AuditResult(round_no, "error", problems=[f"cannot read the round: {exc}"], at=now)
        payloads = {u.payload_hash: u.payload for u in stored if u.payload is not None}
        block, recorded = record
        report = audit_round(gw.public_key, block, recorded, payloads)
        names = {d.address: d.name for d in gw.fleet.devices}
        by_hash = {u.payload_hash: u for u in stored}
        updates = []
        for r in recorded:
            u = by_hash.get(r.payload_hash)
            updates.append(
                AuditedUpdate(
                    device=r.device,
                    name=names.get(r.device, ""),
                    payload_hash="0x" + r.payload_hash.hex(),
                    wire_bytes=None if u is None else u.wire_bytes,
                    gas=None if u is None else u.gas_used,
                    tx=None if u is None or u.tx_hash is None else "0x" + u.tx_hash.hex(),
                )
            )
        return AuditResult(
            round_no,
            "honest" if report.honest else "not honest",
            problems=list(report.problems),
            checked=report.checked_updates,
            count=block.count,
            updates=updates,
            at=now,
        )


def round_archive(gw: Gateway, round_no: int) -> bytes | None:
    """The round's recorded update payloads as an uncompressed tar of ``<payload hash hex>.bin`` files: the
    ``--archive`` folder ``bdn audit round`` wants (ciphertexts do not compress). ``None`` when the gateway has
    no recorded update for the round. Blocking: run it in a thread. Its size is bounded by the fleet's size
    times the largest update the gateway accepts."""
    stored = [(u, u.payload) for u in gw.store.recorded_updates(round_no, with_payload=True) if u.payload]
    if not stored:
        return None
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for u, payload in stored:
            info = tarfile.TarInfo(f"{u.payload_hash.hex()}.bin")
            info.size = len(payload)
            info.mtime = int(u.received_at)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(payload))
    return out.getvalue()


def configured_base_url(gw: Gateway) -> str:
    """The gateway's HTTP endpoint as configured (a wildcard bind address becomes the loopback address)."""
    host = gw.cfg.http.host
    host = "127.0.0.1" if host in ("", "0.0.0.0") else "::1" if host == "::" else host
    return f"http://[{host}]:{gw.http_port}" if ":" in host else f"http://{host}:{gw.http_port}"


def audit_command(gw: Gateway, round_no: int, base: str) -> str:
    """The shell lines an operator runs to check the round independently of this dashboard: fetch the fleet's
    public key and the round's archived payloads from the gateway (both public; the audit itself verifies every
    payload against what its device signed on chain), then ``bdn audit round`` against the gateway's read-only
    ``/rpc`` for an embedded chain, else against the node (URL as configured, minus any credentials in it).
    ``base`` is the gateway's URL as the operator reaches it."""
    chain = gw.fleet.chain
    if chain.kind == "embedded":
        rpc = f"{base}/rpc"
    else:
        parts = urlsplit(chain.url)
        netloc = parts.hostname or ""
        if parts.port:
            netloc += f":{parts.port}"
        rpc = urlunsplit((parts.scheme, netloc, parts.path, "", ""))
    folder = f"round-{round_no}"
    audit = ["bdn", "audit", "round", str(round_no), "--rpc", rpc, "--contract", chain.contract]
    audit += ["--public-key", "public-key.json", "--archive", folder]
    if chain.poa:
        audit.append("--poa")
    return "\n".join(
        [
            shlex.join(["curl", "-fsS", "-o", "public-key.json", f"{base}/dashboard/public-key.json"]),
            shlex.join(["mkdir", "-p", folder])
            + " && "
            + shlex.join(["curl", "-fsS", f"{base}/dashboard/audit/{round_no}/archive.tar"])
            + " | "
            + shlex.join(["tar", "-x", "-C", folder]),
            shlex.join(audit),
        ]
    )
