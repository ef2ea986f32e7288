"""Figures of the causal analyses: CBE energies, causal fidelity, stimulus-response alignment,
injection-detection AUROCs and prediction depth. They take result objects and never run a model."""

from __future__ import annotations

from typing import Any

import numpy as np

from tlmicroscope.viz.html import CircuitsVisView

__all__ = [
    "cbe_energy_figure",
    "cbe_text_influence_figure",
    "fidelity_scatter",
    "injection_auroc_figure",
    "prediction_depth_figure",
    "prediction_depth_tokens",
    "stimulus_response_figure",
]

_LENS_COLOURS = {"logit": "#1f77b4", "tuned": "#d62728"}


def _caption(result: Any) -> str:
    prov = getattr(result, "provenance", None)
    return prov.describe() if prov is not None else ""


def cbe_energy_figure(basis: Any, *, log_y: bool = True, title: str | None = None):
    """Energies of a ``CausalBasis``'s directions (expected KL of the lens when ablated).

    Examples:
        >>> import torch
        >>> from types import SimpleNamespace
        >>> b = SimpleNamespace(energies=torch.tensor([0.3, 0.1]),
        ...                     converged=torch.tensor([True, False]),
        ...                     layer=4, mode="mean", lens="logit", n_tokens=100, provenance=None)
        >>> fig = cbe_energy_figure(b)
        >>> [round(float(v), 3) for v in fig.data[0].y], fig.data[0].marker.color
        ([0.3, 0.1], ('#1f77b4', '#ff7f0e'))
    """
    import plotly.graph_objects as go

    e = basis.energies.double().numpy()
    conv = basis.converged.numpy()
    colours = ["#1f77b4" if c else "#ff7f0e" for c in conv]
    fig = go.Figure(
        go.Bar(
            x=list(range(len(e))),
            y=e,
            marker_color=colours,
            customdata=np.where(conv, "converged", "not converged (energy is a lower bound)"),
            hovertemplate="direction %{x}<br>energy %{y:.4g} nats<br>%{customdata}<extra></extra>",
        )
    )
    fig.update_layout(
        title=title
        or f"CBE energies at layer {basis.layer} ({basis.lens} lens, {basis.mode} ablation, "
        f"{basis.n_tokens} tokens)",
        xaxis_title="direction (by energy)",
        yaxis_title="E[KL(lens ‖ ablated lens)] (nats)",
        template="plotly_white",
    )
    if log_y and (e > 0).all():
        fig.update_yaxes(type="log")
    return fig


def cbe_text_influence_figure(
    basis: Any, influence: Any, *, log_y: bool = True, title: str | None = None
):
    """Each direction's energy on the extraction corpus beside its lens influence on one text.

    ``influence`` is ``[k]`` nats: the lens's KL when the direction is ablated on the text's
    hidden states (same layer, mode and mean as the basis).

    Examples:
        >>> import torch
        >>> from types import SimpleNamespace
        >>> b = SimpleNamespace(energies=torch.tensor([0.3, 0.1]), layer=4, lens="logit",
        ...                     mode="mean")
        >>> fig = cbe_text_influence_figure(b, torch.tensor([0.2, 0.15]))
        >>> [t.name for t in fig.data], [round(float(v), 2) for v in fig.data[1].y]
        (['extraction corpus (saved energies)', 'this text'], [0.2, 0.15])
    """
    import plotly.graph_objects as go

    e = basis.energies.double().numpy()
    x = np.asarray(influence, dtype=float)
    idx = list(range(len(e)))
    fig = go.Figure(
        [
            go.Bar(
                x=idx,
                y=e,
                name="extraction corpus (saved energies)",
                marker_color="#1f77b4",
                hovertemplate="direction %{x}<br>corpus %{y:.4g} nats<extra></extra>",
            ),
            go.Bar(
                x=idx,
                y=x,
                name="this text",
                marker_color="#d62728",
                hovertemplate="direction %{x}<br>this text %{y:.4g} nats<extra></extra>",
            ),
        ]
    )
    fig.update_layout(
        title=title
        or f"Lens influence of each direction at layer {basis.layer}: corpus vs this text "
        f"({basis.lens} lens, {basis.mode} ablation)",
        xaxis_title="direction (by corpus energy)",
        yaxis_title="E[KL(lens ‖ ablated lens)] (nats)",
        barmode="group",
        template="plotly_white",
        legend=dict(orientation="h", y=-0.2),
    )
    if log_y and (e > 0).all() and (x > 0).all():
        fig.update_yaxes(type="log")
    return fig


def fidelity_scatter(result: Any, *, title: str | None = None):
    """Influence of each direction on the lens against its influence on the model (log-log).

    Examples:
        >>> import torch
        >>> from types import SimpleNamespace
        >>> r = SimpleNamespace(lens_influence=torch.tensor([0.1, 0.01]),
        ...                     model_influence=torch.tensor([0.2, 0.05]),
        ...                     spearman=1.0, layer=3, mode="mean", lens="logit", provenance=None)
        >>> fidelity_scatter(r).layout.xaxis.type
        'log'
    """
    import plotly.graph_objects as go

    x = result.lens_influence.double().numpy()
    y = result.model_influence.double().numpy()
    fig = go.Figure(
        go.Scatter(
            x=x,
            y=y,
            mode="markers",
            marker=dict(
                size=9,
                color=np.arange(len(x)),
                colorscale="Viridis",
                colorbar=dict(title=dict(text="direction", side="right")),
            ),
            text=[f"direction {i}" for i in range(len(x))],
            hovertemplate="%{text}<br>lens %{x:.3g} nats<br>model %{y:.3g} nats<extra></extra>",
        )
    )
    positive = np.concatenate([x, y])
    positive = positive[positive > 0]
    if positive.size:
        lo, hi = positive.min(), positive.max()
        fig.add_trace(
            go.Scatter(
                x=[lo, hi],
                y=[lo, hi],
                mode="lines",
                line=dict(dash="dot", color="grey"),
                name="y = x",
                hoverinfo="skip",
            )
        )
    fig.update_layout(
        title=title
        or (
            f"Causal fidelity at layer {result.layer} ({result.lens} lens, {result.mode} "
            "ablation): "
            f"Spearman ρ = {result.spearman:.3f}"
        ),
        xaxis_title="influence on the lens (nats)",
        yaxis_title="influence on the model (nats)",
        template="plotly_white",
        showlegend=False,
    )
    if (x > 0).all() and (y > 0).all():
        fig.update_xaxes(type="log")
        fig.update_yaxes(type="log")
    return fig


def stimulus_response_figure(*results: Any, title: str | None = None):
    """Mean stimulus-response alignment per layer, one line per lens (± standard error).

    Takes one or several ``StimulusResponseResult`` objects (e.g. logit and tuned lens).
    """
    import plotly.graph_objects as go

    fig = go.Figure()
    for res in results:
        a = res.alignment.double().numpy()
        for li, name in enumerate(res.lens_names):
            mean = np.nanmean(a[li], -1)
            n = np.maximum((~np.isnan(a[li])).sum(-1), 1)
            se = np.nanstd(a[li], -1) / np.sqrt(n)
            fig.add_trace(
                go.Scatter(
                    x=list(res.layers),
                    y=mean,
                    error_y=dict(type="data", array=se, visible=True),
                    mode="lines+markers",
                    name=f"{name} lens",
                    line=dict(color=_LENS_COLOURS.get(name)),
                    hovertemplate="layer %{x}<br>alignment %{y:.3f}<extra>" + name + "</extra>",
                )
            )
    fig.update_layout(
        title=title or "Stimulus-response alignment (Aitchison similarity)",
        xaxis_title="layer",
        yaxis_title="alignment",
        template="plotly_white",
    )
    return fig


def injection_auroc_figure(result: Any, *, title: str | None = None):
    """Mean AUROC of prompt-injection detection per feature set, with the spread over splits.

    Examples:
        >>> import numpy as np
        >>> from types import SimpleNamespace
        >>> r = SimpleNamespace(auroc={"logit": np.array([0.7, 0.8]),
        ...                            "mahalanobis": np.array([0.6, 0.6])},
        ...                     detector="lof", n_items=20, provenance=None)
        >>> [round(v, 2) for v in injection_auroc_figure(r).data[0].y]
        [0.75, 0.6]
    """
    import plotly.graph_objects as go

    names = list(result.auroc)
    means = [float(np.mean(result.auroc[k])) for k in names]
    stds = [float(np.std(result.auroc[k])) for k in names]
    fig = go.Figure(
        go.Bar(
            x=names,
            y=means,
            error_y=dict(type="data", array=stds, visible=True),
            marker_color=[_LENS_COLOURS.get(k, "#7f7f7f") for k in names],
            hovertemplate="%{x}<br>AUROC %{y:.3f}<extra></extra>",
        )
    )
    fig.add_hline(y=0.5, line_dash="dot", line_color="grey", annotation_text="chance")
    fig.update_layout(
        title=title
        or f"Prompt-injection detection ({result.detector}, {result.n_items} items, "
        f"{len(next(iter(result.auroc.values())))} splits)",
        yaxis=dict(title="AUROC", range=[0, 1.05]),
        template="plotly_white",
    )
    return fig


def prediction_depth_figure(result: Any, *, batch: int = 0, title: str | None = None):
    """Prediction depth of each token as bars, the model's top-1 prediction in the hover."""
    import plotly.graph_objects as go

    depth = result.depth[batch].numpy()
    toks = [repr(t)[1:-1] or "∅" for t in result.str_tokens[batch]]
    nxt = [repr(str(t))[1:-1] for t in result.final_top1[batch]]
    fig = go.Figure(
        go.Bar(
            x=list(range(len(depth))),
            y=depth,
            customdata=np.stack([toks, nxt], -1),
            marker=dict(color=depth, colorscale="Viridis", cmin=0, cmax=result.n_layers),
            hovertemplate="%{customdata[0]} → %{customdata[1]}<br>depth %{y}<extra></extra>",
        )
    )
    fig.update_layout(
        title=title or f"Prediction depth per token ({result.provenance.lens} lens)",
        xaxis=dict(title="token", tickmode="array", tickvals=list(range(len(toks))), ticktext=toks),
        yaxis=dict(
            title="first layer that keeps the final top-1", range=[0, result.n_layers + 0.5]
        ),
        template="plotly_white",
    )
    return fig


def prediction_depth_tokens(result: Any, *, batch: int = 0) -> CircuitsVisView:
    """The input tokens coloured by their prediction depth (circuitsvis, offline)."""
    from tlmicroscope.viz.lens import colored_tokens

    return colored_tokens(
        result.str_tokens[batch],
        result.depth[batch].float(),
        min_value=0,
        max_value=result.n_layers,
    )
