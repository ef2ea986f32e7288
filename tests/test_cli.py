import subprocess
import sys

import pytest

from tlmicroscope.cli import main

pytestmark = pytest.mark.models


def test_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for command in ("lens", "report", "demo"):
        assert command in out


def test_lens_command_writes_html(tmp_path, capsys):
    out = tmp_path / "lens.html"
    assert main(["lens", "hello world", "--model", "tiny-llama", "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out.resolve())
    assert "Plotly.newPlot" in out.read_text()


def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    assert main(["lens", "", "--model", "tiny-llama", "--out", str(tmp_path / "x.html")]) == 2
    err = capsys.readouterr().err
    assert "error: The text is empty" in err and not (tmp_path / "x.html").exists()
    assert (
        main(
            [
                "lens",
                "x" * 600,
                "--model",
                "tiny-llama",
                "--n-ctx",
                "512",
                "--out",
                str(tmp_path / "x.html"),
            ]
        )
        == 2
    )
    assert "600 tokens long" in capsys.readouterr().err


def test_console_script_entry_point(monkeypatch, capsys):
    done = subprocess.run(
        [sys.executable, "-m", "tlmicroscope.cli", "--version"], capture_output=True, text=True
    )
    assert done.returncode == 0 and done.stdout.startswith("tlmicroscope ")
    # python -m tlmicroscope (what torchrun -m tlmicroscope runs), in-process
    import runpy

    monkeypatch.setattr(sys, "argv", ["tlmicroscope", "--version"])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_module("tlmicroscope", run_name="__main__")
    assert exit_.value.code == 0 and capsys.readouterr().out.startswith("tlmicroscope ")


def _statuses(html: str) -> dict[str, str]:
    import re

    return dict(re.findall(r'data-section="([^"]+)" data-status="([^"]+)"', html))


def test_lens_command_is_the_lens_preset_of_the_report(tmp_path, capsys):
    from tlmicroscope.app.sections import PRESETS

    out = tmp_path / "lens.html"
    argv = ["lens", "The cat sat on the mat.", "--model", "tiny-llama", "--out", str(out)]
    assert main([*argv, "--lens", "logit-paper", "--top-k", "3"]) == 0
    assert PRESETS["lens"].sections == ("trajectory", "logit_lens_table")
    statuses = _statuses(out.read_text())
    assert statuses == {
        "prediction-trajectories": "ok",
        "logit-lens-llm-microscope-style": "ok",
    }
    assert "logit (paper: no final norm)" in out.read_text()  # the chosen lens is drawn too
    assert capsys.readouterr().out.strip() == str(out.resolve())


def test_artifacts_lists_what_is_fitted_and_what_makes_the_rest(tmp_path, monkeypatch, capsys):
    from tlmicroscope import artifacts
    from tlmicroscope.microscope.nonlinearity import NonlinearityReference
    from tlmicroscope.models import load_model

    monkeypatch.setenv("TLMICROSCOPE_HOME", str(tmp_path / "home"))
    assert main(["artifacts", "--model", "tiny-llama"]) == 0
    out = capsys.readouterr().out
    assert f"Artifact store: {tmp_path / 'home'}" in out
    for kind in artifacts.KINDS:  # nothing fitted: every kind is missing, with its command
        assert f"{kind} " in out
    assert "tlmicroscope microscope-fit --model" in out
    model = load_model("tiny-llama")
    ref = NonlinearityReference().fit(model, quick=True, n_tokens=256)
    path = ref.save()
    assert path == artifacts.artifact_path("nonlinearity-reference", model)
    assert main(["artifacts", "--model", "tiny-llama"]) == 0
    out = capsys.readouterr().out
    fitted, missing = out.split("Missing")
    assert "nonlinearity-reference" in fitted and "quick" in fitted and str(path) in fitted
    assert "nonlinearity-reference" not in missing and "tuned-lens" in missing
    assert main(["artifacts"]) == 0  # every model in the store
    assert str(path) in capsys.readouterr().out


def test_demo_command_calls_run_demo_with_its_options(tmp_path, monkeypatch, capsys):
    from tlmicroscope.app import demo

    seen = {}

    def fake(model, *, out, budget_s, progress):
        seen.update(model=model, out=out, budget_s=budget_s, progress=progress)
        return tmp_path / "d.html"

    monkeypatch.setattr(demo, "run_demo", fake)
    out = str(tmp_path / "d.html")
    assert main(["demo", "--out", out, "--model", "tiny-llama", "--budget", "30"]) == 0
    assert seen == {"model": "tiny-llama", "out": out, "budget_s": 30.0, "progress": True}
    assert capsys.readouterr().out.strip() == str((tmp_path / "d.html").resolve())
    assert main(["demo", "--out", out, "--budget", "0"]) == 2
    assert "--budget must be a positive number of seconds" in capsys.readouterr().err


def test_report_command_shows_the_stores_tuned_lens(tmp_path, monkeypatch, capsys):
    from tlmicroscope import artifacts
    from tlmicroscope.lenses import TunedLens
    from tlmicroscope.models import load_model

    monkeypatch.setenv("TLMICROSCOPE_HOME", str(tmp_path / "home"))
    out = tmp_path / "r.html"
    argv = ["report", "The cat sat.", "--model", "tiny-llama", "--sections", "trajectory"]
    assert main([*argv, "--out", str(out)]) == 0
    assert "lens tuned" not in out.read_text()  # nothing in the store: the logit lens alone
    model = load_model("tiny-llama")
    saved = TunedLens.for_model(model).save()
    assert saved == artifacts.artifact_path("tuned-lens", model)
    capsys.readouterr()
    assert main([*argv, "--out", str(out)]) == 0
    assert "lens tuned" in out.read_text() and str(saved) in capsys.readouterr().err
    assert main([*argv, "--out", str(out), "--lens", "logit"]) == 0
    assert "lens tuned" not in out.read_text()
