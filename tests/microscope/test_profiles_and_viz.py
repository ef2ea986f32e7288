"""Layer profiles (shared geometry estimators) and the LLM-Microscope figures on small results."""

import numpy as np
import pytest
import torch

from tlmicroscope.capture import capture
from tlmicroscope.corpus import token_windows
from tlmicroscope.geometry.anisotropy import anisotropy
from tlmicroscope.geometry.intrinsic_dimension import intrinsic_dimension
from tlmicroscope.microscope import (
    NonlinearityReference,
    component_attribution,
    contextuality_nonlinearity_correlation,
    layer_contributions,
    layer_profiles,
    linearity_scores,
    token_class_summary,
    token_nonlinearity,
)
from tlmicroscope.microscope.contextualization import Contextualization
from tlmicroscope.results import Provenance
from tlmicroscope.viz import microscope as mv


@pytest.mark.models
def test_profiles_apply_the_geometry_estimators_per_layer(tiny_llama):
    windows = token_windows(tiny_llama, None, seq_len=64, n_windows=8, shuffle=True, seed=4)
    with pytest.warns(
        UserWarning, match="No intrinsic dimension at layer 0"
    ):  # 200 byte embeddings: all repeats
        prof = layer_profiles(tiny_llama, windows, n_tokens=512, id_points=200, progress=False)
    assert np.isnan(float(prof.intrinsic_dimension[0]))
    states = capture(tiny_llama, windows, sites=("resid",))["resid"]
    flat = states.reshape(states.shape[0], -1, states.shape[-1])
    for layer in (0, 3):
        assert float(prof.anisotropy[layer]) == pytest.approx(
            anisotropy(flat[layer]).estimate, rel=1e-6
        )
    for layer in (1, 3):
        expected = intrinsic_dimension(flat[layer][:200], "twonn", variant="microscope").estimate
        assert float(prof.intrinsic_dimension[layer]) == pytest.approx(float(expected), rel=1e-6)
    assert prof.layer_labels == ("h0", "h1", "h2", "h3") and prof.n_tokens == 512
    assert list(prof.to_dataframe().columns) == [
        "layer",
        "label",
        "anisotropy",
        "intrinsic_dimension",
    ]


@pytest.mark.models
def test_every_figure_builds_from_real_results(tiny_llama):
    text = "Figures from results, never from a model."
    windows = token_windows(tiny_llama, None, seq_len=64, n_windows=16, shuffle=True, seed=4)
    ref = NonlinearityReference().fit(tiny_llama, windows, progress=False)
    tn = token_nonlinearity(tiny_llama, text, reference=ref)
    n_tok = tn.error.shape[2]
    fig = mv.nonlinearity_heatmap(tn, normalization="layer")
    z = np.array(fig.data[0].z, dtype=float)
    assert (
        z.shape == (3, n_tok)
        and np.allclose(np.nanmax(z, 1), 1)
        and np.allclose(np.nanmin(z, 1), 0)
    )
    fig = mv.nonlinearity_heatmap(tn, normalization="none", value="relative_error")
    assert np.allclose(
        np.array(fig.data[0].z, dtype=float), tn.relative_error[:, 0].numpy(), atol=1e-6
    )
    assert len(mv.linearity_plot(ref.linearity_, prompt=tn).data) == 4
    lin = linearity_scores(tiny_llama, windows, progress=False)
    assert list(mv.linearity_plot(lin).data[0].y) == pytest.approx(lin.score.tolist())
    lc = layer_contributions(tiny_llama, text)
    assert mv.layer_contributions_heatmap(lc).data[0].z.shape == (4, n_tok)
    assert np.array(mv.layer_contributions_heatmap(lc, delta=True).data[0].z).shape == (3, n_tok)
    attr = component_attribution(tiny_llama, text)
    assert np.array(mv.component_attribution_heatmap(attr).data[0].z).shape == (7, n_tok)
    C = torch.linspace(1, 3, n_tok)[None].clone()
    C[0, 0] = float("nan")
    ctx = Contextualization(
        C=C,
        prefix_length=torch.arange(n_tok)[None],
        tokens=tn.tokens,
        str_tokens=tn.str_tokens,
        reduction="mean",
        provenance=Provenance("m", "M", False, ""),
    )
    assert np.array(mv.contextualization_heatmap(ctx).data[0].z).shape == (1, n_tok)
    assert mv.contextualization_tokens(ctx).props["tokens"] == list(tn.str_tokens[0])
    summary = token_class_summary(ctx, tn)
    assert len(mv.token_class_plot(summary).data) == 2
    corr = contextuality_nonlinearity_correlation(ctx, tn)
    scatter = mv.correlation_scatter(corr)
    assert f"{corr.pearson_r:.3f}" in scatter.layout.title.text
    with pytest.raises(ValueError, match="normalization"):
        mv.nonlinearity_heatmap(tn, normalization="rows")


def test_profile_and_removal_figures_from_synthetic_results():
    from types import SimpleNamespace

    prof = SimpleNamespace(
        layer_labels=("0", "1", "out"),
        anisotropy=torch.tensor([0.1, 0.9, 0.5]),
        intrinsic_dimension=torch.tensor([12.0, 9.0, 14.0]),
        n_tokens=100,
        id_points=50,
    )
    fig = mv.layer_profiles_plot(prof)
    assert list(fig.data[1].y) == [12.0, 9.0, 14.0]
    res = SimpleNamespace(
        conditions=("original", "articles"),
        accuracy_delta=np.array([0.0, -0.05]),
        accuracy_ci=np.array([[0, 0], [-0.1, 0.0]]),
        loss_delta=np.array([0.0, 0.2]),
        loss_ci=np.array([[0, 0], [0.1, 0.3]]),
        n_items=10,
        n_passages=5,
    )
    fig = mv.filler_removal_plot(res)
    assert list(fig.data[0].y) == [-0.05] and list(fig.data[1].error_y.array) == pytest.approx(
        [0.1]
    )
