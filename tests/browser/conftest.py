"""Headless Debian Chromium driven by Playwright's Python package (never a browser download).

Screenshots go to ``$TLMICROSCOPE_SCREENSHOTS`` (default ``out/screenshots``). Without
``/usr/bin/chromium`` these tests skip, unless ``TLMICROSCOPE_REQUIRE_BROWSER=1`` (as in CI,
where ``.ci/run`` installs Chromium first), in which case they fail.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

CHROMIUM = os.environ.get("TLMICROSCOPE_CHROMIUM", "/usr/bin/chromium")
# The flags keep Chromium from calling out to Google's services on a machine with no network.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="session")
def screenshots() -> Path:
    path = Path(os.environ.get("TLMICROSCOPE_SCREENSHOTS", "out/screenshots"))
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def browser():
    if not Path(CHROMIUM).exists():
        if os.environ.get("TLMICROSCOPE_REQUIRE_BROWSER"):
            pytest.fail(f"{CHROMIUM} is missing; install Debian's chromium and chromium-driver.")
        pytest.skip(f"{CHROMIUM} is not installed")
    pytest.importorskip("playwright")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


class PageErrors(list):
    """JavaScript exceptions and console errors seen by a page."""


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1300, "height": 1600})
    pg = context.new_page()
    errors = PageErrors()
    pg.on("pageerror", lambda exc: errors.append(f"pageerror: {exc}"))
    pg.on(
        "console",
        lambda msg: errors.append(f"console: {msg.text}") if msg.type == "error" else None,
    )
    pg.errors = errors
    yield pg
    context.close()
