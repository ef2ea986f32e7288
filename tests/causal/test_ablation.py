"""Subspace ablation: formulas against dense projections, hooks on models, composition with
patching."""

from __future__ import annotations

import pytest
import torch

from tlmicroscope.causal.ablation import (
    ablate_rows,
    ablate_subspace,
    as_orthonormal_basis,
    derangement,
    subspace_ablation_hooks,
)


def _orthonormal(d: int, k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(d, k, generator=g, dtype=torch.float64)).Q


def _dense_projection(A: torch.Tensor) -> torch.Tensor:
    """P onto col(A) from the normal equations, A (AᵀA)⁻¹ Aᵀ: valid for any independent columns."""
    A = A.double()
    return A @ torch.linalg.solve(A.T @ A, A.T)


@pytest.mark.parametrize("mode", ["zero", "mean", "resample"])
def test_ablation_matches_dense_matrix_formula(mode):
    g = torch.Generator().manual_seed(1)
    u = torch.randn(3, 5, 16, generator=g, dtype=torch.float64)
    B = _orthonormal(16, 4)
    P = _dense_projection(B)
    mu = torch.randn(16, generator=g, dtype=torch.float64)
    donors = torch.randn(3, 5, 16, generator=g, dtype=torch.float64)
    target = {"zero": torch.zeros_like(u), "mean": mu.expand_as(u), "resample": donors}[mode]
    expected = u + torch.einsum("ij,...j->...i", P, target - u)
    got = ablate_rows(u, B, mode, mean=mu, donors=donors)
    torch.testing.assert_close(got, expected)
    # Independent properties: the subspace coordinates become the target's, the rest is untouched.
    torch.testing.assert_close(got @ B, target @ B)
    I_minus_P = torch.eye(16, dtype=torch.float64) - P
    torch.testing.assert_close(got @ I_minus_P, u @ I_minus_P)


def test_non_orthonormal_basis_is_orthonormalised_to_the_same_projection():
    g = torch.Generator().manual_seed(2)
    A = torch.randn(12, 3, generator=g, dtype=torch.float64)
    B = as_orthonormal_basis(A)
    torch.testing.assert_close(B.T @ B, torch.eye(3, dtype=torch.float64))
    torch.testing.assert_close(B @ B.T, _dense_projection(A))
    u = torch.randn(7, 12, generator=g, dtype=torch.float64)
    torch.testing.assert_close(ablate_rows(u, B, "zero"), u - u @ _dense_projection(A))


def test_bad_bases_are_refused():
    with pytest.raises(ValueError, match="linearly dependent"):
        as_orthonormal_basis(torch.tensor([[1.0, 2.0], [1.0, 2.0], [0.0, 0.0]]))
    with pytest.raises(ValueError, match="d_model is 32"):
        as_orthonormal_basis(torch.randn(16, 2), d_model=32)
    with pytest.raises(ValueError, match="NaN"):
        as_orthonormal_basis(torch.tensor([[float("nan")], [1.0]]))
    with pytest.raises(ValueError, match="zero"):
        as_orthonormal_basis(torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
    with pytest.raises(ValueError, match="at most 2"):
        as_orthonormal_basis(torch.randn(2, 3))
    with pytest.raises(ValueError, match="not orthonormal"):
        as_orthonormal_basis(torch.tensor([[1.0, 1.0], [0.0, 1.0]]), orthonormalize=False)
    with pytest.raises(ValueError, match="mode"):
        subspace_ablation_hooks("blocks.0.hook_resid_pre", torch.ones(4), mode="median")


def test_derangement_has_no_fixed_point_and_is_seeded():
    for n in (2, 3, 10, 57):
        p = derangement(n, seed=5)
        assert sorted(p.tolist()) == list(range(n))
        assert not (p == torch.arange(n)).any()
        assert torch.equal(p, derangement(n, seed=5))
    with pytest.raises(ValueError, match="at least 2"):
        derangement(1)


def _clean_resid(model, toks, layer):
    _, cache = model.run_with_cache(toks, names_filter=[f"blocks.{layer}.hook_resid_pre"])
    return cache[f"blocks.{layer}.hook_resid_pre"]


def _replace_hook(name, value):
    return (name, lambda act, hook: value.to(act.dtype))


@pytest.mark.models
@pytest.mark.parametrize("mode", ["zero", "mean", "resample"])
def test_hook_on_model_equals_ablating_by_hand(tiny, mode):
    toks = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(0))
    name = "blocks.1.hook_resid_pre"
    d = tiny.cfg.d_model
    B = _orthonormal(d, 3).float()
    mu = torch.randn(d, generator=torch.Generator().manual_seed(4))
    h = _clean_resid(tiny, toks, 1).double()
    P = _dense_projection(B)
    flat = h.reshape(-1, d)
    target = {
        "zero": torch.zeros_like(h),
        "mean": mu.double().expand_as(h),
        "resample": flat[derangement(flat.shape[0], seed=3)].reshape(h.shape),
    }[mode]
    by_hand = (h + (target - h) @ P).float()
    expected = tiny.run_with_hooks(toks, fwd_hooks=[_replace_hook(name, by_hand)])
    hooks = subspace_ablation_hooks(name, B, mode, mean=mu, seed=3)
    got = tiny.run_with_hooks(toks, fwd_hooks=hooks)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    with tiny.hooks(fwd_hooks=hooks):
        torch.testing.assert_close(tiny(toks), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.models
def test_positions_limit_the_ablation_and_default_mean_is_the_batch_mean(tiny_llama):
    toks = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(1))
    name = "blocks.2.hook_resid_pre"
    B = _orthonormal(tiny_llama.cfg.d_model, 2).float()
    seen = {}
    spy = (name, lambda act, hook: seen.__setitem__("act", act.detach().clone()))
    clean = _clean_resid(tiny_llama, toks, 2)
    tiny_llama.run_with_hooks(
        toks, fwd_hooks=subspace_ablation_hooks(name, B, "mean", positions=[1, -1]) + [spy]
    )
    act = seen["act"]
    untouched = [0, 2, 3, 4, 5, 6]
    torch.testing.assert_close(act[:, untouched], clean[:, untouched])
    mu = clean.reshape(-1, clean.shape[-1]).mean(
        0
    )  # every row of the activation, not just the ablated ones
    torch.testing.assert_close(act[:, [1, 7]] @ B, (mu @ B).expand(2, 2, 2), atol=1e-5, rtol=1e-5)


@pytest.mark.models
def test_ablation_hooks_compose_with_transformer_lens_patching(tiny_gpt2):
    from transformer_lens import patching

    model = tiny_gpt2
    g = torch.Generator().manual_seed(7)
    clean = torch.randint(0, 256, (1, 6), generator=g)
    corrupted = torch.randint(0, 256, (1, 6), generator=g)
    _, clean_cache = model.run_with_cache(clean)
    answer = int(clean[0, -1])

    def metric(logits):
        return logits[0, -1, answer] - logits[0, -1].mean()

    B = _orthonormal(model.cfg.d_model, 4, seed=9).float()
    mu = torch.randn(model.cfg.d_model, generator=g)
    # One ablation downstream of some patches, one at the very hook being patched.
    ablations = subspace_ablation_hooks(
        "blocks.1.hook_resid_post", B, "mean", mean=mu
    ) + subspace_ablation_hooks("blocks.1.hook_resid_pre", B, "zero")
    with model.hooks(fwd_hooks=ablations):
        patched = patching.get_act_patch_resid_pre(model, corrupted, clean_cache, metric)
    n_layers, n_pos = model.cfg.n_layers, corrupted.shape[1]
    assert tuple(patched.shape) == (n_layers, n_pos)
    by_hand = torch.empty(n_layers, n_pos)
    for layer in range(n_layers):
        name = f"blocks.{layer}.hook_resid_pre"
        for pos in range(n_pos):

            def patch(act, hook, pos=pos, name=name):
                act = act.clone()
                act[:, pos] = clean_cache[name][:, pos]
                return act

            # Context hooks run before the hooks of the call itself, as in patching's
            # run_with_hooks.
            logits = model.run_with_hooks(corrupted, fwd_hooks=ablations + [(name, patch)])
            by_hand[layer, pos] = metric(logits)
    torch.testing.assert_close(patched.float(), by_hand, atol=1e-4, rtol=1e-4)
    plain = patching.get_act_patch_resid_pre(model, corrupted, clean_cache, metric)
    assert not torch.allclose(plain.float(), by_hand, atol=1e-3)  # the ablation did matter
    assert torch.allclose(
        model(corrupted), model.run_with_hooks(corrupted, fwd_hooks=[])
    )  # nothing left


@pytest.mark.models
def test_context_manager_removes_hooks_after_an_exception_and_checks_up_front(tiny_llama):
    model = tiny_llama
    toks = torch.randint(0, 256, (1, 5), generator=torch.Generator().manual_seed(3))
    clean = model(toks)
    B = _orthonormal(model.cfg.d_model, 2).float()
    with (
        pytest.raises(RuntimeError, match="boom"),
        ablate_subspace(model, "blocks.0.hook_resid_post", B, mode="zero"),
    ):
        assert not torch.allclose(model(toks), clean)
        raise RuntimeError("boom")
    torch.testing.assert_close(model(toks), clean)
    with (
        pytest.raises(ValueError, match="d_model is 32"),
        ablate_subspace(model, "blocks.0.hook_resid_post", torch.randn(16, 2)),
    ):
        pass
    with (
        pytest.raises(ValueError, match="no hook point"),
        ablate_subspace(model, "blocks.0.hook_nonsense", B),
    ):
        pass
    # A width mismatch at a non-residual site is caught when the hook runs, and the hook is removed.
    with (
        pytest.raises(ValueError, match="width"),
        ablate_subspace(model, "blocks.0.attn.hook_z", B),
    ):
        model(toks)
    torch.testing.assert_close(model(toks), clean)
    with pytest.raises(ValueError, match="only one"):
        model.run_with_hooks(
            toks[:, :1], fwd_hooks=subspace_ablation_hooks("blocks.0.hook_resid_pre", B, "mean")
        )
