"""The ``latent`` subcommand on a tiny model."""

from __future__ import annotations

import re

import pytest

from tlmicroscope.cli import main

pytestmark = pytest.mark.models


def test_latent_page(tmp_path, capsys):
    out = tmp_path / "latent.html"
    rc = main(
        [
            "latent",
            "--model",
            "tiny-gpt2",
            "--n-windows",
            "3",
            "--seq-len",
            "24",
            "--out",
            str(out),
            "--text",
            "hello world",
            "--max-points",
            "500",
        ]
    )
    assert rc == 0
    html = out.read_text()
    sections = re.findall(r'data-section="([^"]+)"', html)
    assert sections == [
        "attention-vs-mlp-outputs-pca",
        "attention-vs-mlp-separation-by-block",
        "residual-stream-by-layer-unit-vectors",
        "norms-by-position-and-layer",
        "positions",
        "token-trajectories",
    ]
    assert "Learned positional embeddings: PCA of W_pos" in html
    assert "<script src=" not in html  # offline: plotly is embedded
    assert str(out.resolve()) in capsys.readouterr().out


def test_latent_rotary_and_missing_umap(tmp_path, monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "umap", None)
    out = tmp_path / "latent.html"
    rc = main(
        [
            "latent",
            "--model",
            "tiny-llama",
            "--n-windows",
            "2",
            "--seq-len",
            "16",
            "--out",
            str(out),
            "--umap",
            "--layers",
            "0:2",
        ]
    )
    assert rc == 0
    html = out.read_text()
    assert "mean residual stream per position over 2 corpus windows and blocks 0-1" in html
    assert 'data-status="missing"' in html and "pip install &#x27;tlmicroscope[umap]&#x27;" in html


@pytest.mark.parametrize(
    "args, match",
    [
        (["--layers", "x:y"], "--layers must look like"),
        (["--layers", "0:9"], "must name blocks"),
        (["--n-windows", "0"], "--n-windows"),
    ],
)
def test_latent_bad_arguments(tmp_path, capsys, args, match):
    rc = main(["latent", "--model", "tiny-gpt2", "--out", str(tmp_path / "x.html"), *args])
    assert rc == 2
    assert match in capsys.readouterr().err
