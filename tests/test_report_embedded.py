"""The full report of a real text on the embedded SmolLM2-135M: every section drawn or explained."""

import pytest

from tlmicroscope.app.sections import default_sections
from tlmicroscope.corpus import text_windows
from tlmicroscope.lenses import TunedLens
from tlmicroscope.report import report

pytestmark = [pytest.mark.embedded, pytest.mark.models]


def test_full_report_has_every_section(embedded_model, tmp_path):
    # 520 tokens: enough for the token-geometry estimators (the paper trusts IDs from ~500 tokens).
    text = text_windows(embedded_model, seq_len=520, n_windows=1, seed=3)[0]
    # An untrained tuned lens is the logit lens exactly; it exercises the "lens present" paths.
    lens = TunedLens.for_model(embedded_model)
    rep = report(embedded_model, text, lens=lens)
    assert rep.failed == {}, rep.failed
    defaults = default_sections()
    assert sorted(rep.rendered + list(rep.missing)) == sorted(defaults)
    # What needs nothing but the text renders; what is missing names the command that fixes it.
    for name in ("trajectory", "logit_lens_table", "token_geometry"):
        assert name in rep.rendered, (name, rep.missing.get(name))
    html = rep.save(tmp_path / "report.html").read_text()
    assert html.count("<section ") >= len(defaults)
    for name in rep.missing:  # each says in place which command fixes it
        fix = rep.fixes[name]
        assert fix and ("tlmicroscope" in fix or "pip install" in fix), (name, fix)
    assert "SmolLM2" in html or "smollm2" in html
