"""family_claims: each claim's numbers against an independent computation on tiny models."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch

from tlmicroscope.claims import FamilyClaims, _stays_from, claims_table, family_claims

CORPUS = ["Layers read the residual stream; lenses read the layers. " * 200]
KW = {
    "kl_tokens": 64,
    "linearity_tokens": 600,
    "id_points": 300,
    "norm_tokens": 48,
    "seq_len": 48,
    "answer": "e",
    "progress": False,
}


@pytest.fixture(scope="module", params=["tiny_llama", "tiny_gpt2"])
def claims_and_model(request):
    model = request.getfixturevalue(request.param)
    with warnings.catch_warnings():  # tiny llama: rank-deficient h^0, ties in the byte embedding
        warnings.simplefilter("ignore", UserWarning)
        c = family_claims(model, CORPUS, **KW)
    return c, model


def _brute_force_ranks(model, prompt: str, answer: str) -> list[int]:
    """The answer's rank at the last prompt position, from TransformerLens's own accumulated
    residuals with its final norm applied (not our Readout), plus the model's logits."""
    toks = model.to_tokens(prompt)
    answer_id = int(model.to_tokens(answer, prepend_bos=False)[0, 0])
    logits, cache = model.run_with_cache(toks)
    L = model.cfg.n_layers
    resid = torch.stack([cache[f"blocks.{i}.hook_resid_pre"][0, -1] for i in range(L)])
    scale = (
        (resid.pow(2).mean(-1, keepdim=True) + model.cfg.eps).rsqrt()
        if model.cfg.normalization_type.startswith("RMS")
        else None
    )
    if scale is None:  # LayerNorm
        centred = resid - resid.mean(-1, keepdim=True)
        normed = centred / (centred.pow(2).mean(-1, keepdim=True) + model.cfg.eps).sqrt()
        normed = normed * model.ln_final.w + model.ln_final.b
    else:
        normed = resid * scale * model.ln_final.w
    layer_logits = normed @ model.W_U + model.b_U
    rows = torch.cat([layer_logits, logits[0, -1:]], 0)
    return [int((r > r[answer_id]).sum()) for r in rows]


def test_paris_ranks_match_a_brute_force_readout(claims_and_model):
    c, model = claims_and_model
    assert c.paris_rank["logit"] == _brute_force_ranks(model, "The capital of France is", "e")


def test_first_token_ratio_matches_norms_from_the_cache(claims_and_model):
    from tlmicroscope.corpus import token_windows

    c, model = claims_and_model
    window = token_windows(model, CORPUS, seq_len=48, n_windows=1)
    _, cache = model.run_with_cache(window)
    for i in range(model.cfg.n_layers):
        norms = cache[f"blocks.{i}.hook_resid_post"][0].norm(dim=-1)
        expect = float(norms[0] / norms[1:].median())
        assert c.first_token_ratio[i] == pytest.approx(expect, rel=1e-4)


def test_kl_of_output_layer_is_dropped_and_values_are_finite(claims_and_model):
    c, model = claims_and_model
    assert len(c.kl["logit"]) == model.cfg.n_layers
    assert all(v >= 0 and math.isfinite(v) for v in c.kl["logit"])
    assert len(c.intrinsic_dimension) == model.cfg.n_layers + 1


def test_round_trip_and_table(claims_and_model, tmp_path):
    c, _ = claims_and_model
    path = tmp_path / "c.json"
    path.write_text(json.dumps(c.to_dict()))
    back = FamilyClaims.from_dict(json.loads(path.read_text()))
    assert json.dumps(back.to_dict()) == json.dumps(c.to_dict())
    table = claims_table([c, back])
    assert table.count("\n") >= 6 and f"{c.linearity_without_residual[0]:.2f}" in table
    with pytest.raises(ValueError, match="missing"):
        FamilyClaims.from_dict({"model_name": "x"})


def test_stays_from():
    assert _stays_from([9, 3, 0, 0], 0) == 2
    assert _stays_from([0, 5, 0, 1, 0], 0) == 4
    assert _stays_from([0, 5, 0, 1, 2], 0) is None
    assert _stays_from([4, 4, 9, 4], 4) == 3


def test_derived_summaries():
    base = {
        "model_name": "m",
        "n_layers": 4,
        "d_model": 8,
        "d_vocab": 10,
        "paris_rank": {},
        "paris_top1_from": {},
        "paris_top5_from": {},
        "kl": {"logit": [3.0, 2.0, 1.0, 0.5], "tuned": [1.0, 2.5, 0.5, 0.1]},
        "kl_tokens": 1,
        "linearity_n_tokens": 1,
        "id_points": 1,
        "norm_tokens": 1,
        "provenance": None,
    }
    c = FamilyClaims(
        **base,
        linearity_without_residual=[0.9, 0.4, 0.5, 0.8],
        intrinsic_dimension=[99.0, 5.0, 9.0, 7.0, 6.0],
        first_token_ratio=[1.0, 30.0, 80.0, 60.0],
    )
    assert c.linearity_min_pair == 1 and c.linearity_u_shape
    assert c.linearity_thirds == pytest.approx((0.9, 0.45, 0.8))  # thirds of 4 pairs: 1, 2, 1
    assert c.id_peak_layer == 2 and c.spike_layer == 2 and c.tuned_beats_logit() == 3
    flat = FamilyClaims(
        **base,
        linearity_without_residual=[0.4, 0.5, 0.6, 0.8],
        intrinsic_dimension=[float("nan")] * 5,
        first_token_ratio=[1.0] * 4,
    )
    assert not flat.linearity_u_shape and flat.id_peak_layer is None and flat.spike_layer == 0


def test_multi_token_answer_is_refused(tiny_llama):
    with pytest.raises(ValueError, match="one token"):
        family_claims(tiny_llama, CORPUS, **(KW | {"answer": " Paris"}))
