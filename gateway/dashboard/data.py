"""What the dashboard shows, gathered into plain dataclasses: one snapshot per page render.

:func:`live_view` reads the gateway's in-memory state (live round, chain height) and must run on the loop;
:func:`collect` runs the store queries and must run in a worker thread (SQLAlchemy is blocking). Every query
is bounded (the latest rounds, the latest rejections), so a refresh costs the same after a year as after a
minute. Device names, rejection details and reasons come from the network: they stay plain strings here and
are escaped by the templates, never trusted as markup.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from blockdeepnet.wire import ONLINE_STATES

if TYPE_CHECKING:
    from gateway.service import Gateway

ROUNDS_SHOWN = 50
REJECTIONS_SHOWN = 100
COMMITS_SHOWN = 10


@dataclass(frozen=True)
class DeviceView:
    address: str
    name: str
    state: str
    last_seen: float | None
    key_holder: bool
    key_share: int
    samples: int
    registered_tx: str | None


@dataclass(frozen=True)
class RoundView:
    round: int
    status: str
    reason: str | None
    opened_at: float
    closed_at: float | None
    duration_s: float | None
    updates: int
    recorded: int
    rejected: int
    wire_bytes: int
    update_gas: int
    commit_gas: int | None
    commit_tx: str | None
    accuracy: float | None
    reports: int
    extensions: int

    @property
    def gas(self) -> int:
        return self.update_gas + (self.commit_gas or 0)


@dataclass(frozen=True)
class LiveView:
    """The round the gateway is running now, from memory (the store lags behind by design)."""

    round: int | None
    submitted: int
    recorded: int
    deadline_at: float | None
    chain_height: int | None


@dataclass(frozen=True)
class RejectionView:
    at: float
    round: int | None
    device: str | None
    name: str  # the fleet's name for ``device`` when it is one of the fleet's addresses, else ""
    reason: str
    detail: str


@dataclass(frozen=True)
class ChainView:
    kind: str
    endpoint: str
    contract: str
    chain_id: int
    height: int | None


@dataclass(frozen=True)
class Snapshot:
    fleet: str
    generated_at: float
    threshold: int
    devices: list[DeviceView]
    live: LiveView
    chain: ChainView
    rounds: list[RoundView] = field(default_factory=list)
    rejections: list[RejectionView] = field(default_factory=list)
    rejection_counts: dict[str, int] = field(default_factory=dict)

    @property
    def commits(self) -> list[RoundView]:
        return [r for r in self.rounds if r.status == "committed"][:COMMITS_SHOWN]

    @property
    def online(self) -> int:
        return sum(1 for d in self.devices if d.state in ONLINE_STATES)

    def to_json(self) -> dict[str, Any]:
        """The same data for scripts and SCADA: plain JSON types only."""
        data = asdict(self)
        for r, view in zip(data["rounds"], self.rounds, strict=True):
            r["gas"] = view.gas
        return data


def chain_endpoint(kind: str, url: str) -> str:
    """Where the chain is, without anything secret: an RPC URL may carry credentials or an API key in its
    path or query, so only scheme, host and port are shown."""
    if kind == "embedded":
        return "embedded (in the gateway's process)"
    parts = urlsplit(url)
    host = parts.hostname or "?"
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}"


def live_view(gw: Gateway) -> LiveView:
    """The in-memory part of a snapshot; call it on the gateway's loop."""
    live = gw.live
    if live is None:
        return LiveView(None, 0, 0, None, gw.chain_height)
    return LiveView(live.round, len(live.submitted), len(live.folded), live.deadline_at, gw.chain_height)


def collect(gw: Gateway, live: LiveView, *, rounds: int = ROUNDS_SHOWN, rejections: int = 0) -> Snapshot:
    """The store part of a snapshot (blocking: run it in a thread). ``rejections`` = how many of the latest
    rejected messages to list (0: only the counts per reason)."""
    fleet = gw.fleet
    shares = {d.address: d.key_share for d in fleet.devices}
    names = {d.address: d.name for d in fleet.devices}
    by_lower = {a.lower(): n for a, n in names.items()}
    devices = [
        DeviceView(
            address=d.address,
            name=d.name or names.get(d.address, ""),
            state=d.state,
            last_seen=d.last_seen,
            key_holder=bool(shares.get(d.address, d.key_share)),
            key_share=shares.get(d.address, d.key_share),
            samples=d.samples,
            registered_tx=d.registered_tx,
        )
        for d in gw.store.devices()
    ]
    devices.sort(key=lambda d: (d.name, d.address))
    rows = gw.store.recent_rounds(rounds) if rounds else []
    stats = gw.store.round_stats([r.round for r in rows])
    views = []
    for r in rows:
        s = stats.get(r.round, {})
        updates = int(s.get("stored", 0)) + int(s.get("recorded", 0)) + int(s.get("rejected", 0))
        recorded = int(s.get("recorded", 0))
        if live.round == r.round:  # the store only knows what the relay has confirmed so far
            updates, recorded = max(updates, live.submitted), max(recorded, live.recorded)
        views.append(
            RoundView(
                round=r.round,
                status=r.status,
                reason=r.reason,
                opened_at=r.opened_at,
                closed_at=r.closed_at,
                duration_s=None if r.closed_at is None else max(0.0, r.closed_at - r.opened_at),
                updates=updates,
                recorded=recorded,
                rejected=int(s.get("rejected", 0)),
                wire_bytes=int(s.get("wire_bytes", 0)),
                update_gas=int(s.get("update_gas", 0)),
                commit_gas=r.commit_gas,
                commit_tx=None if r.commit_tx is None else "0x" + r.commit_tx.hex(),
                accuracy=s.get("accuracy"),
                reports=int(s.get("reports", 0)),
                extensions=r.extensions,
            )
        )
    info = fleet.chain
    chain = ChainView(
        info.kind, chain_endpoint(info.kind, info.url), info.contract, info.chain_id, live.chain_height
    )
    listed = [
        RejectionView(x.at, x.round, x.device, by_lower.get((x.device or "").lower(), ""), x.reason, x.detail)
        for x in (gw.store.recent_rejections(rejections) if rejections else [])
    ]
    return Snapshot(
        fleet=fleet.name,
        generated_at=time.time(),
        threshold=fleet.public_key.threshold,
        devices=devices,
        live=live,
        chain=chain,
        rounds=views,
        rejections=listed,
        rejection_counts=dict(sorted(gw.store.rejection_counts().items(), key=lambda kv: -kv[1])),
    )
