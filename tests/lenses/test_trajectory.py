"""prediction_trajectory against a brute-force computation from the full log-softmax."""

import math

import pytest
import torch

import tlmicroscope.lenses.trajectory as trajectory_module
from tlmicroscope.inputs import to_tokens
from tlmicroscope.lenses import LogitLens, prediction_trajectory
from tlmicroscope.lenses.readout import Readout, ReadoutIdentityError, check_readout_identity

pytestmark = pytest.mark.models


def _residuals(model, toks):
    n = model.cfg.n_layers
    names = [f"blocks.{i}.hook_resid_pre" for i in range(n)] + [f"blocks.{n - 1}.hook_resid_post"]
    logits, cache = model.run_with_cache(toks, names_filter=names)
    return logits, [cache[name] for name in names]


def _final_norm(model, h):
    """The model's own final norm module applied to h (recomputes statistics from h)."""
    return model.ln_final(h)


def brute_force(model, toks, *, final_norm=True, k=5):
    """Every statistic from the full [layer batch pos d_vocab] log-softmax, the slow obvious way."""
    logits, hs = _residuals(model, toks)
    n = model.cfg.n_layers
    lp_final = torch.log_softmax(logits, -1)
    out = {
        key: []
        for key in ("entropy", "kl", "cross_entropy", "target_rank", "max_prob", "top_i", "top_p")
    }
    for layer, h in enumerate(hs):
        if layer == n or final_norm:
            z = model.unembed(_final_norm(model, h))
        else:
            z = h @ model.W_U + model.b_U
        lp = torch.log_softmax(z, -1)
        p = lp.exp()
        out["entropy"].append(-(p * lp).sum(-1))
        out["kl"].append((lp_final.exp() * (lp_final - lp)).sum(-1))
        tgt = toks[:, 1:]
        lp_t = lp[:, :-1].gather(-1, tgt.unsqueeze(-1)).squeeze(-1)
        ce = torch.full(toks.shape, math.nan)
        ce[:, :-1] = -lp_t
        out["cross_entropy"].append(ce)
        rank = torch.full(toks.shape, -1, dtype=torch.long)
        rank[:, :-1] = (lp[:, :-1] > lp_t.unsqueeze(-1)).sum(-1)
        out["target_rank"].append(rank)
        tv, ti = lp.topk(k, -1)
        out["max_prob"].append(tv[..., 0].exp())
        out["top_i"].append(ti)
        out["top_p"].append(tv.exp())
    return {key: torch.stack(v) for key, v in out.items()}


@pytest.mark.parametrize("col_block", [64, 4096])
def test_statistics_equal_brute_force(tiny, col_block, monkeypatch):
    monkeypatch.setattr(trajectory_module, "_COL_BLOCK", col_block)  # 64: several vocab blocks
    g = torch.Generator().manual_seed(1)
    toks = torch.randint(0, tiny.cfg.d_vocab, (2, 19), generator=g)
    with torch.no_grad():
        ref = brute_force(tiny, toks)
    traj = prediction_trajectory(tiny, toks, top_k=5, chunk_size=7)
    for stat in ("entropy", "kl", "max_prob"):
        torch.testing.assert_close(getattr(traj, stat), ref[stat], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(
        traj.cross_entropy, ref["cross_entropy"], atol=2e-5, rtol=1e-4, equal_nan=True
    )
    assert torch.equal(traj.target_rank, ref["target_rank"])
    assert torch.equal(traj.top_tokens, ref["top_i"])
    torch.testing.assert_close(traj.top_probs, ref["top_p"], atol=1e-6, rtol=1e-4)
    assert (
        traj.layer_labels[-1] == f"h{tiny.cfg.n_layers}"
        and len(traj.layers) == tiny.cfg.n_layers + 1
    )
    assert traj.provenance.settings["readout_identity_checked"] is True


def test_paper_lens_skips_the_final_norm(tiny_gpt2):
    toks = to_tokens(tiny_gpt2, "A paper lens.")
    with torch.no_grad():
        ref = brute_force(tiny_gpt2, toks, final_norm=False)
    traj = prediction_trajectory(tiny_gpt2, toks, lens="logit-paper", top_k=5)
    torch.testing.assert_close(traj.entropy, ref["entropy"], atol=2e-5, rtol=1e-4)
    assert torch.equal(traj.top_tokens, ref["top_i"])
    assert traj.provenance.lens == "logit (paper: no final norm)"


def test_cache_input_and_layer_subset_agree_with_model_input(tiny_llama):
    toks = to_tokens(tiny_llama, "Same numbers either way.")
    full = prediction_trajectory(tiny_llama, toks)
    _, _hs = _residuals(tiny_llama, toks)
    n = tiny_llama.cfg.n_layers
    names = [f"blocks.{i}.hook_resid_pre" for i in range(n)] + [f"blocks.{n - 1}.hook_resid_post"]
    _, cache = tiny_llama.run_with_cache(toks, names_filter=names)
    sub = prediction_trajectory(cache, toks, layers=[1, n])
    assert sub.layers == (1, n)
    torch.testing.assert_close(sub.kl, full.kl[[1, n]], atol=1e-5, rtol=1e-4)
    assert torch.equal(sub.top_tokens, full.top_tokens[[1, n]])
    assert sub.provenance.settings["readout_identity_checked"] is False


def test_bad_arguments(tiny_llama):
    with pytest.raises(ValueError, match="out of range"):
        prediction_trajectory(tiny_llama, "abc", layers=[tiny_llama.cfg.n_layers + 1])
    with pytest.raises(ValueError, match="top_k"):
        prediction_trajectory(tiny_llama, "abc", top_k=0)
    with pytest.raises(ValueError, match="empty"):
        prediction_trajectory(tiny_llama, "")

    class OtherModelLens(LogitLens):
        def check_model(self, model):
            raise ValueError("d_model is 64 in the lens but 32 for this model")

    with pytest.raises(ValueError, match="d_model is 64"):
        prediction_trajectory(tiny_llama, "abc", lens=OtherModelLens())
    with pytest.raises(TypeError, match="not a lens"):
        prediction_trajectory(tiny_llama, "abc", lens=object())


def test_readout_identity_detects_a_wrong_readout(tiny_llama):
    toks = to_tokens(tiny_llama, "identity")
    logits, hs = _residuals(tiny_llama, toks)
    readout = Readout(tiny_llama)
    assert check_readout_identity(readout, hs[-1][0], logits[0]) < 1e-4
    readout.W = readout.W * 1.5  # e.g. a norm weight applied twice
    with pytest.raises(ReadoutIdentityError, match="differs from the model's own"):
        check_readout_identity(readout, hs[-1][0], logits[0])


def test_to_dataframe_rows(tiny_llama):
    traj = prediction_trajectory(tiny_llama, "abcd", top_k=2)
    df = traj.to_dataframe()
    assert len(df) == len(traj.layers) * 4
    row = df[(df.layer == 1) & (df.position == 2)].iloc[0]
    assert row.kl == pytest.approx(float(traj.kl[1, 0, 2]))
    assert row.top1 == traj.top_strings[1, 0, 2, 0]


def test_cache_with_logits_checks_the_identity_and_matches(tiny_gpt2):
    toks = to_tokens(tiny_gpt2, "Logits ride along.")
    n = tiny_gpt2.cfg.n_layers
    names = [f"blocks.{i}.hook_resid_pre" for i in range(n)] + [f"blocks.{n - 1}.hook_resid_post"]
    logits, cache = tiny_gpt2.run_with_cache(toks, names_filter=names)
    from_cache = prediction_trajectory(cache, toks, logits=logits)
    from_model = prediction_trajectory(tiny_gpt2, toks)
    assert from_cache.provenance.settings["readout_identity_checked"] is True
    torch.testing.assert_close(from_cache.kl, from_model.kl, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="logits have shape"):
        prediction_trajectory(cache, toks, logits=logits[:, :-1])
