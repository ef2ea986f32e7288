"""resid_mid readouts interleaved with block inputs, against the model's own final norm and
unembedding."""

import pytest
import torch

from tlmicroscope.inputs import to_tokens
from tlmicroscope.lenses import LogitLens, TunedLens, prediction_trajectory
from tlmicroscope.lenses.base import check_lens_sites, lens_sites

pytestmark = pytest.mark.models


def test_pre_and_mid_rows_equal_brute_force(tiny):
    toks = to_tokens(tiny, "Between attention and MLP.")
    n = tiny.cfg.n_layers
    names = (
        [f"blocks.{i}.hook_resid_pre" for i in range(n)]
        + [f"blocks.{i}.hook_resid_mid" for i in range(n)]
        + [f"blocks.{n - 1}.hook_resid_post"]
    )
    with torch.no_grad():
        logits, cache = tiny.run_with_cache(toks, names_filter=names)
    traj = prediction_trajectory(tiny, toks, sites="pre+mid", targets=["e", "t"], top_k=3)
    expected_labels = tuple(lab for i in range(n) for lab in (f"h{i}", f"b{i}.resid_mid")) + (
        f"h{n}",
    )
    assert traj.layer_labels == expected_labels
    assert traj.sites == tuple(s for _ in range(n) for s in ("resid_pre", "resid_mid")) + (
        "resid_post",
    )
    lp_final = torch.log_softmax(logits.double(), -1)
    ids = [int(tiny.to_tokens(c, prepend_bos=False)[0, 0]) for c in ("e", "t")]
    for row, (layer, site) in enumerate(zip(traj.layers, traj.sites)):
        h = cache[f"blocks.{layer if layer < n else n - 1}.hook_{site}"]
        lp = torch.log_softmax(tiny.unembed(tiny.ln_final(h)).double(), -1)
        kl = (lp_final.exp() * (lp_final - lp)).sum(-1)
        torch.testing.assert_close(traj.kl[row].double(), kl, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(
            traj.tracked_prob[row].double(), lp[..., ids].exp(), atol=2e-6, rtol=1e-4
        )
        assert torch.equal(traj.top_tokens[row], lp.topk(3, -1).indices)
    # The pre rows are the plain trajectory's rows.
    plain = prediction_trajectory(tiny, toks, top_k=3)
    pre_rows = [i for i, s in enumerate(traj.sites) if s != "resid_mid"]
    torch.testing.assert_close(traj.entropy[pre_rows], plain.entropy, atol=1e-6, rtol=1e-6)
    assert traj.layer_index(1, "resid_mid") == 3 and traj.layer_index(1) == 2


def test_mid_only_and_a_layer_subset(tiny_llama):
    traj = prediction_trajectory(tiny_llama, "abcdef", sites="mid", layers=[0, 2, 3])
    assert traj.layer_labels == ("b0.resid_mid", "b2.resid_mid", f"h{tiny_llama.cfg.n_layers}")
    both = prediction_trajectory(tiny_llama, "abcdef", sites="pre+mid")
    torch.testing.assert_close(
        traj.kl[1], both.kl[both.layer_index(2, "resid_mid")], atol=1e-6, rtol=1e-6
    )


def test_a_lens_without_a_mid_readout_gets_an_error_naming_the_fix(tiny_llama):
    tuned = TunedLens.for_model(tiny_llama)
    assert lens_sites(tuned) == ("resid_pre",) and lens_sites(LogitLens()) == (
        "resid_pre",
        "resid_mid",
    )
    with pytest.raises(
        ValueError, match=r"no readout for resid_mid.*lens='logit'.*sites='pre'.*transform_site"
    ):
        prediction_trajectory(tiny_llama, "abc", lens=tuned, sites="pre+mid")
    prediction_trajectory(tiny_llama, "abc", lens=tuned, sites="pre")  # block inputs still work

    class ListsMidWithoutMethod(LogitLens):
        readable_sites = ("resid_pre", "resid_mid")
        transform_site = None

    with pytest.raises(ValueError, match="no readout for resid_mid"):
        check_lens_sites(ListsMidWithoutMethod(), ["resid_mid"])
    with pytest.raises(ValueError, match="sites must be one of"):
        prediction_trajectory(tiny_llama, "abc", sites="post")


def test_cache_input_reads_mid_rows(tiny_gpt2):
    toks = to_tokens(tiny_gpt2, "from a cache")
    n = tiny_gpt2.cfg.n_layers
    names = (
        [f"blocks.{i}.hook_resid_pre" for i in range(n)]
        + [f"blocks.{i}.hook_resid_mid" for i in range(n)]
        + [f"blocks.{n - 1}.hook_resid_post"]
    )
    logits, cache = tiny_gpt2.run_with_cache(toks, names_filter=names)
    from_cache = prediction_trajectory(cache, toks, logits=logits, sites="pre+mid")
    from_model = prediction_trajectory(tiny_gpt2, toks, sites="pre+mid")
    torch.testing.assert_close(from_cache.kl, from_model.kl, atol=1e-5, rtol=1e-4)
