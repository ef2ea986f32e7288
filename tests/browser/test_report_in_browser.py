"""The saved report opens in Chromium with every section rendered and no JavaScript errors."""

import pytest

from tlmicroscope.report import available_sections, report

pytestmark = [pytest.mark.browser, pytest.mark.models]


def test_every_section_renders_without_javascript_errors(tiny_llama, page, screenshots, tmp_path):
    rep = report(
        tiny_llama, "The cat sat on the mat. The dog sat too.", sections=available_sections()
    )
    path = rep.save(tmp_path / "report.html")
    page.goto(path.as_uri(), wait_until="load")
    page.wait_for_timeout(1500)
    sections = page.locator("section[data-section]")
    assert sections.count() == len(available_sections())
    for i in range(sections.count()):
        sec = sections.nth(i)
        name = sec.get_attribute("data-section")
        status = sec.get_attribute("data-status")
        if status == "missing":
            assert sec.locator(".notice").count() == 1, name
            continue
        plots = sec.locator(".js-plotly-plot")
        views = sec.locator("div.circuitsvis")
        assert plots.count() + views.count() > 0, f"section {name} has nothing in it"
        for j in range(plots.count()):  # plotly drew an SVG for each figure
            assert plots.nth(j).locator("svg.main-svg").count() > 0, f"{name}: figure {j} not drawn"
        for j in range(views.count()):  # circuitsvis mounted its React component
            assert views.nth(j).locator("*").count() > 0, f"{name}: token view {j} empty"
    page.screenshot(path=str(screenshots / "report.png"), full_page=True)
    assert list(page.errors) == [], page.errors
