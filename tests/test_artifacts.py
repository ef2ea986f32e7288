"""The artifact store (``tlmicroscope.artifacts``) and the one fitted-object contract.

Every kind in the store's registry is checked twice: its class's signatures (``inspect``), and a
real round trip on a tiny model (fit quick -> save to the store -> load from the store -> the same
outputs). ``TLMICROSCOPE_HOME`` is a fresh temporary folder in every test (``tests/conftest.py``).
"""

from __future__ import annotations

import inspect
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from tlmicroscope import artifacts
from tlmicroscope.artifacts import (
    KINDS,
    ArtifactRecord,
    Fitted,
    MissingArtifactError,
    artifact_class,
    artifact_path,
    find_artifact,
    home,
    is_quick,
    list_artifacts,
    load_artifact,
    make_command,
    model_key,
)
from tlmicroscope.io import ModelMismatchError, model_fingerprint
from tlmicroscope.models import tiny_model

TEXT = "The quick brown fox jumps over the lazy dog while the cat sleeps. " * 12

# Names the shared settings must not go by (the package's one name for each: n_tokens,
# batch_size, seed, progress).
_OTHER_NAMES = {
    "tokens",
    "n_windows",
    "micro_batch_tokens",
    "chunk_rows",
    "chunk_size",
    "chunk_bytes",
    "random_state",
    "show_progress",
    "verbose",
}


def _has_jacobian_lens() -> bool:
    from tlmicroscope.lenses.jacobian import TransformerLensVersionError, require_jacobian_lens

    try:
        require_jacobian_lens()
    except TransformerLensVersionError:
        return False
    return True


# ------------------------------------------------------------------------------- the store
def test_home_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("TLMICROSCOPE_HOME", str(tmp_path / "h"))
    assert home() == tmp_path / "h"
    monkeypatch.delenv("TLMICROSCOPE_HOME")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert home() == tmp_path / "xdg" / "tlmicroscope"
    monkeypatch.delenv("XDG_DATA_HOME")
    assert home() == Path(os.path.expanduser("~")) / ".local" / "share" / "tlmicroscope"
    # the weight cache is another variable, untouched by the store
    assert "TLMICROSCOPE_CACHE" not in str(home())


def test_model_key_is_name_plus_processing(tiny_llama):
    assert model_key("smollm2-135m") == "smollm2-135m"
    assert model_key("HuggingFaceTB/SmolLM2-135M-Instruct") == "smollm2-135m"
    assert model_key("smollm2", processed=True) == "smollm2-135m-processed"
    assert model_key("google/gemma-3-270m") == "gemma3-270m"
    assert model_key("some-org/My Model v2") == "my-model-v2"
    fp = model_fingerprint(tiny_llama)
    assert model_key(tiny_llama) == model_key(fp) == fp["name"].lower()
    assert model_key({**fp, "weights_processed": True}) == fp["name"].lower() + "-processed"
    processed = tiny_model(n_layers=2)
    processed._tlmicroscope_processed = True  # what load_model(..., process_weights=True) records
    assert model_key(processed) == "tiny-llama-l2-d32-s0-processed"


def test_paths_and_commands(tmp_path):
    assert artifact_path("tuned-lens", "smollm2-135m") == home() / "smollm2-135m" / "tuned-lens"
    assert artifact_path("tuned-lens", "smollm2-135m", processed=True).parent.name == (
        "smollm2-135m-processed"
    )
    assert artifact_path("causal-basis", "smollm2", variant="Tuned Lens").name == (
        "causal-basis.tuned-lens"
    )
    with pytest.raises(ValueError, match="Unknown artifact kind 'pca'.*latent-pca"):
        artifact_path("pca", "smollm2-135m")
    assert (
        make_command("tuned-lens", "smollm2-135m") == "tlmicroscope train-lens --model smollm2-135m"
    )
    assert make_command("nonlinearity-reference", "gemma-3-270m").endswith("--model gemma3-270m")
    assert "--process-weights" in make_command(
        "latent-pca", {"name": "smollm2-135m", "weights_processed": True}
    )
    for kind in KINDS:
        assert make_command(kind, "smollm2-135m")


def test_missing_artifact_says_where_and_how(tiny_llama):
    assert find_artifact("nonlinearity-reference", tiny_llama) is None
    with pytest.raises(MissingArtifactError) as err:
        load_artifact("nonlinearity-reference", tiny_llama)
    msg = str(err.value)
    assert isinstance(err.value, FileNotFoundError)
    assert str(artifact_path("nonlinearity-reference", tiny_llama)) in msg
    assert "tlmicroscope microscope-fit --model tiny-llama-L3-d32-s0" in msg
    from tlmicroscope.microscope.nonlinearity import NonlinearityReference

    with pytest.raises(MissingArtifactError, match="looked in"):
        NonlinearityReference.load(None, tiny_llama)


def test_list_and_quick_flags(tiny_llama, tiny_gpt2):
    from tlmicroscope.geometry.projection import LatentPCA

    quick = LatentPCA(2).fit(tiny_llama, [TEXT], quick=True, progress=False)
    full = LatentPCA(2, n_tokens=256).fit(tiny_gpt2, [TEXT], progress=False)
    p1, p2 = quick.save(), full.save()
    assert p1 == artifact_path("latent-pca", tiny_llama)
    assert p2 == artifact_path("latent-pca", tiny_gpt2)
    assert is_quick(quick) and is_quick(p1) and not is_quick(full) and not is_quick(p2)
    assert json.loads((p1 / "config.json").read_text())["config"]["quick"] is True
    records = list_artifacts()
    assert [r.model_key for r in records] == sorted([model_key(tiny_llama), model_key(tiny_gpt2)])
    mine = list_artifacts(tiny_llama)
    assert len(mine) == 1 and isinstance(mine[0], ArtifactRecord)
    r = mine[0]
    assert (r.kind, r.path, r.quick, r.variant) == ("latent-pca", p1, True, None)
    assert r.size_bytes == sum(f.stat().st_size for f in p1.iterdir())
    assert r.make_command == "python -m tlmicroscope.artifacts fit latent-pca --model " + (
        model_key(tiny_llama)
    )
    with pytest.raises(Exception, match="frozen|cannot assign"):
        r.kind = "x"
    # a save in flight (a temporary sibling) and foreign folders are not listed
    (p1.parent / ".latent-pca.tmp-1-abc").mkdir()
    (p1.parent / "notes").mkdir()
    assert len(list_artifacts(tiny_llama)) == 1
    loaded = load_artifact("latent-pca", tiny_llama)
    assert torch.equal(loaded.components_, quick.components_) and loaded.quick


def test_store_refuses_another_models_artifact(tiny_llama):
    from tlmicroscope.geometry.projection import LatentPCA

    pca = LatentPCA(2).fit(tiny_llama, [TEXT], quick=True, progress=False)
    other = tiny_model(n_layers=3, seed=1)  # same shapes, other weights
    target = artifact_path("latent-pca", other)
    pca.save(target)  # put it where the other model's would be
    with pytest.raises(ModelMismatchError, match="unembed|another model"):
        LatentPCA.load(None, other)


def test_fit_artifact_and_module_cli(tiny_llama, capsys):
    pca = artifacts.fit_artifact("latent-pca", tiny_llama, [TEXT], quick=True, progress=False)
    assert find_artifact("latent-pca", tiny_llama) is not None and pca.quick
    assert artifacts._main(["list"]) == 0
    out = capsys.readouterr().out
    assert "latent-pca" in out and "quick" in out and model_key(tiny_llama) in out


def test_artifacts_module_imports_no_analysis_package():
    """The registry names classes by string: ``artifacts.py`` imports no analysis package at
    module level (the analyses import it inside their save/load)."""
    import ast

    tree = ast.parse(Path(artifacts.__file__).read_text())
    top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    names = [a.name for n in top if isinstance(n, ast.Import) for a in n.names]
    names += [n.module or "" for n in top if isinstance(n, ast.ImportFrom)]
    assert names and not [m for m in names if m.startswith("tlmicroscope")], names


# ---------------------------------------------------------------------- the fitted contract
def _fit_quick(kind: str, model) -> object:
    """A quick fit of ``kind`` on a tiny model, with settings small enough for a unit test."""
    cls = artifact_class(kind)
    corpus = [TEXT * 4]
    if kind == "tuned-lens":
        obj = cls(tokens_per_step=64, seq_len=32, init_tokens=64, precision="fp32")
        return obj.fit(model, corpus, quick=True, steps=2, progress=False)
    if kind == "jacobian-lens":
        obj = cls(prompt_tokens=16, skip_first_positions=2)
        return obj.fit(model, corpus, n_tokens=32, quick=True, progress=False)
    if kind == "nonlinearity-reference":
        return cls(seq_len=64).fit(model, corpus, n_tokens=512, quick=True, progress=False)
    if kind == "contextualization-probe":
        obj = cls(prefix_length=4, mlp_hidden=16, decoder="frozen", window_length=16)
        return obj.fit(model, corpus, n_tokens=128, quick=True, progress=False)
    if kind == "causal-basis":
        toks = torch.randint(0, 256, (8, 16), generator=torch.Generator().manual_seed(0))
        obj = cls(layer=1)
        return obj.fit(model, toks, quick=True, progress=False, on_nonconvergence="ignore")
    if kind == "injection-detector":
        from tlmicroscope.tasks import load_tasks

        return cls().fit(model, load_tasks("arithmetic"), quick=True, progress=False)
    if kind == "latent-pca":
        return cls(3).fit(model, corpus, quick=True, progress=False)
    raise AssertionError(f"no quick fit for {kind}")


def _outputs(kind: str, obj, model) -> list:
    """What the fitted object predicts, computed through its public methods."""
    g = torch.Generator().manual_seed(1)
    h = torch.randn(5, int(model.cfg.d_model), generator=g)
    if kind in ("tuned-lens", "jacobian-lens"):
        return [obj.transform(h, layer) for layer in range(int(model.cfg.n_layers))]
    if kind == "nonlinearity-reference":
        return [obj.maps_, obj.standardize(1, h), obj.linearity_.score]
    if kind == "contextualization-probe":
        H = torch.randn(3, int(model.cfg.n_layers), int(model.cfg.d_model), generator=g)
        with torch.no_grad():
            return [obj.encoder_(H)]
    if kind == "causal-basis":
        return [obj.vectors, obj.energies, obj.mean]
    if kind == "injection-detector":
        X = obj.prompt_features(model, ["Q: 2 + 2? A:"], [[" 4", " 5"]])
        X = np.resize(X, (4, obj.train_features_.shape[1]))
        return [torch.from_numpy(obj.score(X)), torch.from_numpy(obj.score(obj.train_features_))]
    if kind == "latent-pca":
        return [obj.transform(h)]
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", KINDS)
def test_signatures_follow_the_contract(kind):
    cls = artifact_class(kind)
    assert cls.kind == kind
    obj = cls()  # settings only: every setting has a default, shapes come at fit
    assert isinstance(obj, Fitted)
    assert obj.quick is False
    assert isinstance(cls.QUICK, dict) and cls.QUICK

    fit = inspect.signature(obj.fit)
    params = list(fit.parameters.values())
    assert params[0].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
    assert params[1].name == "corpus" and params[1].default is None
    rest = params[2:]
    assert all(
        p.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.VAR_KEYWORD) for p in rest
    ), f"{kind}: fit's settings must be keyword-only"
    names = {p.name for p in rest}
    assert {"progress", "quick"} <= names, names
    assert fit.parameters["quick"].default is False
    assert not names & _OTHER_NAMES, f"{kind}: use the shared names, not {names & _OTHER_NAMES}"

    save = inspect.signature(obj.save)
    first = next(iter(save.parameters.values()))
    assert first.name == "path" and first.default is None

    assert isinstance(inspect.getattr_static(cls, "load"), classmethod)
    load = list(inspect.signature(cls.load).parameters)
    assert load[:2] == ["path", "model"]


@pytest.mark.parametrize("kind", KINDS)
def test_round_trip_through_the_store(kind, tiny_llama):
    if kind == "jacobian-lens" and not _has_jacobian_lens():
        pytest.skip("the Jacobian lens needs TransformerLens 4.3")
    obj = _fit_quick(kind, tiny_llama)
    assert obj.quick and is_quick(obj)
    path = obj.save()
    assert path == artifact_path(kind, tiny_llama)
    assert find_artifact(kind, tiny_llama) == path and is_quick(path)
    back = artifact_class(kind).load(None, tiny_llama)
    also = load_artifact(kind, tiny_llama)
    assert type(back) is type(obj) is type(also)
    assert back.quick and also.quick
    for a, b in zip(_outputs(kind, obj, tiny_llama), _outputs(kind, back, tiny_llama)):
        assert torch.allclose(a.double(), b.double(), atol=1e-6)
    [record] = list_artifacts(tiny_llama)
    assert record.kind == kind and record.quick


def test_old_call_forms_keep_working(tiny_llama, tmp_path):
    """The forms users relied on before the contract: shapes in TunedLens's __init__, settings in
    its fit, train_tuned_lens, keyword ``model=`` loads, JacobianLens.fit on the class."""
    from tlmicroscope.geometry.projection import LatentPCA
    from tlmicroscope.lenses.train import train_tuned_lens
    from tlmicroscope.lenses.tuned import TunedLens

    lens = TunedLens(3, 32)
    assert tuple(lens.weight.shape) == (3, 32, 32)
    res = train_tuned_lens(
        tiny_llama,
        [TEXT * 4],
        steps=1,
        tokens_per_step=64,
        seq_len=32,
        init="zero",
        progress=False,
        precision="fp32",
    )
    res.lens.save(tmp_path / "lens")
    back = TunedLens.load(tmp_path / "lens", model=tiny_llama)
    assert torch.equal(back.weight, res.lens.weight) and not back.quick
    pca = LatentPCA(2).fit(torch.randn(50, 32))
    pca.save(tmp_path / "pca", model=tiny_llama)
    assert LatentPCA.load(tmp_path / "pca", model=tiny_llama).n_components == 2
    with pytest.raises(ValueError, match="tied to no model"):
        LatentPCA(2).fit(torch.randn(50, 32)).save()
    with pytest.raises(TypeError, match="Unknown tuned-lens training setting.*steps"):
        TunedLens(step=3)
    if _has_jacobian_lens():
        from tlmicroscope.lenses.jacobian import JacobianLens

        prompts = ["a short prompt to fit on"]
        jl = JacobianLens.fit(tiny_llama, prompts, skip_first_positions=2, progress=False)
        assert jl.n_prompts == 1 and not jl.quick


def test_quick_fills_in_only_the_settings_not_given(tiny_llama):
    """``fit(quick=True)`` takes ``QUICK`` for what the constructor left at its default: a
    setting given to the constructor wins (so the demo's probe steps and a tuned lens's window
    reach the fit), and a tuned lens's quick window is cut to a shorter context."""
    from tlmicroscope.causal.basis import CausalBasis
    from tlmicroscope.lenses.tuned import TunedLens
    from tlmicroscope.microscope.contextualization import ContextualizationProbe

    probe = ContextualizationProbe(steps=3)
    probe._apply_fit_settings(None, None, None, True)
    assert probe.quick and probe.steps == 3
    assert probe.warmup == ContextualizationProbe.QUICK["warmup"]
    assert TunedLens()._quick_for(tiny_llama)["seq_len"] == int(tiny_llama.cfg.n_ctx) == 128
    assert TunedLens.QUICK["seq_len"] == 256 and TunedLens.QUICK["steps"] == 2
    lens = _fit_quick("tuned-lens", tiny_llama)  # seq_len=32 etc. given to the constructor
    assert lens.quick and lens.settings["seq_len"] == 32 and lens.settings["steps"] == 2
    assert lens.settings["tokens_per_step"] == 64
    basis = CausalBasis(layer=1, k=2)
    toks = torch.randint(0, 256, (8, 16), generator=torch.Generator().manual_seed(0))
    basis.fit(tiny_llama, toks, quick=True, progress=False, on_nonconvergence="ignore")
    assert basis.quick and basis.k == 2 and basis.max_iter == CausalBasis.QUICK["max_iter"]
