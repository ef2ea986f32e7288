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


@register_section("trajectory", "Prediction trajectories", needs=("resid",), settings=("top_k",))
def _trajectory(ctx: ReportContext) -> Section:
    traj = logit_trajectory(ctx)
    items: list[Any] = []
    tuned = lens_trajectory(ctx)
    for stat in ("cross_entropy", "kl", "entropy", "target_rank"):
        items.append(trajectory_heatmap(traj, stat))
        if tuned is not None:
            items.append(trajectory_heatmap(tuned, stat))
    items.append("<p>Input tokens coloured by the model's next-token cross-entropy (nats):</p>")
    items.append(trajectory_tokens(traj, "cross_entropy"))
    caption = traj.provenance.describe()
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
