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


def test_console_script_entry_point():
    done = subprocess.run(
        [sys.executable, "-m", "tlmicroscope.cli", "--version"], capture_output=True, text=True
    )
    assert done.returncode == 0 and done.stdout.startswith("tlmicroscope ")
