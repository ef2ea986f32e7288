"""Tracked target tokens and target_trajectories against brute force (full log-softmax over the
vocabulary)."""

import pytest
import torch

import tlmicroscope.lenses.trajectory as trajectory_module
from tlmicroscope.inputs import to_tokens
from tlmicroscope.lenses import TunedLens, prediction_trajectory, target_trajectories

pytestmark = pytest.mark.models


def _log_probs(model, toks, *, final_norm=True):
    """[layer batch pos d_vocab] log-probabilities of the logit lens at h^0..h^L, the obvious
    way."""
    n = model.cfg.n_layers
    names = [f"blocks.{i}.hook_resid_pre" for i in range(n)] + [f"blocks.{n - 1}.hook_resid_post"]
    with torch.no_grad():
        _, cache = model.run_with_cache(toks, names_filter=names)
        out = []
        for i, name in enumerate(names):
            h = cache[name]
            z = (
                model.unembed(model.ln_final(h))
                if (final_norm or i == n)
                else h @ model.W_U + model.b_U
            )
            out.append(torch.log_softmax(z.double(), -1))
    return torch.stack(out)


def _brute(lp, groups):
    """prob, logprob, rank [layer batch pos target] for groups = [[ids of target 0], ...]
    (shared)."""
    probs, ranks = [], []
    for ids in groups:
        probs.append(lp[..., ids].exp().sum(-1))
        best = lp[..., ids].max(-1).values
        ranks.append((lp > best.unsqueeze(-1)).sum(-1))
    prob = torch.stack(probs, -1)
    return prob, prob.log(), torch.stack(ranks, -1)


def _ids(model, text):
    return int(model.to_tokens(text, prepend_bos=False)[0, 0])


@pytest.mark.parametrize("col_block", [64, 4096])
def test_tracked_targets_equal_brute_force(tiny, col_block, monkeypatch):
    monkeypatch.setattr(trajectory_module, "_COL_BLOCK", col_block)  # 64: several vocab blocks
    g = torch.Generator().manual_seed(2)
    toks = torch.randint(0, tiny.cfg.d_vocab, (2, 11), generator=g)
    targets = ["a", 7, {"b", 200, "c"}]
    traj = prediction_trajectory(tiny, toks, targets=targets, chunk_size=5)
    lp = _log_probs(tiny, toks)
    prob, logprob, rank = _brute(
        lp, [[_ids(tiny, "a")], [7], [_ids(tiny, "b"), 200, _ids(tiny, "c")]]
    )
    torch.testing.assert_close(traj.tracked_prob.double(), prob, atol=2e-6, rtol=1e-4)
    torch.testing.assert_close(traj.tracked_logprob.double(), logprob, atol=2e-5, rtol=1e-4)
    assert torch.equal(traj.tracked_rank, rank)
    assert traj.tracked_names[0] == "'a'" and traj.tracked_names[2].count(" | ") == 2
    assert traj.tracked_ids.shape == (1, 3, 3) and int(traj.tracked_ids[0, 0, 1]) == -1


def test_per_row_targets_equal_brute_force(tiny_llama):
    toks = torch.randint(
        0, tiny_llama.cfg.d_vocab, (2, 9), generator=torch.Generator().manual_seed(3)
    )
    traj = prediction_trajectory(
        tiny_llama,
        toks,
        targets=[["a", {"x", "y"}], [5, "q"]],
        per_row=True,
        target_names=["first", "second"],
    )
    lp = _log_probs(tiny_llama, toks)
    for row, groups in enumerate(
        [
            [[_ids(tiny_llama, "a")], [_ids(tiny_llama, "x"), _ids(tiny_llama, "y")]],
            [[5], [_ids(tiny_llama, "q")]],
        ]
    ):
        prob, _, rank = _brute(lp[:, row : row + 1], groups)
        torch.testing.assert_close(
            traj.tracked_prob[:, row : row + 1].double(), prob, atol=2e-6, rtol=1e-4
        )
        assert torch.equal(traj.tracked_rank[:, row : row + 1], rank)
    assert traj.tracked_names == ("first", "second")
    assert traj.tracked_read[1][1] == "'q'" and len(traj.tracked_read) == 2


def test_multi_token_string_is_read_at_its_first_token_with_a_warning(tiny_gpt2):
    toks = to_tokens(tiny_gpt2, "Which token?")
    with pytest.warns(UserWarning, match="reading its first token 'P'"):
        multi = prediction_trajectory(tiny_gpt2, toks, targets="Paris")
    single = prediction_trajectory(tiny_gpt2, toks, targets="P")
    assert torch.equal(multi.tracked_prob, single.tracked_prob)
    assert multi.tracked_read == [["'P'"]]
    assert "'Paris' is 5 tokens" in multi.tracked_notes[0]
    assert multi.provenance.settings["tracked_notes"] == list(multi.tracked_notes)


def test_bad_targets_name_the_fix(tiny_llama):
    V = tiny_llama.cfg.d_vocab
    with pytest.raises(ValueError, match="targets is empty"):
        prediction_trajectory(tiny_llama, "abc", targets=[])
    with pytest.raises(ValueError, match="target set is empty"):
        prediction_trajectory(tiny_llama, "abc", targets=[set()])
    with pytest.raises(ValueError, match=f"not in the vocabulary: ids run 0..{V - 1}"):
        prediction_trajectory(tiny_llama, "abc", targets=[V])
    with pytest.raises(ValueError, match="not in the vocabulary: ids run"):
        prediction_trajectory(tiny_llama, "abc", targets=-1)
    with pytest.raises(ValueError, match="target string is empty"):
        prediction_trajectory(tiny_llama, "abc", targets="")
    with pytest.raises(ValueError, match="one entry per row: got 2 for 1 rows"):
        prediction_trajectory(tiny_llama, "abc", targets=["a", "b"], per_row=True)
    with pytest.raises(ValueError, match="2 names for 1 targets"):
        prediction_trajectory(tiny_llama, "abc", targets="a", target_names=["x", "y"])
    with pytest.raises(TypeError, match="A target must be"):
        prediction_trajectory(tiny_llama, "abc", targets=[1.5])


def test_target_trajectories_padding_changes_nothing_and_matches_brute_force(tiny):
    prompts = ["a", "the longest prompt of all", "mid size", "xy", "another one here", "q"]
    targets = ["e", {"s", "t"}]
    batched = target_trajectories(
        tiny, prompts, targets=targets, batch_size=4, positions=[-1, 0], progress=False, n_boot=200
    )
    alone = target_trajectories(
        tiny, prompts, targets=targets, batch_size=1, positions=[-1, 0], progress=False, n_boot=200
    )
    torch.testing.assert_close(batched.prob, alone.prob, atol=1e-6, rtol=1e-5)
    assert torch.equal(batched.rank, alone.rank)
    groups = [[_ids(tiny, "e")], [_ids(tiny, "s"), _ids(tiny, "t")]]
    for i, prompt in enumerate(prompts):
        toks = to_tokens(tiny, prompt)
        lp = _log_probs(tiny, toks)
        prob, logprob, rank = _brute(lp, groups)  # [layer 1 pos target]
        n = toks.shape[1]
        for j, p in enumerate((n - 1, 0)):
            assert int(batched.positions[i, j]) == p
            torch.testing.assert_close(
                batched.prob[0, :, i, j].double(), prob[:, 0, p], atol=2e-6, rtol=1e-4
            )
            torch.testing.assert_close(
                batched.logprob[0, :, i, j].double(), logprob[:, 0, p], atol=2e-5, rtol=1e-4
            )
            assert torch.equal(batched.rank[0, :, i, j], rank[:, 0, p])
        assert batched.read_tokens[i][0] == tiny.to_str_tokens(toks[0])[-1]
    assert batched.provenance.settings["readout_identity_checked"] is True
    # Later batches end their forward pass from a hook: no hook may stay attached.
    assert not [name for name, hp in tiny.hook_dict.items() if hp.fwd_hooks]


def test_bootstrap_band_is_a_band_around_the_mean_over_prompts(tiny_llama):
    prompts = [f"prompt number {i} " * (1 + i % 3) for i in range(24)]
    tt = target_trajectories(
        tiny_llama, prompts, targets=["a", 9], progress=False, n_boot=2000, seed=1
    )
    mean, low, high = tt.band("prob")
    torch.testing.assert_close(mean, tt.prob.mean((2, 3)), atol=1e-6, rtol=1e-5)
    assert bool((low <= mean + 1e-7).all() and (mean <= high + 1e-7).all())
    # The percentile band of a mean is about mean +- 1.96 standard errors (normal approximation).
    se = tt.prob[..., 0, :].std(2, unbiased=False) / len(prompts) ** 0.5
    width = high - low
    ratio = width[se > 1e-6] / (2 * 1.96 * se[se > 1e-6])
    assert bool(((ratio > 0.75) & (ratio < 1.25)).all()), ratio
    df = tt.to_dataframe()
    assert len(df) == len(tt.layers) * 2 and {"prob_low", "rank_high"} <= set(df.columns)


def test_per_prompt_targets_and_several_lenses(tiny_gpt2):
    prompts = ["one", "two two", "three"]
    tt = target_trajectories(
        tiny_gpt2,
        prompts,
        targets=["e", "o", {"e", "x"}],
        per_prompt=True,
        lens=[None, "logit-paper"],
        progress=False,
        n_boot=50,
    )
    assert tt.lens_names == ("logit", "logit (paper: no final norm)") and tt.target_names == (
        "target",
    )
    for i, prompt in enumerate(prompts):
        ref = prediction_trajectory(
            tiny_gpt2, prompt, lens="logit-paper", targets=[["e", "o", {"e", "x"}][i]]
        )
        torch.testing.assert_close(
            tt.prob[1, :, i, 0, 0], ref.tracked_prob[:, 0, -1, 0], atol=1e-6, rtol=1e-5
        )
        torch.testing.assert_close(
            tt.logprob[1, :, i, 0, 0], ref.tracked_logprob[:, 0, -1, 0], atol=1e-5, rtol=1e-5
        )
        assert torch.equal(tt.rank[1, :, i, 0, 0], ref.tracked_rank[:, 0, -1, 0])


def test_target_trajectories_bad_input(tiny_llama):
    with pytest.raises(ValueError, match="prompts is empty"):
        target_trajectories(tiny_llama, [], targets="a", progress=False)
    with pytest.raises(ValueError, match="targets is empty"):
        target_trajectories(tiny_llama, ["abc"], targets=[], progress=False)
    with pytest.raises(ValueError, match="Position 5 is outside prompt 1, which has 2 tokens"):
        target_trajectories(tiny_llama, ["abcdefg", "ab"], targets="a", positions=5, progress=False)
    with pytest.raises(ValueError, match="one entry per row: got 1 for 2 rows"):
        target_trajectories(
            tiny_llama, ["abc", "de"], targets=["a"], per_prompt=True, progress=False
        )
    with pytest.raises(ValueError, match="no readout for resid_mid.*lens='logit'"):
        target_trajectories(
            tiny_llama,
            ["abc"],
            targets="a",
            lens=TunedLens.for_model(tiny_llama),
            sites="pre+mid",
            progress=False,
        )


@pytest.mark.parametrize("softcap", [None, 3.0])
@pytest.mark.parametrize("lean", [False, True])
def test_kernel_extras_equal_brute_force_with_and_without_a_soft_cap(softcap, lean):
    """The readout kernel's normaliser, target logits and grouped ranks against the full logits."""
    from tlmicroscope.lenses import _readout_stats

    g = torch.Generator().manual_seed(5)
    R, d, V, n_per = 12, 16, 300, 3
    x = torch.randn(R, d, generator=g)
    WT = torch.randn(V, d, generator=g)
    b = torch.randn(V, generator=g)
    finish = None if softcap is None else (lambda z: z.div_(softcap).tanh_().mul_(softcap))
    extra = torch.randint(0, V, (R, 4), generator=g)  # two groups of two members
    extra[:, 3] = extra[:, 2]  # a padded group: its member repeated
    p_f = torch.softmax(torch.randn(R // n_per, V, generator=g), -1)
    p_sums = torch.stack([p_f[:, lo : lo + 64].sum(-1) for lo in range(0, V, 64)], 1)
    tgt = torch.randint(0, V, (R,), generator=g)
    st = _readout_stats.blocked_stats(
        x, WT, b, finish, tgt, p_f, p_sums, n_per, 2, col=64, extra=extra, extra_group=2, lean=lean
    )
    z = x @ WT.T + b
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    torch.testing.assert_close(st.lse, torch.logsumexp(z, -1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(st.extra_z, z.gather(1, extra), atol=1e-5, rtol=1e-5)
    best = z.gather(1, extra).view(R, 2, 2).amax(-1)
    assert torch.equal(st.extra_rank, (z.unsqueeze(1) > best.unsqueeze(-1)).sum(-1))
    if lean:
        assert torch.isnan(st.entropy).all() and bool((st.top_i == -1).all())
    else:
        lp = torch.log_softmax(z, -1)
        torch.testing.assert_close(st.entropy, -(lp.exp() * lp).sum(-1), atol=1e-5, rtol=1e-4)
