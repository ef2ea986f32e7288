"""Every command turns a failure into one line and exit status 2 (issue 14, item 5).

Bad paths, bad thread counts and unknown models are caught before any model loads where they
can be; anything else a command raises (OSError, RuntimeError, ...) is still one line, and
``TLMICROSCOPE_DEBUG=1`` keeps the traceback.
"""

import sys
from pathlib import Path

import pytest

from tlmicroscope.app import cli

pytestmark = pytest.mark.models


def _commands() -> dict[str, bool]:
    """Every subcommand with a ``--model`` option, and whether its ``--out`` is a folder."""
    parser = cli._build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    out = {}
    for name, command in sub.choices.items():
        options = {o for a in command._actions for o in a.option_strings}
        if "--model" in options:
            out[name] = name in cli._FOLDER_OUT
    return out


COMMANDS = _commands()


def _other_args(command: str, tmp_path: Path) -> list[str]:
    parser = cli._build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    actions = sub.choices[command]._actions
    options = {o for a in actions for o in a.option_strings}
    args = (
        ["The cat sat."] if any(a.dest == "text" and not a.option_strings for a in actions) else []
    )
    if "--out" in options:
        args += ["--out", str(tmp_path / ("out-folder" if COMMANDS[command] else "out.html"))]
    if "--out-dir" in options:
        args += ["--out-dir", str(tmp_path / "out-dir")]
    return args


def _error_lines(err: str, command: str) -> list[str]:
    assert "Traceback" not in err
    return [
        line for line in err.splitlines() if line.startswith(f"tlmicroscope {command}: error: ")
    ]


def _needs_tl4(line: str) -> bool:
    """fit-jlens on TransformerLens 3 refuses first (one line too), before reading its options."""
    from tlmicroscope.models import access

    return access.TL_MAJOR < 4 and "needs TransformerLens 4.x" in line


def test_every_model_command_is_covered():
    # The parametrisations below run over these; a new command with --model joins them.
    assert {"lens", "report", "geometry", "microscope", "train-lens", "cbe"} <= set(COMMANDS)
    assert {"train-lens", "microscope-fit", "microscope-train-probe"} <= cli._FOLDER_OUT
    assert "lens" not in cli._FOLDER_OUT and "report" not in cli._FOLDER_OUT


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_negative_threads_is_one_line_in_every_command(command, tmp_path, capsys):
    argv = [command, *_other_args(command, tmp_path), "--model", "tiny-llama", "--threads", "-1"]
    assert cli.main(argv) == 2
    (line,) = _error_lines(capsys.readouterr().err, command)
    if _needs_tl4(line):
        return
    assert "--threads must be a positive number" in line and "got -1" in line


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_file_that_is_no_model_is_one_line_in_every_command(command, tmp_path, capsys):
    bad = tmp_path / "notes.txt"
    bad.write_text("root:x:0:0:root:/root:/bin/bash\n")
    argv = [command, *_other_args(command, tmp_path), "--model", str(bad)]
    assert cli.main(argv) == 2
    (line,) = _error_lines(capsys.readouterr().err, command)
    if _needs_tl4(line):
        return
    assert f"{bad} is a file but not a .gguf model file" in line and "tiny-llama" in line


@pytest.mark.skipif(not Path("/etc/passwd").is_file(), reason="needs /etc/passwd")
def test_etc_passwd_as_model(capsys, tmp_path):
    assert (
        cli.main(["lens", "hi", "--model", "/etc/passwd", "--out", str(tmp_path / "x.html")]) == 2
    )
    (line,) = _error_lines(capsys.readouterr().err, "lens")
    assert "/etc/passwd is a file but not a .gguf model file" in line


def test_missing_local_path_is_named(capsys, tmp_path):
    missing = tmp_path / "no" / "model"
    assert cli.main(["lens", "hi", "--model", str(missing), "--out", str(tmp_path / "x.html")]) == 2
    (line,) = _error_lines(capsys.readouterr().err, "lens")
    assert f"No model file or folder at {missing}" in line


def test_unknown_model_name_lists_what_loads(monkeypatch, capsys, tmp_path):
    # What Hugging Face raises offline for a name it cannot find; no network is touched.
    def offline(*args, **kwargs):
        raise OSError(
            "We couldn't connect to 'https://huggingface.co' to load the files.\nCheck ..."
        )

    from transformer_lens.model_bridge import TransformerBridge

    monkeypatch.setattr(TransformerBridge, "boot_transformers", offline)
    try:
        from transformer_lens import HookedTransformer
    except ImportError:
        HookedTransformer = None
    if HookedTransformer is not None:
        monkeypatch.setattr(HookedTransformer, "from_pretrained_no_processing", offline)
    assert (
        cli.main(["lens", "hi", "--model", "no-such-model-xyz", "--out", str(tmp_path / "x.html")])
        == 2
    )
    (line,) = _error_lines(capsys.readouterr().err, "lens")
    assert "Could not load the model 'no-such-model-xyz'" in line
    assert "tiny-llama" in line and "couldn't connect" in line


@pytest.mark.parametrize("command", ["lens", "report", "geometry", "microscope"])
def test_out_that_is_a_folder_is_refused_before_any_work(command, tmp_path, capsys):
    assert cli.main([command, "hi", "--model", "tiny-llama", "--out", str(tmp_path)]) == 2
    (line,) = _error_lines(capsys.readouterr().err, command)
    assert f"--out {tmp_path} is a folder" in line
    assert "loading" not in capsys.readouterr().err  # refused before the model loads


def test_folder_out_that_is_a_file_is_refused(tmp_path, capsys):
    f = tmp_path / "taken"
    f.write_text("x")
    assert cli.main(["train-lens", "--model", "tiny-llama", "--out", str(f)]) == 2
    (line,) = _error_lines(capsys.readouterr().err, "train-lens")
    assert "is a file, but this command writes a folder there" in line


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or not Path("/sys").is_dir(), reason="needs /sys"
)
def test_out_on_a_read_only_file_system(tmp_path, capsys):
    assert cli.main(["lens", "hi", "--model", "tiny-llama", "--out", "/sys/x.html"]) == 2
    (line,) = _error_lines(capsys.readouterr().err, "lens")
    assert "--out /sys/x.html cannot be written: /sys does not accept new files" in line


def test_out_in_a_folder_that_refuses_files(monkeypatch, tmp_path, capsys):
    # Portable: whatever the platform or user, a folder that refuses new files is reported.
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(cli.tempfile, "mkstemp", refuse)
    out = tmp_path / "new" / "deeper" / "x.html"
    assert cli.main(["lens", "hi", "--model", "tiny-llama", "--out", str(out)]) == 2
    (line,) = _error_lines(capsys.readouterr().err, "lens")
    assert f"cannot be written: {tmp_path} does not accept new files (Permission denied)" in line
    assert not (tmp_path / "new").exists()  # the check creates no folders


def test_a_writable_out_leaves_nothing_behind(tmp_path):
    out = cli.check_output_path(tmp_path / "a" / "b.html")
    assert out == tmp_path / "a" / "b.html"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "exc",
    [
        RuntimeError("set_num_threads expects a positive integer"),
        OSError("disk quota exceeded"),
        MemoryError("out of memory"),
    ],
)
def test_any_failure_inside_a_command_is_one_line(monkeypatch, capsys, tmp_path, exc):
    from tlmicroscope import models

    def fail(*args, **kwargs):
        raise exc

    monkeypatch.setattr(models, "load_model", fail)
    assert cli.main(["lens", "hi", "--out", str(tmp_path / "x.html")]) == 2
    (line,) = _error_lines(capsys.readouterr().err, "lens")
    assert type(exc).__name__ in line and str(exc) in line


def test_debug_keeps_the_traceback(monkeypatch, tmp_path):
    from tlmicroscope import models

    def fail(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(models, "load_model", fail)
    monkeypatch.setenv("TLMICROSCOPE_DEBUG", "1")
    with pytest.raises(RuntimeError, match="boom"):
        cli.main(["lens", "hi", "--out", str(tmp_path / "x.html")])
    with pytest.raises(ValueError, match="--threads"):
        cli.main(
            [
                "lens",
                "hi",
                "--model",
                "tiny-llama",
                "--threads",
                "0",
                "--out",
                str(tmp_path / "x.html"),
            ]
        )


def test_multi_line_messages_become_one_line():
    line = cli._one_line(
        ImportError("The dashboard needs Gradio. Install it with:\n    pip install x")
    )
    assert line == "The dashboard needs Gradio. Install it with: pip install x"
