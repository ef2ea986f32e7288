"""The LLM-Microscope report sections: they render from the shared capture, a missing reference or
probe is shown in place with the command that fixes it, and the figures' values equal independent
computations (numpy least squares, the logit lens by hand, the analyses run on the model)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tlmicroscope.capture import residual_stream_names
from tlmicroscope.microscope import (
    ContextualizationProbe,
    NonlinearityReference,
    contextualization,
    token_nonlinearity,
)
from tlmicroscope.models import access
from tlmicroscope.report import report

pytestmark = pytest.mark.models

SECTIONS = [
    "microscope_nonlinearity",
    "microscope_linearity",
    "microscope_contributions",
    "microscope_context",
    "microscope_token_classes",
]
# 113 byte tokens with the BOS: more than 3·d_model + 1 = 97, so the per-prompt fit is allowed.
TEXT = (
    "The cat sat on the mat, and the dog ate a bone. Then, the cat slept; a bird sang in the old "
    "tree by the wall."
)
SHORT = "A short text, the end."
CORPUS = [
    "The quick brown fox jumps over the lazy dog; PACK MY BOX WITH FIVE DOZEN JUGS! 0123456789 " * 8
]


def _run(model, text, **settings):
    """Build the report and also return the figures each section made (captured from the page)."""
    from tlmicroscope.viz.html import HtmlPage

    captured: dict[str, list] = {}
    original = HtmlPage.add_section

    def spy(self, title, *items, **kw):
        captured[title] = list(items)
        return original(self, title, *items, **kw)

    HtmlPage.add_section = spy
    try:
        rep = report(model, text, sections=SECTIONS, **settings)
    finally:
        HtmlPage.add_section = original
    return rep, captured


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tiny_llama):
    """A reference and a quickly trained probe saved for the tiny model."""
    root = tmp_path_factory.mktemp("microscope")
    ref = NonlinearityReference(n_tokens=512, seq_len=64).fit(tiny_llama, CORPUS, progress=False)
    ref.save(root / "ref")
    probe = ContextualizationProbe(
        prefix_length=4,
        mlp_hidden=16,
        decoder="last_k",
        trainable_blocks=1,
        steps=3,
        window_length=16,
    ).fit(tiny_llama, CORPUS, progress=False)
    probe.save(root / "probe")
    return root / "ref", root / "probe", ref, probe


def test_renders_without_saved_objects_and_names_the_training_command(
    tiny_llama, tmp_path, monkeypatch
):
    monkeypatch.setenv("TLMICROSCOPE_HOME", str(tmp_path))  # no reference or probe there
    rep = report(tiny_llama, TEXT, sections=SECTIONS)
    assert rep.rendered == [
        "microscope_nonlinearity",
        "microscope_linearity",
        "microscope_contributions",
        "microscope_token_classes",
    ]
    assert list(rep.missing) == ["microscope_context"] and not rep.failed
    html = rep.html()
    label = access.model_label(tiny_llama)
    assert f"tlmicroscope microscope-train-probe --model {label}" in html
    assert "maps fitted on this text" in html  # the caption says which non-linearity mode
    assert "Missing: contextualization: no probe" in html


def test_short_text_without_reference_shows_the_fit_command(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setenv("TLMICROSCOPE_HOME", str(tmp_path))
    rep = report(tiny_llama, SHORT, sections=SECTIONS)
    assert rep.rendered == ["microscope_contributions"] and not rep.failed
    assert set(rep.missing) == {
        "microscope_nonlinearity",
        "microscope_linearity",
        "microscope_context",
        "microscope_token_classes",
    }
    assert "needs at least 97" in rep.missing["microscope_nonlinearity"]
    html = rep.html()
    label = access.model_label(tiny_llama)
    assert f"tlmicroscope microscope-fit --model {label}" in html
    # a reference asked for at a folder that holds none: the fix writes it there
    rep = report(
        tiny_llama,
        TEXT,
        sections=["microscope_nonlinearity"],
        microscope_reference=str(tmp_path / "nope"),
    )
    assert "No saved non-linearity reference" in rep.missing["microscope_nonlinearity"]
    assert f"--out {tmp_path / 'nope'}" in rep.html()


def test_per_prompt_heatmap_equals_numpy_least_squares(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setenv("TLMICROSCOPE_HOME", str(tmp_path))
    _, figs = _run(tiny_llama, TEXT, microscope_normalization="none")
    z = np.asarray(figs["LLM-Microscope: token-wise non-linearity"][0].data[0].z, dtype=float)
    toks = tiny_llama.to_tokens(TEXT)
    names = residual_stream_names(tiny_llama.cfg.n_layers)
    with torch.no_grad():
        _, cache = tiny_llama.run_with_cache(toks, names_filter=names)
    hs = [cache[n][0].double().numpy() for n in names]
    n = hs[0].shape[0]
    for layer in range(len(hs) - 1):
        x = hs[layer] - hs[layer].mean(0)
        y = hs[layer + 1] - hs[layer + 1].mean(0)
        x, y = x / np.linalg.norm(x), y / np.linalg.norm(y)
        a, *_ = np.linalg.lstsq(x, y, rcond=1e-6)
        expected = np.linalg.norm(x @ a - y, axis=1) * np.sqrt(n)
        np.testing.assert_allclose(z[layer], expected, rtol=2e-3, atol=2e-4)
    # the linearity panel's per-prompt score is 1 − ‖XA − Y‖² of the same fit
    lin = figs["LLM-Microscope: linearity per layer"][0].data[0].y
    x = hs[0] - hs[0].mean(0)
    y = hs[1] - hs[1].mean(0)
    x, y = x / np.linalg.norm(x), y / np.linalg.norm(y)
    a, *_ = np.linalg.lstsq(x, y, rcond=1e-6)
    assert lin[0] == pytest.approx(1 - np.square(x @ a - y).sum(), abs=1e-4)


def test_contributions_heatmap_is_the_logit_lens_loss_by_hand(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setenv("TLMICROSCOPE_HOME", str(tmp_path))
    _, figs = _run(tiny_llama, TEXT, trajectory_positions="all")  # every position drawn
    z = np.asarray(figs["LLM-Microscope: layer contributions"][0].data[0].z, dtype=float)
    toks = tiny_llama.to_tokens(TEXT)
    names = residual_stream_names(tiny_llama.cfg.n_layers)
    with torch.no_grad():
        logits, cache = tiny_llama.run_with_cache(toks, names_filter=names)
    norm = access.final_norm(tiny_llama)
    W_U, b_U = tiny_llama.W_U.detach().double(), tiny_llama.b_U.detach().double()
    for layer, name in enumerate(names):
        h = cache[name][0].double()
        h = (
            h
            * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm.eps)
            * norm.weight.detach().double()
        )  # RMSNorm
        ce = torch.nn.functional.cross_entropy(
            h[:-1] @ W_U + b_U, toks[0, 1:], reduction="none"
        ).numpy()
        np.testing.assert_allclose(z[layer, :-1], ce, rtol=1e-4, atol=1e-4)
    out = torch.nn.functional.cross_entropy(
        logits[0, :-1].double(), toks[0, 1:], reduction="none"
    ).numpy()
    np.testing.assert_allclose(z[-1, :-1], out, rtol=1e-4, atol=1e-4)


def test_saved_reference_and_probe_are_used(tiny_llama, saved):
    ref_path, probe_path, ref, probe = saved
    rep, figs = _run(
        tiny_llama,
        SHORT,
        microscope_reference=str(ref_path),
        microscope_probe=str(probe_path),
        microscope_normalization="none",
        microscope_context_positions=8,
    )
    assert rep.rendered == SECTIONS and not rep.missing and not rep.failed
    html = rep.html()
    assert f"loaded from {ref_path}" in html and "8 positions decoded" in html
    # non-linearity: the reference's maps on standardised states, by hand
    z = np.asarray(figs["LLM-Microscope: token-wise non-linearity"][0].data[0].z, dtype=float)
    toks = tiny_llama.to_tokens(SHORT)
    names = residual_stream_names(tiny_llama.cfg.n_layers)
    with torch.no_grad():
        _, cache = tiny_llama.run_with_cache(toks, names_filter=names)
    for layer in range(len(names) - 1):
        zs = [
            (cache[names[s]][0].double() - ref.mean_[s]) / ref.scale_[s] for s in (layer, layer + 1)
        ]
        expected = (zs[0] @ ref.maps_[layer].double() - zs[1]).norm(dim=-1).numpy()
        np.testing.assert_allclose(z[layer], expected, rtol=1e-4, atol=1e-5)
    # linearity: the reference's corpus scores
    assert figs["LLM-Microscope: linearity per layer"][0].data[0].y == pytest.approx(
        ref.linearity_.score.tolist()
    )
    # contextualization: the last 8 positions, equal to the analysis run on the model itself
    heat = figs["LLM-Microscope: contextualization"][0].data[0].z
    shown = np.asarray(heat, dtype=float)[0]
    full = contextualization(tiny_llama, SHORT, probe=probe).C[0].numpy()
    assert shown.shape == (8,)
    np.testing.assert_allclose(shown, full[-8:], rtol=1e-4, atol=1e-5)


def test_contextualization_from_a_cache_and_on_chosen_positions(tiny_llama, saved):
    *_, probe = saved
    toks = tiny_llama.to_tokens(TEXT)
    names = residual_stream_names(tiny_llama.cfg.n_layers)
    with torch.no_grad():
        _, cache = tiny_llama.run_with_cache(toks, names_filter=names)
    full = contextualization(tiny_llama, toks, probe=probe)
    some = contextualization(cache, toks, probe=probe, positions=[0, 3, -1])
    C = some.C[0]
    assert torch.isnan(C[0]) and not torch.isnan(C[3]) and not torch.isnan(C[-1])
    assert int((~torch.isnan(C)).sum()) == 2
    assert torch.allclose(C[[3, -1]], full.C[0, [3, -1]], atol=1e-5)
    with pytest.raises(ValueError, match="outside"):
        contextualization(tiny_llama, toks, probe=probe, positions=[toks.shape[1]])
    partial = dict(cache.cache_dict)
    del partial[names[1]]
    from transformer_lens import ActivationCache

    with pytest.raises(ValueError, match="lacks"):
        contextualization(ActivationCache(partial, tiny_llama), toks, probe=probe)


def test_token_nonlinearity_report_equals_analysis(tiny_llama, saved):
    ref_path, _, ref, _ = saved
    _, figs = _run(
        tiny_llama, TEXT, microscope_reference=str(ref_path), microscope_normalization="none"
    )
    z = np.asarray(figs["LLM-Microscope: token-wise non-linearity"][0].data[0].z, dtype=float)
    direct = token_nonlinearity(tiny_llama, TEXT, reference=ref).error[:, 0].numpy()
    np.testing.assert_allclose(z, direct, rtol=1e-5, atol=1e-6)


def test_a_quick_reference_in_the_store_is_used_and_said_to_be_quick(
    tiny_llama, tmp_path, monkeypatch
):
    from tlmicroscope import artifacts

    monkeypatch.setenv("TLMICROSCOPE_HOME", str(tmp_path))
    ref = NonlinearityReference().fit(tiny_llama, CORPUS, quick=True)
    saved = ref.save()  # into the store, where the section looks first
    assert saved == artifacts.artifact_path("nonlinearity-reference", tiny_llama)
    rep = report(tiny_llama, SHORT, sections=["microscope_nonlinearity"])
    assert rep.rendered == ["microscope_nonlinearity"]  # the short text is fine with a reference
    html = rep.html()
    assert str(saved) in html and "is a quick fit" in html
    assert artifacts.make_command("nonlinearity-reference", tiny_llama) in html
    # the section's values are the saved maps applied to the text (not a per-prompt fit)
    from tlmicroscope.app.panels.microscope import report_nonlinearity
    from tlmicroscope.app.report import ReportContext, shared_capture
    from tlmicroscope.inputs import to_tokens

    tokens = to_tokens(tiny_llama, SHORT)
    ctx = ReportContext(model=tiny_llama, text=SHORT, tokens=tokens)
    ctx.cache, ctx.logits = shared_capture(tiny_llama, tokens, ["resid"])
    expected = token_nonlinearity(tiny_llama, SHORT, reference=ref)
    assert torch.allclose(report_nonlinearity(ctx).error, expected.error, atol=1e-5)
