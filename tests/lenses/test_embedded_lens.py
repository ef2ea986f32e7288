"""The logit lens on the embedded SmolLM2-135M: known answers and brute-force statistics."""

import pytest
import torch

from tlmicroscope.inputs import to_tokens
from tlmicroscope.lenses import prediction_trajectory

pytestmark = [pytest.mark.embedded, pytest.mark.models]

PROMPT = "The capital of France is"


def test_greedy_next_token_is_paris(embedded_model):
    toks = to_tokens(embedded_model, PROMPT)
    assert toks.shape[1] == 5  # SmolLM2's tokenizer adds no BOS, and neither do we
    with torch.inference_mode():
        logits = embedded_model(toks)
    assert embedded_model.to_string(logits[0, -1].argmax()) == " Paris"


def test_trajectory_equals_brute_force_and_paris_emerges_late(embedded_model):
    toks = to_tokens(embedded_model, PROMPT)
    traj = prediction_trajectory(embedded_model, toks, top_k=5)
    assert traj.provenance.settings["readout_identity_checked"]
    assert traj.provenance.settings["readout_identity_max_abs_diff"] < 1e-3
    n = embedded_model.cfg.n_layers
    names = [f"blocks.{i}.hook_resid_pre" for i in range(n)] + [f"blocks.{n - 1}.hook_resid_post"]
    with torch.inference_mode():
        logits, cache = embedded_model.run_with_cache(toks, names_filter=names)
        lp_final = torch.log_softmax(logits[0], -1)
        for li, name in enumerate(names):
            lp = torch.log_softmax(
                embedded_model.unembed(embedded_model.ln_final(cache[name]))[0], -1
            )
            ent = -(lp.exp() * lp).sum(-1)
            kl = (lp_final.exp() * (lp_final - lp)).sum(-1)
            ce = -lp[:-1].gather(-1, toks[0, 1:, None]).squeeze(-1)
            rank = (lp[:-1] > -ce[:, None]).sum(-1)
            torch.testing.assert_close(traj.entropy[li, 0], ent, atol=2e-3, rtol=1e-3)
            torch.testing.assert_close(traj.kl[li, 0], kl, atol=2e-3, rtol=1e-3)
            torch.testing.assert_close(traj.cross_entropy[li, 0, :-1], ce, atol=2e-3, rtol=1e-3)
            assert (
                traj.target_rank[li, 0, :-1] - rank
            ).abs().max() <= 1  # ties at float32 rounding
            assert torch.equal(traj.top_tokens[li, 0, :, 0], lp.argmax(-1))
    assert traj.top_strings[-1, 0, -1, 0] == " Paris"
    paris = embedded_model.to_single_token(" Paris")
    ranks = [
        int((traj.top_tokens[li, 0, -1] == paris).nonzero().numel() == 0) for li in range(n + 1)
    ]
    # " Paris" is absent from the top 5 in the early and middle layers and present at the end.
    assert all(ranks[:20]) and not ranks[-1]
