"""Causal basis extraction: the objective against brute force, the optimum, bad input, files."""

from __future__ import annotations

import warnings

import pytest
import torch

from tlmicroscope.causal import (
    CausalBasis,
    CBEConvergenceError,
    CBEConvergenceWarning,
    ablate_rows,
    derangement,
    extract_causal_basis,
)
from tlmicroscope.causal._lens_ablation import LensAblationObjective
from tlmicroscope.causal.basis import _init_directions
from tlmicroscope.lenses import LogitLens, Readout

pytestmark = pytest.mark.filterwarnings("ignore:CBE on only")


class AffineLens:
    """A tuned-lens-shaped lens (h + h Wᵀ + b) with random translators, independent of the
    library."""

    name = "affine-test"
    final_norm = True

    def __init__(self, n_layers: int, d: int, seed: int = 3, scale: float = 0.2):
        g = torch.Generator().manual_seed(seed)
        self.W = scale * torch.randn(n_layers, d, d, generator=g)
        self.b = scale * torch.randn(n_layers, d, generator=g)

    def transform(self, h, layer):
        return h + h @ self.W[layer].T + self.b[layer]

    def check_model(self, model):
        return None


class CurvedLens(AffineLens):
    name = "curved-test"

    def transform(self, h, layer):
        return h + torch.tanh(h @ self.W[layer].T) + self.b[layer]


class FirstLayerOnlyLens(AffineLens):
    name = "first-layer-only"

    def transform(self, h, layer):
        if layer != 0:
            raise IndexError(f"no translator {layer}")
        return h


def _tokens(batch=4, pos=16, seed=0):
    return torch.randint(0, 256, (batch, pos), generator=torch.Generator().manual_seed(seed))


def _resid(model, toks, layer):
    name = f"blocks.{layer}.hook_resid_pre"
    _, cache = model.run_with_cache(toks, names_filter=[name])
    return cache[name].reshape(-1, model.cfg.d_model).detach()


def _brute_energy(readout, lens, layer, h, v, mode, donors=None):
    """E_x KL(q(h) || q(ablate(h, v))) by the textbook formula, float64."""
    h2 = ablate_rows(
        h.double(),
        v.double()[:, None],
        mode,
        mean=h.double().mean(0),
        donors=None if donors is None else h.double()[donors],
    )
    lp = torch.log_softmax(
        readout(lens.transform(h, layer), final_norm=lens.final_norm).double(), -1
    )
    lq = torch.log_softmax(
        readout(lens.transform(h2.float(), layer), final_norm=lens.final_norm).double(), -1
    )
    return (lp.exp() * (lp - lq)).sum(-1).mean()


@pytest.mark.models
@pytest.mark.parametrize("mode", ["mean", "zero", "resample"])
def test_objective_and_gradient_match_brute_force(tiny, mode):
    h = _resid(tiny, _tokens(), 2)
    readout = Readout(tiny)
    donors = derangement(h.shape[0], seed=1) if mode == "resample" else None
    for lens in (LogitLens(), LogitLens.paper(), AffineLens(3, 32), CurvedLens(3, 32)):
        # chunk=7 cuts the 64 rows into uneven work blocks, as a large vocabulary does.
        obj = LensAblationObjective(readout, lens, 2, h, mode, donors=donors, chunk=7)
        assert obj.affine == (not isinstance(lens, CurvedLens))
        v = torch.randn(32, generator=torch.Generator().manual_seed(5))
        v = (v / v.norm()).requires_grad_(True)
        energy = obj.energy(v)
        energy.backward()
        v2 = v.detach().clone().requires_grad_(True)
        brute = _brute_energy(readout, lens, 2, h, v2, mode, donors)
        brute.backward()
        assert energy.item() == pytest.approx(brute.item(), rel=2e-4, abs=1e-7)
        torch.testing.assert_close(
            v.grad.double(), v2.grad.double(), rtol=2e-3, atol=1e-6 * float(v2.grad.abs().max())
        )


@pytest.mark.models
def test_first_direction_beats_random_directions_and_basis_is_orthonormal(tiny):
    toks = _tokens(8, 24)
    basis = extract_causal_basis(tiny, lens="logit", corpus=toks, layer=1, k=4, progress=False)
    V = basis.vectors.double()
    torch.testing.assert_close(V.T @ V, torch.eye(4, dtype=torch.float64), atol=1e-5, rtol=0)
    assert (basis.energies[:-1] >= basis.energies[1:]).all()
    assert basis.converged.all() and (basis.n_evals > 0).all()
    h = _resid(tiny, toks, 1)
    readout = Readout(tiny)
    lens = LogitLens()
    for j in range(4):  # the stored energies are the brute-force energies of the stored vectors
        assert float(basis.energies[j]) == pytest.approx(
            _brute_energy(readout, lens, 1, h, basis.vectors[:, j], "mean").item(), rel=1e-3
        )
    g = torch.Generator().manual_seed(11)
    randoms = torch.randn(40, 32, generator=g)
    random_energies = [
        _brute_energy(readout, lens, 1, h, r / r.norm(), "mean").item() for r in randoms
    ]
    assert float(basis.energies[0]) >= max(random_energies)
    # Mean ablation is a local change along v: its energy also beats the singular-vector start.
    init = _init_directions(readout, None, 1)[:, 0]
    assert (
        float(basis.energies[0]) >= _brute_energy(readout, lens, 1, h, init, "mean").item() - 1e-7
    )


@pytest.mark.models
def test_cbe_with_an_affine_lens_and_its_composed_initialisation(tiny_llama):
    lens = AffineLens(3, 32, scale=0.1)
    readout = Readout(tiny_llama)
    M = lens.transform(torch.eye(32), 1) - lens.transform(torch.zeros(1, 32), 1)  # = (I + W_1)ᵀ
    init = _init_directions(readout, M, 3)
    # Independent: left singular vectors of (I + W_1ᵀ) W_U from a full SVD of the d×V matrix.
    A = torch.eye(32, dtype=torch.float64) + lens.W[1].double()
    U, _, _ = torch.linalg.svd(A.T @ readout.W_raw.double(), full_matrices=False)
    for j in range(3):
        assert abs(float(init[:, j].double() @ U[:, j])) == pytest.approx(1.0, abs=1e-5)
    basis = extract_causal_basis(
        tiny_llama, lens=lens, corpus=_tokens(), layer=1, k=3, progress=False
    )
    assert basis.lens == "affine-test" and basis.vectors.shape == (32, 3)


@pytest.mark.models
def test_cbe_with_the_tuned_lens_class(tiny_llama):
    """The reference crashes here (it applies the d×d translator to the d×V unembedding)."""
    from tlmicroscope.lenses.tuned import TunedLens

    lens = TunedLens.for_model(tiny_llama)
    with torch.no_grad():
        g = torch.Generator().manual_seed(2)
        lens.weight.copy_(0.1 * torch.randn(lens.weight.shape, generator=g))
        lens.bias.copy_(0.1 * torch.randn(lens.bias.shape, generator=g))
    basis = extract_causal_basis(
        tiny_llama, lens=lens, corpus=_tokens(), layer=2, k=2, progress=False
    )
    assert basis.lens == "tuned" and basis.converged.all()
    assert all(p.grad is None for p in lens.parameters())  # the lens is only read


@pytest.mark.models
def test_sources_agree_tokens_cache_and_hidden_states(tiny_llama):
    toks = _tokens(2, 12)
    kw = dict(layer=1, k=1, progress=False)
    from_tokens = extract_causal_basis(tiny_llama, lens="logit", corpus=toks, **kw)
    _, cache = tiny_llama.run_with_cache(toks, names_filter=["blocks.1.hook_resid_pre"])
    from_cache = extract_causal_basis(tiny_llama, lens="logit", corpus=cache, **kw)
    from_hidden = extract_causal_basis(
        tiny_llama, lens="logit", corpus=cache["blocks.1.hook_resid_pre"], **kw
    )
    for other in (from_cache, from_hidden):
        torch.testing.assert_close(other.energies, from_tokens.energies)
    texts = ["The quick brown fox jumps over the lazy dog. " * 8]
    from_corpus = extract_causal_basis(
        tiny_llama, lens="logit", corpus=texts, n_tokens=128, seq_len=64, **kw
    )
    assert from_corpus.n_tokens == 128


@pytest.mark.models
def test_bad_input_is_refused(tiny_llama):
    toks = _tokens(2, 8)
    with pytest.raises(ValueError, match="k must be an integer in 1..d_model=32"):
        extract_causal_basis(tiny_llama, lens="logit", corpus=toks, layer=1, k=33)
    with pytest.raises(ValueError, match="k must be"):
        extract_causal_basis(tiny_llama, lens="logit", corpus=toks, layer=1, k=0)
    with pytest.raises(ValueError, match="no lens translator"):
        extract_causal_basis(tiny_llama, lens="logit", corpus=toks, layer=3, k=1)
    with pytest.raises(ValueError, match="out of range"):
        extract_causal_basis(tiny_llama, lens="logit", corpus=toks, layer=7, k=1)
    with pytest.raises(ValueError, match="has no translator for layer 2"):
        extract_causal_basis(tiny_llama, lens=FirstLayerOnlyLens(3, 32), corpus=toks, layer=2, k=1)
    with pytest.raises(ValueError, match="width 16"):
        extract_causal_basis(tiny_llama, lens="logit", corpus=torch.randn(50, 16), layer=1, k=1)
    with pytest.raises(ValueError, match="at least 2 hidden-state rows"):
        extract_causal_basis(tiny_llama, lens="logit", corpus="a", layer=1, k=1)
    with pytest.raises(ValueError, match="at least 2"):
        extract_causal_basis(tiny_llama, lens="logit", corpus=[""], layer=1, k=1, mode="resample")
    with pytest.raises(ValueError, match="NaN"):
        extract_causal_basis(
            tiny_llama, lens="logit", corpus=torch.full((8, 32), float("nan")), layer=1, k=1
        )
    with pytest.raises(ValueError, match="mode"):
        extract_causal_basis(tiny_llama, lens="logit", corpus=toks, layer=1, k=1, mode="median")


@pytest.mark.models
def test_non_convergence_is_reported(tiny_llama):
    toks = _tokens(2, 16)
    with pytest.warns(CBEConvergenceWarning, match="without the relative energy change"):
        basis = extract_causal_basis(
            tiny_llama,
            lens="logit",
            corpus=toks,
            layer=1,
            k=2,
            max_iter=2,
            tol=1e-12,
            progress=False,
        )
    assert not basis.converged.any() and (basis.n_evals <= 4).all()
    with pytest.raises(CBEConvergenceError):
        extract_causal_basis(
            tiny_llama,
            lens="logit",
            corpus=toks,
            layer=1,
            k=1,
            max_iter=2,
            tol=1e-12,
            progress=False,
            on_nonconvergence="raise",
        )
    with warnings.catch_warnings():
        warnings.simplefilter("error", CBEConvergenceWarning)
        extract_causal_basis(
            tiny_llama,
            lens="logit",
            corpus=toks,
            layer=1,
            k=1,
            max_iter=2,
            tol=1e-12,
            progress=False,
            on_nonconvergence="ignore",
        )


@pytest.mark.models
def test_save_load_roundtrip_and_refusal_for_another_model(tiny_llama, tiny_gpt2, tmp_path):
    from tlmicroscope.io import FittedFileError, ModelMismatchError

    basis = extract_causal_basis(
        tiny_llama, lens="logit", corpus=_tokens(), layer=1, k=2, progress=False
    )
    basis.save(tmp_path / "b")
    back = CausalBasis.load(tmp_path / "b", tiny_llama)
    for f in ("energies", "vectors", "mean", "converged", "n_evals"):
        assert torch.equal(getattr(back, f), getattr(basis, f))
    assert (back.layer, back.mode, back.lens, back.n_tokens) == (1, "mean", "logit", basis.n_tokens)
    assert back.provenance.settings["k"] == 2
    with pytest.raises(ModelMismatchError, match="unembed"):
        CausalBasis.load(tmp_path / "b", tiny_gpt2)
    (tmp_path / "b" / "tensors.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(FittedFileError, match="corrupt"):
        CausalBasis.load(tmp_path / "b")
    # Its hooks ablate at its own layer with its own mean, and refuse a model of another width.
    hooks = basis.ablation_hooks()
    assert hooks[0][0] == "blocks.1.hook_resid_pre"
    wide = torch.zeros(1, 3, 64)
    with pytest.raises(ValueError, match="width 64"):
        hooks[0][1](wide, None)
