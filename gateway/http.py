"""The gateway's HTTP endpoint: ``/metrics`` (Prometheus), ``/healthz``, ``/fleet`` (the public fleet.json),
``/enroll`` (devices redeem their tokens, :mod:`gateway.enroll`), ``/dashboard`` (the operator dashboard,
:mod:`gateway.dashboard`), and ``/rpc`` for the embedded chain.

``/rpc`` exists because an embedded chain lives inside the gateway's process: devices still have to check
each global block against the contract themselves (DESIGN §1.6), so the gateway serves a *read-only*
JSON-RPC view of it (calls, logs, receipts; no transactions). On a real chain devices use the node instead.
"""

from __future__ import annotations

import asyncio
import json
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING, Any

from aiohttp import web
from web3 import Web3

if TYPE_CHECKING:
    from gateway.service import Gateway

_MAX_RPC_BYTES = 64 * 1024


async def serve(gw: Gateway, stack: AsyncExitStack) -> int:
    """Start the endpoint on ``gw.cfg.http``; returns the bound port (useful with port 0)."""
    app = web.Application(client_max_size=_MAX_RPC_BYTES)

    async def metrics(_req: web.Request) -> web.Response:
        return web.Response(body=gw.metrics.render(), content_type="text/plain", charset="utf-8")

    async def healthz(_req: web.Request) -> web.Response:
        live = gw.live
        checks = {
            "broker_connected": gw.client.connected.is_set(),
            "chain_reachable": gw.relay.healthy,
            "round": live.round if live else None,
            "accepting": gw._accepting is not None,
        }
        ok = bool(checks["broker_connected"] and checks["chain_reachable"])
        return web.json_response({"ok": ok, **checks}, status=200 if ok else 503)

    async def rpc(req: web.Request) -> web.Response:
        try:
            body = await req.json()
            method, params, ident = body["method"], body.get("params", []), body.get("id")
            if not isinstance(method, str) or not isinstance(params, list):
                raise ValueError("method must be a string and params a list")
        except (ValueError, KeyError, TypeError) as exc:
            return web.json_response(
                {
                    "jsonrpc": "2.0",
                    "id": None,
                    "error": {"code": -32600, "message": f"invalid request: {exc}"},
                }
            )
        response: dict[str, Any] = await asyncio.to_thread(gw.chain.read_only_request, method, params)
        response["jsonrpc"], response["id"] = "2.0", ident
        if "result" in response:
            response["result"] = _wire(response["result"])
        return web.Response(text=json.dumps(response), content_type="application/json")

    async def fleet(_req: web.Request) -> web.Response:
        return web.json_response(gw.fleet.to_dict())

    app.router.add_get("/metrics", metrics)
    app.router.add_get("/fleet", fleet)
    if gw.cfg.enroll.enabled:
        from gateway.enroll import Enroller

        enroller = Enroller(gw)

        async def enroll(req: web.Request) -> web.Response:
            status, answer = await enroller.handle(await req.read())
            return web.json_response(answer, status=status)

        app.router.add_post("/enroll", enroll)
    app.router.add_get("/healthz", healthz)
    if gw.cfg.http.dashboard:
        from gateway.dashboard import add_routes

        add_routes(app, gw)
    if gw.chain.embedded:
        app.router.add_post("/rpc", rpc)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, gw.cfg.http.host, gw.cfg.http.port)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise OSError(
            f"cannot serve HTTP on {gw.cfg.http.host}:{gw.cfg.http.port}: {exc.strerror}; "
            "set http.port in gateway.toml to a free port (0 = any) or http.enabled = false"
        ) from exc
    stack.push_async_callback(runner.cleanup)
    server = site._server
    assert server is not None
    port: int = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return port


def _wire(value: Any) -> Any:
    """eth-tester's answer in JSON-RPC's own encoding: bytes (HexBytes) as hex data, every integer as a hex
    quantity (eth-tester hands back Python ints, e.g. for ``eth_chainId``; nodes answer ``"0x..."``, and
    devices read ``/rpc`` with a plain JSON-RPC client), mappings (AttributeDicts) and lists recursively."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return hex(value)
    if isinstance(value, bytes | bytearray):
        return Web3.to_hex(value)
    if hasattr(value, "items"):
        return {k: _wire(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_wire(v) for v in value]
    raise TypeError(f"cannot encode {type(value).__name__}")
