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


def test_trajectory_section_draws_the_last_positions_it_is_asked_for(tiny_llama):
    """``trajectory_positions=n``: the heatmaps equal the full trajectory's last n columns (read
    out from the window only), the hover numbers positions as in the text, the caption says
    which are drawn; ``'all'`` draws every position; a bad value is refused."""
    import torch

    from tlmicroscope.app.panels.lens import _trajectory
    from tlmicroscope.app.report import ReportContext, shared_capture
    from tlmicroscope.inputs import to_tokens
    from tlmicroscope.lenses import prediction_trajectory
    from tlmicroscope.viz import trajectory_heatmap

    text = "The trajectory shows only the tail of a long text. " * 2
    toks = to_tokens(tiny_llama, text)
    n_pos = int(toks.shape[-1])
    cache, logits = shared_capture(tiny_llama, toks, ["resid"])

    def section(value):
        ctx = ReportContext(
            model=tiny_llama,
            text=text,
            tokens=toks,
            cache=cache,
            logits=logits,
            settings={"trajectory_positions": value},
        )
        return _trajectory(ctx)

    full = prediction_trajectory(tiny_llama, toks, top_k=10)
    sec = section(8)
    for fig, stat in zip(sec.items[:4], ("cross_entropy", "kl", "entropy", "target_rank")):
        want = trajectory_heatmap(full, stat, positions=slice(-8, None))
        assert len(fig.data[0].z[0]) == 8
        torch.testing.assert_close(
            torch.as_tensor(fig.data[0].z),
            torch.as_tensor(want.data[0].z),
            rtol=1e-4,
            atol=1e-4,
            equal_nan=True,  # the last position has no next token
        )
    assert f"position {n_pos - 1}<br>" in sec.items[0].data[0].customdata[0][-1]
    assert f"last 8 of {n_pos} positions (positions {n_pos - 8}-{n_pos - 1})" in sec.caption
    every = section("all")
    assert len(every.items[0].data[0].z[0]) == n_pos and "last 8" not in every.caption
    with pytest.raises(ValueError, match="trajectory_positions must be a positive int or 'all'"):
        section(0)


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


def test_layer_contribution_heatmaps_draw_the_trajectory_window(tiny_llama):
    """The contributions read the last ``trajectory_positions`` positions, equal to the full
    loss's last columns; the caption says which positions the means are over."""
    import numpy as np

    from tlmicroscope.app.panels.microscope import _contributions_section
    from tlmicroscope.app.report import ReportContext, shared_capture
    from tlmicroscope.inputs import to_tokens
    from tlmicroscope.lenses import prediction_trajectory

    text = "The layer contributions of a long text. " * 2
    toks = to_tokens(tiny_llama, text)
    cache, logits = shared_capture(tiny_llama, toks, ["resid"])
    ctx = ReportContext(
        model=tiny_llama,
        text=text,
        tokens=toks,
        cache=cache,
        logits=logits,
        settings={"trajectory_positions": 8},
    )
    sec = _contributions_section(ctx)
    fig, drop = sec.items
    full = prediction_trajectory(tiny_llama, toks).statistic("cross_entropy")[:, 0].double().numpy()
    np.testing.assert_allclose(np.asarray(fig.data[0].z, float), full[:, -8:], rtol=1e-4, atol=1e-4)
    want_drop = (full[:-1] - full[1:])[:, -8:]
    np.testing.assert_allclose(np.asarray(drop.data[0].z, float), want_drop, rtol=1e-4, atol=1e-4)
    assert "the heatmaps draw the last 8" in sec.caption
    assert f"means are over the last 8 of {toks.shape[-1]} positions" in sec.caption
