"""``tlmicroscope serve``: a local dashboard, built on Gradio.

Choose a model from the menu (or type a path under a folder the dashboard was started with),
paste a text, pick report sections, and see the report update. Runs show progress section by
section and can be stopped between sections; bad input (an empty text, a text over the context,
a model or lens path it does not offer) is reported on the page. The server never loads a path
outside the folders it was given (``model_dirs``, ``lens_dirs``), and warns when it listens on
an address other machines can reach. Gradio carries the web server, queueing, progress and
cancellation, so this module holds only the form and one generator.
"""

from __future__ import annotations

import html
import ipaddress
import os
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "DASHBOARD_INSTALL",
    "build_app",
    "check_lens_path",
    "check_model_choice",
    "host_warning",
    "make_analyse",
    "serve",
]

DASHBOARD_INSTALL = "pip install 'tlmicroscope[dashboard]'"
_DEFAULT_TEXT = "The capital of France is"


def _gradio():
    # Gradio phones home for analytics and version checks unless told not to; we run offline.
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        import gradio as gr
    except ImportError as exc:  # pragma: no cover - exercised by the CLI test through a flag
        raise ImportError(
            f"The dashboard needs Gradio. Install it with:\n    {DASHBOARD_INSTALL}"
        ) from exc
    return gr


class _Models:
    """Loaded models by name; keeps the most recent two so switching back is instant."""

    def __init__(self, keep: int = 2):
        self._keep = keep
        self._models: dict[str, Any] = {}
        self._lock = threading.Lock()

    def get(self, name: str) -> Any:
        from tlmicroscope.models import load_model

        with self._lock:
            if name not in self._models:
                model = load_model(name)
                self._models[name] = model
                while len(self._models) > self._keep:
                    self._models.pop(next(iter(self._models)))
            return self._models[name]


def _iframe(page_html: str) -> str:
    return (
        '<iframe id="report-frame" title="tlmicroscope report" style="width:100%;height:1100px;'
        f'border:1px solid #ddd" srcdoc="{html.escape(page_html, quote=True)}"></iframe>'
    )


def _error(message: str) -> str:
    return f'<div class="tlm-error" role="alert"><b>Error:</b> {html.escape(message)}</div>'


def _folders(dirs: Sequence[str | os.PathLike] | None, what: str) -> list[Path]:
    out = []
    for d in dirs or ():
        path = Path(os.path.expanduser(str(d))).resolve()
        if not path.is_dir():
            raise ValueError(f"The {what} folder {d} does not exist (or is not a folder).")
        out.append(path)
    return out


def _under(path: str, folders: Sequence[Path]) -> Path | None:
    """``path`` resolved (symbolic links followed), if it lies inside one of ``folders``."""
    try:
        real = Path(os.path.expanduser(path)).resolve()
    except (OSError, RuntimeError, ValueError):
        return None
    return real if any(real == f or real.is_relative_to(f) for f in folders) else None


def check_model_choice(name: str, choices: Sequence[str], model_dirs: Sequence[Path] = ()) -> str:
    """The model ``name`` if the dashboard offers it: one of ``choices`` or a path under
    ``model_dirs``.

    Raises:
        ValueError: anything else, with what is offered and how to offer more.

    Examples:
        >>> check_model_choice("tiny-llama", ["tiny-llama"])
        'tiny-llama'
        >>> check_model_choice("/etc/passwd", ["tiny-llama"])
        Traceback (most recent call last):
        ...
        ValueError: This dashboard offers the models tiny-llama, and no model folders; ...
    """
    name = (name or "").strip()
    if name in choices:
        return name
    real = _under(name, model_dirs) if name else None
    if real is not None and real.exists():
        return str(real)
    folders = (
        f"paths under {', '.join(str(f) for f in model_dirs)}" if model_dirs else "no model folders"
    )
    raise ValueError(
        f"This dashboard offers the models {', '.join(choices)}, and {folders}; {name!r} is "
        "neither. "
        "Start it with --models NAME,... or --model-dir FOLDER to offer more."
    )


def check_lens_path(path: str, lens_dirs: Sequence[Path] = ()) -> Path | None:
    """The lens folder typed in the form, if it lies under ``lens_dirs``; ``None`` for an empty box.

    Raises:
        ValueError: a path outside every lens folder (or no lens folder given at start).

    Examples:
        >>> check_lens_path("") is None
        True
        >>> check_lens_path("/etc")
        Traceback (most recent call last):
        ...
        ValueError: Lens folders are limited to those the dashboard was started with (none); ...
    """
    path = (path or "").strip()
    if not path:
        return None
    real = _under(path, lens_dirs)
    if real is None:
        given = ", ".join(str(f) for f in lens_dirs) or "none"
        raise ValueError(
            f"Lens folders are limited to those the dashboard was started with ({given}); "
            f"{path!r} is "
            "not under one. Start it with --lens-dir FOLDER."
        )
    return real


def host_warning(host: str) -> str | None:
    """A warning when ``host`` is not a loopback address (others could reach the dashboard).

    Examples:
        >>> [host_warning(h) is None for h in ("127.0.0.1", "localhost", "::1")]
        [True, True, True]
        >>> host_warning("0.0.0.0")[:46]
        'The dashboard listens on 0.0.0.0, which is not'
    """
    h = host.strip().strip("[]")
    if h.lower() == "localhost" or h.lower().endswith(".localhost"):
        return None
    try:
        if ipaddress.ip_address(h).is_loopback:
            return None
    except ValueError:
        pass  # a host name: it may be reachable from elsewhere
    return (
        f"The dashboard listens on {host}, which is not a loopback address: anyone who can reach "
        "this "
        "machine can run models on it and read the model and lens folders it was given, without a "
        "password. Use --host 127.0.0.1 unless that is what you want."
    )


def make_analyse(
    choices: Sequence[str],
    *,
    model_dirs: Sequence[Path] = (),
    lens_dirs: Sequence[Path] = (),
    cache: _Models | None = None,
) -> Callable[..., Iterator[tuple[str, str]]]:
    """The dashboard's run: a generator of ``(status_html, report_html)`` pairs (no Gradio needed).

    ``cache`` is anything with ``get(name) -> model`` (default: keeps the last two models loaded).

    Examples:
        >>> from tlmicroscope.models import tiny_model
        >>> class One:  # a model cache that always gives one tiny model
        ...     def get(self, name):
        ...         return tiny_model(n_layers=1)
        >>> run = make_analyse(["tiny-llama"], cache=One())
        >>> status, page = list(run("tiny-llama", "hello", ["trajectory"], ""))[-1]
        >>> status[:5], "report-frame" in page
        ('Done:', True)
        >>> list(run("/etc/passwd", "hello", ["trajectory"], ""))[-1][0][:60]
        '<div class="tlm-error" role="alert"><b>Error:</b> Could not '
    """
    from tlmicroscope import artifacts
    from tlmicroscope.app.report import report_steps
    from tlmicroscope.lenses import load_lens

    cache = cache or _Models()

    def analyse(
        model_name: str,
        text: str,
        chosen: list[str],
        lens_path: str,
        progress: Callable[..., Any] = lambda *a, **k: None,
    ) -> Iterator[tuple[str, str]]:
        if not text or not text.strip():
            yield _error("The text is empty: type or paste something to analyse."), ""
            return
        if not chosen:
            yield _error("Pick at least one section."), ""
            return
        try:
            name = check_model_choice(model_name, choices, model_dirs)
        except ValueError as exc:
            yield _error(f"Could not load the model {model_name!r}: {exc}"), ""
            return
        try:
            lens_dir = check_lens_path(lens_path, lens_dirs)
        except ValueError as exc:
            yield _error(str(exc)), ""
            return
        yield f"Loading {html.escape(model_name)} …", ""
        try:
            model = cache.get(name)
        except Exception as exc:
            yield _error(f"Could not load the model {model_name!r}: {exc}"), ""
            return
        try:
            if lens_dir is None:  # the artifact store's tuned lens for this model, if fitted
                lens_dir = artifacts.find_artifact("tuned-lens", model)
            lens = load_lens(lens_dir, model) if lens_dir is not None else None
            steps = report_steps(
                model, text, lens=lens, sections=chosen, title=f"tlmicroscope: {model_name}"
            )
            for done, total, section, rep in steps:  # noqa: B007 (rep: the last one is used)
                progress((done, total), desc=f"section {section}" if section else "done")
                if section:
                    yield f"Running section {done + 1} of {total}: {html.escape(section)} …", ""
        except (ValueError, TypeError, OSError, ImportError) as exc:
            yield _error(str(exc)), ""
            return
        notes = [f"{len(rep.rendered)} sections rendered"]
        if rep.missing:
            notes.append(f"missing prerequisites: {', '.join(rep.missing)}")
        if rep.failed:
            notes.append(f"failed: {', '.join(rep.failed)}")
        yield "Done: " + "; ".join(notes) + ".", _iframe(rep.html())

    return analyse


def build_app(
    models: Sequence[str] | None = None,
    *,
    default_text: str = _DEFAULT_TEXT,
    model_dirs: Sequence[str | os.PathLike] = (),
    lens_dirs: Sequence[str | os.PathLike] = (),
) -> Any:
    """The Gradio app (not launched).

    ``models`` lists the names offered (default: those available offline); a typed model path
    is loaded only under ``model_dirs``, and a lens folder only under ``lens_dirs``.
    """
    gr = _gradio()
    from tlmicroscope.app.sections import available_sections, default_sections
    from tlmicroscope.models import available_models

    choices = list(models) if models else available_models()
    model_folders, lens_folders = _folders(model_dirs, "model"), _folders(lens_dirs, "lens")
    sections = available_sections()
    defaults = default_sections()
    run_report = make_analyse(choices, model_dirs=model_folders, lens_dirs=lens_folders)

    def analyse(
        model_name: str,
        text: str,
        chosen: list[str],
        lens_path: str,
        progress=gr.Progress(),  # noqa: B008 (Gradio reads this default to inject progress)
    ) -> Iterator[tuple[str, str]]:
        yield from run_report(model_name, text, chosen, lens_path, progress=progress)

    model_label = "Model" + (
        f" (or a .gguf file / HF folder under {', '.join(map(str, model_folders))})"
        if model_folders
        else ""
    )
    lens_label = "Tuned lens folder (optional; empty: the artifact store's, if fitted" + (
        f"; or one under {', '.join(map(str, lens_folders))})"
        if lens_folders
        else "; no other offered: --lens-dir)"
    )
    theme = gr.themes.Default(font=["system-ui", "sans-serif"], font_mono=["monospace"])
    with gr.Blocks(title="tlmicroscope") as app:
        gr.Markdown(
            "# tlmicroscope\nWhat each layer of a language model knows: pick a model, "
            "paste a text, choose sections."
        )
        with gr.Row():
            model_box = gr.Dropdown(
                choices=choices,
                value=choices[0] if choices else None,
                allow_custom_value=True,
                label=model_label,
                elem_id="tlm-model",
            )
            lens_box = gr.Textbox(label=lens_label, elem_id="tlm-lens")
        text_box = gr.Textbox(value=default_text, lines=4, label="Text", elem_id="tlm-text")
        section_box = gr.CheckboxGroup(
            choices=sections, value=defaults, label="Sections", elem_id="tlm-sections"
        )
        with gr.Row():
            run = gr.Button("Analyse", variant="primary", elem_id="tlm-run")
            stop = gr.Button("Stop", elem_id="tlm-stop")
        status = gr.HTML(elem_id="tlm-status")
        out = gr.HTML(elem_id="tlm-report")
        event = run.click(analyse, [model_box, text_box, section_box, lens_box], [status, out])
        stop.click(lambda: "Stopped.", None, status, cancels=[event])
    app._tlm_theme = theme
    return app


def serve(
    host: str = "127.0.0.1",
    port: int = 7860,
    models: Sequence[str] | None = None,
    *,
    block: bool = True,
    model_dirs: Sequence[str | os.PathLike] = (),
    lens_dirs: Sequence[str | os.PathLike] = (),
    warn_host: bool = True,
) -> Any:
    """Launch the dashboard on ``host:port`` (loopback by default). Returns the app.

    A ``host`` other machines can reach gets a warning (``warn_host=False``: the caller said it).
    """
    message = host_warning(host)
    if message and warn_host:
        warnings.warn(message, UserWarning, stacklevel=2)
    app = build_app(models, model_dirs=model_dirs, lens_dirs=lens_dirs)
    app.queue(default_concurrency_limit=1).launch(
        server_name=host,
        server_port=port,
        share=False,
        inbrowser=False,
        show_error=True,
        prevent_thread_lock=not block,
        quiet=not block,
        theme=app._tlm_theme,
    )
    return app
