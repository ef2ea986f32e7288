"""The latent-geometry report sections: they render from the report's shared capture (no forward
pass of their own), their numbers equal an independent ``run_with_cache`` computation, and missing
prerequisites (umap-learn, a too-short text) are shown in place with the command that fixes them."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from tlmicroscope.app.report import ReportContext, shared_capture
from tlmicroscope.app.sections import SECTIONS
from tlmicroscope.capture import residual_stream_names
from tlmicroscope.geometry.components import capture_components
from tlmicroscope.report import report

pytestmark = pytest.mark.models

TEXT = "The quick brown fox jumps over the lazy dog; then it runs far away into the old forest."


def _build(model, text, name, sites=("attn_out", "mlp_out", "resid"), **settings):
    """Run one section's builder on a context made as the report makes it."""
    report(model, "warm up", sections=[])  # loads the section modules
    tokens = model.to_tokens(text)
    ctx = ReportContext(model=model, text=text, tokens=tokens, settings=settings)
    ctx.cache, ctx.logits = shared_capture(model, tokens, list(sites))
    return ctx, SECTIONS[name].build(ctx)


def _figures(section):
    return [item for item in section.items if hasattr(item, "data")]


def _independent_norms(model, text):
    """‖h^l‖ at every position from a plain ``run_with_cache``: [layer pos]."""
    names = residual_stream_names(model.cfg.n_layers)
    with torch.no_grad():
        _, cache = model.run_with_cache(model.to_tokens(text), names_filter=lambda n: n in names)
    return torch.stack([torch.linalg.norm(cache[n][0].double(), dim=-1) for n in names])


def test_sections_render_in_the_report(tiny_llama, tmp_path):
    rep = report(
        tiny_llama, TEXT, sections=["token_geometry", "latent_projections", "norm_profile"]
    )
    assert rep.rendered == ["token_geometry", "latent_projections", "norm_profile"]
    assert not rep.failed and not rep.missing
    html = rep.save(tmp_path / "r.html").read_text()
    assert 'data-section="latent-projections" data-status="ok"' in html
    assert 'data-section="norm-profile" data-status="ok"' in html
    assert "weights unprocessed" in html and "Separation by block" in html
    assert "First-token spike" in html and "Norms by layer" in html


def test_sections_need_no_forward_pass_of_their_own(tiny_llama, monkeypatch):
    ctx, _ = _build(tiny_llama, TEXT, "token_geometry")
    calls = []
    for attr in ("forward", "run_with_cache", "run_with_hooks"):
        orig = getattr(tiny_llama, attr)
        monkeypatch.setattr(
            tiny_llama, attr, lambda *a, _o=orig, _n=attr, **k: calls.append(_n) or _o(*a, **k)
        )
    for name in ("latent_projections", "norm_profile"):
        SECTIONS[name].build(ctx)
    assert calls == []


def test_norm_values_equal_run_with_cache(tiny):
    _, section = _build(tiny, TEXT, "norm_profile", sites=("resid",))
    ref = _independent_norms(tiny, TEXT)  # [L+1 pos]
    heat, lines, spike = _figures(section)
    z = np.asarray(heat.data[0].z, dtype=float)
    np.testing.assert_allclose(10**z, ref.numpy(), rtol=1e-4)
    line_y = np.stack([np.asarray(t.y, dtype=float) for t in lines.data])
    np.testing.assert_allclose(line_y, ref.numpy(), rtol=1e-4)
    ratio = ref[:, 0] / ref[:, 1:].median(dim=1).values
    bars = next(t for t in spike.data if t.name == "ratio")
    np.testing.assert_allclose(np.asarray(bars.y, dtype=float), ratio.numpy(), rtol=1e-4)
    assert list(heat.data[0].y) == [f"h{i}" for i in range(tiny.cfg.n_layers + 1)]


def test_resid_post_read_from_resid_pre_of_the_next_block(tiny_llama):
    """A cache of h^0..h^L (the ``resid`` site) serves resid_post of every block."""
    ctx, _ = _build(tiny_llama, TEXT, "norm_profile", sites=("resid",))
    st = capture_components(ctx.cache, ctx.tokens, components=("resid_post",))
    direct = capture_components(tiny_llama, ctx.tokens, components=("resid_post",), progress=False)
    torch.testing.assert_close(st.activations, direct.activations, rtol=1e-5, atol=1e-5)


def test_projection_and_separation_values(tiny_llama):
    ctx, section = _build(tiny_llama, TEXT, "latent_projections", latent_layers=[0, 1])
    attn_mlp, resid, sep_fig = _figures(section)
    # Independent: PCA by SVD of every attn/mlp output of blocks 0-1 at positions >= 1, fitted with
    # centring and applied without it.
    names = [f"blocks.{lay}.hook_{c}" for lay in (0, 1) for c in ("attn_out", "mlp_out")]
    with torch.no_grad():
        _, cache = tiny_llama.run_with_cache(ctx.tokens, names_filter=lambda n: n in names)
    x = torch.cat([cache[n][0, 1:].double() for n in names])
    _, _, vt = torch.linalg.svd(x - x.mean(0), full_matrices=False)
    ref = (x @ vt[:2].T).numpy()
    got = np.concatenate(
        [np.stack([np.asarray(t.x, float), np.asarray(t.y, float)], 1) for t in attn_mlp.data]
    )
    order = [t.name for t in attn_mlp.data]
    assert order == ["attn_out", "mlp_out"]
    # The traces group points by component: attn of block 0, 1 then mlp of block 0, 1.
    n = x.shape[0] // 4
    ref_grouped = np.concatenate([ref[0:n], ref[2 * n : 3 * n], ref[n : 2 * n], ref[3 * n :]])
    np.testing.assert_allclose(np.abs(got), np.abs(ref_grouped), rtol=1e-3, atol=1e-4)
    hover = attn_mlp.data[0].customdata
    assert hover[0][0] == repr(tiny_llama.to_str_tokens(ctx.tokens)[1])[1:-1]
    acc = np.asarray(sep_fig.data[0].y, dtype=float)
    assert acc.shape == (tiny_llama.cfg.n_layers,) and ((acc >= 0) & (acc <= 1)).all()
    assert [t.name for t in resid.data] == ["embed", "resid_post"]


def test_umap_missing_shows_the_install_command(tiny_llama, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "umap", None)  # import umap now raises ImportError
    rep = report(tiny_llama, TEXT, sections=["latent_projections", "latent_umap"])
    assert rep.rendered == ["latent_projections"] and "umap-learn" in rep.missing["latent_umap"]
    html = rep.save(tmp_path / "r.html").read_text()
    assert (
        "pip install &#x27;tlmicroscope[umap]&#x27;" in html
        or "pip install 'tlmicroscope[umap]'" in html
    )


def test_umap_renders_when_installed(tiny_llama):
    pytest.importorskip("umap")
    rep = report(tiny_llama, TEXT, sections=["latent_umap"], latent_umap_fit_size=100)
    assert rep.rendered == ["latent_umap"], rep.failed


def test_too_short_texts_are_missing_with_a_fix(tiny_llama, tmp_path):
    rep = report(tiny_llama, "a", sections=["latent_projections", "norm_profile"])
    assert rep.rendered == [] and set(rep.missing) == {"latent_projections", "norm_profile"}
    assert "1 token" in rep.missing["norm_profile"]
    assert "--text-file" in rep.save(tmp_path / "r.html").read_text()
    rep = report(tiny_llama, "abcd", sections=["latent_projections"])  # projected, not scored
    assert rep.rendered == ["latent_projections"]
    assert "not scored" in rep.html()
