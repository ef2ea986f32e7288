"""Every public analysis follows one of the signature forms written down in CONTRIBUTING.

* per text:   ``f(model_or_cache, tokens=None, *, ...)``
* corpus:     ``f(model, corpus=None, *, ...)``
* task items: ``f(model, items=None, *, ...)`` (multiple-choice items, scored with and without
  an intervention)
* vocabulary: ``f(model, token_ids=None, *, ...)`` (each id run as its own one-token input)

Everything after the second parameter is keyword-only. Shared settings have one name each (a batch
of sequences is ``batch_size``, a memory chunk of rows ``chunk_size``, a count ``n_<thing>``,
bootstraps ``n_boot`` and ``ci_level``). ``TABLE`` lists every public callable of the five public
packages that is not a class, and says which form it follows, or what else it is; a new function
exported without an entry fails ``test_the_table_lists_every_public_function``.

The old spellings (positional orders and keyword names before this form) keep working for one
release with a ``DeprecationWarning``; the last tests call each of them on a tiny model and
compare with the new spelling.
"""

from __future__ import annotations

import importlib
import inspect
import warnings

import pytest
import torch

pytestmark = pytest.mark.filterwarnings("ignore:CBE on only")

PACKAGES = (
    "tlmicroscope",
    "tlmicroscope.lenses",
    "tlmicroscope.microscope",
    "tlmicroscope.geometry",
    "tlmicroscope.causal",
)

# The analysis forms, by their second parameter.
TEXT, CORPUS, ITEMS, VOCAB = "text", "corpus", "items", "vocab"
SECOND = {TEXT: "tokens", CORPUS: "corpus", ITEMS: "items", VOCAB: "token_ids"}
FIRST = {"model", "model_or_cache", "model_or_states"}

# What else a public function may be: not an analysis of a model, so no form to follow, but the
# shared names still apply.
PRIMITIVE = "primitive"  # works on tensors, points or text already in hand
ON_RESULTS = "on results"  # combines or reads result objects
HELPER = "helper"  # labels, input builders, small utilities
INTERVENTION = "intervention"  # hooks and context managers
LOADER = "loader"  # loads a model or a saved object
PRESENTATION = "presentation"  # the report

TABLE: dict[str, str] = {
    # tlmicroscope
    "tlmicroscope.load_model": LOADER,
    "tlmicroscope.tiny_model": LOADER,
    "tlmicroscope.report": PRESENTATION,
    # lenses
    "tlmicroscope.lenses.prediction_trajectory": TEXT,
    "tlmicroscope.lenses.component_lens": TEXT,
    "tlmicroscope.lenses.target_trajectories": TEXT,
    "tlmicroscope.lenses.evaluate_lens": CORPUS,
    "tlmicroscope.lenses.lens_bench": CORPUS,
    "tlmicroscope.lenses.train_tuned_lens": CORPUS,
    "tlmicroscope.lenses.fit_jacobian_lens": CORPUS,
    "tlmicroscope.lenses.check_readout_identity": PRIMITIVE,
    "tlmicroscope.lenses.lens_logits": PRIMITIVE,
    "tlmicroscope.lenses.lens_features": PRIMITIVE,
    "tlmicroscope.lenses.layer_label": HELPER,
    "tlmicroscope.lenses.resolve_lens": HELPER,
    "tlmicroscope.lenses.load_lens": LOADER,
    # microscope
    "tlmicroscope.microscope.token_nonlinearity": TEXT,
    "tlmicroscope.microscope.contextualization": TEXT,
    "tlmicroscope.microscope.layer_contributions": TEXT,
    "tlmicroscope.microscope.component_attribution": TEXT,
    "tlmicroscope.microscope.linearity_scores": CORPUS,
    "tlmicroscope.microscope.layer_profiles": CORPUS,
    "tlmicroscope.microscope.filler_removal_experiment": ITEMS,
    "tlmicroscope.microscope.linearity_score": PRIMITIVE,
    "tlmicroscope.microscope.remove_filler": PRIMITIVE,
    "tlmicroscope.microscope.classify_tokens": PRIMITIVE,
    "tlmicroscope.microscope.token_class_summary": ON_RESULTS,
    "tlmicroscope.microscope.token_table": ON_RESULTS,
    "tlmicroscope.microscope.contextuality_nonlinearity_correlation": ON_RESULTS,
    # geometry
    "tlmicroscope.geometry.layer_geometry": TEXT,
    "tlmicroscope.geometry.capture_components": TEXT,
    "tlmicroscope.geometry.component_separation": TEXT,
    "tlmicroscope.geometry.norm_profile": TEXT,
    "tlmicroscope.geometry.positional_geometry": TEXT,
    "tlmicroscope.geometry.token_trajectories": TEXT,
    "tlmicroscope.geometry.geometry_sweep": CORPUS,
    "tlmicroscope.geometry.vocabulary_norms": VOCAB,
    "tlmicroscope.geometry.vocabulary_states": VOCAB,
    "tlmicroscope.geometry.anisotropy": PRIMITIVE,
    "tlmicroscope.geometry.cosine_similarity": PRIMITIVE,
    "tlmicroscope.geometry.intrinsic_dimension": PRIMITIVE,
    "tlmicroscope.geometry.nearest_neighbours": PRIMITIVE,
    "tlmicroscope.geometry.neighbourhood_overlap": PRIMITIVE,
    "tlmicroscope.geometry.remove_duplicates": PRIMITIVE,
    "tlmicroscope.geometry.project": PRIMITIVE,
    "tlmicroscope.geometry.shuffle_tokens": PRIMITIVE,
    "tlmicroscope.geometry.id_loss_correlation": ON_RESULTS,
    "tlmicroscope.geometry.logits_entropy_correlation": ON_RESULTS,
    "tlmicroscope.geometry.block_permutation": HELPER,
    "tlmicroscope.geometry.gride_scales": HELPER,
    "tlmicroscope.geometry.intermediate_layers": HELPER,
    "tlmicroscope.geometry.repeated_token_sequence": HELPER,
    "tlmicroscope.geometry.single_token_inputs": HELPER,
    "tlmicroscope.geometry.load_geometry_sweep": LOADER,
    # causal
    "tlmicroscope.causal.causal_fidelity": TEXT,
    "tlmicroscope.causal.stimulus_response_alignment": TEXT,
    "tlmicroscope.causal.injection_features": TEXT,
    "tlmicroscope.causal.extract_causal_basis": CORPUS,
    "tlmicroscope.causal.injection_experiment": ITEMS,
    "tlmicroscope.causal.injection_by_task": ITEMS,
    "tlmicroscope.causal.ablate_rows": PRIMITIVE,
    "tlmicroscope.causal.aitchison_similarity": PRIMITIVE,
    "tlmicroscope.causal.as_orthonormal_basis": PRIMITIVE,
    "tlmicroscope.causal.order_choices": PRIMITIVE,
    "tlmicroscope.causal.paper_features": PRIMITIVE,
    "tlmicroscope.causal.inject": PRIMITIVE,
    "tlmicroscope.causal.prediction_depth": ON_RESULTS,
    "tlmicroscope.causal.injection_prompts": HELPER,
    "tlmicroscope.causal.task_type": HELPER,
    "tlmicroscope.causal.split_auroc": HELPER,
    "tlmicroscope.causal.derangement": HELPER,
    "tlmicroscope.causal.default_cbe_dir": HELPER,
    "tlmicroscope.causal.ablate_subspace": INTERVENTION,
    "tlmicroscope.causal.subspace_ablation_hooks": INTERVENTION,
}
ANALYSIS_FORMS = (TEXT, CORPUS, ITEMS, VOCAB)
KINDS = (*ANALYSIS_FORMS, PRIMITIVE, ON_RESULTS, HELPER, INTERVENTION, LOADER, PRESENTATION)

# Old or second names of a shared setting -> the package's one name for it.
RETIRED = {
    "micro_batch_tokens": "batch_size (sequences per forward pass)",
    "dim_batch": "chunk_size",
    "chunk_rows": "chunk_size",
    "chunk_bytes": "chunk_size",
    "n_bootstrap": "n_boot",
    "confidence": "ci_level",
    "corpus_or_tokens": "corpus",
    "dataset": "items",
    "prompt_tokens": "seq_len",
    "random_state": "seed",
    "verbose": "progress",
    "show_progress": "progress",
}


def _public_functions() -> dict[str, object]:
    found = {}
    for package in PACKAGES:
        module = importlib.import_module(package)
        for name in module.__all__:
            obj = getattr(module, name)
            if callable(obj) and not inspect.isclass(obj) and not inspect.ismodule(obj):
                found[f"{package}.{name}"] = obj
    return found


def _resolve(qualified: str) -> object:
    package, name = qualified.rsplit(".", 1)
    return getattr(importlib.import_module(package), name)


def _params(qualified: str) -> list[inspect.Parameter]:
    return list(inspect.signature(_resolve(qualified)).parameters.values())


def _is_int_setting(p: inspect.Parameter) -> bool:
    annotation = p.annotation if isinstance(p.annotation, str) else str(p.annotation)
    return (isinstance(p.default, int) and not isinstance(p.default, bool)) or annotation.split(
        "|"
    )[0].strip() == "int"


def _unlisted() -> list[str]:
    return sorted(set(_public_functions()) - set(TABLE))


def test_the_table_lists_every_public_function():
    public = set(_public_functions())
    missing = _unlisted()
    assert not missing, (
        f"Public functions without an entry in tests/test_signatures.py TABLE: {missing}. Add "
        "each with its form (see CONTRIBUTING, 'Signatures')."
    )
    stale = sorted(set(TABLE) - public)
    assert not stale, f"TABLE lists names that are no longer public functions: {stale}."
    assert set(TABLE.values()) <= set(KINDS)


@pytest.mark.parametrize("name", [n for n, k in TABLE.items() if k in ANALYSIS_FORMS])
def test_analysis_follows_its_form(name):
    form = TABLE[name]
    params = _params(name)
    positional = [
        p
        for p in params
        if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    ]
    assert params[0].name in FIRST, f"{name}: the first parameter is {params[0].name!r}."
    assert len(positional) == 2, (
        f"{name}: positional parameters {[p.name for p in positional]}; only the model and "
        f"{SECOND[form]!r} may be positional, the rest keyword-only (after `*`)."
    )
    second = positional[1]
    assert second.name == SECOND[form], (
        f"{name} is listed as the {form} form, whose second parameter is {SECOND[form]!r}, "
        f"not {second.name!r}."
    )
    assert second.default is None, f"{name}: {second.name} must default to None."
    assert not any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params), (
        f"{name} takes *args; analyses take their settings by keyword."
    )


@pytest.mark.parametrize("name", sorted(TABLE))
def test_shared_settings_go_by_one_name(name):
    for p in _params(name):
        assert p.name not in RETIRED, f"{name}({p.name}=): the package's name is {RETIRED[p.name]}."
        if "batch" in p.name:
            assert p.name == "batch_size", f"{name}({p.name}=): a batch is batch_size."
        if "chunk" in p.name:
            assert p.name == "chunk_size", f"{name}({p.name}=): a memory chunk is chunk_size."
        if p.name == "tokens" or (p.name.endswith("_tokens") and not p.name.endswith("n_tokens")):
            assert not _is_int_setting(p), (
                f"{name}({p.name}=) is a count; counts are n_tokens (or <prefix>_n_tokens)."
            )
        assert not p.name.startswith("num_") and not p.name.endswith("_count"), (
            f"{name}({p.name}=): counts are n_<thing>."
        )


def test_an_unlisted_analysis_would_fail(monkeypatch):
    """A function newly exported from a package, and not in TABLE, is caught."""
    import tlmicroscope.causal as causal

    def new_analysis(model, tokens=None, *, lens=None):
        return None

    monkeypatch.setattr(causal, "new_analysis", new_analysis, raising=False)
    monkeypatch.setattr(causal, "__all__", [*causal.__all__, "new_analysis"])
    assert _unlisted() == ["tlmicroscope.causal.new_analysis"]


# Old spellings: each one still runs, warns, and gives what the new spelling gives.


def _old(call):
    with pytest.warns(DeprecationWarning) as record:
        out = call()
    message = str(record[0].message)
    assert "0.2.0" in message and "(" in message, message
    return out, message


def _new(call):
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        return call()


@pytest.fixture
def tiny(tiny_llama):
    return tiny_llama


@pytest.fixture(scope="module")
def toks():
    return torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))


TEXTS = ["the words of a short text to read, again and again. " * 20]


def test_old_causal_forms(tiny, toks):
    from tlmicroscope.causal import causal_fidelity, extract_causal_basis
    from tlmicroscope.causal import stimulus_response_alignment as sra

    old, msg = _old(lambda: extract_causal_basis(tiny, "logit", toks, 1, 2, progress=False))
    assert "extract_causal_basis(model, corpus, *, lens=..., layer=..., k=..., mode=...)" in msg
    new = _new(lambda: extract_causal_basis(tiny, toks, lens="logit", layer=1, k=2, progress=False))
    torch.testing.assert_close(old.vectors, new.vectors)
    kw, msg = _old(
        lambda: extract_causal_basis(
            tiny, lens="logit", corpus_or_tokens=toks, layer=1, k=2, progress=False
        )
    )
    assert "corpus_or_tokens= is now corpus=" in msg
    torch.testing.assert_close(kw.vectors, new.vectors)

    basis = new.vectors
    old, msg = _old(
        lambda: causal_fidelity(tiny, "logit", basis, 1, toks, n_boot=0, progress=False)
    )
    assert "causal_fidelity(model, tokens, *, lens=..., basis=..., layer=...)" in msg
    new = _new(
        lambda: causal_fidelity(
            tiny, toks, lens="logit", basis=basis, layer=1, n_boot=0, progress=False
        )
    )
    torch.testing.assert_close(old.model_influence, new.model_influence)
    # the lens alone by position (the old second slot) is still read as the lens
    one, _ = _old(
        lambda: causal_fidelity(tiny, "logit", basis=basis, layer=1, tokens=toks, n_boot=0)
    )
    torch.testing.assert_close(one.lens_influence, new.lens_influence)

    old, _ = _old(lambda: sra(tiny, "logit", toks, [1], n_samples=3, progress=False))
    new = _new(lambda: sra(tiny, toks, lens="logit", layer=[1], n_samples=3, progress=False))
    torch.testing.assert_close(old.alignment, new.alignment, equal_nan=True)


def test_old_lens_forms(tiny):
    from tlmicroscope.lenses import evaluate_lens, lens_bench, target_trajectories

    old, msg = _old(
        lambda: evaluate_lens(
            tiny, "logit", TEXTS, tokens=64, seq_len=32, micro_batch_tokens=64, chunk_rows=16,
            holdout=0.5, progress=False,
        )
    )  # fmt: skip
    for part in ("tokens= is now n_tokens=", "micro_batch_tokens=", "chunk_rows="):
        assert part in msg
    new = _new(
        lambda: evaluate_lens(
            tiny, TEXTS, lens="logit", n_tokens=64, seq_len=32, batch_size=2, chunk_size=16,
            holdout=0.5, progress=False,
        )
    )  # fmt: skip
    torch.testing.assert_close(old.kl, new.kl)
    assert old.n_tokens == new.n_tokens == 64

    settings = {"seq_len": 32, "holdout": 0.5, "cbe_layers": [], "sra_layers": [1]}
    old, msg = _old(
        lambda: lens_bench(
            tiny, ["logit"], TEXTS, tokens=64, sra_samples=2, progress=False, **settings
        )
    )
    assert "sra_samples= is now sra_n_samples=" in msg
    new = _new(
        lambda: lens_bench(
            tiny, TEXTS, lenses=["logit"], n_tokens=64, sra_n_samples=2, progress=False, **settings
        )
    )
    torch.testing.assert_close(old.kl, new.kl)

    prompts = ["ab", "a longer one"]
    old, _ = _old(
        lambda: target_trajectories(
            tiny, prompts, ["x"], n_bootstrap=20, confidence=0.9, progress=False
        )
    )
    new = _new(
        lambda: target_trajectories(
            tiny, prompts, targets=["x"], n_boot=20, ci_level=0.9, progress=False
        )
    )
    torch.testing.assert_close(old.prob, new.prob)
    assert old.n_bootstrap == new.n_bootstrap == 20


def test_old_lens_fit_forms(tiny):
    from tlmicroscope.lenses import fit_jacobian_lens, train_tuned_lens
    from tlmicroscope.lenses.train import TrainConfig

    cfg = TrainConfig(steps=1, tokens_per_step=64, seq_len=32, init_tokens=64, progress=False)
    old, msg = _old(lambda: train_tuned_lens(tiny, TEXTS, cfg, precision="fp32"))
    assert "train_tuned_lens(model, corpus, *, config=...)" in msg
    new = _new(lambda: train_tuned_lens(tiny, TEXTS, config=cfg, precision="fp32"))
    for a, b in zip(old.lens.parameters(), new.lens.parameters(), strict=True):
        torch.testing.assert_close(a, b)

    # The renamed settings reach the function: a too-short seq_len is refused in its new name.
    with (
        pytest.warns(DeprecationWarning, match="prompt_tokens= is now seq_len="),
        pytest.raises((ValueError, ImportError), match="seq_len=3|TransformerLens"),
    ):
        fit_jacobian_lens(tiny, TEXTS, prompt_tokens=3, dim_batch=8, progress=False)


def test_old_microscope_forms(tiny):
    from tlmicroscope.microscope import contextualization, filler_removal_experiment
    from tlmicroscope.microscope.contextualization import ContextualizationProbe
    from tlmicroscope.tasks import MultipleChoiceItem

    # The probe third by position reaches the probe check (an unfitted probe is refused).
    with (
        pytest.warns(DeprecationWarning, match="contextualization"),
        pytest.raises(ValueError, match="not fitted"),
    ):
        contextualization(tiny, "abcde", ContextualizationProbe())
    with pytest.raises(ValueError, match="not fitted"):
        _new(lambda: contextualization(tiny, "abcde", probe=ContextualizationProbe()))

    items = [MultipleChoiceItem("Is the sky blue?", ("yes", "no"), 0, "demo")] * 4
    settings = {"corpus": False, "removals": ("articles",), "n_shots": 0, "progress": False}
    old, msg = _old(
        lambda: filler_removal_experiment(tiny, dataset=items, n_bootstrap=20, **settings)
    )
    assert "dataset= is now items=" in msg and "n_bootstrap= is now n_boot=" in msg
    new = _new(lambda: filler_removal_experiment(tiny, items, n_boot=20, **settings))
    assert (old.correct == new.correct).all() and (old.accuracy_ci == new.accuracy_ci).all()


def test_old_geometry_and_injection_forms(tiny, tmp_path):
    from tlmicroscope.causal import injection_features
    from tlmicroscope.geometry import geometry_sweep, nearest_neighbours

    x = torch.randn(40, 3, generator=torch.Generator().manual_seed(0))
    old, _ = _old(lambda: nearest_neighbours(x, 3, chunk_bytes=1024))
    new = _new(lambda: nearest_neighbours(x, 3, chunk_size=4))
    assert torch.equal(old.indices, new.indices)
    torch.testing.assert_close(old.distances, new.distances)
    with pytest.raises(ValueError, match="chunk_size must be a positive"):
        nearest_neighbours(x, 3, chunk_size=0)

    prompts = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(1))
    settings = {"shuffle_levels": (0,), "progress": False}
    old, _ = _old(
        lambda: geometry_sweep(tiny, prompts=prompts, out=tmp_path / "a.jsonl", **settings)
    )
    new = _new(lambda: geometry_sweep(tiny, prompts, out=tmp_path / "b.jsonl", **settings))
    assert old.metric("gride", 0).tolist() == new.metric("gride", 0).tolist()

    texts, choices = ["Q: 1+1=", "Q: 2+2="], [[" 2", " 3"], [" 4", " 5"]]
    old, _ = _old(lambda: injection_features(tiny, texts, choices, ["logit"]))
    new = _new(lambda: injection_features(tiny, texts, choices=choices, lenses=["logit"]))
    torch.testing.assert_close(old.loglik["logit"], new.loglik["logit"])


def test_both_spellings_at_once_are_refused(tiny, toks):
    from tlmicroscope.lenses import evaluate_lens

    with pytest.raises(TypeError, match="pass only n_tokens="):
        evaluate_lens(tiny, TEXTS, tokens=64, n_tokens=64)
    from tlmicroscope.causal import causal_fidelity

    with pytest.raises(TypeError, match="at most 2 positional"):
        causal_fidelity(tiny, "logit", None, 1, toks, "extra")
