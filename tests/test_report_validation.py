"""``report`` checks its arguments at the door, and a text too short for a section is a missing
prerequisite naming the tokens it needs (issues 12 "Bad input" and 14, item 6)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import tlmicroscope
from tlmicroscope.app.sections import SECTION_MODULES
from tlmicroscope.causal import extract_causal_basis
from tlmicroscope.lenses import TunedLens
from tlmicroscope.microscope import ContextualizationProbe, NonlinearityReference
from tlmicroscope.report import available_sections, available_settings, report

pytestmark = [
    pytest.mark.models,
    pytest.mark.filterwarnings("ignore:CBE on only", "ignore::UserWarning"),
]

CORPUS = [
    "The quick brown fox jumps over the lazy dog; PACK MY BOX WITH FIVE DOZEN JUGS! 0123456789 " * 6
]


def _tuned_lens(model, seed: int = 0) -> TunedLens:
    lens = TunedLens.for_model(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        lens.weight.copy_(0.1 * torch.randn(lens.weight.shape, generator=g))
        lens.bias.copy_(0.1 * torch.randn(lens.bias.shape, generator=g))
    return lens


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tiny_llama):
    """Every artifact a section can use, saved for the tiny model: nothing is missing but text."""
    root = tmp_path_factory.mktemp("artifacts")
    NonlinearityReference(n_tokens=512, seq_len=64).fit(tiny_llama, CORPUS, progress=False).save(
        root / "ref"
    )
    ContextualizationProbe(
        prefix_length=4,
        mlp_hidden=16,
        decoder="last_k",
        trainable_blocks=1,
        steps=2,
        window_length=16,
    ).fit(tiny_llama, CORPUS, progress=False).save(root / "probe")
    lens = _tuned_lens(tiny_llama)
    lens.save(root / "lens")
    toks = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1))
    extract_causal_basis(
        tiny_llama,
        lens=lens,
        corpus=toks,
        layer=1,
        k=3,
        max_iter=20,
        progress=False,
        on_nonconvergence="ignore",
    ).save(root / "basis")
    return root


def _settings(root: Path) -> dict:
    return {
        "microscope_reference": str(root / "ref"),
        "microscope_probe": str(root / "probe"),
        "causal_basis": str(root / "basis"),
    }


# -- settings, sections, lens -------------------------------------------------------------------
def test_unknown_setting_lists_the_valid_ones(tiny_llama):
    with pytest.raises(ValueError) as err:
        report(tiny_llama, "hello", sections=["trajectory"], top_kk=3)
    msg = str(err.value)
    assert "Unknown report settings 'top_kk' (did you mean 'top_k'?)" in msg
    for name in ("top_k", "truncate", "geometry_max_scale", "microscope_probe", "causal_basis"):
        assert name in msg


def test_declared_settings_are_the_ones_sections_read():
    # Independent of the declarations: every ctx.settings key a panel reads, from its source.
    read = set()
    for mod in SECTION_MODULES:
        src = Path(__import__(mod, fromlist=["_"]).__file__).read_text()
        read |= set(re.findall(r"settings\.get\(\"(\w+)\"", src))
        read |= set(re.findall(r"\bs\.get\(\"(\w+)\"", src))
        read |= set(re.findall(r"_load\(ctx, \"(\w+)\"", src))
    read.discard("lens_digest")  # a saved basis's provenance, not a report setting
    assert read <= set(available_settings()), read - set(available_settings())


def test_sections_as_one_string_is_one_section(tiny_llama):
    assert report(tiny_llama, "hello", sections="trajectory").rendered == ["trajectory"]


def test_bad_sections_are_named(tiny_llama):
    with pytest.raises(ValueError, match="'trajectry' \\(did you mean 'trajectory'\\?\\)"):
        report(tiny_llama, "hello", sections=["trajectry"])
    with pytest.raises(TypeError, match="sections must be names"):
        report(tiny_llama, "hello", sections=["trajectory", 3])
    with pytest.raises(TypeError, match="sections must be a section name or a list"):
        report(tiny_llama, "hello", sections=3)
    with pytest.raises(TypeError, match="text must be a string"):
        report(tiny_llama, ["hello"], sections="trajectory")


def test_lens_given_as_a_path_is_loaded(tiny_llama, saved):
    by_path = report(tiny_llama, "hello there", lens=str(saved / "lens"), sections="trajectory")
    by_object = report(
        tiny_llama,
        "hello there",
        lens=TunedLens.load(saved / "lens", tiny_llama),
        sections="trajectory",
    )
    plain = report(tiny_llama, "hello there", sections="trajectory")
    assert by_path.rendered == by_object.rendered == ["trajectory"]
    # The tuned lens's trajectory is drawn beside the logit lens's: the page grows by its figure(s).
    n_plots = [r.html().count("Plotly.newPlot") for r in (by_path, by_object, plain)]
    assert n_plots[0] == n_plots[1] > n_plots[2]


def test_lens_path_that_does_not_load_says_why(tiny_llama, tiny_gpt2, saved, tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing there.*train-lens"):
        report(tiny_llama, "hello", lens=str(tmp_path / "nope"), sections="trajectory")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="cannot be loaded for this model: No saved lens"):
        report(tiny_llama, "hello", lens=tmp_path / "empty", sections="trajectory")
    with pytest.raises(ValueError, match="cannot be loaded for this model"):
        report(
            tiny_gpt2, "hello", lens=str(saved / "lens"), sections="trajectory"
        )  # another model's
    with pytest.raises(TypeError, match="is not a lens"):
        report(tiny_llama, "hello", lens=42, sections="trajectory")


def test_missing_artifact_says_where_it_looked_and_the_command(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setenv("TLMICROSCOPE_HOME", str(tmp_path / "home"))
    rep = report(
        tiny_llama,
        "The cat sat on the mat.",
        sections=["microscope_context"],
        microscope_reference=str(tmp_path / "nope"),
    )
    assert (
        "looked in" in rep.missing["microscope_context"]
        and str(tmp_path / "home") in rep.missing["microscope_context"]
    )
    assert rep.fixes["microscope_context"].startswith("tlmicroscope microscope-train-probe")
    rep = report(
        tiny_llama,
        "x" * 120,
        sections=["microscope_nonlinearity"],
        microscope_reference=str(tmp_path / "nope"),
    )
    assert (
        f"No saved non-linearity reference at {tmp_path / 'nope'}"
        in rep.missing["microscope_nonlinearity"]
    )
    assert rep.fixes["microscope_nonlinearity"].startswith("tlmicroscope microscope-fit")


# -- short texts --------------------------------------------------------------------------------
@pytest.mark.parametrize("text, n_tokens", [("P", 1), ("Pa", 2)])
def test_every_section_on_a_one_and_two_token_text(tiny_llama, saved, text, n_tokens):
    assert tiny_llama.to_tokens(text).shape[-1] == n_tokens
    lens = TunedLens.load(saved / "lens", tiny_llama)
    rep = report(tiny_llama, text, lens=lens, sections=available_sections(), **_settings(saved))
    assert rep.failed == {}, rep.failed
    assert set(rep.rendered) | set(rep.missing) == set(available_sections())
    for name, message in rep.missing.items():
        if name == "latent_umap" and "umap" in message.lower() and "token" not in message:
            continue  # umap-learn not installed here: a missing install, not a short text
        # Every artifact is there, so a missing section is missing for length, and says by how much.
        need = re.search(rf"The text has {n_tokens} tokens?; .* needs? at least (\d+)", message)
        if name == "microscope_token_classes":  # summarises the two sections above
            need = need or re.search("neither is available", message)
        assert need, (name, message)
        if need.groups():
            assert int(need.group(1)) > n_tokens
    if n_tokens == 1:
        assert "microscope_contributions" in rep.missing  # was numpy's "All-NaN slice"
        assert "microscope_context" in rep.missing
    else:
        assert "microscope_contributions" in rep.rendered and "microscope_context" in rep.rendered


def test_one_token_report_through_the_public_name(tiny_llama):
    # tlmicroscope.report(model, "Paris")-like: a one-token text gives a page, never a failure.
    rep = tlmicroscope.report(tiny_llama, "P")
    assert rep.failed == {}
    assert "trajectory" in rep.rendered


@pytest.mark.embedded
def test_paris_on_the_embedded_model(embedded_model, tmp_path, monkeypatch):
    # The case: tlmicroscope.report(model, "Paris") on SmolLM2, one token, no artifacts.
    monkeypatch.setenv("TLMICROSCOPE_HOME", str(tmp_path))
    assert embedded_model.to_tokens("Paris").shape[-1] == 1
    rep = tlmicroscope.report(embedded_model, "Paris")
    assert rep.failed == {}, rep.failed
    assert (
        "The text has 1 token; the layer contributions" in rep.missing["microscope_contributions"]
    )
    assert "needs at least 2" in rep.missing["microscope_contributions"]
