"""Figures of target trajectories and component lenses, built from synthetic results (no model)."""

import numpy as np
import pytest
import torch

from tlmicroscope.lenses.components import ComponentLens
from tlmicroscope.lenses.targets import TargetTrajectories
from tlmicroscope.results import Provenance
from tlmicroscope.viz.targets import head_logit_heatmap, target_trajectory_figure

_PROV = Provenance(
    model="synthetic", model_class="none", weights_processed=False, transformer_lens="-"
)


def _tt():
    A, L, N, P, T = 2, 3, 5, 1, 2
    prob = torch.rand(A, L, N, P, T, generator=torch.Generator().manual_seed(0))
    mean = {
        "prob": prob.mean((2, 3)),
        "logprob": prob.log().mean((2, 3)),
        "rank": torch.zeros(A, L, T),
    }
    low = {k: v - 0.1 for k, v in mean.items()}
    high = {k: v + 0.2 for k, v in mean.items()}
    return TargetTrajectories(
        lens_names=("logit", "tuned"),
        layers=(0, 1, 2),
        sites=("resid_pre", "resid_pre", "resid_post"),
        layer_labels=("0", "1", "out"),
        target_names=("' Paris'", "' London'"),
        target_read=[["' Paris'", "' London'"]],
        target_notes=("target 'Paris is' is 2 tokens",),
        prob=prob,
        logprob=prob.log(),
        rank=torch.zeros(A, L, N, P, T, dtype=torch.long),
        positions=torch.zeros(N, P, dtype=torch.long),
        read_tokens=[["x"]] * N,
        n_tokens=(1,) * N,
        mean=mean,
        low=low,
        high=high,
        confidence=0.9,
        n_bootstrap=10,
        provenance=_PROV,
    )


def test_one_line_and_one_band_per_lens_and_target():
    tt = _tt()
    fig = target_trajectory_figure(tt)
    lines = [t for t in fig.data if t.showlegend is not False]
    bands = [t for t in fig.data if t.showlegend is False]
    assert [t.name for t in lines] == [
        "logit: ' Paris'",
        "logit: ' London'",
        "tuned: ' Paris'",
        "tuned: ' London'",
    ]
    np.testing.assert_allclose(lines[2].y, tt.mean["prob"][1, :, 0].double().numpy())
    np.testing.assert_allclose(
        bands[2].y,
        np.concatenate([tt.high["prob"][1, :, 0].numpy(), tt.low["prob"][1, :, 0].numpy()[::-1]]),
        rtol=1e-6,
    )
    assert list(bands[0].x) == ["0", "1", "out", "out", "1", "0"]
    assert (
        "90% bootstrap band" in fig.layout.title.text
        and "2 tokens" in fig.layout.annotations[0].text
    )
    only = target_trajectory_figure(tt, "logprob", lenses="tuned", targets=[1])
    assert [t.name for t in only.data if t.showlegend is not False] == ["tuned: ' London'"]
    with pytest.raises(ValueError, match="No lens 'jacobian'"):
        target_trajectory_figure(tt, lenses="jacobian")
    with pytest.raises(ValueError, match="valid targets are 0..1"):
        target_trajectory_figure(tt, targets=[5])


def test_head_heatmap_shows_the_head_map_and_mlp_column():
    L, H, B, P, T = 3, 4, 1, 2, 1
    heads = torch.arange(L * H * B * P * T, dtype=torch.float32).reshape(L, H, B, P, T) - 10
    mlp = torch.ones(L, B, P, T)
    z = torch.zeros(B, P, T)
    cl = ComponentLens(
        heads=heads,
        attn=heads.sum(1),
        attn_bias=torch.zeros(L, B, P, T),
        mlp=mlp,
        embed=z,
        pos_embed=None,
        bias=z,
        logit=z + 3.0,
        model_logit=None,
        target_ids=torch.zeros(B, P, T, dtype=torch.long),
        target_names=("' Paris'",),
        target_strings=np.array([[[" Paris"]] * P], dtype=object),
        tokens=torch.zeros(B, P),
        str_tokens=[["a", "b"]],
        n_layers=L,
        n_heads=H,
        logit_space="logit",
        per_head=True,
        max_residual_error=0.0,
        max_logit_error=0.0,
        provenance=_PROV,
    )
    fig = head_logit_heatmap(cl, pos=0)
    np.testing.assert_allclose(np.asarray(fig.data[0].z)[:, :H], heads[:, :, 0, 0, 0].numpy())
    np.testing.assert_allclose(np.asarray(fig.data[0].z)[:, H], 1.0)
    assert fig.data[0].zmid == 0.0 and "' Paris'" in fig.layout.title.text
    with pytest.raises(ValueError, match="valid targets are 0..0"):
        head_logit_heatmap(cl, target=1)
    with pytest.raises(ValueError, match="valid heads are 0..3"):
        cl.head(0, 4)
