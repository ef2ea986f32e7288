"""The demo: a report of a shipped text on which every default section draws.

``tlmicroscope demo`` (and ``make demo``) runs :func:`run_demo`. It reads a text of about 600
SmolLM2 tokens shipped with the package (``tlmicroscope/data/demo_text.txt``, long enough for
every estimator: token-cloud IDs, neighbour overlap, the token-class summary, the decoded
contextualization window), makes sure the artifact store holds what the default sections need,
and writes the report.

Four default sections draw from fitted objects: the non-linearity and linearity panels (a
non-linearity reference), contextualization and token classes (a contextualization probe), the
second trajectory heatmaps (a tuned lens) and the causal basis energies (a causal basis extracted
through that tuned lens). For each one the store lacks, the demo fits a *quick* version
(``fit(..., quick=True)`` with the class's own ``QUICK`` settings: fewer tokens and steps than
the full fit, chosen so that each estimate still means something) and saves it to the store,
where it is marked quick, so the report's captions say so and name the command that makes the
full one. Whatever the store already holds is used as it
is, and a full fit always wins: the demo never replaces a fitted object it finds.

On SmolLM2-135M (README, "The demo"; measured on a shared two-core machine) the first run costs
about 5 CPU-minutes, most of it the probe; later runs fit nothing and take about a minute (the
trajectory heatmaps and layer contributions read the text's last 64 positions), for a page of
about 17 MB.
"""

from __future__ import annotations

import inspect
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from tlmicroscope import artifacts

__all__ = [
    "DEMO_FITS",
    "DEMO_TEXT_FILE",
    "DemoFit",
    "demo_report",
    "demo_text",
    "ensure_demo_fits",
    "plan_demo_fits",
    "quick_settings",
    "run_demo",
]

#: The shipped demo text (in ``tlmicroscope/data/``).
DEMO_TEXT_FILE = "data/demo_text.txt"


def demo_text() -> str:
    """The shipped demo text: about 490 words (588 SmolLM2 tokens) of plain English prose.

    Examples:
        >>> text = demo_text()
        >>> len(text.split()) > 400, "Paris" in text
        (True, True)
    """
    return resources.files("tlmicroscope").joinpath(DEMO_TEXT_FILE).read_text(encoding="utf-8")


# ----------------------------------------------------------------------------- quick settings
# The quick settings are the fitted classes' own ``QUICK`` (one source: ``fit(..., quick=True)``
# applies them and records the fit as quick). The demo adds only what sizes a fit to a model
# with a context shorter than the classes' windows, and the causal basis's "ignore" for a
# direction L-BFGS leaves unconverged (the log line after the fit counts them).
_WINDOWS = {  # kind -> window setting -> its default length in tokens
    "nonlinearity-reference": {"seq_len": 256},
    "contextualization-probe": {"window_length": 64},
    "causal-basis": {"seq_len": 256},
}
_FIT_OPTIONS: dict[str, dict[str, Any]] = {"causal-basis": {"on_nonconvergence": "ignore"}}


def _sized(kind: str, model: Any) -> dict[str, Any]:
    """Settings that fit ``kind``'s windows into ``model``'s context (empty when they fit)."""
    n_ctx = int(model.cfg.n_ctx)
    out = {name: n_ctx for name, size in _WINDOWS.get(kind, {}).items() if n_ctx < size}
    if kind == "contextualization-probe" and out:
        out["prefix_length"] = min(16, n_ctx // 2)
    return out


def quick_settings(kind: str, model: Any) -> dict[str, Any]:
    """What a quick ``kind`` fit for ``model`` takes: the class's ``QUICK`` (a tuned lens's sized
    to the model's context), then the demo's sizing and fit options.

    Examples:
        >>> from tlmicroscope.models import tiny_model
        >>> quick_settings("nonlinearity-reference", tiny_model(n_layers=2))
        {'n_tokens': 4096, 'seq_len': 128}
    """
    if kind not in {f.kind for f in DEMO_FITS}:
        raise ValueError(
            f"The demo makes no quick {kind!r}; it makes: {', '.join(f.kind for f in DEMO_FITS)}."
        )
    cls = artifacts.artifact_class(kind)
    quick = cls._quick_for(model) if hasattr(cls, "_quick_for") else dict(cls.QUICK)
    return {**quick, **_sized(kind, model), **_FIT_OPTIONS.get(kind, {})}


# --------------------------------------------------------------------------------- the plan
@dataclass(frozen=True)
class DemoFit:
    """One fitted object the default sections read.

    Attributes:
        kind: Its artifact kind (``tlmicroscope.artifacts.KINDS``).
        title: What it is, in words (the progress bar shows it).
        sections: The default sections that draw from it.
        variant: The store's variant folder (the causal basis is kept per lens).
        share: Its expected part of a first run's fitting time (the budget is split by it).
    """

    kind: str
    title: str
    sections: tuple[str, ...]
    variant: str | None = None
    share: float = 0.25

    def path(self, model: Any) -> Path:
        """Where the store keeps it for ``model``."""
        return artifacts.artifact_path(self.kind, model, variant=self.variant)


#: What the default sections need, in the order the demo fits them (the causal basis is read
#: through the tuned lens, so it comes after it).
DEMO_FITS: tuple[DemoFit, ...] = (
    DemoFit(
        "nonlinearity-reference",
        "non-linearity reference",
        ("microscope_nonlinearity", "microscope_linearity", "microscope_token_classes"),
        share=0.1,
    ),
    DemoFit(
        "contextualization-probe",
        "contextualization probe",
        ("microscope_context", "microscope_token_classes"),
        share=0.6,
    ),
    DemoFit("tuned-lens", "tuned lens", ("trajectory", "causal_basis"), share=0.2),
    DemoFit("causal-basis", "causal basis", ("causal_basis",), variant="tuned", share=0.1),
)


def plan_demo_fits(model: Any, lens: Any = None) -> list[DemoFit]:
    """The fitted objects the store lacks for ``model``: what a demo run would fit.

    A causal basis counts as missing when the store's was extracted through another lens than
    ``lens`` (the store's tuned lens, loaded).

    Examples:
        >>> from tlmicroscope.models import tiny_model
        >>> [f.kind for f in plan_demo_fits(tiny_model(n_layers=2, seed=7))]  # an empty store
        ['nonlinearity-reference', 'contextualization-probe', 'tuned-lens', 'causal-basis']
    """
    out = []
    for fit in DEMO_FITS:
        found = artifacts.find_artifact(fit.kind, model, variant=fit.variant)
        if found is None or (fit.kind == "causal-basis" and not _basis_matches(found, model, lens)):
            out.append(fit)
    return out


def _basis_matches(path: Path, model: Any, lens: Any) -> bool:
    """Whether the basis saved at ``path`` was extracted through ``lens`` (same tensors)."""
    if lens is None:
        return False
    from tlmicroscope.causal.basis import CausalBasis, lens_digest

    try:
        basis = CausalBasis.load(path, model)
    except (OSError, ValueError):  # another model, or a damaged file: fit a new one
        return False
    saved = basis.provenance.settings.get("lens_digest") if basis.provenance else None
    return basis.lens == getattr(lens, "name", None) and saved in (None, lens_digest(lens))


# ---------------------------------------------------------------------------------- fitting
def _accepts(fn: Callable[..., Any]) -> tuple[set[str], bool]:
    params = inspect.signature(fn).parameters.values()
    names = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return names, any(p.kind is p.VAR_KEYWORD for p in params)


def _fit_contract(
    cls: type, model: Any, corpus: Any, settings: dict[str, Any], progress: bool
) -> Any:
    """``cls(**init).fit(model, corpus, **rest)``, the settings split between the two by their
    signatures (the fitted-object contract of ``tlmicroscope.artifacts``: a setting ``fit`` names
    goes to ``fit``), with ``quick=True``: the class fills in its ``QUICK`` for what is not given
    and records the fit as quick."""
    init_names, _ = _accepts(cls.__init__)
    fit_names, fit_kwargs = _accepts(cls.fit)
    init = {k: v for k, v in settings.items() if k in init_names and k not in fit_names}
    rest = {k: v for k, v in settings.items() if k not in init}
    unknown = [k for k in rest if k not in fit_names and not fit_kwargs]
    if unknown:
        raise TypeError(
            f"{cls.__name__} takes no setting {unknown}; the demo's settings are stale."
        )
    if "progress" in fit_names or fit_kwargs:
        rest.setdefault("progress", progress)
    if "quick" in fit_names or fit_kwargs:
        rest["quick"] = True
    required = [
        p.name
        for p in list(inspect.signature(cls.__init__).parameters.values())[1:]
        if p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.POSITIONAL_ONLY)
    ]
    obj = cls.for_model(model) if required and hasattr(cls, "for_model") else cls(**init)
    return obj.fit(model, corpus, **rest) or obj


def _fit_basis(model: Any, lens: Any, corpus: Any, settings: dict[str, Any], progress: bool) -> Any:
    """A quick causal basis through ``lens`` on ``corpus`` (``None``: the embedded one)."""
    from tlmicroscope.causal.basis import CausalBasis

    return _fit_contract(CausalBasis, model, corpus, {**settings, "lens": lens}, progress)


def _save_quick(obj: Any, path: Path) -> Path:
    """Save ``obj`` to ``path`` marked as a quick fit (``artifacts.is_quick`` reads the mark)."""
    import dataclasses
    import json

    from tlmicroscope.io import atomic_write_text

    try:
        obj.quick = True
    except (AttributeError, dataclasses.FrozenInstanceError):  # frozen: the config mark below
        pass
    saved = Path(obj.save(path) or path)
    if not artifacts.is_quick(saved):  # a class that does not record it yet: mark its config
        config = saved / "config.json"
        meta = json.loads(config.read_text())
        meta["quick"] = True
        atomic_write_text(config, json.dumps(meta, indent=2, sort_keys=True))
    return saved


def _fit_one(
    fit: DemoFit, model: Any, lens: Any, corpus: Any, seconds: float, progress: bool
) -> Any:
    """Fit the quick ``fit.kind`` for ``model`` into the store; returns the fitted object."""
    import warnings

    settings = {**_sized(fit.kind, model), **_FIT_OPTIONS.get(fit.kind, {})}
    with warnings.catch_warnings():  # the log line after the fit states N and the chance floor
        warnings.filterwarnings("ignore", message=".*chance floor.*")
        if fit.kind == "causal-basis":
            obj = _fit_basis(model, lens, corpus, settings, progress)
        else:
            if fit.kind == "tuned-lens":  # stops with what it has once its share is spent
                settings["max_seconds"] = max(1.0, seconds)
            cls = artifacts.artifact_class(fit.kind)
            obj = _fit_contract(cls, model, corpus, settings, progress)
    _save_quick(obj, fit.path(model))
    return obj


def _summary(kind: str, obj: Any) -> str:
    """What a quick fit reached, in a phrase: does the estimate still mean something?"""
    try:
        if kind == "nonlinearity-reference":
            score, n = obj.linearity_.score, int(obj.n_tokens_)
            d = int(obj.maps_.shape[-1])
            return (
                f"{n} tokens, linearity {float(score.min()):.3f}..{float(score.max()):.3f} "
                f"(chance floor d/(N-1) = {d / (n - 1):.2f})"
            )
        if kind == "contextualization-probe":
            h = list(obj.history_)
            k = max(1, len(h) // 10)
            return f"{len(h)} steps, loss {sum(h[:k]) / k:.2f} -> {sum(h[-k:]) / k:.2f} nats"
        if kind == "tuned-lens":
            kl = obj.settings.get("final_train_kl") or []
            at = ", ".join(f"layer {i} {kl[i]:.2f}" for i in (0, len(kl) // 2, len(kl) - 1))
            return f"{obj.settings.get('steps')} steps; held-out KL {at} nats" if kl else ""
        if kind == "causal-basis":
            e = obj.energies
            return (
                f"k={int(e.numel())} at layer {obj.layer}, energies {float(e.max()):.3f}.."
                f"{float(e.min()):.3f} nats, {int(obj.converged.sum())} converged"
            )
    except (
        AttributeError,
        TypeError,
        ValueError,
        IndexError,
    ):  # a summary is never worth a failure
        return ""
    return ""


def _say(msg: str) -> None:
    from tqdm.auto import tqdm

    tqdm.write(f"[tlmicroscope demo] {msg}", file=sys.stderr)


def _load_model(model: Any) -> Any:
    if not isinstance(model, str):
        return model
    from tlmicroscope.models import load_model

    _say(f"loading {model}")
    return load_model(model)


def ensure_demo_fits(
    model: Any, *, budget_s: float = 600.0, progress: bool = True, corpus: Any = None
) -> dict[str, Path]:
    """Fit into the store the quick versions of what the default sections lack; returns every
    demo artifact's folder by kind (fitted now or found).

    The budget is split among the missing fits by their expected share; the tuned lens stops
    when its part is spent. A fit that would start with the whole budget spent is left out (its
    sections then show the command that makes it) with a message. ``corpus`` (default: the
    embedded one) is what the quick fits read.

    Examples:
        >>> from tlmicroscope.models import tiny_model
        >>> sorted(ensure_demo_fits(tiny_model(n_layers=2), progress=False))  # doctest: +SKIP
        ['causal-basis', 'contextualization-probe', 'nonlinearity-reference', 'tuned-lens']
    """
    from tqdm.auto import tqdm

    if not budget_s >= 0:
        raise ValueError(
            f"budget_s must be a number of seconds >= 0 (0 fits nothing), got {budget_s!r}."
        )
    lens = _store_lens(model)
    todo = plan_demo_fits(model, lens)
    start = time.perf_counter()
    left_out = []
    with tqdm(total=len(todo), unit="fit", disable=not progress or not todo) as bar:
        for i, fit in enumerate(todo):
            spent = time.perf_counter() - start
            remaining = budget_s - spent
            bar.set_description(
                f"demo: quick {fit.title} ({spent:.0f} of {budget_s:.0f} s budget spent)"
            )
            if remaining <= 0 or (fit.kind == "causal-basis" and lens is None):
                why = "the budget was spent" if remaining <= 0 else "there is no tuned lens"
                left_out.append((fit, why))
                bar.update()
                continue
            share = fit.share / sum(f.share for f in todo[i:])
            t0 = time.perf_counter()
            obj = _fit_one(fit, model, lens, corpus, share * remaining, progress)
            if fit.kind == "tuned-lens":
                lens = obj
            note = _summary(fit.kind, obj)
            _say(
                f"quick {fit.title} fitted in {time.perf_counter() - t0:.0f} s"
                + (f": {note}" if note else "")
            )
            bar.update()
    for fit, why in left_out:
        _say(
            f"no quick {fit.title} ({why}); its sections show the command that makes it: "
            f"{artifacts.make_command(fit.kind, model)}"
        )
    found = {f.kind: artifacts.find_artifact(f.kind, model, variant=f.variant) for f in DEMO_FITS}
    return {k: v for k, v in found.items() if v is not None}


def _store_lens(model: Any) -> Any:
    """The store's tuned lens for ``model``, or ``None``."""
    path = artifacts.find_artifact("tuned-lens", model)
    if path is None:
        return None
    from tlmicroscope.lenses.base import load_lens

    return load_lens(path, model)


# ---------------------------------------------------------------------------------- report
def demo_report(
    model: Any = "smollm2-135m",
    *,
    budget_s: float = 600.0,
    progress: bool = True,
    text: str | None = None,
    corpus: Any = None,
) -> Any:
    """The demo's ``Report``: quick fits for what the store lacks, then every default section.

    Args:
        model: A model name for ``load_model`` or a loaded model.
        budget_s: Seconds the fitting may take in all (see :func:`ensure_demo_fits`).
        progress: Show the progress bars.
        text: The text (default: the shipped :func:`demo_text`).
        corpus: What the quick fits read (default: the embedded corpus).

    Examples:
        >>> from tlmicroscope.models import tiny_model
        >>> rep = demo_report(tiny_model(n_layers=2), progress=False)  # doctest: +SKIP
        >>> rep.missing, rep.failed  # doctest: +SKIP
        ({}, {})
    """
    from tlmicroscope.app import report
    from tlmicroscope.app.sections import available_settings

    model = _load_model(model)
    found = ensure_demo_fits(model, budget_s=budget_s, progress=progress, corpus=corpus)
    lens = _store_lens(model)
    wanted = {
        "microscope_reference": found.get("nonlinearity-reference"),
        "microscope_probe": found.get("contextualization-probe"),
        "causal_basis": found.get("causal-basis"),
        "truncate": True,  # a model with a shorter context reads the text's beginning
    }
    valid = available_settings()
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in wanted.items()}
    settings = {k: v for k, v in settings.items() if v is not None and k in valid}
    _say("building the report")
    return report(
        model,
        text if text is not None else demo_text(),
        lens=lens,
        title="tlmicroscope demo",
        **settings,
    )


def _check_out(out: Path) -> None:
    """Refuse an output path that cannot take the page before minutes of fitting."""
    if out.is_dir():
        raise ValueError(f"out={str(out)!r} is a folder; give the HTML file to write in it.")
    for parent in out.parents:
        if parent.exists() and not parent.is_dir():
            raise ValueError(f"out={str(out)!r}: {parent} is a file, not a folder.")


def run_demo(
    model: Any = "smollm2-135m",
    *,
    out: str | Path,
    budget_s: float = 600.0,
    progress: bool = True,
) -> Path:
    """Write the demo report to ``out``: every default section drawn on the shipped text.

    Fits quick versions of the missing fitted objects into the artifact store first (within
    ``budget_s`` seconds; nothing when the store has them), then builds the report.

    Args:
        model: A model name for ``load_model`` (default: the embedded SmolLM2-135M) or a model.
        out: The HTML file to write (its folder is created).
        budget_s: Seconds the quick fits may take in all.
        progress: Show the progress bars.

    Returns:
        The written file's path.

    Examples:
        >>> run_demo(out="out/demo-report.html")  # doctest: +SKIP
        PosixPath('out/demo-report.html')
    """
    t0 = time.perf_counter()
    _check_out(Path(out))
    rep = demo_report(model, budget_s=budget_s, progress=progress)
    path = Path(rep.save(out))
    states = {
        "drawn": len(rep.rendered),
        "missing": len(rep.missing),
        "failed": len(rep.failed),
    }
    slow = sorted(rep.seconds.items(), key=lambda kv: -kv[1])[:3]
    _say(
        ", ".join(f"{n} {s}" for s, n in states.items() if n or s == "drawn")
        + f" sections; {time.perf_counter() - t0:.0f} s in all; the report's capture "
        + f"{rep.capture_seconds:.0f} s, slowest sections "
        + ", ".join(f"{name} {secs:.0f} s" for name, secs in slow)
    )
    return path
