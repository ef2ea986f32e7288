"""The demo: quick fits of what the store lacks, then a report where every default section draws."""

from __future__ import annotations

import shutil

import pytest
import torch

from tlmicroscope import artifacts
from tlmicroscope.app import demo
from tlmicroscope.app.sections import default_sections


def _small_probe(mp: pytest.MonkeyPatch) -> None:
    """The probe's quick settings cut to 4 steps: the tiny models need the path, not the fit."""
    from tlmicroscope.microscope.contextualization import ContextualizationProbe

    mp.setattr(ContextualizationProbe, "QUICK", {"steps": 4, "warmup": 1})


def _corpus() -> list[str]:
    return [demo.demo_text()] * 2  # about 5.6k bytes: one token per byte on the tiny models


@pytest.fixture(scope="module")
def first_run(tiny_llama, tmp_path_factory):
    """One ``run_demo`` on the tiny model into an empty store: its report, page and store."""
    home = tmp_path_factory.mktemp("demo") / "home"
    out = home.parent / "page" / "demo.html"
    reports = []
    real = demo.demo_report

    def keep(*args, **kwargs):
        reports.append(real(*args, corpus=_corpus(), **kwargs))
        return reports[-1]

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TLMICROSCOPE_HOME", str(home))
        _small_probe(mp)
        plan = [f.kind for f in demo.plan_demo_fits(tiny_llama)]
        mp.setattr(demo, "demo_report", keep)
        path = demo.run_demo(tiny_llama, out=out, progress=False)
    return {"plan": plan, "report": reports[0], "path": path, "out": out, "home": home}


@pytest.fixture
def store(first_run, tmp_path, monkeypatch):
    """A copy of the first run's store, for a test that changes it."""
    home = tmp_path / "home"
    shutil.copytree(first_run["home"], home)
    monkeypatch.setenv("TLMICROSCOPE_HOME", str(home))
    _small_probe(monkeypatch)
    return home


def test_demo_text_is_long_enough_for_every_estimator():
    from tlmicroscope.geometry.layer_geometry import min_tokens

    text = demo.demo_text()
    # the token-geometry section's own minimum with its default overlap sizes 1..6
    assert len(text.encode()) > min_tokens(None, (1, 2, 3, 4, 5, 6))
    assert 400 < len(text.split()) < 700  # a few hundred SmolLM2 tokens (588, README)


def test_demo_fits_what_is_missing_and_every_default_section_draws(tiny_llama, first_run):
    from tlmicroscope.microscope.nonlinearity import NonlinearityReference

    model, rep = tiny_llama, first_run["report"]
    assert first_run["plan"] == [f.kind for f in demo.DEMO_FITS]  # the store was empty
    assert rep.missing == {} and rep.failed == {}
    assert rep.rendered == default_sections()
    assert first_run["path"] == first_run["out"]
    html = first_run["out"].read_text()
    assert "Causal basis energies" in html and "LLM-Microscope: contextualization" in html
    # the captions say which fits are quick and name the command of the full one
    for kind in ("tuned-lens", "nonlinearity-reference", "contextualization-probe", "causal-basis"):
        assert f"This {kind} is a quick fit" in html
    assert "tlmicroscope train-lens --model" in html
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TLMICROSCOPE_HOME", str(first_run["home"]))
        records = {r.kind: r for r in artifacts.list_artifacts(model)}
        assert set(records) == {f.kind for f in demo.DEMO_FITS}
        assert all(r.quick for r in records.values())
        # loaded back, each says it is quick (the captions read this) and has the demo's settings
        for fit in demo.DEMO_FITS:
            assert artifacts.is_quick(artifacts.load_artifact(fit.kind, model, variant=fit.variant))
        probe = artifacts.load_artifact("contextualization-probe", model)
        assert probe.steps_done_ == 4  # the class's QUICK (cut by _small_probe), by fit(quick=True)
        assert probe.quick and probe.window_length == 64  # the default, not changed by quick
        # the store is complete: a second run fits nothing
        assert demo.plan_demo_fits(model, demo._store_lens(model)) == []
    # the stored reference is the fit the quick settings make, done here independently
    settings = demo.quick_settings("nonlinearity-reference", model)
    assert settings["n_tokens"] == 4096
    mine = NonlinearityReference(**settings).fit(model, _corpus(), progress=False)
    saved = NonlinearityReference.load(records["nonlinearity-reference"].path, model)
    torch.testing.assert_close(saved.maps_, mine.maps_)


def test_full_fit_in_the_store_wins_and_a_new_lens_refits_its_basis(tiny_llama, store):
    from tlmicroscope.lenses.tuned import TunedLens
    from tlmicroscope.microscope.nonlinearity import NonlinearityReference

    model = tiny_llama
    full = NonlinearityReference(n_tokens=1024, seq_len=128).fit(model, _corpus(), progress=False)
    path = full.save(artifacts.artifact_path("nonlinearity-reference", model))
    assert not artifacts.is_quick(path)
    # another tuned lens in the store: its basis no longer matches, the rest is kept
    lens = TunedLens.for_model(model)
    with torch.no_grad():
        lens.bias.add_(0.1)
    lens.save(artifacts.artifact_path("tuned-lens", model))
    plan = demo.plan_demo_fits(model, demo._store_lens(model))
    assert [f.kind for f in plan] == ["causal-basis"]
    demo.ensure_demo_fits(model, progress=False, corpus=_corpus())
    assert demo.plan_demo_fits(model, demo._store_lens(model)) == []
    kept = NonlinearityReference.load(path, model)
    assert kept.n_tokens_ == 1024 and not artifacts.is_quick(path)


def test_spent_budget_leaves_fits_out_and_says_which(tiny_llama, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TLMICROSCOPE_HOME", str(tmp_path / "home"))
    found = demo.ensure_demo_fits(tiny_llama, budget_s=0, progress=False, corpus=_corpus())
    assert found == {} and artifacts.list_artifacts(tiny_llama) == []
    err = capsys.readouterr().err
    assert "no quick contextualization probe (the budget was spent)" in err
    assert "tlmicroscope microscope-train-probe --model" in err  # the command that makes it


def test_bad_out_and_budget_are_refused_before_any_work(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setenv("TLMICROSCOPE_HOME", str(tmp_path / "home"))
    with pytest.raises(ValueError, match="is a folder"):
        demo.run_demo(tiny_llama, out=tmp_path, progress=False)
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        demo.run_demo(tiny_llama, out=tmp_path / "file" / "demo.html", progress=False)
    with pytest.raises(ValueError, match="budget_s must be"):
        demo.ensure_demo_fits(tiny_llama, budget_s=-1, progress=False)
    assert not (tmp_path / "home").exists()  # nothing was fitted


def test_unknown_kind_names_the_ones_it_makes(tiny_llama):
    with pytest.raises(ValueError, match="nonlinearity-reference"):
        demo.quick_settings("jacobian-lens", tiny_llama)


@pytest.mark.embedded
@pytest.mark.slow
def test_embedded_demo_draws_every_default_section(embedded_model, tmp_path, monkeypatch):
    """The first run on SmolLM2-135M: four quick fits (minutes on two cores), then the report."""
    monkeypatch.setenv("TLMICROSCOPE_HOME", str(tmp_path / "home"))
    # a generous budget: on a busy machine the default 600 s can leave the causal basis out
    rep = demo.demo_report(embedded_model, budget_s=3600, progress=False)
    assert rep.missing == {} and rep.failed == {}
    assert rep.rendered == default_sections()
    assert "588 tokens of text" in rep.html()  # the whole shipped text, no BOS added
    # the quick tuned lens already reads layer 15 far better than the logit lens (17.1 nats of
    # held-out KL there, README "Tuned lens")
    kl = artifacts.load_artifact("tuned-lens", embedded_model).settings["final_train_kl"]
    assert kl[15] < 17.1 / 2
