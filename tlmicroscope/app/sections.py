"""The section registry: what a report (and the dashboard, and each family command) can show.

A section is a builder ``f(ctx) -> Section`` registered with :func:`register_section`. It
declares the capture sites it reads (``needs``) and the settings it reads (``settings``), so the
report makes one forward pass for every section and refuses a misspelt setting before any work.
The panels in ``tlmicroscope.app.panels`` register the built-in sections; their order in
:data:`SECTION_MODULES` is the page's order. A *preset* (:data:`PRESETS`) is a named list of
sections and settings: the family commands (``tlmicroscope microscope``, ``lens``, ...) render
their preset through the same engine as ``tlmicroscope report``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "PRESETS",
    "SECTIONS",
    "SECTION_MODULES",
    "MissingPrerequisite",
    "Preset",
    "ReportContext",
    "Section",
    "SectionSpec",
    "available_sections",
    "available_settings",
    "default_sections",
    "load_builtin_sections",
    "register_section",
    "require_tokens",
    "section_spec",
]


class MissingPrerequisite(Exception):
    """A section cannot be built here; ``fix`` is the command that makes it possible."""

    def __init__(self, message: str, fix: str | None = None):
        super().__init__(message)
        self.message = message
        self.fix = fix


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
        """Compute once per report and share, e.g. the logit-lens trajectory two sections use."""
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]

    def memoized(self, key: str) -> bool:
        """Whether a section already computed ``key`` (so a cheaper variant need not be made)."""
        return key in self._memo


def require_tokens(ctx: ReportContext, n_min: int, what: str) -> None:
    """A section's minimum text length, as a missing prerequisite naming the tokens needed.

    Examples:
        >>> from types import SimpleNamespace
        >>> import torch
        >>> ctx = SimpleNamespace(tokens=torch.zeros(1, 1))
        >>> require_tokens(ctx, 2, "the loss")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        tlmicroscope.app.sections.MissingPrerequisite: The text has 1 token; ...
    """
    n = int(ctx.tokens.shape[-1])
    if n < n_min:
        raise MissingPrerequisite(
            f"The text has {n} token{'s' if n != 1 else ''}; {what} needs at least {n_min}. "
            "Pass a longer text."
        )


@dataclass(frozen=True)
class SectionSpec:
    """A registered section: its name, page title, builder, and what it reads."""

    name: str
    title: str
    build: Callable[[ReportContext], Section]
    default: bool
    needs: tuple[str, ...] = ()
    settings: tuple[str, ...] = ()


#: Every registered section by name, in page order (registration order).
SECTIONS: dict[str, SectionSpec] = {}

#: Modules whose import registers the built-in sections, in page order: trajectories,
#: LLM-Microscope panels, token geometry, latent projections and norm profile, causal basis.
SECTION_MODULES: tuple[str, ...] = (
    "tlmicroscope.app.panels.lens",
    "tlmicroscope.app.panels.microscope",
    "tlmicroscope.app.panels.token_geometry",
    "tlmicroscope.app.panels.latent",
    "tlmicroscope.app.panels.causal",
)

# Settings the report itself reads (every section's own are declared with register_section).
REPORT_SETTINGS = ("truncate",)


def load_builtin_sections() -> None:
    """Import the built-in panels so their sections are registered, in page order (idempotent).

    The page follows ``SECTION_MODULES`` whichever panel was imported first; sections registered
    by other modules follow, in registration order.
    """
    for mod in SECTION_MODULES:
        importlib.import_module(mod)
    rank = {mod: i for i, mod in enumerate(SECTION_MODULES)}
    ordered = sorted(
        SECTIONS.items(),
        key=lambda item: rank.get(item[1].build.__module__, len(rank)),
    )  # sorted() is stable: within a module, registration order
    if list(SECTIONS) != [name for name, _ in ordered]:
        SECTIONS.clear()
        SECTIONS.update(ordered)


def register_section(
    name: str,
    title: str,
    *,
    default: bool = True,
    needs: Sequence[str] = (),
    settings: Sequence[str] = (),
):
    """Register a builder ``f(ctx) -> Section`` under ``name``; registration order is page order.

    ``needs`` names the capture sites (``tlmicroscope.capture`` names: ``"resid"``,
    ``"attn_out"``, ``"mlp_out"``, ...) the section reads from ``ctx.cache``; the report captures
    the union of all chosen sections' needs in one forward pass. ``settings`` names the
    ``ctx.settings`` keys the section reads: ``report`` refuses any other setting name (a typo
    such as ``top_kk``).

    Examples:
        >>> @register_section("hello_doc", "Hello", default=False)
        ... def _hello(ctx):
        ...     return Section(["<p>hello</p>"], caption="a one-line section")
        >>> section_spec("hello_doc").default
        False
        >>> _ = SECTIONS.pop("hello_doc")
    """

    def deco(fn: Callable[[ReportContext], Section]) -> Callable[[ReportContext], Section]:
        SECTIONS[name] = SectionSpec(name, title, fn, default, tuple(needs), tuple(settings))
        return fn

    return deco


def section_spec(name: str) -> SectionSpec:
    """The registered section ``name`` (a ``ValueError`` naming the valid ones otherwise).

    Examples:
        >>> section_spec("trajectory").title
        'Prediction trajectories'
    """
    load_builtin_sections()
    try:
        return SECTIONS[name]
    except KeyError:
        raise ValueError(
            f"No report section {name!r}; valid sections: {', '.join(SECTIONS)}."
        ) from None


def available_sections() -> list[str]:
    """Every registered section name, in page order.

    Examples:
        >>> "trajectory" in available_sections()
        True
    """
    load_builtin_sections()
    return list(SECTIONS)


def default_sections() -> list[str]:
    """The sections a report shows when none are named, in page order.

    Examples:
        >>> set(default_sections()) <= set(available_sections())
        True
    """
    load_builtin_sections()
    return [n for n, s in SECTIONS.items() if s.default]


def available_settings() -> dict[str, list[str]]:
    """Each setting ``report`` accepts, with the sections that read it (``[]``: the report itself).

    Examples:
        >>> available_settings()["geometry_overlap_k"]
        ['token_geometry']
    """
    load_builtin_sections()
    out: dict[str, list[str]] = {name: [] for name in REPORT_SETTINGS}
    for spec in SECTIONS.values():
        for name in spec.settings:
            out.setdefault(name, []).append(spec.name)
    return out


@dataclass(frozen=True)
class Preset:
    """A named page: sections and settings rendered by the report engine (a family command)."""

    name: str
    title: str
    sections: tuple[str, ...]
    settings: dict[str, Any] = field(default_factory=dict)


#: The family commands' pages: ``tlmicroscope <name> TEXT`` renders ``report(..., sections=...)``.
PRESETS: dict[str, Preset] = {
    "lens": Preset("lens", "Lens view", ("trajectory", "logit_lens_table")),
    "microscope": Preset(
        "microscope",
        "LLM-Microscope",
        (
            "microscope_nonlinearity",
            "microscope_linearity",
            "microscope_contributions",
            "microscope_attribution",
            "microscope_context",
            "logit_lens_table",
        ),
    ),
}
