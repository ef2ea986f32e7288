"""The dashboard in Chromium: a run renders the report; bad input and Stop show on the page."""

import socket
import time

import pytest

pytestmark = [pytest.mark.browser, pytest.mark.models]

gradio = pytest.importorskip("gradio")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def dashboard_url():
    from tlmicroscope.app.sections import SECTIONS, Section, register_section
    from tlmicroscope.dashboard import serve

    @register_section("slow_test_section", "Slow test section", default=False)
    def _slow(ctx):  # long enough to press Stop while it runs
        time.sleep(20)
        return Section(["<p>slow</p>"])

    port = _free_port()
    app = serve("127.0.0.1", port, models=["tiny-llama", "tiny-gpt2"], block=False)
    yield f"http://127.0.0.1:{port}"
    app.close()
    SECTIONS.pop("slow_test_section", None)


def _run(page, text, model=None):
    if model is not None:
        page.fill("#tlm-model input", model)
        page.keyboard.press("Enter")
    page.fill("#tlm-text textarea", text)
    page.click("#tlm-run")


def test_a_run_renders_the_report(page, dashboard_url, screenshots):
    page.goto(dashboard_url, wait_until="networkidle")
    _run(page, "Hello world, this is a test.")
    page.wait_for_selector("#report-frame", timeout=60_000)
    frame = page.frame_locator("#report-frame")
    frame.locator("section[data-section]").first.wait_for(timeout=30_000)
    assert frame.locator("section[data-section]").count() >= 2
    assert frame.locator(".js-plotly-plot").count() >= 2
    assert "Done:" in page.inner_text("#tlm-status")
    page.screenshot(path=str(screenshots / "dashboard.png"), full_page=True)
    assert list(page.errors) == [], page.errors


@pytest.mark.parametrize(
    "text, model, message",
    [
        ("", None, "The text is empty"),
        ("x" * 2100, None, "2100 tokens long but the model's context is 2048"),
        ("hello", "no-such-model-anywhere", "Could not load the model 'no-such-model-anywhere'"),
    ],
)
def test_bad_input_is_reported_on_the_page(page, dashboard_url, text, model, message):
    page.goto(dashboard_url, wait_until="networkidle")
    _run(page, text, model)
    page.wait_for_selector(".tlm-error", timeout=60_000)
    assert message in page.inner_text(".tlm-error")
    assert page.locator("#report-frame").count() == 0


def test_stop_cancels_a_long_run(page, dashboard_url):
    page.goto(dashboard_url, wait_until="networkidle")
    page.locator("#tlm-sections label", has_text="slow_test_section").click()
    _run(page, "Hello there")
    page.wait_for_function(
        "document.querySelector('#tlm-status') && "
        "document.querySelector('#tlm-status').innerText.includes('slow_test_section')",
        timeout=60_000,
    )
    page.click("#tlm-stop")
    page.wait_for_function(
        "document.querySelector('#tlm-status').innerText.includes('Stopped')", timeout=15_000
    )
    page.wait_for_timeout(1000)
    assert page.locator("#report-frame").count() == 0
