"""Token trajectories: one shared PCA of h^0..h^L, compared with a direct computation."""

from __future__ import annotations

import pytest
import torch

from tlmicroscope.geometry import LatentPCA, capture_components, token_trajectories
from tlmicroscope.geometry.components import unit_length

pytestmark = pytest.mark.models


def test_paths_equal_a_direct_pca(tiny):
    text = "the cat sat"
    tr = token_trajectories(tiny, text, positions=[0, 4, 10])
    n_layers = tiny.cfg.n_layers
    names = [f"blocks.{lay}.hook_resid_pre" for lay in range(n_layers)] + [
        f"blocks.{n_layers - 1}.hook_resid_post"
    ]
    toks = tiny.to_tokens(text)
    _, cache = tiny.run_with_cache(toks, names_filter=lambda n: n in names)
    # h^0 is resid_pre 0 and h^{l+1} is resid_post l = resid_pre l+1.
    h = unit_length(torch.stack([cache[n][0] for n in names]))  # [layer pos d]
    pca = LatentPCA(2).fit(h.reshape(-1, h.shape[-1]))
    expected = (h @ pca.components_.T)[:, [0, 4, 10]].transpose(0, 1)
    torch.testing.assert_close(tr.coords.abs(), expected.abs(), rtol=1e-4, atol=1e-4)
    assert tr.layer_labels == tuple(f"h{i}" for i in range(n_layers + 1))
    assert tr.str_tokens == ("t", "c", "t") and tr.positions == (0, 4, 10)
    assert tr.step_length.shape == (3, n_layers)
    df = tr.to_dataframe()
    assert len(df) == 3 * (n_layers + 1) and {"dim1", "dim2", "token", "layer"} <= set(df.columns)


def test_options(tiny_gpt2):
    st = capture_components(tiny_gpt2, "hello world", progress=False)
    tr = token_trajectories(
        st,
        components=("embed", "resid_mid", "resid_post"),
        positions=[1, 2],
        n_components=3,
        fit_on="selected",
        unit=False,
    )
    assert tr.coords.shape == (2, 1 + 2 * 3, 3)
    assert tr.layer_labels[:3] == ("h0", "b0.resid_mid", "h1")
    assert len(tr.projection) == (1 + 2 * 3) * 11
    default = token_trajectories(tiny_gpt2, "x" * 40)
    assert (
        len(default.positions) == 32 and default.positions[0] == 0 and default.positions[-1] == 39
    )


def test_bad_input(tiny_llama):
    with pytest.raises(ValueError, match="were not captured"):
        token_trajectories(tiny_llama, "hey", positions=[5])
    with pytest.raises(ValueError, match="fit_on"):
        token_trajectories(tiny_llama, "hey", fit_on="some")
    st = capture_components(tiny_llama, "hey", average="samples", progress=False)
    with pytest.raises(ValueError, match="not averaged"):
        token_trajectories(st)
    with pytest.raises(ValueError, match="sample 3"):
        token_trajectories(tiny_llama, "hey", sample=3)
