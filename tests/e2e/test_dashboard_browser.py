"""The dashboard in headless Chromium: it loads and shows the fleet, and while a gateway runs a round driven by
simulated devices over MQTT, the committed round and the next one appear on the open page by themselves (the
page's script refreshes it; no reload), with no console error. Screenshots land in ``test-artifacts/``."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from bench.round import premade_updates
from blockdeepnet.ports import free_port
from blockdeepnet.wire import DeviceState, DeviceStatus, Report, Topics
from tests.support.browser import chromium_page, save_screenshot
from tests.support.fleets import device_client, small_fleet
from tests.support.gateway import GatewayThread

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


def test_open_dashboard_follows_a_round_without_reloading(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    local = small_fleet(
        tmp_path,
        "plant",
        broker_port=free_port("127.0.0.1"),
        http_port=0,
        gateway_extra={"rounds": {"max_rounds": 2, "min_updates": 1}},
    )
    topics = Topics(local.fleet.name)
    updates = premade_updates(local)
    errors: list[str] = []
    with GatewayThread(local.gateway_config) as gt, chromium_page(errors) as page:
        port = gt.gw.broker_port
        assert port is not None
        gt.wait_for("round_open")
        page.goto(f"http://127.0.0.1:{gt.gw.http_port}/dashboard")
        page.wait_for_selector("text=BlockDeepNet")
        page.wait_for_selector('[data-round="1"][data-status="open"]')
        for d in local.devices:
            assert page.locator(f'tr[data-device="{d.address}"]').inner_text().startswith(d.name)
        page.evaluate("window.__sameDocument = true")  # gone if the page reloads

        clients = [device_client(local, k, port) for k in range(len(local.devices))]
        try:
            states: tuple[DeviceStatus, ...] = ("online", "training", "training")
            for d, c, state in zip(local.devices, clients, states, strict=True):
                c.publish(topics.state(d.address), DeviceState(state, 1).to_cbor(), retain=True)
            gt.wait_for("device_state", count=3)
            page.wait_for_selector(f'tr[data-device="{local.devices[0].address}"] .state-online')
            page.wait_for_selector(f'tr[data-device="{local.devices[2].address}"] .state-training')
            clients[1].publish(topics.update(local.devices[1].address), b"\xa1junk")
            for (_, topic, payload), c in zip(updates, clients, strict=True):
                c.publish(topic, payload)
            gt.wait_for("round_closed", timeout=90)
            for k, (d, c) in enumerate(zip(local.devices, clients, strict=True)):
                c.publish(topics.report(d.address), Report(1, 100, 0.6, 0.7 + 0.05 * k).to_cbor())
            gt.wait_for("report", count=3)
            page.wait_for_selector('[data-round="1"][data-status="committed"]', timeout=20_000)
            page.wait_for_selector('[data-round="2"]', timeout=20_000)
            page.wait_for_selector("svg.chart circle", timeout=20_000)
            page.wait_for_selector("text=malformed", timeout=20_000)
        finally:
            for c in clients:
                c.close()
        assert page.evaluate("window.__sameDocument") is True
        assert re.fullmatch(r"updated \d{4}-\d\d-\d\d \d\d:\d\d:\d\d", page.inner_text("#refreshed"))
        shot = save_screenshot(page, request, "dashboard-overview")
        assert shot.stat().st_size > 10_000

        page.click('[data-round="1"] a[href="/dashboard/audit/1"]')
        page.wait_for_selector('[data-audit="ok"]', timeout=60_000)
        save_screenshot(page, request, "dashboard-audit")
        page.set_viewport_size({"width": 390, "height": 844})
        page.goto(f"http://127.0.0.1:{gt.gw.http_port}/dashboard/rounds")
        page.wait_for_selector('[data-round="1"]')
        save_screenshot(page, request, "dashboard-rounds-phone")
    assert errors == []
