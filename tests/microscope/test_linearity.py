"""Layer linearity: against brute-force regression, the chance floor, the residual toy, paper
mode."""

import numpy as np
import pytest
import torch

from tlmicroscope.capture import capture
from tlmicroscope.corpus import token_windows
from tlmicroscope.microscope import linearity_score, linearity_scores


def _brute_force_r2(x: np.ndarray, y: np.ndarray) -> float:
    """R² of an ordinary least-squares regression of every column of y on [1, x], pooled."""
    design = np.hstack([np.ones((x.shape[0], 1)), x])
    coef, *_ = np.linalg.lstsq(design, y, rcond=None)
    rss = ((design @ coef - y) ** 2).sum()
    tss = ((y - y.mean(0)) ** 2).sum()
    return 1 - rss / tss


def _paper_formula(x: np.ndarray, y: np.ndarray) -> float:
    """The reference notebook's score written out in numpy: centre, normalise, pinv by SVD."""
    X = x - x.mean(0)
    Y = y - y.mean(0)
    X /= np.linalg.norm(X)
    Y /= np.linalg.norm(Y)
    U, S, Vt = np.linalg.svd(X, full_matrices=False)
    A = Vt.T @ np.diag(1 / S) @ U.T @ Y
    return 1 - ((X @ A - Y) ** 2).sum()


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def test_matches_brute_force_regression(rng):
    x = rng.normal(size=(300, 10)) @ rng.normal(size=(10, 10)) + 5.0
    y = np.tanh(x @ rng.normal(size=(10, 10)) * 0.3) + 0.1 * rng.normal(size=(300, 10))
    assert linearity_score(x, y) == pytest.approx(_brute_force_r2(x, y), abs=1e-10)
    assert linearity_score(x, y, without_residual=True) == pytest.approx(
        _brute_force_r2(x, y - x), abs=1e-10
    )


def test_chance_floor_for_unrelated_data(rng):
    n, d = 3000, 40
    scores = [linearity_score(rng.normal(size=(n, d)), rng.normal(size=(n, d))) for _ in range(5)]
    assert np.mean(scores) == pytest.approx(d / (n - 1), rel=0.08)


def test_residual_toy_map_is_linear_with_residual_only(rng):
    x = rng.normal(size=(5000, 64))
    y = x + 0.05 * np.tanh(x @ rng.normal(size=(64, 64)))
    with_res = linearity_score(x, y)
    without = linearity_score(x, y, without_residual=True)
    assert with_res > 0.998
    assert without < 0.85 and without < with_res - 0.1


def test_paper_mode_equals_pseudo_inverse_formula(rng):
    x = rng.normal(size=(400, 16))
    y = x @ rng.normal(size=(16, 16)) + np.sin(x)
    expected = _paper_formula(x, y)
    got = linearity_score(torch.tensor(x), torch.tensor(y), mode="paper")
    assert got == pytest.approx(expected, abs=1e-12)
    # well conditioned with N >> d, the conditioned solver agrees with it
    assert linearity_score(x, y) == pytest.approx(expected, abs=1e-10)
    assert linearity_score(x, y, mode="paper", without_residual=True) == pytest.approx(
        _paper_formula(x, y - x), abs=1e-12
    )


def test_invariant_to_scale_and_translation(rng):
    x = rng.normal(size=(500, 8))
    y = np.tanh(x @ rng.normal(size=(8, 8)))
    base = linearity_score(x, y)
    assert linearity_score(3.0 * x - 7.0, 0.01 * y + 100.0) == pytest.approx(base, abs=1e-10)


def test_states_input_reports_n_d_rank_and_floor(rng):
    states = torch.tensor(rng.normal(size=(3, 600, 12)))
    states[1] = states[0] * 2 + 1
    res = linearity_scores(states)
    assert res.pair_labels == ("h0→h1", "h1→h2")
    assert res.n_tokens == 600 and res.d_model == 12
    assert res.rank.tolist() == [12, 12]
    assert res.score[0] == pytest.approx(1.0, abs=1e-12)
    assert res.chance_floor[1] == pytest.approx(12 / 599)
    assert res.score[1] == pytest.approx(
        _brute_force_r2(states[1].numpy(), states[2].numpy()), abs=1e-10
    )
    df = res.to_dataframe()
    assert list(df["n_tokens"]) == [600, 600]


def test_too_few_tokens_are_refused_or_warned(rng):
    states = torch.tensor(rng.normal(size=(2, 10, 16)))
    with pytest.raises(ValueError, match=r"N=10 token rows for d_model=16.*allow_underdetermined"):
        linearity_scores(states)
    with pytest.warns(UserWarning, match="exact"):
        res = linearity_scores(states, allow_underdetermined=True)
    assert res.score[0] == pytest.approx(1.0, abs=1e-8)  # the flaw: any data fits exactly
    with pytest.warns(UserWarning, match="chance floor"):
        linearity_scores(torch.tensor(rng.normal(size=(2, 100, 16))))


def test_rank_deficient_states_report_rank_and_still_solve(rng):
    base = rng.normal(size=(800, 6))
    x = np.hstack([base, base[:, :2] * 2.0])  # 8 columns, rank 6
    y = np.tanh(base @ rng.normal(size=(6, 8)))
    states = torch.tensor(np.stack([x, y]))
    with pytest.warns(UserWarning, match=r"rank 6 of d_model=8"):
        res = linearity_scores(states)
    assert int(res.rank[0]) == 6
    assert float(res.score[0]) == pytest.approx(_brute_force_r2(x, y), abs=1e-9)
    with pytest.warns(UserWarning):
        ridged = linearity_scores(states, ridge=1e-2)
    assert float(ridged.score[0]) < float(res.score[0])


def test_nan_activations_are_refused():
    states = torch.randn(2, 200, 4, dtype=torch.float64)
    states[1, 5, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        linearity_scores(states)


def test_bad_shapes():
    with pytest.raises(ValueError, match="same N"):
        linearity_score(np.zeros((5, 2)), np.zeros((6, 2)))
    with pytest.raises(ValueError, match=r"\[layer N d_model\]"):
        linearity_scores(torch.zeros(10, 3))
    with pytest.raises(ValueError, match="mode"):
        linearity_scores(torch.zeros(2, 10, 3), mode="svd")


@pytest.mark.models
def test_model_scores_equal_scores_of_captured_states(tiny):
    windows = token_windows(tiny, None, seq_len=64, n_windows=16, shuffle=True, seed=3)
    res = linearity_scores(tiny, windows, progress=False, batch_size=5)
    states = capture(tiny, windows, sites=("resid",))["resid"]  # [L+1 batch pos d]
    flat = states.reshape(states.shape[0], -1, states.shape[-1]).double().numpy()
    for i, layer in enumerate(res.pairs):
        assert float(res.score[i]) == pytest.approx(
            _brute_force_r2(flat[layer], flat[layer + 1]), abs=1e-7
        )
        assert float(res.score_without_residual[i]) == pytest.approx(
            _brute_force_r2(flat[layer], flat[layer + 1] - flat[layer]), abs=1e-7
        )
    assert res.n_tokens == 16 * 64 and res.provenance.settings["mode"] == "lstsq"
    paper = linearity_scores(tiny, windows, mode="paper", progress=False)
    assert torch.allclose(paper.score, res.score, atol=1e-5)
    assert torch.allclose(paper.score_without_residual, res.score_without_residual, atol=1e-4)


@pytest.mark.models
def test_skip_positions_and_pairs_subset(tiny_llama):
    windows = token_windows(tiny_llama, None, seq_len=32, n_windows=40, shuffle=True, seed=1)
    res = linearity_scores(tiny_llama, windows, layers=[1], skip_positions=4, progress=False)
    states = capture(tiny_llama, windows, sites=("resid",), layers=[1, 2])["resid"][:, :, 4:]
    flat = states.reshape(2, -1, states.shape[-1]).double().numpy()
    assert res.pairs == (1,) and res.n_tokens == 40 * 28
    assert float(res.score[0]) == pytest.approx(_brute_force_r2(flat[0], flat[1]), abs=1e-7)
    with pytest.raises(ValueError, match="skip_positions"):
        linearity_scores(tiny_llama, windows, skip_positions=32, progress=False)
