"""The dashboard's aiohttp handlers: server-rendered jinja2 pages, their refreshable fragments, and JSON.

Every page is one template for the main content inside ``base.html``. With ``?fragment=1`` only the main
content is rendered: ``static/dashboard.js`` fetches that every few seconds and swaps it in, so a new round
shows up on an open page without a reload (and without JS, a ``<noscript>`` refresh does the same).

Autoescaping is on for every template: device names, rejection reasons and details arrive over MQTT from
anyone. Pages also carry a Content-Security-Policy that allows only this origin's script and style, so even
a missed escape could not run injected script.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jinja2
from aiohttp import web
from markupsafe import Markup

from gateway.dashboard.audit import Auditor, audit_command, configured_base_url, round_archive
from gateway.dashboard.data import REJECTIONS_SHOWN, ROUNDS_SHOWN, Snapshot, collect, live_view
from gateway.store import StoreError

if TYPE_CHECKING:
    from gateway.service import Gateway

log = logging.getLogger("bdn.gateway.dashboard")
HERE = Path(__file__).parent
_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
_MAX_ROUND = (1 << 63) - 1
# A Host header we are willing to echo into a command line: a DNS name or IP literal and an optional port.
_HOST = re.compile(
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?|\[[0-9A-Fa-f:.]{2,45}\])(?::[0-9]{1,5})?"
)


def _round_param(req: web.Request) -> int:
    text = req.match_info["round"]
    round_no = int(text) if text.isdigit() and len(text) <= 19 else -1
    if not 0 <= round_no <= _MAX_ROUND:
        raise web.HTTPNotFound(text="no such round: give /dashboard/audit/<round number>")
    return round_no


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(HERE / "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(
        ago=_ago,
        clock=_clock,
        seconds=_seconds,
        number=_number,
        size=_size,
        short=_short,
        percent=_percent,
    )
    env.globals["accuracy_chart"] = accuracy_chart
    return env


def _ago(at: float | None, now: float | None = None) -> str:
    if at is None:
        return "never"
    s = max(0.0, (now or time.time()) - at)
    if s < 60:
        return f"{s:.0f} s ago"
    if s < 3600:
        return f"{s / 60:.0f} min ago"
    if s < 86400:
        return f"{s / 3600:.1f} h ago"
    return f"{s / 86400:.1f} d ago"


def _clock(at: float | None) -> str:
    return "—" if at is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at))


def _seconds(s: float | None) -> str:
    if s is None:
        return "—"
    return f"{s:.2f} s" if s < 60 else f"{s / 60:.1f} min"


def _number(n: int | None) -> str:
    return "—" if n is None else f"{n:,}".replace(",", "\u202f")


def _size(n: int | None) -> str:
    if not n:
        return "—" if n is None else "0 B"
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000  # type: ignore[assignment]
    return f"{n} B"


def _short(value: str | None, keep: int = 6) -> str:
    if not value:
        return "—"
    return value if len(value) <= 2 + 2 * keep else f"{value[: 2 + keep]}…{value[-keep:]}"


def _percent(value: float | None) -> str:
    return "—" if value is None or not math.isfinite(value) else f"{100 * value:.1f} %"


def accuracy_chart(snapshot: Snapshot, width: int = 640, height: int = 160) -> dict[str, Any]:
    """Geometry of the accuracy-per-round chart (an inline SVG the template draws): points in pixels, axis
    ticks, and one label per point. Server side, so no chart library and no script."""
    points = sorted(
        (r.round, r.accuracy) for r in snapshot.rounds if r.accuracy is not None and math.isfinite(r.accuracy)
    )
    pad_l, pad_r, pad_t, pad_b = 44, 12, 10, 24
    w, h = width - pad_l - pad_r, height - pad_t - pad_b
    if not points:
        return {"width": width, "height": height, "points": [], "line": "", "yticks": [], "xticks": []}
    first, last = points[0][0], points[-1][0]
    span = max(1, last - first)

    def x(r: int) -> float:
        return pad_l + (w * (r - first) / span if last != first else w / 2)

    def y(a: float) -> float:
        return pad_t + h * (1 - min(1.0, max(0.0, a)))

    dots = [{"x": round(x(r), 1), "y": round(y(a), 1), "round": r, "accuracy": a} for r, a in points]
    step = max(1, math.ceil(len(points) / 10))
    return {
        "width": width,
        "height": height,
        "points": dots,
        "line": " ".join(f"{d['x']},{d['y']}" for d in dots),
        "yticks": [
            {"y": round(y(v), 1), "label": f"{v:.0%}", "x0": pad_l, "x1": pad_l + w} for v in (0, 0.5, 1)
        ],
        "xticks": [{"x": d["x"], "label": d["round"], "y": height - 6} for d in dots[::step]],
    }


class Dashboard:
    """Handlers bound to one gateway."""

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw
        self.env = _environment()
        self.auditor = Auditor(gw)

    async def _snapshot(self, *, rounds: int = ROUNDS_SHOWN, rejections: int = 0) -> Snapshot:
        live = live_view(self.gw)
        try:
            return await asyncio.to_thread(collect, self.gw, live, rounds=rounds, rejections=rejections)
        except StoreError as exc:  # the page says so (and its script backs off); the gateway goes on
            log.warning("dashboard: cannot read the store: %s", exc)
            raise web.HTTPServiceUnavailable(text=f"the gateway's store is not answering: {exc}") from None

    def _page(
        self, req: web.Request, template: str, title: str, *, refresh: bool = True, **ctx: Any
    ) -> web.Response:
        ctx.setdefault("now", time.time())
        ctx.setdefault("fleet", self.gw.fleet.name)
        content = self.env.get_template(template).render(**ctx)
        if req.query.get("fragment") == "1":
            html = content
        else:
            html = self.env.get_template("base.html").render(
                title=title,
                content=Markup(content),  # already rendered (and escaped) above
                refresh=refresh,
                path=req.path,
                **ctx,
            )
        # The footer's time stamp is outside a fragment: the script shows this one, in the gateway's clock.
        headers = {**_HEADERS, "X-Rendered-At": _clock(ctx["now"])}
        return web.Response(text=html, content_type="text/html", charset="utf-8", headers=headers)

    async def overview(self, req: web.Request) -> web.Response:
        snap = await self._snapshot(rounds=ROUNDS_SHOWN, rejections=10)
        return self._page(req, "overview.html", "Overview", snap=snap)

    async def rounds(self, req: web.Request) -> web.Response:
        snap = await self._snapshot(rounds=ROUNDS_SHOWN)
        return self._page(req, "rounds.html", "Rounds", snap=snap)

    async def chain(self, req: web.Request) -> web.Response:
        snap = await self._snapshot(rounds=ROUNDS_SHOWN)
        return self._page(req, "chain.html", "Chain", snap=snap)

    async def rejections(self, req: web.Request) -> web.Response:
        snap = await self._snapshot(rounds=0, rejections=REJECTIONS_SHOWN)
        return self._page(req, "rejections.html", "Rejections", snap=snap)

    def _base_url(self, req: web.Request) -> str:
        """The gateway's URL as this browser reached it (for command lines to copy), else as configured."""
        host = req.headers.get("Host", "")
        if _HOST.fullmatch(host):
            return f"{'https' if req.secure else 'http'}://{host}"
        return configured_base_url(self.gw)

    async def audit(self, req: web.Request) -> web.Response:
        round_no = _round_param(req)
        result = await self.auditor.result(round_no)
        return self._page(
            req,
            "audit.html",
            f"Audit of round {round_no}",
            refresh=not result.final,
            result=result,
            command=audit_command(self.gw, round_no, self._base_url(req)),
        )

    async def archive(self, req: web.Request) -> web.Response:
        """The round's recorded update payloads as a tar, for ``bdn audit round --archive``."""
        round_no = _round_param(req)
        try:
            data = await asyncio.to_thread(round_archive, self.gw, round_no)
        except StoreError as exc:
            log.warning("dashboard: cannot read the payloads of round %d: %s", round_no, exc)
            raise web.HTTPServiceUnavailable(text=f"the gateway's store is not answering: {exc}") from None
        if data is None:
            raise web.HTTPNotFound(text=f"this gateway has no recorded update for round {round_no}")
        return web.Response(
            body=data,
            content_type="application/x-tar",
            headers={
                "Content-Disposition": f'attachment; filename="round-{round_no}-updates.tar"',
                "Cache-Control": "no-store",
            },
        )

    async def public_key(self, _req: web.Request) -> web.Response:
        """The fleet's Paillier (threshold) public key, the ``--public-key`` file of ``bdn audit round``."""
        return web.json_response(self.gw.fleet.public_key.to_dict(), headers={"Cache-Control": "no-store"})

    async def state(self, _req: web.Request) -> web.Response:
        snap = await self._snapshot(rounds=ROUNDS_SHOWN, rejections=REJECTIONS_SHOWN)
        return web.json_response(snap.to_json(), headers={"Cache-Control": "no-store"})


def add_routes(app: web.Application, gw: Gateway) -> None:
    """Serve the dashboard under ``/dashboard`` on ``app`` (the gateway's HTTP endpoint)."""
    d = Dashboard(gw)
    app.router.add_get("/dashboard", d.overview)
    app.router.add_get("/dashboard/", d.overview)
    app.router.add_get("/dashboard/rounds", d.rounds)
    app.router.add_get("/dashboard/chain", d.chain)
    app.router.add_get("/dashboard/rejections", d.rejections)
    app.router.add_get("/dashboard/audit/{round}", d.audit)
    app.router.add_get("/dashboard/audit/{round}/archive.tar", d.archive)
    app.router.add_get("/dashboard/public-key.json", d.public_key)
    app.router.add_get("/dashboard/state.json", d.state)
    app.router.add_static("/dashboard/static", HERE / "static")
