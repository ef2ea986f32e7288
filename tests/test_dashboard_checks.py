"""The dashboard loads only what it offers, and warns when others can reach it (issue 14, item 9).

No browser and no server: the run generator, the path checks and the ``serve`` command are
exercised directly (``serve`` itself is replaced where it would start a server).
"""

from __future__ import annotations

import argparse
import os

import pytest

from tlmicroscope.app import cli, dashboard
from tlmicroscope.app.dashboard import (
    check_lens_path,
    check_model_choice,
    host_warning,
    make_analyse,
)

pytestmark = pytest.mark.models


class _Spy:
    """A model cache that records what it was asked to load and loads the tiny model."""

    def __init__(self, model):
        self.model, self.asked = model, []

    def get(self, name):
        self.asked.append(name)
        return self.model


def _run(analyse, model, lens="", text="hello there", sections=("trajectory",)):
    return list(analyse(model, text, list(sections), lens))


@pytest.mark.parametrize(
    "host, loopback",
    [
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("localhost", True),
        ("::1", True),
        ("[::1]", True),
        ("0.0.0.0", False),
        ("::", False),
        ("192.168.1.5", False),
        ("example.org", False),
    ],
)
def test_host_warning_only_off_loopback(host, loopback):
    msg = host_warning(host)
    assert (msg is None) == loopback
    if not loopback:
        assert host in msg and "not a loopback address" in msg and "--host 127.0.0.1" in msg


def test_models_are_limited_to_the_menu_and_the_model_folders(tmp_path, tiny_llama):
    inside = tmp_path / "models" / "mine.gguf"
    inside.parent.mkdir()
    inside.write_bytes(b"GGUF")
    outside = tmp_path / "elsewhere.gguf"
    outside.write_bytes(b"GGUF")
    link = tmp_path / "models" / "link.gguf"
    os.symlink(outside, link)  # a link out of the folder is outside it
    folders = [(tmp_path / "models").resolve()]
    assert check_model_choice("tiny-llama", ["tiny-llama"], folders) == "tiny-llama"
    assert check_model_choice(str(inside), ["tiny-llama"], folders) == str(inside.resolve())
    for bad in [
        str(outside),
        str(link),
        "/etc/passwd",
        str(tmp_path / "models" / ".." / "elsewhere.gguf"),
        "gpt2",
        str(tmp_path / "models" / "missing.gguf"),
    ]:
        with pytest.raises(ValueError, match="This dashboard offers the models tiny-llama"):
            check_model_choice(bad, ["tiny-llama"], folders)

    spy = _Spy(tiny_llama)
    analyse = make_analyse(["tiny-llama"], model_dirs=folders, cache=spy)
    status, _ = _run(analyse, "/etc/passwd")[-1]
    assert "Could not load the model &#x27;/etc/passwd&#x27;" in status and "tlm-error" in status
    assert spy.asked == []  # refused before any load was tried
    status, page = _run(analyse, "tiny-llama")[-1]
    assert status.startswith("Done:") and "report-frame" in page and spy.asked == ["tiny-llama"]


def test_lens_paths_are_limited_to_the_lens_folders(tmp_path, tiny_llama):
    from tlmicroscope.lenses import TunedLens

    lenses = tmp_path / "lenses"
    TunedLens.for_model(tiny_llama).save(lenses / "tuned")
    other = tmp_path / "other"
    TunedLens.for_model(tiny_llama).save(other)
    folders = [lenses.resolve()]
    assert check_lens_path("", folders) is None
    assert check_lens_path(str(lenses / "tuned"), folders) == (lenses / "tuned").resolve()
    with pytest.raises(ValueError, match="Lens folders are limited.*not under one"):
        check_lens_path(str(other), folders)
    with pytest.raises(ValueError, match=r"started with \(none\)"):
        check_lens_path(str(lenses / "tuned"), [])

    analyse = make_analyse(["tiny-llama"], lens_dirs=folders, cache=_Spy(tiny_llama))
    status, _ = _run(analyse, "tiny-llama", lens=str(other))[-1]
    assert "Lens folders are limited" in status
    status, page = _run(analyse, "tiny-llama", lens=str(lenses / "tuned"))[-1]
    assert status.startswith("Done:") and "tuned" in page


def test_empty_text_and_no_sections_are_reported(tiny_llama):
    analyse = make_analyse(["tiny-llama"], cache=_Spy(tiny_llama))
    assert "The text is empty" in _run(analyse, "tiny-llama", text="  ")[-1][0]
    assert "Pick at least one section" in _run(analyse, "tiny-llama", sections=())[-1][0]


def _serve_args(tmp_path, *extra):
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    from tlmicroscope.app import serve as serve_command

    serve_command.register(sub)
    return parser.parse_args(["serve", *extra])


def test_serve_command_warns_off_loopback_and_passes_the_folders(tmp_path, monkeypatch, capsys):
    seen = {}
    monkeypatch.setattr(dashboard, "serve", lambda *a, **k: seen.update(args=a, kwargs=k))
    (tmp_path / "m").mkdir()
    (tmp_path / "l").mkdir()
    args = _serve_args(
        tmp_path,
        "--host",
        "0.0.0.0",
        "--model-dir",
        str(tmp_path / "m"),
        "--lens-dir",
        str(tmp_path / "l"),
        "--models",
        "tiny-llama",
    )
    assert args.func(args) == 0
    err = capsys.readouterr().err
    assert "warning: The dashboard listens on 0.0.0.0, which is not a loopback address" in err
    assert seen["args"] == ("0.0.0.0", 7860, ["tiny-llama"])
    assert seen["kwargs"]["model_dirs"] == [(tmp_path / "m").resolve()]
    assert seen["kwargs"]["lens_dirs"] == [(tmp_path / "l").resolve()]
    args = _serve_args(tmp_path)
    assert args.func(args) == 0
    assert "warning" not in capsys.readouterr().err  # loopback by default


def test_serve_command_refuses_a_missing_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(dashboard, "serve", lambda *a, **k: pytest.fail("must not start"))
    assert cli.main(["serve", "--model-dir", str(tmp_path / "nope")]) == 2
    assert "The model folder" in capsys.readouterr().err


def test_serve_warns_from_python_too(monkeypatch):
    class Stop(Exception):
        pass

    def stop(*args, **kwargs):
        raise Stop

    monkeypatch.setattr(
        dashboard, "build_app", stop
    )  # no server: stop where the app would be built
    with (
        pytest.warns(UserWarning, match="listens on 0.0.0.0, which is not a loopback"),
        pytest.raises(Stop),
    ):
        dashboard.serve("0.0.0.0", 0, ["tiny-llama"], block=False)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a loopback host warns nothing
        with pytest.raises(Stop):
            dashboard.serve("127.0.0.1", 0, ["tiny-llama"], block=False)


def test_an_empty_lens_box_uses_the_stores_tuned_lens(tiny_llama, tmp_path, monkeypatch):
    from tlmicroscope.lenses import TunedLens

    monkeypatch.setenv("TLMICROSCOPE_HOME", str(tmp_path))
    analyse = make_analyse(["tiny-llama"], cache=_Spy(tiny_llama))
    page = _run(analyse, "tiny-llama", sections=("trajectory",))[-1][1]
    assert "lens tuned" not in page  # nothing fitted: the logit lens alone
    TunedLens.for_model(tiny_llama).save()  # into the store
    page = _run(analyse, "tiny-llama", sections=("trajectory",))[-1][1]
    assert "lens tuned" in page
