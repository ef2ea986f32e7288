"""The architecture matrix: every public analysis and every report section on each model family.

One tiny seeded random model per family (``tlmicroscope.models.families``), built from
transformers' config classes and booted as the model class ``TLMICROSCOPE_TEST_KIND`` asks for,
is shared by all tests of the family. Each analysis runs with small settings on ~16 tokens and
is checked against something that could fail: an identity (the logit lens's last layer is the
model's output, residual pieces sum to ``resid_post``), a brute-force recomputation, or a valid
range. An analysis a family cannot support must refuse with a message that says why; those
refusals are listed in ``REFUSALS`` and asserted. ``benchmarks/architecture_matrix.py`` runs this
file on every TransformerLens line and writes the README's table from the results.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

from tlmicroscope.models.families import FAMILIES

pytestmark = [pytest.mark.models, pytest.mark.matrix]

KIND = os.environ.get("TLMICROSCOPE_TEST_KIND", "auto")
# TLMICROSCOPE_TEST_DEVICE=cuda runs the whole matrix with each model on the GPU (every analysis
# must accept a CUDA model and keep its tensors there); it skips where no GPU is present.
DEVICE = os.environ.get("TLMICROSCOPE_TEST_DEVICE", "cpu")
if DEVICE.startswith("cuda") and not torch.cuda.is_available():
    pytest.skip(
        "TLMICROSCOPE_TEST_DEVICE=cuda but no CUDA device is present", allow_module_level=True
    )
TEXT = "The cat sat on a"  # 16 byte tokens
CORPUS = [
    "A lens reads what each layer of a language model would predict, layer after layer. " * 4,
    "Residual streams carry information from one block to the next in every transformer. " * 4,
    "Python's documentation explains modules, functions, classes and the standard library. " * 4,
]


@pytest.fixture(scope="module", autouse=True)
def _single_threaded_blas():
    """One BLAS/OpenMP thread for scikit-learn and numpy too (10x faster on tiny problems on two
    busy cores); restored for the modules that follow."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1):
        yield


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run 5-20x faster on one thread than on two busy cores (OpenMP waits).

    The conftest sets the thread count again before every test, so this needs no teardown;
    the module-scoped fixtures below set it themselves, as they are built before this runs.
    """
    torch.set_num_threads(1)


def _family_param(name: str):
    return pytest.param(name, id=name, marks=pytest.mark.xdist_group(f"matrix-{name}"))


FAMILY_PARAMS = [_family_param(f) for f in FAMILIES]


@pytest.fixture(scope="module", params=FAMILY_PARAMS)
def fam(request):
    """The family's model, its tokens for TEXT, and one cache of the standard hooks."""
    from tlmicroscope.models import tiny_model
    from tlmicroscope.models.access import resolve_kind

    torch.set_num_threads(1)
    name = request.param
    kind = resolve_kind(KIND)
    family = FAMILIES[name]
    if kind == "hooked" and not family.hooked:
        pytest.skip(f"{family.title}: {family.hooked_note}")
    model = tiny_model(name, kind=kind, n_layers=2, d_model=32, seed=0, source="transformers")
    if DEVICE != "cpu":
        model = model.to(DEVICE)
    tokens = model.to_tokens(TEXT)
    with torch.inference_mode():
        logits, cache = model.run_with_cache(tokens)
    return dict(
        name=name, model=model, tokens=tokens, logits=logits, cache=cache, L=model.cfg.n_layers
    )


@pytest.fixture(scope="module")
def fitted(fam, tmp_path_factory):
    """The fitted objects every family gets, with 1-2 steps each, saved where the report reads them:
    a tuned lens, a non-linearity reference, a contextualization probe, a causal basis through the
    tuned lens."""
    from tlmicroscope.causal import extract_causal_basis
    from tlmicroscope.corpus import token_windows
    from tlmicroscope.lenses import train_tuned_lens
    from tlmicroscope.microscope import ContextualizationProbe, NonlinearityReference

    torch.set_num_threads(1)
    model, folder = fam["model"], tmp_path_factory.mktemp(f"fitted-{fam['name']}")
    lens = train_tuned_lens(
        model,
        CORPUS,
        steps=2,
        tokens_per_step=64,
        seq_len=32,
        precision="fp32",
        progress=False,
        init_tokens=128,
        micro_batch_tokens=64,
    ).lens
    windows = token_windows(model, CORPUS, seq_len=48, n_windows=3)
    reference = NonlinearityReference().fit(model, windows, progress=False)
    probe = ContextualizationProbe(
        prefix_length=4,
        mlp_hidden=16,
        decoder="last_k",
        trainable_blocks=1,
        steps=1,
        window_length=16,
        windows_per_step=2,
        positions_per_window=2,
    ).fit(model, CORPUS, progress=False)
    tuned_basis = extract_causal_basis(
        model, lens=lens, corpus=fam["tokens"], layer=1, k=2, max_iter=20, progress=False
    )
    paths = {
        "microscope_reference": folder / "nonlinearity",
        "microscope_probe": folder / "probe",
        "causal_basis": folder / "basis",
    }
    for obj, key in (
        (reference, "microscope_reference"),
        (probe, "microscope_probe"),
        (tuned_basis, "causal_basis"),
    ):
        obj.save(paths[key])
    return {
        "lens": lens,
        "windows": windows,
        "reference": reference,
        "probe": probe,
        "tuned_basis": tuned_basis,
        "paths": paths,
    }


# ---------------------------------------------------------------------------------------------
# the model itself


def test_model_matches_transformers(fam):
    """The booted model computes what the transformers model does (log-probs, 3e-4).

    Cohere's logits before its 0.0625 scale reach ~600, where float32 rounds at ~6e-5: an
    implementation that reorders the final sums differs by ~1e-4 without being wrong.
    """
    from tlmicroscope.models.families import tiny_hf_model

    hf = tiny_hf_model(fam["name"], n_layers=2, d_model=32, seed=0)
    with torch.inference_mode():
        ref = hf(fam["tokens"]).logits
    torch.testing.assert_close(
        torch.log_softmax(fam["logits"], -1), torch.log_softmax(ref, -1), atol=3e-4, rtol=0
    )
    # logits reach tens of nats, so soft caps and logit scales matter
    assert ref.abs().max() > 15
    cap = getattr(hf.config, "final_logit_softcapping", None)
    if cap:  # Gemma 2: the cap bites, squashing logits that would reach past it
        hf.config.final_logit_softcapping = None
        with torch.inference_mode():
            raw = hf(fam["tokens"]).logits
        assert raw.abs().max() > cap > ref.abs().max()
        torch.testing.assert_close(ref, cap * torch.tanh(raw / cap), atol=1e-4, rtol=1e-5)


def test_residual_pieces_sum_to_resid_post(fam):
    """resid_post = resid_pre + attn_out + mlp_out, the identity layer contributions rest on."""
    cache = fam["cache"]
    for layer in range(fam["L"]):
        pre = cache[f"blocks.{layer}.hook_resid_pre"]
        pieces = (
            pre + cache[f"blocks.{layer}.hook_attn_out"] + cache[f"blocks.{layer}.hook_mlp_out"]
        )
        torch.testing.assert_close(
            pieces, cache[f"blocks.{layer}.hook_resid_post"], atol=1e-4, rtol=1e-4
        )


# ---------------------------------------------------------------------------------------------
# lenses


def test_readout_identity(fam):
    from tlmicroscope.lenses import Readout, check_readout_identity

    h = fam["cache"][f"blocks.{fam['L'] - 1}.hook_resid_post"][0]
    diff = check_readout_identity(Readout(fam["model"]), h, fam["logits"][0])
    assert diff < 2e-3


def test_prediction_trajectory_logit_lens(fam):
    from tlmicroscope.lenses import prediction_trajectory

    traj = prediction_trajectory(fam["model"], fam["tokens"], top_k=3)
    L, n = fam["L"], fam["tokens"].shape[-1]
    assert traj.kl.shape == (L + 1, 1, n)
    # the last lens layer is the model's own output distribution
    assert float(traj.kl[-1].abs().max()) < 1e-3
    model_top = fam["logits"][0].argmax(-1)
    assert torch.equal(traj.top_tokens[-1, 0, :, 0], model_top)
    # entropy = logsumexp(z) - E[z] loses ~1e-5 nats to float32 rounding when logits reach 40
    assert (traj.entropy >= -1e-4).all() and (
        traj.entropy <= math.log(fam["model"].cfg.d_vocab) + 1e-4
    ).all()
    assert ((traj.top_probs >= 0) & (traj.top_probs <= 1 + 1e-4)).all()  # same rounding


def test_prediction_depth(fam):
    from tlmicroscope.causal import prediction_depth
    from tlmicroscope.lenses import prediction_trajectory

    res = prediction_depth(prediction_trajectory(fam["model"], fam["tokens"], top_k=1))
    assert res.depth.shape == fam["tokens"].shape
    assert ((res.depth >= 0) & (res.depth <= fam["L"])).all()


def test_tuned_lens_training_and_trajectory(fam, fitted):
    from tlmicroscope.lenses import prediction_trajectory

    traj = prediction_trajectory(fam["model"], fam["tokens"], lens=fitted["lens"], top_k=1)
    assert torch.isfinite(traj.kl).all() and (traj.kl >= -1e-4).all()
    assert float(traj.kl[-1].abs().max()) < 1e-3  # the last layer is read out as the model does


def test_evaluate_lens(fam):
    from tlmicroscope.lenses import evaluate_lens

    ev = evaluate_lens(
        fam["model"],
        lens="logit",
        corpus=CORPUS,
        n_tokens=128,
        seq_len=32,
        holdout=0.5,
        baseline=False,
        progress=False,
    )
    assert ev.kl.shape == (fam["L"] + 1,)
    assert float(ev.kl[-1]) < 1e-3 and (ev.kl >= -1e-4).all()
    assert torch.isfinite(ev.cross_entropy).all()


# ---------------------------------------------------------------------------------------------
# LLM-Microscope


def test_layer_contributions(fam):
    from tlmicroscope.microscope import layer_contributions

    res = layer_contributions(fam["model"], fam["tokens"])
    assert res.loss.shape[0] == fam["L"] + 1
    assert torch.isfinite(res.loss[..., :-1]).all()  # the last position has no next token
    # delta[l] is how much block l lowered the loss
    torch.testing.assert_close(
        res.delta, res.loss[:-1] - res.loss[1:], atol=1e-5, rtol=1e-5, equal_nan=True
    )


def test_component_attribution(fam):
    from tlmicroscope.microscope import component_attribution

    res = component_attribution(fam["model"], fam["tokens"])
    total = res.attribution.sum(0) + res.bias
    torch.testing.assert_close(total, res.logit, atol=2e-3, rtol=1e-3)
    assert res.max_identity_error < 1e-3


def test_linearity_scores(fam, fitted):
    from tlmicroscope.microscope import linearity_scores

    res = linearity_scores(fam["model"], fitted["windows"], progress=False)
    assert res.score.shape == (fam["L"],)
    assert ((res.score >= -1e-6) & (res.score <= 1 + 1e-6)).all()


def test_token_nonlinearity(fam, fitted):
    from tlmicroscope.microscope import token_nonlinearity

    res = token_nonlinearity(fam["model"], fam["tokens"], reference=fitted["reference"])
    assert res.error.shape == (fam["L"], 1, fam["tokens"].shape[-1])
    assert torch.isfinite(res.error).all() and (res.error >= 0).all()


def test_contextualization_and_token_classes(fam, fitted):
    from tlmicroscope.microscope import (
        contextuality_nonlinearity_correlation,
        contextualization,
        token_class_summary,
        token_nonlinearity,
    )

    res = contextualization(fam["model"], fam["tokens"], probe=fitted["probe"])
    C = res.C[~torch.isnan(res.C)]
    assert C.numel() > 0 and (C >= 0).all() and torch.isfinite(C).all()
    tn = token_nonlinearity(fam["model"], fam["tokens"], reference=fitted["reference"])
    summary = token_class_summary(res, tn)
    assert summary.count.sum() == C.numel()  # every scored token, in exactly one class
    corr = contextuality_nonlinearity_correlation(res, tn)
    assert -1 - 1e-9 <= corr.pearson_r <= 1 + 1e-9 or math.isnan(corr.pearson_r)


def test_layer_profiles(fam):
    from tlmicroscope.microscope import layer_profiles

    prof = layer_profiles(
        fam["model"], CORPUS, n_tokens=256, id_points=100, seq_len=64, progress=False
    )
    assert ((prof.anisotropy >= -1e-6) & (prof.anisotropy <= 1 + 1e-6)).all()
    # h^0 of a byte vocabulary has too few distinct points for an ID; later layers must have one
    assert (prof.intrinsic_dimension[1:] > 0).all()


def test_filler_removal_experiment(fam):
    from tlmicroscope.microscope import filler_removal_experiment
    from tlmicroscope.tasks import MultipleChoiceItem

    items = [
        MultipleChoiceItem(f"Is {i} even or odd?", ("even", "odd"), i % 2, "parity")
        for i in range(4)
    ]
    res = filler_removal_experiment(
        fam["model"],
        items,
        corpus=CORPUS,
        removals=("articles",),
        n_shots=1,
        n_passages=2,
        context_words=10,
        continuation_words=3,
        n_boot=20,
        progress=False,
    )
    assert res.conditions == ("original", "articles")
    assert ((res.accuracy >= 0) & (res.accuracy <= 1)).all()
    assert res.removed_fraction[0] == 0


# ---------------------------------------------------------------------------------------------
# geometry


def test_capture_components(fam, record_property):
    from tlmicroscope.geometry import COMPONENTS, capture_components

    model = fam["model"]
    states = capture_components(model, fam["tokens"], drop_first=False)
    parallel = bool(getattr(model.cfg, "parallel_attn_mlp", False))
    kept = set(states.components)
    assert ("resid_mid" in kept) == (not parallel)
    assert kept >= set(COMPONENTS) - {"resid_mid", "ln1", "ln2"}  # only sites a family may lack
    for comp, hook, X in zip(states.components, states.hook_names, states.activations):
        if comp in ("attn_out", "resid_post", "resid_mid"):
            torch.testing.assert_close(X, fam["cache"][hook], atol=1e-5, rtol=1e-5)
    # asked for explicitly, a state the blocks do not have is refused with the reason
    for comp in [c for c in COMPONENTS if c not in kept]:
        with pytest.raises(ValueError, match=f"lacks a site asked for: no {comp}: ") as err:
            capture_components(model, fam["tokens"], components=(comp,))
        reason = str(err.value).split(f"no {comp}: ", 1)[1].split(". Leave")[0]
        record_property("refused", f"no {comp} ({reason})")


def test_norm_profile(fam):
    from tlmicroscope.geometry import norm_profile

    prof = norm_profile(fam["model"], fam["tokens"], progress=False)
    L = fam["L"]
    direct = fam["cache"][f"blocks.{L - 1}.hook_resid_post"].norm(dim=-1)
    torch.testing.assert_close(prof.norms[-1], direct, atol=1e-4, rtol=1e-4)


def test_component_separation(fam):
    from tlmicroscope.geometry import component_separation

    res = component_separation(fam["model"], fam["tokens"], n_folds=2, max_points=64)
    assert ((res.accuracy >= 0) & (res.accuracy <= 1)).all()


def test_positional_geometry(fam):
    from tlmicroscope.corpus import token_windows
    from tlmicroscope.geometry import positional_geometry

    windows = token_windows(fam["model"], CORPUS, seq_len=32, n_windows=4)
    geo = positional_geometry(fam["model"], windows, n_components=2, progress=False)
    expected = (
        "W_pos" if fam["model"].cfg.positional_embedding_type == "standard" else "mean_residual"
    )
    assert geo.source == expected and torch.isfinite(geo.vectors).all()
    assert ((geo.cosine >= -1 - 1e-5) & (geo.cosine <= 1 + 1e-5)).all()


def test_token_trajectories(fam):
    from tlmicroscope.geometry import token_trajectories

    res = token_trajectories(fam["model"], fam["tokens"])
    assert torch.isfinite(res.coords).all() and res.coords.shape[-1] == 2


def test_vocabulary_norms_and_states(fam):
    from tlmicroscope.geometry import vocabulary_norms, vocabulary_states

    ids = torch.arange(97, 105)
    res = vocabulary_norms(fam["model"], ids, progress=False)
    with torch.inference_mode():
        _, cache = fam["model"].run_with_cache(ids[:, None])
    last = cache[f"blocks.{fam['L'] - 1}.hook_resid_post"][:, 0]
    torch.testing.assert_close(res.norms[-1], last.norm(dim=-1), atol=1e-4, rtol=1e-4)
    states = vocabulary_states(fam["model"], ids, progress=False)  # every component it has
    i = next(
        k
        for k, (c, layer) in enumerate(zip(states.components, states.layers))
        if c == "resid_post" and layer == fam["L"] - 1
    )
    torch.testing.assert_close(states.activations[i, :, 0], last, atol=1e-4, rtol=1e-4)


def test_layer_geometry(fam):
    from tlmicroscope.geometry import layer_geometry

    res = layer_geometry(fam["model"], fam["tokens"], max_scale=4)
    assert torch.isfinite(res.twonn).all() and (res.twonn > 0).all()
    assert ((res.cosine >= -1 - 1e-5) & (res.cosine <= 1 + 1e-5)).all()
    assert math.isfinite(res.loss)


def test_geometry_sweep_and_correlations(fam, tmp_path):
    from tlmicroscope.geometry import (
        geometry_sweep,
        id_loss_correlation,
        logits_entropy_correlation,
    )

    prompts = torch.randint(0, 256, (3, 24), generator=torch.Generator().manual_seed(0))
    sweep = geometry_sweep(
        fam["model"],
        prompts,
        out=tmp_path / "s.jsonl",
        shuffle_levels=(0, 2),
        seeds=(0,),
        max_scale=4,
        progress=False,
    )
    assert len(sweep.records) == 6
    for corr in (id_loss_correlation(sweep), logits_entropy_correlation(sweep)):
        r = corr.pearson[~np.isnan(corr.pearson)]
        assert (np.abs(r) <= 1 + 1e-9).all()


# ---------------------------------------------------------------------------------------------
# causal


@pytest.fixture(scope="module")
def basis(fam):
    from tlmicroscope.causal import extract_causal_basis

    torch.set_num_threads(1)
    return extract_causal_basis(
        fam["model"], lens="logit", corpus=fam["tokens"], layer=1, k=2, max_iter=20, progress=False
    )


def test_extract_causal_basis(fam, basis, fitted):
    for b in (basis, fitted["tuned_basis"]):  # through the logit lens and a tuned lens
        V = b.vectors.double()
        torch.testing.assert_close(V.T @ V, torch.eye(2, dtype=torch.float64), atol=1e-5, rtol=0)
        assert (b.energies[:-1] >= b.energies[1:]).all() and (b.energies >= 0).all()


def test_causal_fidelity(fam, basis):
    from tlmicroscope.causal import causal_fidelity

    res = causal_fidelity(
        fam["model"], lens="logit", basis=basis, tokens=fam["tokens"], progress=False
    )
    assert res.model_influence.shape == (2,) and (res.model_influence >= 0).all()


def test_stimulus_response_alignment(fam):
    from tlmicroscope.causal import stimulus_response_alignment

    # One short sequence: donors from any other position (the default wants another sequence).
    res = stimulus_response_alignment(
        fam["model"], lens="logit", tokens=fam["tokens"], n_samples=4, donors="any", progress=False
    )
    assert torch.isfinite(res.alignment).all()


def test_ablate_subspace(fam, basis):
    from tlmicroscope.causal import ablate_subspace

    model, tokens = fam["model"], fam["tokens"]
    with torch.inference_mode():
        with ablate_subspace(model, "blocks.1.hook_resid_pre", basis.vectors, mode="zero"):
            ablated = model(tokens)
        after = model(tokens)
    torch.testing.assert_close(after, fam["logits"])  # hooks removed
    assert not torch.allclose(ablated, fam["logits"])


def test_injection_experiment(fam):
    from tlmicroscope.causal import injection_experiment
    from tlmicroscope.tasks import MultipleChoiceItem

    items = [
        MultipleChoiceItem(f"{a}+{b}?", (str(a + b), str(a + b + 1)), 0, "arithmetic")
        for a in range(2, 5)
        for b in range(2, 5)
    ]  # byte tokens: the injected prompt fits n_ctx
    res = injection_experiment(
        fam["model"], items, n_items=None, n_shots=0, n_splits=2, progress=False
    )
    for v in res.auroc.values():
        assert v.shape == (2,) and ((v >= 0) & (v <= 1)).all()
    assert 0 <= res.accuracy_clean <= 1 and 0 <= res.follows_injection <= 1


def test_injection_features(fam):
    from tlmicroscope.causal import injection_features

    prompts = ["Q: 1+1?\nA:", "Q: hey\nA:"]
    choices = [[" 2", " 11"], [" yo", " hi"]]
    feats = injection_features(
        fam["model"], prompts, choices=choices, lenses=["logit"], batch_size=2
    )
    L = fam["L"]
    assert (
        feats.loglik["logit"].shape == (2, L + 1, 2) and torch.isfinite(feats.loglik["logit"]).all()
    )


# ---------------------------------------------------------------------------------------------
# report sections


def _all_sections():
    from tlmicroscope.report import available_sections

    return available_sections()


@pytest.fixture(scope="module")
def built_report(fam, fitted):
    """The report with every section, given every fitted object a section may read."""
    import tlmicroscope

    torch.set_num_threads(1)
    return tlmicroscope.report(
        fam["model"],
        TEXT,
        sections=_all_sections(),
        lens=fitted["lens"],
        **{k: str(v) for k, v in fitted["paths"].items()},
    )


def _umap_missing() -> bool:
    import importlib.util

    return importlib.util.find_spec("umap") is None


@pytest.mark.parametrize("section", _all_sections())
def test_report_section(fam, built_report, section, record_property):
    """Each section renders; the only refusal allowed is an optional package that is absent."""
    rep = built_report
    if section in rep.failed:
        pytest.fail(f"section {section} failed on {fam['name']}: {rep.failed[section]}")
    if section in rep.missing:
        message = rep.missing[section]
        record_property("refused", message)
        assert section == "latent_umap" and _umap_missing() and "umap" in message, message
        return
    assert section in rep.rendered
