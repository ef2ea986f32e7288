"""``report``: one offline HTML page of many analyses of one text.

Sections are registered builders. Each gets a shared ``ReportContext`` whose ``memo`` lets
sections reuse one another's forward passes and results, and returns a ``Section`` (figures,
views, a caption saying which settings produced it). A builder whose prerequisite is missing
raises ``MissingPrerequisite`` with the command that fixes it; the report shows that message in
place and carries on. Any other failure in a section is also shown in place, never failing the
whole report.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
]


class MissingPrerequisite(Exception):
    """A section cannot be built here; ``fix`` is the command that makes it possible."""

    def __init__(self, message: str, fix: str | None = None):
        super().__init__(message)
        self.message = message
        self.fix = fix


def require_tokens(ctx: ReportContext, n_min: int, what: str) -> None:
    """A section's minimum text length, as a missing prerequisite naming the number of tokens needed.

    Examples:
        >>> from types import SimpleNamespace
        >>> import torch
        >>> require_tokens(SimpleNamespace(tokens=torch.zeros(1, 1)), 2, "the loss")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        tlmicroscope.report.MissingPrerequisite: The text has 1 token; the loss needs at least 2...
    """
    n = int(ctx.tokens.shape[-1])
    if n < n_min:
        raise MissingPrerequisite(
            f"The text has {n} token{'s' if n != 1 else ''}; {what} needs at least {n_min}. "
            "Pass a longer text."
        )


@dataclass
class Section:
    """What a section builder returns: figures, ``CircuitsVisView``s or HTML strings."""

    items: list[Any]
    caption: str = ""


@dataclass
class ReportContext:
    """Shared state for section builders: the model, the text, one shared capture, memoised results.

    Before any section runs, the report makes **one** forward pass that captures the union of the
    sites every chosen section declared in ``needs`` (plus the logits). Sections read it as
    ``ctx.cache``, an ``ActivationCache`` with the standard hook names, so any analysis that takes
    ``model_or_cache`` runs on it without another forward pass; ``ctx.logits`` holds the output.
    """

    model: Any
    text: str
    tokens: Any
    lens: Any = None
    settings: dict[str, Any] = field(default_factory=dict)
    cache: Any = None
    logits: Any = None
    _memo: dict[str, Any] = field(default_factory=dict)

    def memo(self, key: str, compute: Callable[[], Any]) -> Any:
        """Compute once per report and share: e.g. the logit-lens trajectory used by two sections."""
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]


def _shared_capture(model: Any, tokens: Any, sites: Sequence[str]) -> tuple[Any, Any]:
    """One forward pass capturing ``sites`` for every layer, as an ``ActivationCache`` and logits."""
    from transformer_lens import ActivationCache

    from tlmicroscope.capture import capture

    cap = capture(model, tokens, sites=tuple(sites), return_logits=True)
    entries: dict[str, Any] = {}
    for site in cap.activations:
        for i, name in enumerate(cap.hook_names[site]):
            entries[name] = cap.activations[site][i]
    return ActivationCache(entries, model), cap.logits


@dataclass(frozen=True)
class _Spec:
    name: str
    title: str
    build: Callable[[ReportContext], Section]
    default: bool
    needs: tuple[str, ...] = ()
    settings: tuple[str, ...] = ()


_SECTIONS: dict[str, _Spec] = {}

# Settings the report itself reads (every section's own are declared with register_section).
_REPORT_SETTINGS = ("truncate",)


def register_section(
    name: str,
    title: str,
    *,
    default: bool = True,
    needs: Sequence[str] = (),
    settings: Sequence[str] = (),
):
    """Register a section builder ``f(ctx) -> Section`` under ``name``; registration order is page order.

    ``needs`` names the capture sites (``tlmicroscope.capture`` names: ``"resid"``, ``"attn_out"``,
    ``"mlp_out"``, ...) the section reads from ``ctx.cache``; the report captures the union of
    all chosen sections' needs in one forward pass. ``settings`` names the ``ctx.settings`` keys
    the section reads: ``report`` refuses any other setting name (a typo such as ``top_kk``).
    """

    def deco(fn: Callable[[ReportContext], Section]) -> Callable[[ReportContext], Section]:
        _SECTIONS[name] = _Spec(name, title, fn, default, tuple(needs), tuple(settings))
        return fn

    return deco


def available_sections() -> list[str]:
    """Every registered section name, in page order.

    Examples:
        >>> "trajectory" in available_sections()
        True
    """
    _load_builtin_sections()
    return list(_SECTIONS)


def available_settings() -> dict[str, list[str]]:
    """Each setting ``report`` accepts, with the sections that read it (``[]``: the report itself).

    Examples:
        >>> available_settings()["geometry_overlap_k"]
        ['token_geometry']
    """
    _load_builtin_sections()
    out: dict[str, list[str]] = {name: [] for name in _REPORT_SETTINGS}
    for spec in _SECTIONS.values():
        for name in spec.settings:
            out.setdefault(name, []).append(spec.name)
    return out


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
    """Validate ``report``'s arguments before any work; returns the lens (loaded) and the section names."""
    if not isinstance(text, str):
        raise TypeError(
            f"text must be a string, got {type(text).__name__}; pass the text to analyse."
        )
    valid = available_settings()
    unknown = [k for k in settings if k not in valid]
    if unknown:
        raise ValueError(_unknown("setting", unknown, list(valid)))
    if sections is None:
        names = [n for n, s in _SECTIONS.items() if s.default]
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
        unknown = [n for n in names if n not in _SECTIONS]
        if unknown:
            raise ValueError(_unknown("section", unknown, list(_SECTIONS)))
    return _resolve_report_lens(lens, model), names


def _resolve_report_lens(lens: Any, model: Any) -> Any:
    """``None``, ``"logit"``, ``"logit-paper"`` as given; a path: load it (or say why not); a lens: check it."""
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
                "train-lens --out FOLDER makes one), a lens object, or None for the logit lens alone."
            )
        try:
            return load_lens(path, model)
        except (OSError, ValueError, TypeError, KeyError) as exc:
            raise ValueError(f"lens={str(lens)!r} cannot be loaded for this model: {exc}") from exc
    lens = resolve_lens(lens)  # TypeError for what is no lens
    lens.check_model(model)
    return lens


# Modules that register report sections when imported; each analysis package adds its own.
# Page order: trajectories, LLM-Microscope panels, token geometry, latent projections and norm
# profile, causal basis energies.
_SECTION_MODULES = [
    "tlmicroscope.lenses._report",
    "tlmicroscope.microscope._report",
    "tlmicroscope.geometry._token_report",
    "tlmicroscope.geometry._latent_report",
    "tlmicroscope.causal._report",
]


def _load_builtin_sections() -> None:
    import importlib

    for mod in _SECTION_MODULES:
        importlib.import_module(mod)


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
    **settings: Any,
) -> Iterator[tuple[int, int, str, Report]]:
    """Build a report section by section, yielding ``(done, total, next_section, report_so_far)``.

    The first yield comes before any section runs; the last has ``done == total``. A caller that
    stops iterating (a cancelled dashboard run) stops the work between sections.
    """
    _load_builtin_sections()
    lens, names = _check_arguments(model, text, lens, sections, settings)
    tokens = to_tokens(model, text, truncate=bool(settings.get("truncate", False)))
    ctx = ReportContext(model=model, text=text, tokens=tokens, lens=lens, settings=dict(settings))
    needs = sorted({site for n in names for site in _SECTIONS[n].needs})
    t_capture = time.perf_counter()
    if needs:
        ctx.cache, ctx.logits = _shared_capture(model, tokens, needs)
    t_capture = time.perf_counter() - t_capture
    processed = "processed (fold_ln/centring)" if access.weights_processed(model) else "unprocessed"
    intro = (
        f"Model <b>{escape(access.model_label(model))}</b> ({escape(type(model).__name__)}, "
        f"weights {processed}, TransformerLens {escape(access.TL_VERSION)}); "
        f"{tokens.shape[-1]} tokens of text."
    )
    page = HtmlPage(title=title or "tlmicroscope report", intro=intro)
    rep = Report(
        page=page, rendered=[], missing={}, failed={}, seconds={}, capture_seconds=t_capture
    )
    for i, name in enumerate(names):
        yield i, len(names), name, rep
        spec = _SECTIONS[name]
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
    for _, _, _, rep in report_steps(
        model, text, lens=lens, sections=sections, title=title, **settings
    ):
        pass
    return rep
