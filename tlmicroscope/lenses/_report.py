"""Report sections for lenses: prediction trajectories and the LLM-Microscope logit-lens table."""

from __future__ import annotations

from typing import Any

from tlmicroscope.lenses.trajectory import prediction_trajectory
from tlmicroscope.report import ReportContext, Section, register_section
from tlmicroscope.viz.lens import logit_lens_table, trajectory_heatmap, trajectory_tokens


def logit_trajectory(ctx: ReportContext) -> Any:
    """The logit-lens trajectory of the report's text, computed once per report."""
    return ctx.memo(
        "trajectory:logit",
        lambda: prediction_trajectory(ctx.model, ctx.tokens, top_k=int(ctx.settings.get("top_k", 10))),
    )


def lens_trajectory(ctx: ReportContext) -> Any:
    """The trajectory through the report's trained lens (``None`` when there is none)."""
    if ctx.lens is None:
        return None
    return ctx.memo(
        f"trajectory:{ctx.lens.name}",
        lambda: prediction_trajectory(
            ctx.model, ctx.tokens, lens=ctx.lens, top_k=int(ctx.settings.get("top_k", 10))
        ),
    )


@register_section("trajectory", "Prediction trajectories")
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
    else:
        caption += (
            " | No tuned lens was given: only the logit lens is shown. "
            "Train one with `tlmicroscope train-lens` and pass it with --lens."
        )
    return Section(items, caption)


@register_section("logit_lens_table", "Logit lens, LLM-Microscope style")
def _logit_lens_table(ctx: ReportContext) -> Section:
    traj = ctx.memo(
        "trajectory:logit-paper",
        lambda: prediction_trajectory(ctx.model, ctx.tokens, lens="logit-paper", top_k=1),
    )
    positions = None if traj.tokens.shape[1] <= 64 else slice(-64, None)
    caption = (
        traj.provenance.describe()
        + " | As in LLM-Microscope: no final norm on intermediate layers, colour −log p(top-1)."
        + (" Last 64 positions shown." if positions is not None else "")
    )
    return Section([logit_lens_table(traj, positions=positions)], caption)
