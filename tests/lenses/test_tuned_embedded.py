"""The tuned lens on the embedded SmolLM2-135M: the logit lens at init, and a short training run."""

import pytest
import torch

from tlmicroscope.lenses import TunedLens, prediction_trajectory
from tlmicroscope.lenses.evaluate import evaluate_lens
from tlmicroscope.lenses.train import train_tuned_lens

pytestmark = [pytest.mark.embedded, pytest.mark.models]


def test_untrained_lens_is_the_logit_lens_on_the_embedded_model(embedded_model):
    lens = TunedLens.for_model(embedded_model)
    text = "The capital of France is"
    tuned = prediction_trajectory(embedded_model, text, lens=lens, top_k=3)
    logit = prediction_trajectory(embedded_model, text, top_k=3)
    assert torch.equal(tuned.kl, logit.kl) and torch.equal(tuned.top_tokens, logit.top_tokens)


def test_short_training_beats_the_logit_lens_at_every_layer(embedded_model, tmp_path):
    # The smallest run that still trains past the least-squares start (measured margin over the
    # logit lens: at least 2.2 nats at every layer on 128 held-out tokens).
    res = train_tuned_lens(
        embedded_model,
        None,
        steps=2,
        tokens_per_step=128,
        seq_len=128,
        init="lstsq",
        init_tokens=1024,
        progress=False,
        out_dir=str(tmp_path),
    )
    ev = evaluate_lens(
        embedded_model,
        lens=TunedLens.load(tmp_path, embedded_model),
        corpus=None,
        n_tokens=128,
        seq_len=128,
        progress=False,
    )
    tuned, logit = ev.kl[:-1], ev.baseline.kl[:-1]
    assert (tuned < logit).all(), list(zip(tuned.tolist(), logit.tolist()))
    assert res.kl.shape == (2, embedded_model.cfg.n_layers)
    assert float(ev.kl[-1]) < 1e-3  # the output row is the model itself
