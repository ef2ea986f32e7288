"""The microscope subcommands on the tiny model (their artefacts go to a temporary cache)."""

import pytest

from tlmicroscope.cli import main

pytestmark = pytest.mark.models

# The page is the report's ``microscope`` preset: its sections carry the report's titles.
NONLIN = "llm-microscope-token-wise-non-linearity"
LINEARITY = "llm-microscope-linearity-per-layer"
CONTRIB = "llm-microscope-layer-contributions"
ATTRIBUTION = "llm-microscope-component-attribution"
CONTEXT = "llm-microscope-contextualization"
TABLE = "logit-lens-llm-microscope-style"


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TLMICROSCOPE_HOME", str(tmp_path / "home"))


def _sections(html: str) -> dict[str, str]:
    import re

    return dict(re.findall(r'data-section="([^"]+)" data-status="([^"]+)"', html))


def test_microscope_writes_the_panels(tmp_path, capsys):
    out = tmp_path / "m.html"
    # no probe yet: the contextualization panel is a notice with the command that trains one
    assert (
        main(
            [
                "microscope",
                "The cat sat on the mat.",
                "--model",
                "tiny-llama",
                "--out",
                str(out),
                "--fit-tokens",
                "1024",
            ]
        )
        == 0
    )
    sections = _sections(out.read_text())
    assert sections[NONLIN] == "ok" and sections[TABLE] == "ok"
    assert sections[CONTEXT] == "missing"
    assert "microscope-train-probe" in out.read_text()
    assert (
        main(
            [
                "microscope-train-probe",
                "--model",
                "tiny-llama",
                "--steps",
                "3",
                "--prefix-length",
                "4",
                "--mlp-hidden",
                "16",
            ]
        )
        == 0
    )
    assert (
        main(["microscope", "The cat sat on the mat.", "--model", "tiny-llama", "--out", str(out)])
        == 0
    )
    sections = _sections(out.read_text())
    assert set(sections) == {NONLIN, LINEARITY, CONTRIB, ATTRIBUTION, CONTEXT, TABLE}
    assert all(v == "ok" for v in sections.values())
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(out.resolve())


def test_no_fit_shows_notices_and_bad_input_exits_2(tmp_path, capsys):
    out = tmp_path / "m.html"
    assert (
        main(["microscope", "hello", "--model", "tiny-llama", "--out", str(out), "--no-fit"]) == 0
    )
    sections = _sections(out.read_text())
    assert sections[NONLIN] == "missing" and "microscope-fit" in out.read_text()
    assert (
        main(
            [
                "microscope",
                "",
                "--model",
                "tiny-llama",
                "--out",
                str(tmp_path / "x.html"),
                "--no-fit",
            ]
        )
        == 2
    )
    assert "empty" in capsys.readouterr().err
    assert (
        main(["microscope", "hi", "--model", "tiny-llama", "--reference", str(tmp_path / "nope")])
        == 2
    )


def test_fit_linearity_and_removal_commands(tmp_path, capsys):
    ref = tmp_path / "ref"
    assert (
        main(
            [
                "microscope-fit",
                "--model",
                "tiny-llama",
                "--n-tokens",
                "1024",
                "--seq-len",
                "64",
                "--out",
                str(ref),
            ]
        )
        == 0
    )
    assert (ref / "config.json").is_file()
    assert (
        main(
            [
                "microscope-linearity",
                "--model",
                "tiny-llama",
                "--n-tokens",
                "1024",
                "--seq-len",
                "64",
                "--out",
                str(tmp_path / "lin.html"),
                "--csv",
                str(tmp_path / "lin.csv"),
            ]
        )
        == 0
    )
    assert "score_without_residual" in (tmp_path / "lin.csv").read_text()
    assert (
        main(
            [
                "microscope-removal",
                "--model",
                "tiny-llama",
                "--max-items",
                "8",
                "--n-passages",
                "3",
                "--removals",
                "articles",
                "--corpus",
                "none",
                "--out",
                str(tmp_path / "rm.html"),
            ]
        )
        == 0
    )
    assert "accuracy_delta" in capsys.readouterr().out
