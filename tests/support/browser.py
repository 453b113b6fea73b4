"""Headless Debian Chromium driven by Playwright's sync API, for end-to-end tests of the dashboard.

The browser is the system's ``/usr/bin/chromium`` (the Makefile installs Debian's ``chromium``), never one
Playwright downloads: tests must run offline. Each page gets a fresh temporary profile, so no state leaks
between tests. `make test` installs Chromium, so a machine without it fails the test with what to run (a skip
would hide a broken install).

Screenshots go to ``<pytest rootdir>/test-artifacts/`` (or ``$BDN_TEST_ARTIFACTS``), where CI collects them.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from playwright.sync_api import ConsoleMessage, Error, Page, sync_playwright

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@contextmanager
def chromium_page(
    errors: list[str] | None = None, *, width: int = 1280, height: int = 900, timeout_ms: int = 30_000
) -> Iterator[Page]:
    """A Playwright ``Page`` in headless Chromium with a throw-away profile. Console errors and uncaught page
    exceptions are appended to ``errors`` when given, so a test can assert the page ran cleanly."""
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(
            f"{CHROMIUM} is missing: `make deb-deps` installs Debian's chromium for the browser tests"
        )
    with tempfile.TemporaryDirectory(prefix="bdn-chromium-") as profile, sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            profile,
            executable_path=str(CHROMIUM),
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": width, "height": height},
        )
        try:
            context.set_default_timeout(timeout_ms)
            page = context.pages[0] if context.pages else context.new_page()
            if errors is not None:

                def on_console(msg: ConsoleMessage) -> None:
                    if msg.type == "error":
                        errors.append(f"console: {msg.text} ({msg.location.get('url', '?')})")

                def on_page_error(exc: Error) -> None:
                    errors.append(f"page error: {exc}")

                page.on("console", on_console)
                page.on("pageerror", on_page_error)
            yield page
        finally:
            context.close()


def artifacts_dir(request: pytest.FixtureRequest) -> Path:
    """Where test artifacts go: ``$BDN_TEST_ARTIFACTS``, else ``test-artifacts/`` under pytest's rootdir."""
    configured = os.environ.get("BDN_TEST_ARTIFACTS")
    folder = Path(configured) if configured else Path(request.config.rootpath) / "test-artifacts"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def save_screenshot(page: Page, request: pytest.FixtureRequest, name: str) -> Path:
    """Save a full-page PNG of ``page`` as ``<artifacts>/<name>.png`` and return its path."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "screenshot"
    path = artifacts_dir(request) / f"{safe}.png"
    page.screenshot(path=str(path), full_page=True)
    return path
