"""The operator dashboard on a real gateway (embedded broker and chain, SQLite): one whole round driven over
MQTT, then its pages and JSON read over HTTP. Hostile strings stored from the network must come out escaped."""

from __future__ import annotations

import html
import io
import json
import shlex
import subprocess
import sys
import tarfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from bench.round import premade_updates
from blockdeepnet.ports import free_port
from blockdeepnet.wire import Report, Topics
from provisioning.localfleet import LocalFleet
from tests.support.fleets import device_client, small_fleet
from tests.support.gateway import GatewayThread

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

HOSTILE = '<script>alert("pwned")</script><img src=x onerror=alert(1)>'


def _fleet(tmp_path: Path, **http: object) -> LocalFleet:
    return small_fleet(
        tmp_path,
        "dash",
        broker_port=free_port("127.0.0.1"),
        http_port=0,
        gateway_extra={"rounds": {"max_rounds": 1, "min_updates": 1}, "http": http},
    )


def _fetch(url: str) -> tuple[int, dict[str, str], bytes]:
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def _get(url: str) -> tuple[int, dict[str, str], str]:
    status, headers, body = _fetch(url)
    return status, headers, body.decode()


def _run_printed_audit(audit_page: str, base: str, folder: Path) -> dict[str, Any]:
    """Do what the audit page tells an operator to do (its downloads, then ``bdn audit round``), in Python
    instead of curl and tar, and return the audit's JSON verdict."""
    command = html.unescape(audit_page.split('<pre class="command">', 1)[1].split("</pre>", 1)[0])
    lines = command.splitlines()
    assert (
        f"{base}/dashboard/public-key.json" in lines[0]
        and f"{base}/dashboard/audit/1/archive.tar" in lines[1]
    )
    status, _, key = _fetch(f"{base}/dashboard/public-key.json")
    assert status == 200
    (folder / "public-key.json").write_bytes(key)
    status, headers, tar = _fetch(f"{base}/dashboard/audit/1/archive.tar")
    assert status == 200 and headers["Content-Type"] == "application/x-tar"
    with tarfile.open(fileobj=io.BytesIO(tar)) as archive:
        assert all(m.isfile() and m.name.endswith(".bin") and "/" not in m.name for m in archive.getmembers())
        archive.extractall(folder / "round-1", filter="data")
    argv = shlex.split(lines[2])
    assert argv[:4] == ["bdn", "audit", "round", "1"]
    done = subprocess.run(
        [sys.executable, "-m", "cli.main", *argv[1:], "--json"],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    verdict: dict[str, Any] = json.loads(done.stdout)
    return verdict


def _page(url: str) -> str:
    status, headers, body = _get(url)
    assert status == 200, (url, status, body[:500])
    assert headers["Content-Type"].startswith("text/html")
    assert "script-src 'self'" in headers["Content-Security-Policy"]
    return body


def test_dashboard_shows_fleet_round_chain_audit_and_escaped_rejections(tmp_path: Path) -> None:
    local = _fleet(tmp_path)
    topics = Topics(local.fleet.name)
    updates = premade_updates(local)
    with GatewayThread(local.gateway_config) as gt:
        base = f"http://127.0.0.1:{gt.gw.http_port}/dashboard"
        port = gt.gw.broker_port
        assert port is not None
        gt.wait_for("round_open")
        first = _page(base)
        assert "BlockDeepNet" in first and 'data-round="1"' in first
        clients = [device_client(local, k, port) for k in range(len(local.devices))]
        try:
            clients[0].publish(topics.update(local.devices[0].address), b"\x00junk")
            gt.wait_for("update_rejected")
            for (_, topic, payload), c in zip(updates, clients, strict=True):
                c.publish(topic, payload)
            gt.wait_for("round_closed", timeout=90)
            for d, c in zip(local.devices, clients, strict=True):
                c.publish(topics.report(d.address), Report(1, 100, 0.5, 0.75).to_cbor())
            gt.wait_for("report", count=3)
        finally:
            for c in clients:
                c.close()
        # What a hostile message leaves in the store: device segment and detail are attacker-chosen text.
        gt.gw.store.add_rejection(1.7e9, 1, HOSTILE, "malformed", f"bad CBOR near {HOSTILE}")

        overview = _page(base)
        for d in local.devices:
            assert d.name in overview and d.address[:6] in overview
        assert 'data-round="1" data-status="committed"' in overview
        assert "75.0 %" in overview and "<svg" in overview and "<circle" in overview
        assert "/dashboard/audit/1" in overview

        _, _, fragment = _get(f"{base}?fragment=1")
        assert 'data-round="1"' in fragment and "<html" not in fragment and "<main" not in fragment

        state: dict[str, Any] = json.loads(_get(f"{base}/state.json")[2])
        assert state["fleet"] == local.fleet.name
        assert {d["name"] for d in state["devices"]} == {d.name for d in local.devices}
        assert sum(d["key_holder"] for d in state["devices"]) == 2
        (round1,) = state["rounds"]
        assert round1["status"] == "committed" and round1["updates"] == 3 and round1["recorded"] == 3
        assert round1["wire_bytes"] == sum(len(p) for _, _, p in updates)
        assert round1["update_gas"] > 0 and round1["commit_gas"] > 0
        assert round1["gas"] == round1["update_gas"] + round1["commit_gas"]
        assert round1["accuracy"] == pytest.approx(0.75) and round1["reports"] == 3
        assert (
            state["chain"]["height"] is not None and state["chain"]["contract"] == local.fleet.chain.contract
        )
        assert state["rejection_counts"]["malformed"] == 2
        assert any(x["detail"].endswith(HOSTILE) for x in state["rejections"])

        rejections = _page(f"{base}/rejections")
        assert "malformed" in rejections
        assert "<script>alert" not in rejections and "<img src=x" not in rejections
        assert "&lt;script&gt;alert(&#34;pwned&#34;)&lt;/script&gt;" in rejections

        chain = _page(f"{base}/chain")
        assert local.fleet.chain.contract in chain and 'data-commit="1"' in chain

        audit = _page(f"{base}/audit/1")
        assert 'data-audit="ok"' in audit and "3 of 3 updates checked" in audit
        assert f"bdn audit round 1 --rpc http://127.0.0.1:{gt.gw.http_port}/rpc" in audit
        verdict = _run_printed_audit(audit, f"http://127.0.0.1:{gt.gw.http_port}", tmp_path)
        assert verdict == {"round": 1, "honest": True, "updates": 3, "problems": []}
        assert _get(f"{base}/audit/2/archive.tar")[0] == 404
        forged = urllib.request.Request(f"{base}/audit/1", headers={"Host": 'x"><script>alert(1)</script>'})
        with urllib.request.urlopen(forged, timeout=30) as r:
            page = r.read().decode()
        assert "<script>alert" not in page and "alert(1)" not in page  # a forged Host is not echoed
        assert 'data-audit="unknown"' in _page(f"{base}/audit/7")
        assert _get(f"{base}/audit/not-a-round")[0] == 404
        assert _get(f"{base}/audit/99999999999999999999")[0] == 404
        status, _, css = _get(f"{base}/static/dashboard.css")
        assert status == 200 and ".badge" in css


def test_dashboard_can_be_switched_off(tmp_path: Path) -> None:
    local = _fleet(tmp_path, dashboard=False)
    with GatewayThread(local.gateway_config) as gt:
        base = f"http://127.0.0.1:{gt.gw.http_port}"
        assert _get(f"{base}/dashboard")[0] == 404
        assert _get(f"{base}/metrics")[0] == 200
