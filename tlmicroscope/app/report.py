"""The report engine: one offline HTML page of many analyses of one text.

Sections are registered builders (``tlmicroscope.app.sections``). Each gets a shared
``ReportContext`` whose ``memo`` lets
sections reuse one another's forward passes and results, and returns a ``Section`` (figures,
views, a caption saying which settings produced it). A builder whose prerequisite is missing
raises ``MissingPrerequisite`` with the command that fixes it; the report shows that message in
place and carries on. Any other failure in a section is also shown in place, never failing the
whole report.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tlmicroscope.app.sections import (
    SECTIONS,
    MissingPrerequisite,
    ReportContext,
    Section,
    available_sections,
    available_settings,
    default_sections,
    load_builtin_sections,
    register_section,
    require_tokens,
)
from tlmicroscope.inputs import to_tokens
from tlmicroscope.models import access
from tlmicroscope.viz.html import HtmlPage, escape

__all__ = [
    "MissingPrerequisite",
    "Report",
    "ReportContext",
    "Section",
    "available_sections",
    "available_settings",
    "register_section",
    "report",
    "report_steps",
    "require_tokens",
    "shared_capture",
]


def shared_capture(model: Any, tokens: Any, sites: Sequence[str]) -> tuple[Any, Any]:
    """One forward pass capturing ``sites`` for every layer, as an ``ActivationCache`` and logits.

    Examples:
        >>> from tlmicroscope.models import tiny_model
        >>> model = tiny_model(n_layers=1)
        >>> cache, logits = shared_capture(model, model.to_tokens("hi"), ["resid"])
        >>> "blocks.0.hook_resid_pre" in cache, logits.shape[-1] == model.cfg.d_vocab
        (True, True)
    """
    from transformer_lens import ActivationCache

    from tlmicroscope.capture import capture

    cap = capture(model, tokens, sites=tuple(sites), return_logits=True)
    entries: dict[str, Any] = {}
    for site in cap.activations:
        for i, name in enumerate(cap.hook_names[site]):
            entries[name] = cap.activations[site][i]
    return ActivationCache(entries, model), cap.logits


def _unknown(kind: str, given: Sequence[str], valid: Sequence[str]) -> str:
    import difflib

    parts = []
    for name in given:
        close = difflib.get_close_matches(name, valid, n=1)
        parts.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    return f"Unknown report {kind}s {', '.join(parts)}; valid {kind}s: {', '.join(sorted(valid))}."


def _check_arguments(
    model: Any, text: Any, lens: Any, sections: Any, settings: dict[str, Any]
) -> tuple[Any, list[str]]:
    """Validate ``report``'s arguments before any work; returns the (loaded) lens and sections."""
    if not isinstance(text, str):
        raise TypeError(
            f"text must be a string, got {type(text).__name__}; pass the text to analyse."
        )
    valid = available_settings()
    unknown = [k for k in settings if k not in valid]
    if unknown:
        raise ValueError(_unknown("setting", unknown, list(valid)))
    if sections is None:
        names = default_sections()
    else:
        if isinstance(sections, str):  # one section, not its letters
            sections = [sections]
        try:
            names = list(sections)
        except TypeError:
            raise TypeError(
                f"sections must be a section name or a list of them, got {type(sections).__name__}."
            ) from None
        bad = [n for n in names if not isinstance(n, str)]
        if bad:
            raise TypeError(
                f"sections must be names (strings), got {bad[:3]}; see available_sections()."
            )
        unknown = [n for n in names if n not in SECTIONS]
        if unknown:
            raise ValueError(_unknown("section", unknown, list(SECTIONS)))
    return _resolve_report_lens(lens, model), names


def _resolve_report_lens(lens: Any, model: Any) -> Any:
    """``None``, ``"logit"``, ``"logit-paper"`` kept; a path loaded (or why not); a lens checked."""
    import os

    from tlmicroscope.lenses.base import load_lens, resolve_lens

    if lens is None or (isinstance(lens, str) and lens in ("logit", "logit-paper")):
        return (
            lens  # the sections read these names as they are (the causal basis of the logit lens)
        )
    if isinstance(lens, (str, os.PathLike)):
        path = Path(os.path.expanduser(str(lens)))
        if not path.exists():
            raise FileNotFoundError(
                f"lens={str(lens)!r}: nothing there. Pass the folder of a saved lens (tlmicroscope "
                "train-lens --out FOLDER makes one), a lens object, or None for the logit lens "
                "alone."
            )
        try:
            return load_lens(path, model)
        except (OSError, ValueError, TypeError, KeyError) as exc:
            raise ValueError(f"lens={str(lens)!r} cannot be loaded for this model: {exc}") from exc
    lens = resolve_lens(lens)  # TypeError for what is no lens
    lens.check_model(model)
    return lens


@dataclass
class Report:
    """A built report: its page, which sections rendered or were missing, and their timings."""

    page: HtmlPage
    rendered: list[str]
    missing: dict[str, str]
    failed: dict[str, str]
    seconds: dict[str, float]
    #: Wall time of the one shared forward pass and capture that every section reads.
    capture_seconds: float = 0.0
    #: For each missing section, the command that makes it possible (``None`` when there is none).
    fixes: dict[str, str | None] = field(default_factory=dict)

    def save(self, path: str | Path) -> Path:
        """Write the self-contained HTML page atomically."""
        return self.page.save(path)

    def html(self) -> str:
        return self.page.render()

    def _repr_html_(self) -> str:
        return self.page.render()


def report_steps(
    model: Any,
    text: str,
    *,
    lens: Any = None,
    sections: Sequence[str] | None = None,
    title: str | None = None,
    intro: str | None = None,
    **settings: Any,
) -> Iterator[tuple[int, int, str, Report]]:
    """Build a report section by section, yielding ``(done, total, next_section, report_so_far)``.

    The first yield comes before any section runs; the last has ``done == total``. A caller that
    stops iterating (a cancelled dashboard run) stops the work between sections.
    """
    load_builtin_sections()
    lens, names = _check_arguments(model, text, lens, sections, settings)
    tokens = to_tokens(model, text, truncate=bool(settings.get("truncate", False)))
    ctx = ReportContext(model=model, text=text, tokens=tokens, lens=lens, settings=dict(settings))
    needs = sorted({site for n in names for site in SECTIONS[n].needs})
    t_capture = time.perf_counter()
    if needs:
        ctx.cache, ctx.logits = shared_capture(model, tokens, needs)
    t_capture = time.perf_counter() - t_capture
    processed = "processed (fold_ln/centring)" if access.weights_processed(model) else "unprocessed"
    opening = (
        f"Model <b>{escape(access.model_label(model))}</b> ({escape(type(model).__name__)}, "
        f"weights {processed}, TransformerLens {escape(access.TL_VERSION)}); "
        f"{tokens.shape[-1]} tokens of text." + (f" {escape(intro)}" if intro else "")
    )
    page = HtmlPage(title=title or "tlmicroscope report", intro=opening)
    rep = Report(
        page=page, rendered=[], missing={}, failed={}, seconds={}, capture_seconds=t_capture
    )
    for i, name in enumerate(names):
        yield i, len(names), name, rep
        spec = SECTIONS[name]
        t0 = time.perf_counter()
        try:
            sec = spec.build(ctx)
        except MissingPrerequisite as exc:
            page.add_notice(spec.title, exc.message, exc.fix)
            rep.missing[name] = exc.message
            rep.fixes[name] = exc.fix
        except Exception as exc:
            detail = "".join(traceback.format_exception_only(type(exc), exc)).strip()
            page.add_notice(spec.title, f"This section failed: {detail}")
            rep.failed[name] = detail
        else:
            page.add_section(spec.title, *sec.items, caption=sec.caption)
            rep.rendered.append(name)
        rep.seconds[name] = time.perf_counter() - t0
    yield len(names), len(names), "", rep


def report(
    model: Any,
    text: str,
    *,
    lens: Any = None,
    sections: Sequence[str] | None = None,
    title: str | None = None,
    intro: str | None = None,
    **settings: Any,
) -> Report:
    """Build one offline HTML report of ``text`` on ``model``.

    Args:
        model: A TransformerLens model.
        text: The text to analyse (validated before any section runs).
        lens: A trained lens (e.g. a ``TunedLens``) to show beside the logit lens, or the folder
            of a saved one (loaded here, or an error saying why not).
        sections: Section names to include (default: every default section), or one name; see
            ``available_sections()``.
        title: The page title.
        intro: A sentence added to the page's opening line (which names the model and text).
        **settings: Passed to the sections through ``ctx.settings`` (e.g. ``top_k``); see
            ``available_settings()``. Any other name is an error listing the valid ones.

    Raises:
        ValueError: an unknown section or setting (with the closest valid name), or a lens
            folder that does not load for this model; also what ``to_tokens`` refuses.
        FileNotFoundError: ``lens`` names a path with nothing there.
        TypeError: a lens object that is no lens, or sections that are not names.

    Examples:
        >>> from tlmicroscope.models import tiny_model
        >>> rep = report(tiny_model(n_layers=2), "hello there", sections=["trajectory"])
        >>> rep.rendered
        ['trajectory']
    """
    rep = None
    for _, _, _, rep in report_steps(  # noqa: B007 (the last report is the result)
        model, text, lens=lens, sections=sections, title=title, intro=intro, **settings
    ):
        pass
    return rep
