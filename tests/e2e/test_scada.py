"""Issue 7's acceptance: the demo fitted into a plant.

``bdn demo`` (3 devices, 2 rounds, 512-bit key) runs with its bridge to a second Mosquitto, the "plant
broker", over MQTT 5 with a topic prefix, and with the Sparkplug B edge node publishing there. On the plant
broker a Sparkplug subscriber decodes every message with Eclipse Tahu's generated schema (the PyPI package
``sparkplug_b_packets``, not our own module) and checks births, data and deaths; the bridged topics arrive
with the prefix. While the demo runs, headless Chromium opens the dashboard, waits for round 1 to appear
without a reload, and saves a screenshot in ``test-artifacts/``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from blockdeepnet.ports import free_port
from tests.support.browser import chromium_page, save_screenshot
from tests.support.mosquitto import MosquittoProcess
from tests.support.mqtt import MqttTestClient
from tests.support.sparkplug import SparkplugRecorder

pytestmark = [pytest.mark.integration, pytest.mark.timeout(480)]

PREFIX = "plant1/"
GROUP = "BlockDeepNet"
NODE = "demo"


def _wait(what: str, ok: Callable[[], bool], timeout: float, alive: Callable[[], bool]) -> None:
    end = time.monotonic() + timeout
    while not ok():
        if not alive():
            raise AssertionError(f"the demo ended before {what}")
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def _responds(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return bool(r.status == 200)
    except OSError:
        return False


def test_demo_bridged_to_a_plant_broker_with_sparkplug_and_dashboard(
    tmp_path: Path, mosquitto_factory: Callable[..., MosquittoProcess], request: pytest.FixtureRequest
) -> None:
    plant = mosquitto_factory()
    recorder = SparkplugRecorder(plant.host, plant.port, f"spBv1.0/{GROUP}/#")
    historian = MqttTestClient(plant.host, plant.port).connect()  # everything bridged up
    historian.subscribe(f"{PREFIX}#")
    http_port = free_port()
    cmd = [sys.executable, "-m", "cli.main", "demo", "--devices", "3", "--rounds", "2", "--threshold", "1"]
    cmd += ["--holders", "2", "--key-bits", "512", "--no-bench", "--out", str(tmp_path)]
    cmd += ["--http-port", str(http_port), "--upstream", f"127.0.0.1:{plant.port}"]
    cmd += ["--upstream-protocol", "5", "--upstream-prefix", PREFIX]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "120"}
    log = (tmp_path / "demo.out").open("w")
    demo = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, text=True)

    def alive() -> bool:
        return demo.poll() is None

    try:
        dashboard = f"http://127.0.0.1:{http_port}/dashboard"
        _wait("the dashboard to answer", lambda: _responds(dashboard), 120, alive)
        with chromium_page() as page:
            page.goto(dashboard)
            page.wait_for_selector("text=BlockDeepNet", timeout=10_000)
            # Round 1 opens once the gateway is up; the open page shows it by itself (no reload), then its
            # commit and the devices' states as they come.
            page.wait_for_selector('[data-round="1"]', timeout=180_000)
            _wait(
                "round 1 on the plant broker",
                lambda: (recorder.node_metric("Round/Number") or 0) >= 1,
                60,
                alive,
            )
            page.wait_for_selector('tr[data-round="1"][data-status="committed"]', timeout=180_000)
            page.wait_for_function("document.querySelectorAll('.badge.state-unknown').length === 0")
            shot = save_screenshot(page, request, "scada-demo-dashboard")
            text = page.inner_text("body")
        assert shot.stat().st_size > 10_000
        assert "dev0" in text and "dev2" in text
        assert demo.wait(timeout=400) == 0, (tmp_path / "demo.out").read_text()[-3000:]
        recorder.wait_for(lambda: recorder.count("NDEATH") >= 1, timeout=30)
    finally:
        if demo.poll() is None:
            demo.terminate()
            demo.wait(30)
        log.close()
        recorder.close()
        historian.close()

    # --- Sparkplug: births before data, consecutive sequence numbers, deaths at the end --------------------
    node = recorder.node_messages(GROUP, NODE)
    kinds = [m.kind for m in node]
    assert kinds[0] == "NBIRTH" and node[0].seq == 0
    bd_seq = node[0].metric("bdSeq")
    assert node[-1].kind == "NDEATH" and node[-1].metric("bdSeq") == bd_seq
    recorder.assert_sequence(node)  # seq + 1 mod 256 from each NBIRTH, NDEATH without one
    births = {m.device for m in node if m.kind == "DBIRTH"}
    assert births == {"dev0", "dev1", "dev2"}
    for device in births:
        device_kinds = [m.kind for m in node if m.device == device]
        assert device_kinds[0] == "DBIRTH", device_kinds
        assert "DDEATH" in device_kinds  # the agents stop at the end of the demo
    rounds = [m.metric("Round/Number") for m in node if m.kind == "NDATA" and m.has("Round/Number")]
    assert rounds and max(rounds) == 2
    accuracy = [m.metric("Model/Accuracy") for m in node if m.kind == "NDATA" and m.has("Model/Accuracy")]
    assert accuracy and 0.5 < accuracy[-1] <= 1.0
    assert any(m.has("Chain/Height") for m in node if m.kind == "NDATA")

    # --- the bridge: the gateway's state, the round and the devices' states went up with the prefix --------
    bridged = [m.topic for m in historian.drain()]
    assert f"{PREFIX}bdn/v1/demo/gateway/state" in bridged
    assert f"{PREFIX}bdn/v1/demo/round" in bridged
    assert sum(1 for t in bridged if t.startswith(f"{PREFIX}bdn/v1/demo/dev/")) >= 3
