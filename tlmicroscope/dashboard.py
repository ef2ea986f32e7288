"""``tlmicroscope serve``: a local dashboard, built on Gradio.

Choose a model available offline (or type a path), paste a text, pick report sections, and see
the report update. Runs show progress section by section and can be stopped between sections;
bad input (an empty text, a text over the context, an unknown model) is reported on the page.
Gradio carries the web server, queueing, progress and cancellation, so this module holds only
the form and one generator.
"""

from __future__ import annotations

import html
import os
import threading
from collections.abc import Iterator, Sequence
from typing import Any

__all__ = ["build_app", "serve", "DASHBOARD_INSTALL"]

DASHBOARD_INSTALL = "pip install 'tlmicroscope[dashboard]'"
_DEFAULT_TEXT = "The capital of France is"


def _gradio():
    # Gradio phones home for analytics and version checks unless told not to; we run offline.
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        import gradio as gr
    except ImportError as exc:  # pragma: no cover - exercised by the CLI test through a flag
        raise ImportError(f"The dashboard needs Gradio. Install it with:\n    {DASHBOARD_INSTALL}") from exc
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


def build_app(models: Sequence[str] | None = None, *, default_text: str = _DEFAULT_TEXT) -> Any:
    """The Gradio app (not launched). ``models`` lists the names offered; typed names/paths work too."""
    gr = _gradio()
    from tlmicroscope.lenses import load_lens
    from tlmicroscope.models import available_models
    from tlmicroscope.report import _SECTIONS, available_sections, report_steps

    choices = list(models) if models else available_models()
    sections = available_sections()
    defaults = [n for n in sections if _SECTIONS[n].default]
    cache = _Models()

    def analyse(model_name: str, text: str, chosen: list[str], lens_path: str,
                progress=gr.Progress()) -> Iterator[tuple[str, str]]:
        if not text or not text.strip():
            yield _error("The text is empty: type or paste something to analyse."), ""
            return
        if not chosen:
            yield _error("Pick at least one section."), ""
            return
        yield f"Loading {html.escape(model_name)} …", ""
        try:
            model = cache.get(model_name)
        except Exception as exc:  # unknown names, missing files, missing wheels
            yield _error(f"Could not load the model {model_name!r}: {exc}"), ""
            return
        try:
            lens = load_lens(lens_path, model) if lens_path and lens_path.strip() else None
            steps = report_steps(model, text, lens=lens, sections=chosen, title=f"tlmicroscope: {model_name}")
            for done, total, name, rep in steps:
                progress((done, total), desc=f"section {name}" if name else "done")
                if name:
                    yield f"Running section {done + 1} of {total}: {html.escape(name)} …", ""
        except (ValueError, FileNotFoundError, ImportError) as exc:
            yield _error(str(exc)), ""
            return
        notes = [f"{len(rep.rendered)} sections rendered"]
        if rep.missing:
            notes.append(f"missing prerequisites: {', '.join(rep.missing)}")
        if rep.failed:
            notes.append(f"failed: {', '.join(rep.failed)}")
        yield "Done: " + "; ".join(notes) + ".", _iframe(rep.html())

    theme = gr.themes.Default(font=["system-ui", "sans-serif"], font_mono=["monospace"])
    with gr.Blocks(title="tlmicroscope") as app:
        gr.Markdown("# tlmicroscope\nWhat each layer of a language model knows: pick a model, "
                    "paste a text, choose sections.")
        with gr.Row():
            model_box = gr.Dropdown(choices=choices, value=choices[0] if choices else None,
                                    allow_custom_value=True, label="Model (or a local .gguf / HF folder)",
                                    elem_id="tlm-model")
            lens_box = gr.Textbox(label="Tuned lens folder (optional)", elem_id="tlm-lens")
        text_box = gr.Textbox(value=default_text, lines=4, label="Text", elem_id="tlm-text")
        section_box = gr.CheckboxGroup(choices=sections, value=defaults, label="Sections",
                                       elem_id="tlm-sections")
        with gr.Row():
            run = gr.Button("Analyse", variant="primary", elem_id="tlm-run")
            stop = gr.Button("Stop", elem_id="tlm-stop")
        status = gr.HTML(elem_id="tlm-status")
        out = gr.HTML(elem_id="tlm-report")
        event = run.click(analyse, [model_box, text_box, section_box, lens_box], [status, out])
        stop.click(lambda: "Stopped.", None, status, cancels=[event])
    app._tlm_theme = theme
    return app


def serve(host: str = "127.0.0.1", port: int = 7860, models: Sequence[str] | None = None,
          *, block: bool = True) -> Any:
    """Launch the dashboard on ``host:port`` (loopback by default). Returns the app."""
    app = build_app(models)
    app.queue(default_concurrency_limit=1).launch(
        server_name=host, server_port=port, share=False, inbrowser=False, show_error=True,
        prevent_thread_lock=not block, quiet=not block, theme=app._tlm_theme,
    )
    return app
