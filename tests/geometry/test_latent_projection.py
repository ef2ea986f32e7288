"""PCA (against scikit-learn), the uncentred application, reuse, saving, UMAP and bad input."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from sklearn.decomposition import PCA

from tlmicroscope.geometry import projection as projection_module
from tlmicroscope.geometry.projection import LatentPCA, project


def _cloud(n: int = 400, d: int = 12, seed: int = 0, offset: float = 3.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    scales = np.linspace(4.0, 0.5, d)
    return (rng.normal(size=(n, d)) * scales @ _rotation(d, seed) + offset).astype(np.float32)


def _rotation(d: int, seed: int) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(seed + 100).normal(size=(d, d)))
    return q


def _align_signs(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Flip each row of ``a`` to agree in sign with the same row of ``b``."""
    return a * np.sign(np.sum(a * b, axis=1, keepdims=True))


def test_pca_matches_scikit_learn_up_to_sign():
    x = _cloud()
    ours = LatentPCA(5).fit(torch.from_numpy(x))
    ref = PCA(5, svd_solver="full").fit(x.astype(np.float64))
    comps = ours.components_.numpy()
    np.testing.assert_allclose(np.abs(np.sum(comps * ref.components_, axis=1)), 1.0, atol=1e-5)
    np.testing.assert_allclose(_align_signs(comps, ref.components_), ref.components_, atol=1e-4)
    np.testing.assert_allclose(ours.explained_variance_.numpy(), ref.explained_variance_, rtol=1e-5)
    np.testing.assert_allclose(
        ours.explained_variance_ratio_.numpy(), ref.explained_variance_ratio_, rtol=1e-5
    )
    np.testing.assert_allclose(ours.mean_.numpy(), ref.mean_, rtol=1e-6, atol=1e-6)


def test_uncentred_application_is_the_reference_formula():
    x = _cloud(offset=10.0)
    pca = LatentPCA(3).fit(x)
    comps = pca.components_.numpy().astype(np.float64)
    np.testing.assert_allclose(
        pca.transform(x).numpy(), x.astype(np.float64) @ comps.T, rtol=1e-5, atol=1e-3
    )
    # The reference keeps the origin: the projected mean is not at zero.
    assert np.abs(pca.transform(x).numpy().mean(0)).max() > 1.0
    centred = LatentPCA(3, center=True).fit(x)
    ref = PCA(3, svd_solver="full").fit(x.astype(np.float64))
    np.testing.assert_allclose(
        np.abs(centred.transform(x).numpy()), np.abs(ref.transform(x)), rtol=1e-4, atol=1e-3
    )


def test_streamed_moments_equal_one_pass(monkeypatch):
    x = _cloud(n=1000, offset=1e4)  # a large common offset: naive sums would lose the variance
    one = LatentPCA(4).fit(x)
    monkeypatch.setattr(projection_module, "_CHUNK", 37)
    many = LatentPCA(4).fit(x)
    np.testing.assert_allclose(
        many.explained_variance_.numpy(), one.explained_variance_.numpy(), rtol=1e-6
    )
    ref = PCA(4, svd_solver="full").fit(x.astype(np.float64))
    np.testing.assert_allclose(many.explained_variance_.numpy(), ref.explained_variance_, rtol=1e-3)


def test_project_fit_on_and_reuse():
    a, b = _cloud(seed=1), _cloud(seed=2, offset=-1.0)
    proj = project(torch.from_numpy(b), n_components=2, fit_on=torch.from_numpy(a))
    comps = LatentPCA(2).fit(a).components_
    torch.testing.assert_close(proj.coords, torch.from_numpy(b) @ comps.T, rtol=1e-5, atol=1e-4)
    fitted = project(torch.from_numpy(a), n_components=2)
    again = fitted.transform(torch.from_numpy(b), fields={"position": np.arange(len(b))})
    torch.testing.assert_close(again.coords, proj.coords)
    assert again.reducer is fitted.reducer and list(again.field("position")[:3]) == [0, 1, 2]
    assert proj.axis_titles()[0].startswith("PC1 (")


def test_projection_of_component_states_carries_labels(tiny_gpt2):
    from tlmicroscope.geometry import capture_components

    st = capture_components(
        tiny_gpt2, "hello there", components=("attn_out", "mlp_out"), progress=False
    )
    proj = project(st, n_components=3)
    assert len(proj) == st.n_points
    assert set(proj.field("component")) == {"attn_out", "mlp_out"}
    assert proj.field("token")[0] == "h" and proj.n_layers == 3
    df = proj.to_dataframe()
    assert {"dim1", "dim3", "layer", "position", "token"} <= set(df.columns)
    torch.testing.assert_close(proj.coords, st.flat() @ proj.reducer.components_.T)


def test_save_and_load(tmp_path, tiny_llama, tiny_gpt2):
    pca = LatentPCA(3).fit(_cloud(d=32))
    pca.save(tmp_path / "pca", model=tiny_llama)
    back = LatentPCA.load(tmp_path / "pca", model=tiny_llama)
    x = torch.from_numpy(_cloud(d=32, seed=5))
    torch.testing.assert_close(back.transform(x), pca.transform(x))
    reused = project(x, reducer=back)
    torch.testing.assert_close(reused.coords, x @ pca.components_.T)
    assert reused.method == "pca" and reused.explained_variance_ratio is not None
    assert back.n_samples_seen_ == 400
    from tlmicroscope.io import ModelMismatchError

    with pytest.raises(ModelMismatchError):
        LatentPCA.load(tmp_path / "pca", model=tiny_gpt2)


@pytest.mark.parametrize(
    "x, k, match",
    [
        (np.ones((5, 4), dtype=np.float32), 2, "constant"),
        (np.random.default_rng(0).normal(size=(3, 8)).astype(np.float32), 6, "at least 6 vectors"),
        (np.random.default_rng(0).normal(size=(1, 8)).astype(np.float32), 1, "at least 2 vectors"),
        (
            np.random.default_rng(0).normal(size=(10, 4)).astype(np.float32),
            5,
            "exceeds the 4 dimensions",
        ),
        (np.array([[0.0, 1.0], [np.nan, 2.0], [1.0, 1.0]], dtype=np.float32), 1, "NaN"),
    ],
)
def test_bad_input(x, k, match):
    with pytest.raises(ValueError, match=match):
        project(x, n_components=k)


def test_bad_arguments():
    x = _cloud()
    with pytest.raises(ValueError, match="method must be"):
        project(x, method="tsne")
    with pytest.raises(ValueError, match="features"):
        project(x, fit_on=x[:, :5])
    with pytest.raises(ValueError, match="not fitted"):
        LatentPCA(2).transform(x)
    with pytest.raises(ValueError, match="no 'token' field"):
        project(x).field("token")
    with pytest.raises(ValueError, match="entries for"):
        project(x, fields={"layer": [1, 2]})
    with pytest.raises(TypeError, match="floating point"):
        project(torch.ones(4, 3, dtype=torch.long))


def test_umap_missing_gives_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "umap", None)  # makes `import umap` raise ImportError
    with pytest.raises(ImportError, match=r"pip install 'tlmicroscope\[umap\]'"):
        project(_cloud(), method="umap")


def test_umap_separates_clouds_and_transforms_new_points():
    pytest.importorskip("umap")
    rng = np.random.default_rng(0)
    d = 16
    a = rng.normal(size=(150, d)) + 0.2
    a[:, 0] += 6.0
    b = rng.normal(size=(150, d)) + 0.2
    b[:, 1] += 6.0
    x = np.concatenate([a, b]).astype(np.float32)
    proj = project(x, "umap", seed=0, fit_size=200, fields={"component": ["a"] * 150 + ["b"] * 150})
    r = proj.reducer
    assert (r.metric, r.n_neighbors, r.min_dist, r.random_state) == ("cosine", 15, 0.1, 0)
    c = proj.coords.numpy()
    gap = np.linalg.norm(c[:150].mean(0) - c[150:].mean(0))
    spread = max(c[:150].std(0).max(), c[150:].std(0).max())
    assert gap > 3 * spread
    new = proj.transform(a[:5].astype(np.float32))
    assert np.linalg.norm(new.coords.numpy().mean(0) - c[:150].mean(0)) < gap / 2
    assert proj.explained_variance_ratio is None and proj.axis_titles() == ["UMAP 1", "UMAP 2"]


def test_umap_bad_input():
    pytest.importorskip("umap")
    with pytest.raises(ValueError, match="constant"):
        project(np.ones((20, 4), dtype=np.float32), "umap")
    with pytest.raises(ValueError, match="needs more than"):
        project(np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32), "umap")
