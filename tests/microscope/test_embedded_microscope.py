"""Each LLM-Microscope panel on the embedded SmolLM2-135M, with quick settings (about two
minutes)."""

import math

import pytest
import torch

from tlmicroscope.microscope import (
    ContextualizationProbe,
    NonlinearityReference,
    component_attribution,
    contextualization,
    layer_contributions,
    token_nonlinearity,
)
from tlmicroscope.viz import logit_lens_table
from tlmicroscope.viz import microscope as mv

pytestmark = [pytest.mark.embedded, pytest.mark.models]

TEXT = "The capital of France is Paris. It is known for the Eiffel Tower, museums and cafés."


@pytest.fixture(scope="module")
def reference(embedded_model):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter(
            "ignore"
        )  # 4096 tokens for d=576: the chance-floor warning is expected
        return NonlinearityReference(n_tokens=4096, seq_len=256).fit(embedded_model, progress=False)


@pytest.fixture(scope="module")
def probe(embedded_model):
    return ContextualizationProbe(
        prefix_length=4,
        mlp_hidden=64,
        decoder="frozen",
        steps=3,
        windows_per_step=2,
        positions_per_window=2,
        window_length=32,
    ).fit(embedded_model, progress=False)


def test_linearity_panel(reference):
    lin = reference.linearity_
    assert lin.n_tokens == 4096 and lin.d_model == 576 and len(lin.pairs) == 30
    assert float(lin.chance_floor[5]) == pytest.approx(int(lin.rank[5]) / 4095)
    middle = slice(5, 25)
    # the residual stream makes adjacent layers close to affine, far above the chance floor
    assert bool((lin.score[middle] > 0.9).all())
    assert bool((lin.score[middle] > lin.score_without_residual[middle]).all())
    assert bool((lin.score_without_residual > lin.chance_floor).all())
    assert len(mv.linearity_plot(lin).data) == 3


def test_nonlinearity_panel(embedded_model, reference):
    tn = token_nonlinearity(embedded_model, TEXT, reference=reference)
    n = embedded_model.to_tokens(TEXT).shape[1]
    assert tn.error.shape == (30, 1, n) and bool(torch.isfinite(tn.error).all())
    assert tn.n_fit == 4096
    fig = mv.nonlinearity_heatmap(tn)
    assert fig.data[0].z.shape == (30, n)


def test_contribution_and_logit_lens_panels(embedded_model):
    lc = layer_contributions(embedded_model, TEXT)
    toks = embedded_model.to_tokens(TEXT)
    with torch.no_grad():
        logits = embedded_model(toks)
    own = -torch.log_softmax(logits[0, :-1].float(), -1).gather(1, toks[0, 1:, None])[:, 0]
    assert torch.allclose(lc.loss[-1, 0, :-1], own, atol=2e-3)
    paris = (
        embedded_model.to_str_tokens(toks[0]).index(" Paris") - 1
    )  # the position predicting " Paris"
    assert float(lc.loss[-1, 0, paris]) < 1.0 < float(lc.loss[5, 0, paris])
    assert lc.trajectory.top_strings[-1, 0, paris, 0] == " Paris"
    assert logit_lens_table(lc.trajectory).data[0].z.shape == (31, toks.shape[1])
    attr = component_attribution(embedded_model, TEXT)
    assert attr.labels[0] == "embed" and len(attr.labels) == 61
    assert attr.max_identity_error < 1e-2
    assert mv.component_attribution_heatmap(attr).data[0].z.shape == (61, toks.shape[1])


def test_contextualization_panel(embedded_model, probe):
    ctx = contextualization(embedded_model, TEXT, probe=probe)
    n = embedded_model.to_tokens(TEXT).shape[1]
    assert math.isnan(float(ctx.C[0, 0])) and bool(torch.isfinite(ctx.C[0, 1:]).all())
    assert ctx.prefix_length[0].tolist()[:6] == [0, 1, 2, 3, 4, 4]
    assert mv.contextualization_heatmap(ctx).data[0].z.shape == (1, n)


def test_microscope_command_on_the_embedded_model(
    embedded_model, reference, probe, tmp_path, monkeypatch
):
    import re

    from tlmicroscope.app.commands import microscope as microscope_command
    from tlmicroscope.cli import main

    reference.save(tmp_path / "ref")
    probe.save(tmp_path / "probe")
    monkeypatch.setattr(microscope_command, "load_from_args", lambda args: embedded_model)
    out = tmp_path / "m.html"
    assert (
        main(
            [
                "microscope",
                TEXT,
                "--reference",
                str(tmp_path / "ref"),
                "--probe",
                str(tmp_path / "probe"),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    sections = dict(re.findall(r'data-section="([^"]+)" data-status="([^"]+)"', out.read_text()))
    for name in (
        "llm-microscope-token-wise-non-linearity",
        "llm-microscope-linearity-per-layer",
        "llm-microscope-layer-contributions",
        "llm-microscope-contextualization",
        "logit-lens-llm-microscope-style",
    ):
        assert sections[name] == "ok"
