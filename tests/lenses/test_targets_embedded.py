"""Target trajectories and the component lens on the embedded SmolLM2-135M (real tokenizer, real
weights)."""

import pytest
import torch

from tlmicroscope.inputs import to_tokens
from tlmicroscope.lenses import component_lens, target_trajectories

pytestmark = [pytest.mark.embedded, pytest.mark.models]

PROMPTS = [
    "The capital of France is",
    "Paris is the capital of",
    "The Eiffel Tower stands in the city of",
    "Everyone knows that the largest city in France is",
]


def test_padding_changes_nothing_on_the_real_tokenizer_and_paris_rises_late(embedded_model):
    batched = target_trajectories(
        embedded_model,
        PROMPTS,
        targets=[" Paris", " France"],
        batch_size=4,
        progress=False,
        n_boot=200,
    )
    alone = target_trajectories(
        embedded_model,
        PROMPTS,
        targets=[" Paris", " France"],
        batch_size=1,
        progress=False,
        n_boot=200,
    )
    torch.testing.assert_close(batched.logprob, alone.logprob, atol=2e-3, rtol=1e-3)
    with torch.inference_mode():
        for i, p in enumerate(PROMPTS):
            logits = embedded_model(to_tokens(embedded_model, p))[0, -1]
            lp = torch.log_softmax(logits.float(), -1)
            paris = embedded_model.to_single_token(" Paris")
            assert float(batched.logprob[0, -1, i, 0, 0]) == pytest.approx(
                float(lp[paris]), abs=2e-3
            )
    # " Paris" is improbable in the first half of the layers and the model's best guess at the
    # output.
    assert float(batched.mean["prob"][0, :15, 0].max()) < 0.01
    assert float(batched.mean["prob"][0, -1, 0]) > 0.3 and int(batched.rank[0, -1, 0, 0, 0]) == 0


def test_component_lens_adds_up_to_the_real_logit(embedded_model):
    cl = component_lens(embedded_model, PROMPTS[0], targets=[" Paris", " London"])
    assert cl.max_logit_error < 1e-3 and cl.max_residual_error < 1e-4
    torch.testing.assert_close(cl.logit, cl.model_logit, atol=1e-3, rtol=1e-4)
    # The head that most favours " Paris" over " London" directly sits in the last third of the
    # model.
    diff = cl.heads[..., 0, -1, 0] - cl.heads[..., 0, -1, 1]  # [layer head]
    assert int(diff.flatten().argmax()) // embedded_model.cfg.n_heads >= 20
    assert float(diff.max()) > 1.0
