"""The lens panel: prediction trajectories and the LLM-Microscope logit-lens table.

Its two sections are the ``lens`` preset (``tlmicroscope lens TEXT``) and the first two of the
report. ``trajectory`` shows the logit lens and, beside it, the report's own lens (a trained
lens, or ``"logit-paper"``); ``logit_lens_table`` reads out only the positions it shows.
"""

from __future__ import annotations

from typing import Any

from tlmicroscope.app.prerequisites import quick_note
from tlmicroscope.app.sections import ReportContext, Section, register_section
from tlmicroscope.lenses.trajectory import prediction_trajectory
from tlmicroscope.viz.lens import logit_lens_table, trajectory_heatmap, trajectory_tokens


def _trajectory_of(ctx: ReportContext, lens: Any, top_k: int) -> Any:
    """A trajectory from the report's shared capture when it has the residual stream."""
    if ctx.cache is not None and "blocks.0.hook_resid_pre" in ctx.cache:
        return prediction_trajectory(
            ctx.cache, ctx.tokens, lens=lens, top_k=top_k, logits=ctx.logits
        )
    return prediction_trajectory(ctx.model, ctx.tokens, lens=lens, top_k=top_k)


def logit_trajectory(ctx: ReportContext) -> Any:
    """The logit-lens trajectory of the report's text, computed once per report."""
    return ctx.memo(
        "trajectory:logit", lambda: _trajectory_of(ctx, None, int(ctx.settings.get("top_k", 10)))
    )


def lens_trajectory(ctx: ReportContext) -> Any:
    """The trajectory through the report's own lens (``None`` for none or the plain logit lens).

    The lens is a trained lens or the name ``"logit-paper"`` (the LLM-Microscope variant)."""
    if ctx.lens is None or ctx.lens == "logit":
        return None
    return ctx.memo(
        f"trajectory:{getattr(ctx.lens, 'name', ctx.lens)}",
        lambda: _trajectory_of(ctx, ctx.lens, int(ctx.settings.get("top_k", 10))),
    )


#: Positions the trajectory section draws by default: the text's last 64 (``trajectory_positions``).
TRAJECTORY_POSITIONS = 64


def trajectory_window(ctx: ReportContext) -> int | None:
    """How many of the text's last positions the trajectory and layer-contribution heatmaps
    draw (the ``trajectory_positions`` setting; ``None``: all)."""
    value = ctx.settings.get("trajectory_positions", TRAJECTORY_POSITIONS)
    if value in (None, "all"):
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"trajectory_positions must be a positive int or 'all', got {value!r}.")
    return value if value < int(ctx.tokens.shape[-1]) else None


def _windowed(ctx: ReportContext, lens: Any, key: str, n: int | None) -> tuple[Any, Any, int]:
    """The trajectory through ``lens``, the positions of it to draw and the text position of
    its first one: the shared full trajectory when a section already computed it (or there is
    no shared capture), else only the last ``n`` positions read out (every position is read out
    on its own, so those cells equal the full trajectory's)."""
    top_k = int(ctx.settings.get("top_k", 10))
    shared = ctx.cache is not None and "blocks.0.hook_resid_pre" in ctx.cache
    if n is None or ctx.memoized(key) or not shared or ctx.logits is None:
        traj = ctx.memo(key, lambda: _trajectory_of(ctx, lens, top_k))
        return traj, (None if n is None else slice(-n, None)), 0

    def compute() -> Any:
        cache, tokens, logits = _last_positions(ctx, n)
        return prediction_trajectory(cache, tokens, lens=lens, top_k=top_k, logits=logits)

    return ctx.memo(f"{key}:last{n}", compute), None, int(ctx.tokens.shape[-1]) - n


def report_lens_window(ctx: ReportContext) -> tuple[Any, Any, int]:
    """The trajectory through the report's lens (the logit lens when it has none) as the
    trajectory section draws it: ``(trajectory, positions to draw, first position)`` (see
    ``trajectory_window``; computed once per report and shared)."""
    n = trajectory_window(ctx)
    if ctx.lens is None or ctx.lens == "logit":
        return _windowed(ctx, None, "trajectory:logit", n)
    return _windowed(ctx, ctx.lens, f"trajectory:{getattr(ctx.lens, 'name', ctx.lens)}", n)


@register_section(
    "trajectory",
    "Prediction trajectories",
    needs=("resid",),
    settings=("top_k", "trajectory_positions"),
)
def _trajectory(ctx: ReportContext) -> Section:
    n_pos = int(ctx.tokens.shape[-1])
    n = trajectory_window(ctx)
    traj, pos, first = _windowed(ctx, None, "trajectory:logit", n)
    tuned, tuned_pos, tuned_first = None, None, 0
    if ctx.lens is not None and ctx.lens != "logit":
        key = f"trajectory:{getattr(ctx.lens, 'name', ctx.lens)}"
        tuned, tuned_pos, tuned_first = _windowed(ctx, ctx.lens, key, n)
    items: list[Any] = []
    for stat in ("cross_entropy", "kl", "entropy", "target_rank"):
        items.append(trajectory_heatmap(traj, stat, positions=pos, first_position=first))
        if tuned is not None:
            items.append(
                trajectory_heatmap(tuned, stat, positions=tuned_pos, first_position=tuned_first)
            )
    items.append("<p>Input tokens coloured by the model's next-token cross-entropy (nats):</p>")
    items.append(trajectory_tokens(traj, "cross_entropy"))
    caption = traj.provenance.describe()
    if n is not None:
        caption += (
            f" | The last {n} of {n_pos} positions (positions {n_pos - n}-{n_pos - 1}) are "
            "drawn; "
            "the setting trajectory_positions= changes it ('all' draws every position)."
        )
    if tuned is not None:
        caption += " | " + tuned.provenance.describe()
        note = quick_note(ctx.lens, "tuned-lens", ctx.model)  # e.g. the demo's quick lens
        caption += f" | {note}" if note else ""
    else:
        caption += (
            " | No tuned lens was given: only the logit lens is shown. "
            "Train one with `tlmicroscope train-lens` (it goes to the artifact store, where "
            "`tlmicroscope report` finds it) or pass a lens folder with --lens."
        )
    return Section(items, caption)


_TABLE_POSITIONS = 64


def _last_positions(ctx: ReportContext, n: int) -> tuple[Any, Any, Any]:
    """The shared capture's residuals, tokens and logits cut to the last ``n`` positions.

    Every position is read out on its own (the final norm and the unembedding act row by row),
    so reading out only the positions a view shows gives the same cells for a fraction of the cost.
    """
    from transformer_lens import ActivationCache

    L = int(ctx.model.cfg.n_layers)
    names = [f"blocks.{i}.hook_resid_pre" for i in range(L)] + [f"blocks.{L - 1}.hook_resid_post"]
    sliced = {name: ctx.cache[name][:, -n:] for name in names}
    return ActivationCache(sliced, ctx.model), ctx.tokens[:, -n:], ctx.logits[:, -n:]


@register_section(
    "logit_lens_table", "Logit lens, LLM-Microscope style", needs=("resid",), settings=("top_k",)
)
def _logit_lens_table(ctx: ReportContext) -> Section:
    n_pos = int(ctx.tokens.shape[-1])
    shown = min(n_pos, _TABLE_POSITIONS)

    def compute() -> Any:
        if (
            ctx.cache is not None
            and "blocks.0.hook_resid_pre" in ctx.cache
            and ctx.logits is not None
        ):
            cache, tokens, logits = _last_positions(ctx, shown)
            return prediction_trajectory(cache, tokens, lens="logit-paper", top_k=1, logits=logits)
        return prediction_trajectory(ctx.model, ctx.tokens, lens="logit-paper", top_k=1)

    traj = ctx.memo(f"trajectory:logit-paper:last{shown}", compute)
    positions = None if traj.tokens.shape[1] <= shown else slice(-shown, None)
    caption = (
        traj.provenance.describe()
        + " | As in LLM-Microscope: no final norm on intermediate layers, colour −log p(top-1)."
        + (f" Last {shown} of {n_pos} positions shown." if shown < n_pos else "")
    )
    return Section([logit_lens_table(traj, positions=positions)], caption)
