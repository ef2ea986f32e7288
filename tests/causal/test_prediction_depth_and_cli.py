"""Prediction depth against a brute-force loop; the cbe and injection subcommands."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from tlmicroscope.causal import prediction_depth
from tlmicroscope.lenses import prediction_trajectory


def _brute_depth(top1: torch.Tensor, layers: list[int], n_layers: int) -> torch.Tensor:
    """For each token, scan the lens layers from the last one down while they agree with the
    output."""
    final = top1[-1]
    out = torch.full(final.shape, n_layers, dtype=torch.long)
    for b in range(final.shape[0]):
        for p in range(final.shape[1]):
            for i in range(len(layers) - 1, -1, -1):
                if top1[i, b, p] != final[b, p]:
                    break
                out[b, p] = layers[i]
    return out


@pytest.mark.models
def test_prediction_depth_matches_brute_force(tiny):
    traj = prediction_trajectory(
        tiny, torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(1)), top_k=1
    )
    res = prediction_depth(traj)
    n = tiny.cfg.n_layers
    assert torch.equal(res.depth, _brute_depth(traj.top_tokens[..., 0], list(range(n)), n))
    assert res.layers == tuple(range(n)) and len(res.to_dataframe()) == 9


def test_prediction_depth_on_a_constructed_trajectory():
    from tlmicroscope.results import Provenance

    # 4 lens layers + output; tokens: settles at 2, settles at 0, never, settles then leaves (-> 3).
    top1 = torch.tensor([[5, 7, 1, 9], [6, 7, 2, 9], [8, 7, 3, 4], [8, 7, 4, 9], [8, 7, 9, 9]])
    traj = _fake_trajectory(top1[:, None, :], Provenance("m", "M", False, "4"))
    assert prediction_depth(traj).depth.tolist() == [[2, 0, 4, 3]]
    no_output = dataclasses.replace(traj, layers=(0, 1, 2, 3, 5))
    with pytest.raises(ValueError, match="lacks the output row"):
        prediction_depth(no_output)


def _fake_trajectory(top1, prov):
    from tlmicroscope.lenses.trajectory import PredictionTrajectory

    L1, B, P = top1.shape
    zeros = torch.zeros(L1, B, P)
    return PredictionTrajectory(
        layers=tuple(range(L1)),
        layer_labels=tuple(str(i) for i in range(L1)),
        tokens=torch.zeros(B, P).long(),
        str_tokens=[["a"] * P],
        targets=torch.zeros(B, P).long(),
        entropy=zeros,
        kl=zeros,
        cross_entropy=zeros,
        target_rank=zeros.long(),
        max_prob=zeros,
        top_tokens=top1[..., None],
        top_probs=zeros[..., None],
        top_strings=np.full((L1, B, P, 1), "x", dtype=object),
        n_layers=L1 - 1,
        provenance=prov,
    )


def test_figures_from_results():
    from tlmicroscope.causal import StimulusResponseResult
    from tlmicroscope.results import Provenance
    from tlmicroscope.viz.causal import (
        prediction_depth_figure,
        prediction_depth_tokens,
        stimulus_response_figure,
    )

    top1 = torch.tensor([[5, 7], [5, 8], [5, 7]])[:, None, :]
    res = prediction_depth(_fake_trajectory(top1, Provenance("m", "M", False, "4", lens="logit")))
    fig = prediction_depth_figure(res)
    assert list(fig.data[0].y) == [0, 2]
    assert prediction_depth_tokens(res).props["values"] == [0.0, 2.0]
    sr = StimulusResponseResult(
        alignment=torch.tensor([[[0.1, 0.3], [0.5, float("nan")]]]),
        layers=(1, 2),
        lens_names=("logit",),
        positions=torch.zeros(2, 2).long(),
        donors=torch.zeros(2, 2, 2).long(),
        provenance=Provenance("m", "M", False, "4"),
    )
    fig = stimulus_response_figure(sr)
    np.testing.assert_allclose(fig.data[0].y, [0.2, 0.5])


@pytest.mark.models
def test_cli_cbe_and_injection_write_results_and_html(tmp_path, capsys):
    from tlmicroscope.causal import CausalBasis
    from tlmicroscope.cli import main

    out = tmp_path / "cbe"
    rc = main(
        [
            "cbe",
            "--model",
            "tiny-llama",
            "--k",
            "2",
            "--n-tokens",
            "128",
            "--seq-len",
            "64",
            "--layer",
            "1",
            "--stimulus-response",
            "3",
            "--out-dir",
            str(out),
        ]
    )
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert len(res["basis"]["energies"]) == 2 and "spearman" in res["fidelity"]
    assert {r["layer"] for r in res["stimulus_response"]} == {0, 1, 2}
    basis = CausalBasis.load(out / "basis")
    assert basis.layer == 1 and basis.energies.tolist() == pytest.approx(res["basis"]["energies"])
    html = (out / "cbe.html").read_text()
    assert "Causal fidelity" in html and "Stimulus-response" in html
    out2 = tmp_path / "inj"
    rc = main(
        [
            "injection",
            "--model",
            "tiny-llama",
            "--n-items",
            "16",
            "--shots",
            "1",
            "--splits",
            "3",
            "--out-dir",
            str(out2),
        ]
    )
    assert rc == 0
    res = json.loads((out2 / "results.json").read_text())
    assert (
        set(res["auroc"]) == {"logit", "output", "mahalanobis"} and len(res["auroc"]["logit"]) == 3
    )
    assert "AUROC" in (out2 / "injection.html").read_text()
    assert (
        main(["cbe", "--model", "tiny-llama", "--k", "999", "--out-dir", str(tmp_path / "bad")])
        == 2
    )
    assert "k must be an integer" in capsys.readouterr().err
