"""Views built from hand-made trajectories: no model needed."""

import numpy as np
import pytest
import torch

from tlmicroscope.lenses.trajectory import PredictionTrajectory
from tlmicroscope.results import Provenance
from tlmicroscope.viz import (
    HtmlPage,
    colored_tokens,
    logit_lens_table,
    trajectory_heatmap,
    trajectory_tokens,
)


def synthetic_trajectory(n_layers=2, n_pos=4, k=3):
    g = torch.Generator().manual_seed(0)
    shape = (n_layers + 1, 1, n_pos)
    top_probs = torch.rand(*shape, k, generator=g).sort(-1, descending=True).values
    strings = np.array(
        [
            [[[f"t{layer}{pos}{r}" for r in range(k)] for pos in range(n_pos)]]
            for layer in range(n_layers + 1)
        ],
        dtype=object,
    )
    return PredictionTrajectory(
        layers=tuple(range(n_layers + 1)),
        layer_labels=tuple(f"h{i}" for i in range(n_layers + 1)),
        tokens=torch.arange(n_pos).unsqueeze(0),
        str_tokens=[[f"w{i}" for i in range(n_pos)]],
        targets=torch.tensor([[1, 2, 3, -1]]),
        entropy=torch.rand(shape, generator=g),
        kl=torch.rand(shape, generator=g),
        cross_entropy=torch.rand(shape, generator=g),
        target_rank=torch.randint(0, 1000, shape, generator=g),
        max_prob=top_probs[..., 0],
        top_tokens=torch.zeros(*shape, k, dtype=torch.long),
        top_probs=top_probs,
        top_strings=strings,
        n_layers=n_layers,
        provenance=Provenance("synthetic", "None", False, "0", lens="logit"),
    )


def test_heatmap_values_text_and_hover():
    traj = synthetic_trajectory()
    fig = trajectory_heatmap(traj, "kl")
    heat = fig.data[0]
    np.testing.assert_allclose(heat.z, traj.kl[:, 0].numpy(), rtol=1e-6)
    assert heat.text[2][1] == "t210"
    assert "w1 → next w2" in heat.customdata[0][1] and "t011: " in heat.customdata[0][1]
    assert list(fig.layout.yaxis.ticktext) == ["h0", "h1", "h2"]


def test_rank_is_coloured_on_a_log_scale_and_positions_select():
    traj = synthetic_trajectory()
    fig = trajectory_heatmap(traj, "target_rank", positions=[3, 0])
    expected = np.log10(traj.target_rank[:, 0][:, [3, 0]].numpy() + 1)
    np.testing.assert_allclose(fig.data[0].z, expected, rtol=1e-6)
    assert list(fig.layout.xaxis.ticktext) == ["w3", "w0"]


def test_logit_lens_table_colours_negative_log_top1():
    traj = synthetic_trajectory()
    fig = logit_lens_table(traj)
    np.testing.assert_allclose(fig.data[0].z, -np.log(traj.max_prob[:, 0].numpy()), rtol=1e-5)


def test_bad_statistic_and_token_value_mismatch():
    with pytest.raises(ValueError, match="Unknown statistic"):
        trajectory_heatmap(synthetic_trajectory(), "loss")
    with pytest.raises(ValueError, match="2 tokens but 3 values"):
        colored_tokens(["a", "b"], [1, 2, 3])


def test_page_is_offline_and_embeds_each_library_once(tmp_path):
    traj = synthetic_trajectory()
    page = HtmlPage(title="t")
    page.add_section("Heat one", trajectory_heatmap(traj, "kl"))
    page.add_section("Heat two", trajectory_heatmap(traj, "entropy"), trajectory_tokens(traj))
    page.add_notice("Tuned lens", "No tuned lens here.", fix="tlmicroscope train-lens")
    html = page.save(tmp_path / "p.html").read_text()
    assert "<script src=" not in html and "unpkg.com" not in html
    assert html.count("var CircuitsVis=") == 1
    assert html.count("Plotly.newPlot(") == 2  # one per figure, the library once
    assert 'data-status="missing"' in html and "tlmicroscope train-lens" in html


def test_colour_scale_is_clipped_at_the_90th_percentile_when_one_layer_dominates():
    traj = synthetic_trajectory(n_layers=30, n_pos=4)
    traj.kl[0] = 150.0  # an embedding-layer readout far above the rest
    heat = trajectory_heatmap(traj, "kl").data[0]
    vals = traj.kl[:, 0].numpy()
    assert heat.zmax == pytest.approx(float(np.percentile(vals, 90))) and heat.zmax < 1.0
    np.testing.assert_allclose(heat.z, vals, rtol=1e-6)  # the data itself is not clipped
    assert trajectory_heatmap(synthetic_trajectory(), "kl").data[0].zmax is None
