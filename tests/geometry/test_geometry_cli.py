"""The ``geometry`` and ``geometry-sweep`` subcommands on a tiny model."""

from __future__ import annotations

import json

import pytest

from tlmicroscope.cli import main

pytestmark = pytest.mark.models

TEXT = " ".join(f"token{i % 41} word{i % 13}" for i in range(20))


def test_geometry_command(tmp_path, capsys):
    out, csv = tmp_path / "g.html", tmp_path / "g.csv"
    assert (
        main(
            [
                "geometry",
                TEXT,
                "--model",
                "tiny-llama",
                "--out",
                str(out),
                "--csv",
                str(csv),
                "--max-scale",
                "16",
            ]
        )
        == 0
    )
    assert out.is_file() and "Token geometry per layer" in out.read_text()
    # the report's token-geometry panel, built by the same code: summary table and notice
    assert 'class="token-geometry-summary"' in out.read_text()
    assert "token-cloud IDs are noisy" in out.read_text()
    header = csv.read_text().splitlines()[0].split(",")
    assert header[:4] == ["layer", "label", "n_unique", "gride_2"] and "overlap_6" in header
    assert str(out) in capsys.readouterr().out


def test_geometry_command_bad_input(tmp_path, capsys):
    assert (
        main(
            [
                "geometry",
                "ab",
                "--model",
                "tiny-llama",
                "--out",
                str(tmp_path / "x.html"),
                "--max-scale",
                "8",
            ]
        )
        == 2
    )
    assert "needs at least 9 tokens" in capsys.readouterr().err


def test_geometry_sweep_command(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text(TEXT * 4)
    out = tmp_path / "s.jsonl"
    args = [
        "geometry-sweep",
        "--model",
        "tiny-llama",
        "--corpus",
        str(corpus),
        "--out",
        str(out),
        "--seq-len",
        "64",
        "--n-windows",
        "3",
        "--shuffle-levels",
        "0,2",
        "--max-scale",
        "16",
        "--no-progress",
    ]
    assert main(args) == 0
    lines = out.read_text().splitlines()
    assert json.loads(lines[0])["settings"]["n_prompts"] == 3 and len(lines) == 1 + 6
    assert out.with_suffix(".html").is_file()
    assert main(args) == 0  # resuming a finished sweep does nothing and succeeds
    assert len(out.read_text().splitlines()) == 7
