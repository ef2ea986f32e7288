import pytest

from tlmicroscope.app.sections import SECTIONS, MissingPrerequisite, Section, register_section
from tlmicroscope.report import report

pytestmark = pytest.mark.models


@pytest.fixture
def temp_sections():
    saved = dict(SECTIONS)
    yield
    SECTIONS.clear()
    SECTIONS.update(saved)


def test_report_renders_lens_sections(tiny_llama, tmp_path):
    rep = report(tiny_llama, "Hello there", sections=["trajectory", "logit_lens_table"])
    assert rep.rendered == ["trajectory", "logit_lens_table"] and not rep.failed
    html = rep.save(tmp_path / "r.html").read_text()
    assert 'data-section="prediction-trajectories"' in html and "weights unprocessed" in html


def test_missing_and_failing_sections_are_shown_in_place(tiny_llama, temp_sections):
    @register_section("needs_umap", "Needs UMAP")
    def _needs(ctx):
        raise MissingPrerequisite("UMAP is not installed.", fix="pip install 'tlmicroscope[umap]'")

    @register_section("broken", "Broken")
    def _broken(ctx):
        raise RuntimeError("kaboom")

    @register_section("fine", "Fine")
    def _fine(ctx):
        return Section(["<p>ok</p>"], caption="c")

    rep = report(tiny_llama, "abc", sections=["needs_umap", "broken", "fine"])
    assert rep.rendered == ["fine"]
    assert "UMAP" in rep.missing["needs_umap"] and "kaboom" in rep.failed["broken"]
    html = rep.html()
    assert "pip install &#x27;tlmicroscope[umap]&#x27;" in html and "kaboom" in html


def test_bad_report_input(tiny_llama):
    with pytest.raises(ValueError, match="empty"):
        report(tiny_llama, "")
    with pytest.raises(ValueError, match="Unknown report sections"):
        report(tiny_llama, "abc", sections=["nope"])


def test_sections_share_one_forward_pass(tiny_llama, temp_sections):
    """Every section reads the shared capture: the model runs once for the whole report."""
    from tlmicroscope.lenses import prediction_trajectory

    @register_section("second_reader", "Second reader", needs=("resid", "mlp_out"))
    def _second(ctx):
        assert "blocks.2.hook_mlp_out" in ctx.cache
        traj = prediction_trajectory(ctx.cache, ctx.tokens, logits=ctx.logits)
        return Section([f"<p>{float(traj.kl.mean()):.3f}</p>"])

    calls = []
    tiny_llama.add_hook(
        "blocks.0.hook_resid_pre", lambda act, hook: calls.append(1), is_permanent=True
    )
    try:
        rep = report(
            tiny_llama, "shared pass", sections=["trajectory", "logit_lens_table", "second_reader"]
        )
    finally:
        tiny_llama.reset_hooks(including_permanent=True)
    assert rep.rendered == ["trajectory", "logit_lens_table", "second_reader"]
    assert len(calls) == 1


def test_logit_lens_table_reads_out_only_the_shown_positions(tiny_llama):
    """The table of a long text equals the full paper-mode trajectory's last 64 positions."""
    import torch

    from tlmicroscope.app.panels.lens import _logit_lens_table
    from tlmicroscope.app.report import ReportContext, shared_capture
    from tlmicroscope.inputs import to_tokens
    from tlmicroscope.lenses import prediction_trajectory
    from tlmicroscope.viz import logit_lens_table

    text = "A long text: the table shows only its tail. " * 2
    toks = to_tokens(tiny_llama, text)
    assert toks.shape[-1] > 64
    cache, logits = shared_capture(tiny_llama, toks, ["resid"])
    ctx = ReportContext(model=tiny_llama, text=text, tokens=toks, cache=cache, logits=logits)
    fig = _logit_lens_table(ctx).items[0]
    full = prediction_trajectory(tiny_llama, toks, lens="logit-paper", top_k=1)
    want = logit_lens_table(full, positions=slice(-64, None))
    torch.testing.assert_close(
        torch.as_tensor(fig.data[0].z), torch.as_tensor(want.data[0].z), rtol=1e-4, atol=1e-5
    )
    assert [list(r) for r in fig.data[0].text] == [list(r) for r in want.data[0].text]


def test_page_order_follows_the_panel_list_whatever_was_imported_first(temp_sections):
    from tlmicroscope.app.sections import SECTION_MODULES, available_sections

    names = available_sections()
    # As if the causal panel (the last one) had been imported, and registered, first.
    moved = {
        n: SECTIONS.pop(n)
        for n in list(SECTIONS)
        if SECTIONS[n].build.__module__.endswith(".causal")
    }
    rest = dict(SECTIONS)
    SECTIONS.clear()
    SECTIONS.update({**moved, **rest})
    assert next(iter(SECTIONS)) == "causal_basis"
    assert available_sections() == names  # put back in the panels' order
    ranks = [SECTION_MODULES.index(SECTIONS[n].build.__module__) for n in names]
    assert ranks == sorted(ranks) and names[0] == "trajectory"
