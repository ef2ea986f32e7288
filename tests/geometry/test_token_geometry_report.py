"""The token-geometry report section: it renders from the shared capture, its figure equals an
independent computation from ``run_with_cache``, and short or repetitive texts are shown as
missing prerequisites with the command that fixes them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tlmicroscope.app.panels.token_geometry import report_layer_geometry
from tlmicroscope.app.report import ReportContext, shared_capture
from tlmicroscope.app.sections import SECTIONS
from tlmicroscope.capture import residual_stream_names
from tlmicroscope.geometry import cosine_similarity, intrinsic_dimension, neighbourhood_overlap
from tlmicroscope.models import access
from tlmicroscope.report import report

pytestmark = pytest.mark.models

TEXT = "The quick brown fox jumps over the lazy dog; then it runs far away into the old forest."


def _final_norm(model, h):
    norm = access.final_norm(model)
    h = h.double()
    if norm.kind == "LN":
        h = h - h.mean(-1, keepdim=True)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm.eps)
    return h * norm.weight.double() + (0 if norm.bias is None else norm.bias.double())


def _build(model, text, **settings):
    """Run the section's builder on a context made as the report makes it."""
    report(model, "warm up", sections=[])  # loads the section modules
    tokens = model.to_tokens(text)
    ctx = ReportContext(model=model, text=text, tokens=tokens, settings=settings)
    ctx.cache, ctx.logits = shared_capture(model, tokens, ["resid"])
    return ctx, SECTIONS["token_geometry"].build(ctx)


def _traces(section):
    fig = next(item for item in section.items if hasattr(item, "data"))
    return {t.name: np.array(t.y, dtype=float) for t in fig.data}


def test_section_renders_in_the_report(tiny_llama, tmp_path):
    rep = report(tiny_llama, TEXT, sections=["trajectory", "token_geometry"])
    assert rep.rendered == ["trajectory", "token_geometry"] and not rep.failed and not rep.missing
    html = rep.save(tmp_path / "r.html").read_text()
    assert 'data-section="token-geometry" data-status="ok"' in html
    assert "twonn_variant=base" in html and "weights unprocessed" in html
    assert "contextual entropy" in html and "Per-layer numbers" in html
    assert "noisy below about 500 tokens" in html  # an 87-token text


def test_figure_equals_an_independent_computation(tiny):
    ctx, section = _build(tiny, TEXT)
    traces = _traces(section)
    toks = tiny.to_tokens(TEXT)
    names = residual_stream_names(tiny.cfg.n_layers)
    with torch.no_grad():
        logits, cache = tiny.run_with_cache(toks, names_filter=names)
    clouds = [cache[name][0].double() for name in names]
    clouds[-1] = _final_norm(tiny, clouds[-1])
    for layer, cloud in enumerate(clouds):
        ref = intrinsic_dimension(cloud, "gride", max_scale=8)
        for j, scale in enumerate(ref.scales):
            assert traces[f"GRIDE n2={scale}"][layer] == pytest.approx(float(ref.ids[j]), abs=1e-5)
        assert traces["TwoNN base"][layer] == pytest.approx(
            intrinsic_dimension(cloud, "twonn").estimate, abs=1e-6
        )
        cos = cosine_similarity(cloud)
        assert traces["cosine (i≠j)"][layer] == pytest.approx(cos.mean, abs=1e-6)
        assert traces["cosine (all N², paper)"][layer] == pytest.approx(
            cos.mean_with_diagonal, abs=1e-6
        )
        if layer < len(clouds) - 1:
            ov = neighbourhood_overlap(cloud, clouds[layer + 1], k=(1, 2, 6)).overlap
            for j, k in enumerate((1, 2, 6)):
                assert traces[f"overlap k={k}"][layer] == pytest.approx(float(ov[j]), abs=1e-12)
    # prompt-level numbers: entropy and loss from the model's own logits
    geo = report_layer_geometry(ctx)  # memoised: the one the section drew
    logp = torch.log_softmax(logits[0].double(), -1)
    assert geo.contextual_entropy == pytest.approx(
        float(-(logp.exp() * logp).sum(-1).mean()), abs=1e-6
    )
    with torch.no_grad():
        assert geo.loss == pytest.approx(float(tiny(toks, return_type="loss")), abs=1e-5)
    ref_logits = intrinsic_dimension(logits[0].double(), "gride", max_scale=8)
    np.testing.assert_allclose(geo.logits_gride[:3].numpy(), ref_logits.ids.numpy(), atol=1e-4)


def test_section_runs_no_forward_pass_of_its_own(tiny_llama):
    calls = []
    tiny_llama.add_hook(
        "blocks.0.hook_resid_pre", lambda act, hook: calls.append(1), is_permanent=True
    )
    try:
        rep = report(tiny_llama, TEXT, sections=["trajectory", "token_geometry"])
    finally:
        tiny_llama.reset_hooks(including_permanent=True)
    assert rep.rendered == ["trajectory", "token_geometry"] and len(calls) == 1


def test_settings_reach_the_estimators_and_the_caption(tiny_llama):
    ctx, section = _build(
        tiny_llama,
        TEXT,
        geometry_max_scale=16,
        geometry_twonn_variant="ml",
        geometry_overlap_k=(1, 2),
        geometry_final_norm=False,
    )
    geo = report_layer_geometry(ctx)  # memoised: the one the section drew
    assert geo.gride_scales == (2, 4, 8, 16) and geo.overlap_k == (1, 2)
    assert geo.layer_labels[-1] == f"h{tiny_llama.cfg.n_layers}"  # no "·norm"
    assert "twonn_variant=ml" in section.caption and "is the raw residual" in section.caption
    assert "TwoNN ml" in _traces(section)


def test_too_short_a_text_says_how_many_tokens_are_needed(tiny_llama):
    rep = report(tiny_llama, "abcd", sections=["token_geometry"])
    assert rep.rendered == [] and "need at least 7" in rep.missing["token_geometry"]
    html = rep.html()
    assert 'data-status="missing"' in html
    assert "tlmicroscope report --text-file A_TEXT_OF_500_OR_MORE_TOKENS.txt" in html
    # a larger GRIDE scale raises the minimum
    rep = report(
        tiny_llama, "abcdefghijklmnopqrstuvwxyz", sections=["token_geometry"], geometry_max_scale=32
    )
    assert "need at least 33" in rep.missing["token_geometry"]


def test_a_repetitive_text_is_a_missing_prerequisite(tiny_llama):
    rep = report(tiny_llama, "ab" * 20, sections=["token_geometry"])
    assert not rep.failed and "distinct token vectors" in rep.missing["token_geometry"]
