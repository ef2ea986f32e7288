"""Figures of latent-space geometry: projections, PCA pair grids, separation, norms, positions,
paths.

They take the result objects of ``tlmicroscope.geometry`` and never run a model. Colours follow
the reference (Vainateya/Feature_Geometry_Visualization): attention blue, MLP red, embedding
green, final norm yellow, attention-norm orange and MLP-norm magenta, each shaded from dark
(first block) to light (last block). Positions use matplotlib's "winter" ramp (blue to green).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import combinations
from typing import Any

import numpy as np

__all__ = [
    "COMPONENT_COLORS",
    "component_color",
    "first_token_plot",
    "norm_heatmap",
    "norm_profile_plot",
    "pca_pair_grid",
    "positional_cosine_heatmap",
    "projection_scatter",
    "separation_plot",
    "trajectory_plot",
    "vocabulary_norm_histogram",
]

#: Base colour of each component (RGB in [0, 1]) and its (darken, lighten) shading amounts.
COMPONENT_COLORS: dict[str, tuple[tuple[float, float, float], tuple[float, float]]] = {
    "attn_out": ((0.0, 0.0, 1.0), (0.5, 0.6)),
    "resid_mid": ((0.0, 0.0, 1.0), (0.5, 0.6)),  # the reference colours post-attention blue too
    "mlp_out": ((1.0, 0.0, 0.0), (0.5, 0.6)),
    "resid_post": ((1.0, 0.0, 0.0), (0.5, 0.6)),
    "embed": ((0.0, 1.0, 0.498), (0.5, 0.6)),  # springgreen
    "ln1": ((1.0, 0.549, 0.0), (0.5, 0.6)),  # darkorange
    "ln2": ((1.0, 0.0, 1.0), (0.5, 0.6)),  # fuchsia
    "ln_final": ((1.0, 1.0, 0.0), (0.1, 0.7)),  # yellow
}
_OTHER = ((0.4, 0.4, 0.4), (0.5, 0.6))
#: matplotlib's "winter": blue to spring green.
WINTER = [[0.0, "rgb(0,0,255)"], [1.0, "rgb(0,255,127)"]]
_PRE_ADD = {"attn_out", "mlp_out", "ln1", "ln2"}


def component_color(component: str, depth: float) -> str:
    """The reference's colour for a component at relative depth 0 (first block) .. 1 (last).

    Examples:
        >>> component_color("attn_out", 0.0), component_color("attn_out", 1.0)
        ('rgb(0,0,128)', 'rgb(153,153,255)')
    """
    base, (dark, light) = COMPONENT_COLORS.get(component, _OTHER)
    c = np.asarray(base)
    lo, hi = c * (1 - dark), c + (1 - c) * light
    rgb = lo + float(np.clip(depth, 0.0, 1.0)) * (hi - lo)
    return "rgb({},{},{})".format(*(round(255 * v) for v in rgb))


def _depth(projection: Any, idx: np.ndarray) -> np.ndarray:
    if "layer" not in projection.fields:
        return np.full(len(idx), 0.5)
    layer = projection.fields["layer"][idx].astype(float)
    n = projection.n_layers or (np.nanmax(layer) + 1)
    return np.clip((layer + 1) / max(n + 1, 1), 0, 1)


def _subsample(n: int, max_points: int | None, seed: int) -> np.ndarray:
    if max_points is None or n <= max_points:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=max_points, replace=False))


def _hover(projection: Any, idx: np.ndarray) -> tuple[np.ndarray, str]:
    """customdata columns and a hovertemplate showing every label the projection has."""
    cols, lines = [], []
    for key, title in (
        ("token", "token"),
        ("position", "position"),
        ("component", "component"),
        ("layer_label", "layer"),
        ("sample", "sample"),
    ):
        if key in projection.fields:
            vals = projection.fields[key][idx]
            if key == "token":
                vals = np.array([repr(str(t))[1:-1] for t in vals], dtype=object)
            lines.append(f"{title}: %{{customdata[{len(cols)}]}}")
            cols.append(vals)
    data = np.stack(cols, 1) if cols else None
    return data, "<br>".join(lines) + "<extra></extra>"


@dataclass
class _Group:
    name: str | None
    idx: np.ndarray
    color: Any
    continuous: dict | None = None  # colorscale, cmin, cmax, colorbar title
    symbol: str = "circle"


def _groups(projection: Any, color_by: str | None, idx: np.ndarray) -> list[_Group]:
    if color_by is None:
        return [_Group(None, idx, "rgb(60,60,160)")]
    if color_by not in ("layer", "component", "position", "token"):
        raise ValueError(
            f"color_by must be 'layer', 'component', 'position', 'token' or None, got {color_by!r}."
        )
    if color_by == "component":
        comps = projection.field("component")[idx]
        depth = _depth(projection, idx)
        out = []
        for comp in dict.fromkeys(comps):
            m = comps == comp
            colors = [component_color(comp, d) for d in depth[m]]
            out.append(
                _Group(
                    str(comp), idx[m], colors, symbol="circle" if comp in _PRE_ADD else "diamond"
                )
            )
        return out
    if color_by == "layer":
        if "layer" in projection.fields:
            vals = projection.fields["layer"][idx].astype(float)
        else:
            labels = projection.field("layer_label")[idx]
            order = {lab: i for i, lab in enumerate(dict.fromkeys(projection.field("layer_label")))}
            vals = np.array([order[lab] for lab in labels], dtype=float)
        return [_Group(None, idx, vals, {"colorscale": "Viridis", "title": "layer"})]
    if color_by == "position":
        vals = projection.field("position")[idx].astype(float)
        return [_Group(None, idx, vals, {"colorscale": WINTER, "title": "position"})]
    tokens = projection.field("token")[idx]
    uniq = list(dict.fromkeys(tokens))
    if len(uniq) <= 20:
        return [_Group(repr(str(t))[1:-1], idx[tokens == t], None) for t in uniq]
    codes = np.array([uniq.index(t) for t in tokens], dtype=float)
    return [_Group(None, idx, codes, {"colorscale": "Turbo", "title": "token (first seen)"})]


def _marker(group: _Group, size: float, show_scale: bool) -> dict:
    marker: dict[str, Any] = {"size": size, "symbol": group.symbol}
    if group.color is not None:
        marker["color"] = group.color
    if group.continuous:
        marker.update(
            colorscale=group.continuous["colorscale"],
            showscale=show_scale,
            colorbar={"title": group.continuous["title"]},
        )
    return marker


def _shown_note(n_shown: int, n_total: int) -> str:
    return "" if n_shown == n_total else f" ({n_shown:,} of {n_total:,} points shown)"


def projection_scatter(
    projection: Any,
    color_by: str | None = "component",
    dims: int = 2,
    *,
    max_points: int | None = 30_000,
    seed: int = 0,
    marker_size: float | None = None,
    title: str | None = None,
):
    """An interactive scatter of a ``Projection``; hover shows token, position, layer, component.

    Args:
        projection: From ``tlmicroscope.geometry.project``.
        color_by: ``"component"`` (reference colours, shaded by depth), ``"layer"``,
            ``"position"`` (winter ramp), ``"token"`` or ``None``.
        dims: 2 or 3.
        max_points: Draw at most this many points (a seeded random subset; the title says so).

    Raises:
        ValueError: ``dims`` out of range, or a ``color_by`` field the projection lacks.

    Examples:
        >>> import torch
        >>> from tlmicroscope.geometry import project
        >>> proj = project(torch.randn(50, 8),
        ...                fields={"component": ["attn_out"] * 25 + ["mlp_out"] * 25})
        >>> [t.name for t in projection_scatter(proj, "component").data]
        ['attn_out', 'mlp_out']
    """
    import plotly.graph_objects as go

    if dims not in (2, 3):
        raise ValueError(f"dims must be 2 or 3, got {dims}.")
    if dims > projection.n_components:
        raise ValueError(
            f"dims={dims} but the projection has {projection.n_components} components; "
            f"project with n_components={dims}."
        )
    idx = _subsample(len(projection), max_points, seed)
    groups = _groups(projection, color_by, idx)
    xyz = projection.coords.numpy()
    size = marker_size or (3 if len(idx) > 5000 else 5)
    fig = go.Figure()
    for gi, g in enumerate(groups):
        data, template = _hover(projection, g.idx)
        common = dict(
            mode="markers",
            name=g.name,
            showlegend=g.name is not None,
            customdata=data,
            hovertemplate=template,
            marker=_marker(g, size, gi == 0),
        )
        if dims == 2:
            fig.add_trace(go.Scattergl(x=xyz[g.idx, 0], y=xyz[g.idx, 1], **common))
        else:
            fig.add_trace(go.Scatter3d(x=xyz[g.idx, 0], y=xyz[g.idx, 1], z=xyz[g.idx, 2], **common))
    axes = projection.axis_titles()
    head = title or f"{projection.method.upper()} projection coloured by {color_by or 'nothing'}"
    fig.update_layout(
        title=head + _shown_note(len(idx), len(projection)),
        template="plotly_white",
        legend={"itemsizing": "constant"},
        height=600,
    )
    if dims == 2:
        fig.update_xaxes(title=axes[0])
        fig.update_yaxes(title=axes[1])
    else:
        fig.update_layout(
            scene={"xaxis_title": axes[0], "yaxis_title": axes[1], "zaxis_title": axes[2]}
        )
    return fig


def pca_pair_grid(
    projection: Any,
    color_by: str | None = "position",
    *,
    n_components: int = 6,
    max_points: int | None = 5_000,
    seed: int = 0,
    title: str | None = None,
):
    """Every pair of the first ``n_components`` components (15 panels for 6), as the reference's
    sequence-position figure.

    Examples:
        >>> import torch
        >>> from tlmicroscope.geometry import project
        >>> proj = project(torch.randn(40, 10), n_components=6,
        ...                fields={"position": list(range(40))})
        >>> len(pca_pair_grid(proj).data)
        15
    """
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    k = min(n_components, projection.n_components)
    if k < 2:
        raise ValueError(
            "A pair grid needs at least 2 components; the projection has "
            f"{projection.n_components}."
        )
    pairs = list(combinations(range(k), 2))
    cols = min(3, len(pairs))
    rows = -(-len(pairs) // cols)
    axes = projection.axis_titles()
    fig = make_subplots(
        rows=rows,
        cols=cols,
        horizontal_spacing=0.06,
        vertical_spacing=0.08,
        subplot_titles=[f"{axes[i].split(' ')[0]} vs {axes[j].split(' ')[0]}" for i, j in pairs],
    )
    idx = _subsample(len(projection), max_points, seed)
    groups = _groups(projection, color_by, idx)
    xyz = projection.coords.numpy()
    for p, (i, j) in enumerate(pairs):
        r, c = divmod(p, cols)
        for gi, g in enumerate(groups):
            data, template = _hover(projection, g.idx)
            fig.add_trace(
                go.Scattergl(
                    x=xyz[g.idx, i],
                    y=xyz[g.idx, j],
                    mode="markers",
                    name=g.name,
                    showlegend=p == 0 and g.name is not None,
                    legendgroup=g.name,
                    customdata=data,
                    hovertemplate=template,
                    marker=_marker(g, 3, p == 0 and gi == 0),
                ),
                row=r + 1,
                col=c + 1,
            )
    fig.update_layout(
        title=(title or f"First {k} principal components, pairwise")
        + _shown_note(len(idx), len(projection)),
        template="plotly_white",
        height=260 * rows + 80,
        showlegend=True,
    )
    return fig


def separation_plot(result: Any, *, also: Any = None, title: str | None = None):
    """Cross-validated accuracy (with ±1 sd over folds) and silhouette by block, chance marked.

    ``also`` adds the accuracy of a second result, e.g. the same separation scored in the top two
    principal components (``component_separation(..., n_pca=2)``).

    Examples:
        >>> import torch
        >>> from tlmicroscope.geometry.separation import SeparationResult
        >>> r = SeparationResult((0, 1), torch.tensor([0.6, 0.9]), torch.tensor([0.05, 0.02]),
        ...                      torch.tensor([0.1, 0.4]), torch.tensor([100, 100]),
        ...                      ("attn_out", "mlp_out"), 0.5)
        >>> [t.name for t in separation_plot(r).data]
        ['linear-probe accuracy (CV)', 'silhouette']
    """
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(specs=[[{"secondary_y": True}]])
    layers = list(result.layers)
    fig.add_trace(
        go.Scatter(
            x=layers,
            y=result.accuracy.numpy(),
            mode="lines+markers",
            name="linear-probe accuracy (CV)",
            line={"color": "rgb(80,0,160)"},
            error_y={"type": "data", "array": result.accuracy_std.numpy()},
        ),
        secondary_y=False,
    )
    if also is not None:
        k = also.provenance.settings.get("separation", {}).get("n_pca") if also.provenance else None
        fig.add_trace(
            go.Scatter(
                x=list(also.layers),
                y=also.accuracy.numpy(),
                mode="lines+markers",
                name=f"accuracy in the top {k} PCs" if k else "accuracy (second result)",
                line={"color": "rgb(0,150,90)", "dash": "dash"},
                error_y={"type": "data", "array": also.accuracy_std.numpy()},
            ),
            secondary_y=False,
        )
    fig.add_trace(
        go.Scatter(
            x=layers,
            y=result.silhouette.numpy(),
            mode="lines+markers",
            name="silhouette",
            line={"color": "rgb(230,120,0)", "dash": "dot"},
        ),
        secondary_y=True,
    )
    fig.add_hline(
        y=result.chance,
        line_dash="dash",
        line_color="grey",
        annotation_text=f"chance {result.chance:g}",
        secondary_y=False,
    )
    a, b = result.components
    fig.update_layout(
        title=title or f"{a} vs {b}: separation by block",
        template="plotly_white",
        xaxis_title="block",
        height=420,
    )
    low = min(float(r.accuracy.min()) for r in (result, also) if r is not None)
    fig.update_yaxes(title="accuracy", range=[min(0.4, low - 0.05), 1.02], secondary_y=False)
    fig.update_yaxes(title="silhouette", range=[-1, 1], secondary_y=True)
    return fig


def _profile_rows(profile: Any, states: Sequence[int] | None, limit: int) -> list[int]:
    n = profile.norms.shape[0]
    if states is not None:
        return [int(s) % n for s in states]
    return sorted({round(x) for x in np.linspace(0, n - 1, min(limit, n))})


def norm_profile_plot(
    profile: Any,
    *,
    states: Sequence[int] | None = None,
    max_lines: int = 12,
    log: bool = True,
    title: str | None = None,
):
    """Mean norm over samples by position, one line per state (log scale by default).

    Examples:
        >>> import torch
        >>> from tlmicroscope.geometry.norms import NormProfile
        >>> p = NormProfile(torch.rand(3, 2, 5) + 1, ("resid_post",) * 3, (0, 1, 2),
        ...                 torch.arange(5), None, 3)
        >>> len(norm_profile_plot(p).data)
        3
    """
    import plotly.graph_objects as go

    prof = profile.by_position.numpy()
    labels = list(profile.layer_labels)
    pos = profile.positions.numpy()
    tokens = profile.str_tokens[0] if profile.str_tokens is not None else None
    rows = _profile_rows(profile, states, max_lines)
    fig = go.Figure()
    for k, r in enumerate(rows):
        depth = k / max(len(rows) - 1, 1)
        hover = (
            None if tokens is None else [f"token (sample 0): {repr(str(t))[1:-1]}" for t in tokens]
        )
        fig.add_trace(
            go.Scatter(
                x=pos,
                y=prof[r],
                mode="lines",
                name=labels[r],
                text=hover,
                line={"color": component_color(profile.components[r], depth), "width": 1.5},
                hovertemplate="position %{x}<br>norm %{y:.3g}<br>%{text}<extra>"
                + labels[r]
                + "</extra>",
            )
        )
    fig.update_layout(
        title=title or "Norm by position (mean over samples)",
        template="plotly_white",
        xaxis_title="position",
        yaxis_title="L2 norm",
        height=450,
    )
    if log:
        fig.update_yaxes(type="log")
    return fig


def norm_heatmap(profile: Any, *, title: str | None = None):
    """Mean norm over samples by state (rows) and position (columns), coloured on a log10 scale.

    Hover shows the norm itself, the position and its token (sample 0).

    Examples:
        >>> import torch
        >>> from tlmicroscope.geometry.norms import NormProfile
        >>> p = NormProfile(torch.rand(3, 2, 5) + 1, ("resid_post",) * 3, (0, 1, 2),
        ...                 torch.arange(5), None, 3)
        >>> norm_heatmap(p).data[0].z.shape
        (3, 5)
    """
    import plotly.graph_objects as go

    prof = profile.by_position.double().numpy()
    labels = list(profile.layer_labels)
    pos = profile.positions.numpy()
    tokens = (
        np.array([repr(str(t))[1:-1] for t in profile.str_tokens[0]], dtype=object)
        if profile.str_tokens is not None
        else np.array([""] * len(pos), dtype=object)
    )
    custom = np.stack([prof, np.broadcast_to(tokens, prof.shape)], -1)
    log = np.log10(np.clip(prof, np.finfo(float).tiny, None))
    fig = go.Figure(
        go.Heatmap(
            z=log,
            x=pos,
            y=labels,
            customdata=custom,
            colorscale="Viridis",
            colorbar={"title": "log10 norm"},
            hovertemplate="layer %{y}, position %{x}<br>token %{customdata[1]}<br>"
            "norm %{customdata[0]:.4g}<extra></extra>",
        )
    )
    fig.update_layout(
        title=title or "Norm by layer and position (log10 colour scale)",
        template="plotly_white",
        xaxis_title="position",
        yaxis_title="layer",
        height=max(320, 16 * len(labels) + 140),
    )
    return fig


def first_token_plot(profile: Any, *, title: str | None = None):
    """By state: position 0's norm and the median other position's norm (log), and their ratio."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    labels = list(profile.layer_labels)
    prof = profile.by_position
    first = (
        int((profile.positions == 0).nonzero()[0]) if bool((profile.positions == 0).any()) else None
    )
    if first is None:
        raise ValueError("The profile has no position 0; measure all positions.")
    rest = (profile.positions != 0).nonzero().flatten()
    fig = make_subplots(
        rows=2,
        cols=1,
        shared_xaxes=True,
        vertical_spacing=0.08,
        subplot_titles=["norms (log scale)", "position 0 / median of the others"],
    )
    fig.add_trace(
        go.Scatter(
            x=labels,
            y=prof[:, first].numpy(),
            mode="lines+markers",
            name="position 0",
            line={"color": "rgb(200,0,0)"},
        ),
        row=1,
        col=1,
    )
    fig.add_trace(
        go.Scatter(
            x=labels,
            y=prof[:, rest].median(1).values.numpy(),
            mode="lines+markers",
            name="median of positions ≥ 1",
            line={"color": "rgb(0,0,200)"},
        ),
        row=1,
        col=1,
    )
    fig.add_trace(
        go.Bar(
            x=labels,
            y=profile.first_token_ratio.numpy(),
            name="ratio",
            marker_color="rgb(120,120,120)",
        ),
        row=2,
        col=1,
    )
    fig.update_yaxes(type="log", row=1, col=1)
    fig.update_yaxes(type="log", row=2, col=1)
    fig.update_layout(
        title=title or "First-token norm spike by layer", template="plotly_white", height=600
    )
    return fig


def trajectory_plot(
    traj: Any,
    dims: int = 2,
    *,
    background: bool = True,
    max_background: int = 5_000,
    title: str | None = None,
):
    """Chosen tokens' paths through the layers, over the cloud of every projected state.

    Examples:
        >>> from tlmicroscope.models import tiny_model
        >>> from tlmicroscope.geometry import token_trajectories
        >>> tr = token_trajectories(tiny_model(n_layers=2), "hey", positions=[0, 2])
        >>> fig = trajectory_plot(tr)
        >>> [t.name for t in fig.data]
        ['all states', 'h @0', 'y @2']
    """
    import plotly.colors as pc
    import plotly.graph_objects as go

    if dims not in (2, 3) or dims > traj.coords.shape[-1]:
        raise ValueError(
            f"dims must be 2 or 3 and at most the {traj.coords.shape[-1]} projected components."
        )
    fig = go.Figure()
    scatter = go.Scatter if dims == 2 else go.Scatter3d
    if background:
        proj = traj.projection
        idx = _subsample(len(proj), max_background, 0)
        xyz = proj.coords.numpy()[idx]
        data, template = _hover(proj, idx)
        kw = (
            dict(x=xyz[:, 0], y=xyz[:, 1])
            if dims == 2
            else dict(x=xyz[:, 0], y=xyz[:, 1], z=xyz[:, 2])
        )
        fig.add_trace(
            scatter(
                **kw,
                mode="markers",
                name="all states",
                customdata=data,
                hovertemplate=template,
                marker={"size": 3, "color": "rgba(150,150,150,0.35)"},
            )
        )
    palette = pc.qualitative.Dark24
    for t, (pos, tok) in enumerate(zip(traj.positions, traj.str_tokens)):
        c = traj.coords[t].numpy()
        kw = dict(x=c[:, 0], y=c[:, 1]) if dims == 2 else dict(x=c[:, 0], y=c[:, 1], z=c[:, 2])
        name = f"{repr(str(tok))[1:-1]} @{pos}"
        fig.add_trace(
            scatter(
                **kw,
                mode="lines+markers",
                name=name,
                text=list(traj.layer_labels),
                line={"color": palette[t % len(palette)]},
                marker={"size": 5 if dims == 2 else 3},
                hovertemplate=f"{name}<br>layer %{{text}}<extra></extra>",
            )
        )
    axes = traj.projection.axis_titles()
    fig.update_layout(
        title=title or "Token trajectories across layers (one shared projection)",
        template="plotly_white",
        height=600,
    )
    if dims == 2:
        fig.update_xaxes(title=axes[0])
        fig.update_yaxes(title=axes[1])
    else:
        fig.update_layout(
            scene={"xaxis_title": axes[0], "yaxis_title": axes[1], "zaxis_title": axes[2]}
        )
    return fig


def positional_cosine_heatmap(geometry: Any, *, title: str | None = None):
    """Cosine similarity between positions (a ``PositionalGeometry``)."""
    import plotly.graph_objects as go

    fig = go.Figure(
        go.Heatmap(
            z=geometry.cosine.numpy(),
            colorscale="RdBu",
            zmin=-1,
            zmax=1,
            colorbar={"title": "cosine"},
            hovertemplate="positions %{y} and %{x}<br>cosine %{z:.3f}<extra></extra>",
        )
    )
    src = "W_pos" if geometry.source == "W_pos" else "mean residual"
    fig.update_layout(
        title=title or f"Cosine similarity between positions ({src})",
        template="plotly_white",
        xaxis_title="position",
        yaxis_title="position",
        height=550,
        yaxis={"autorange": "reversed"},
    )
    return fig


def vocabulary_norm_histogram(
    vnorms: Any, *, layers: Sequence[int] | None = None, bins: int = 150, title: str | None = None
):
    """Histogram over tokens of the mean norm when each token is fed alone (the reference's
    figure).
    """
    import plotly.graph_objects as go

    m = vnorms.mean_norm(layers).numpy()
    fig = go.Figure(go.Histogram(x=m, nbinsx=bins, marker_color="rgb(90,90,200)"))
    where = "after a BOS" if vnorms.prepend_bos else "as the first token"
    fig.update_layout(
        title=title or f"Mean intermediate-layer norm of {len(m):,} tokens fed alone ({where})",
        xaxis_title="mean norm",
        yaxis_title="tokens",
        template="plotly_white",
        height=420,
    )
    return fig
