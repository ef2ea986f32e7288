"""Figures and the page of a ``LensBench``: one figure per metric (lenses as lines over layers) and
a
table. They take the result object and run no model."""

from __future__ import annotations

from html import escape
from typing import Any

from tlmicroscope.layers import RESIDUAL_AXIS

__all__ = ["lens_bench_figure", "lens_bench_page", "lens_bench_table_html"]

_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")
_TITLES = {
    "kl": ("KL(final ‖ lens) per layer", "nats"),
    "kl_bpb": ("KL(final ‖ lens) per layer", "bits per byte"),
    "cross_entropy": ("Cross-entropy of the next token per layer", "nats"),
    "cross_entropy_bpb": ("Cross-entropy of the next token per layer", "bits per byte"),
    "bias_kl": ("Bias: KL(marginal final ‖ marginal lens) per layer", "nats"),
    "depth_fraction": (
        "Prediction depth: share of tokens settled from each layer",
        "fraction of tokens",
    ),
    "fidelity_rho": (
        "Causal fidelity of each lens's CBE directions (Spearman ρ, lens vs model)",
        "ρ",
    ),
    "sra": ("Stimulus-response alignment per layer", "mean Aitchison similarity"),
}


def lens_bench_figure(bench: Any, metric: str = "kl"):
    """One metric of a ``LensBench`` as lines over layers, one per lens.

    Args:
        bench: A ``LensBench``.
        metric: ``"kl"``, ``"kl_bpb"``, ``"cross_entropy"``, ``"cross_entropy_bpb"``, ``"bias_kl"``,
            ``"depth_fraction"``, ``"fidelity_rho"`` or ``"sra"``.

    Examples:
        >>> from tlmicroscope.models import tiny_model
        >>> from tlmicroscope.lenses.bench import lens_bench
        >>> model = tiny_model(n_layers=2)
        >>> bench = lens_bench(model, ["words to read " * 40], lenses=["logit", "logit-paper"],
        ...                    n_tokens=64, seq_len=32, holdout=0.5, cbe_layers=[], sra_n_samples=4,
        ...                    progress=False)
        >>> [t.name for t in lens_bench_figure(bench, "kl").data]
        ['logit', 'logit (paper: no final norm)']
    """
    import plotly.graph_objects as go

    if metric not in _TITLES:
        raise ValueError(f"metric must be one of {sorted(_TITLES)}, got {metric!r}.")
    title, unit = _TITLES[metric]
    base = metric.removesuffix("_bpb")
    values = getattr(bench, base).double()
    if metric.endswith("_bpb"):
        values = values * bench.nats_to_bpb
    if metric in ("fidelity_rho",):
        x = [str(v) for v in bench.cbe_layers]
    elif metric == "sra":
        x = [str(v) for v in bench.sra_layers]
    else:
        x = list(bench.layer_labels)
    fig = go.Figure()
    for i, name in enumerate(bench.lens_names):
        y = values[i].numpy()
        error_y = None
        if metric == "sra":
            error_y = {
                "type": "data",
                "array": bench.sra_std[i].double().numpy(),
                "visible": True,
                "thickness": 1,
            }
        if metric == "fidelity_rho" and not bench.fidelity_ci.isnan().all():
            lo, hi = bench.fidelity_ci[i, :, 0].double(), bench.fidelity_ci[i, :, 1].double()
            error_y = {
                "type": "data",
                "symmetric": False,
                "array": (hi - values[i]).numpy(),
                "arrayminus": (values[i] - lo).numpy(),
                "visible": True,
                "thickness": 1,
            }
        fig.add_trace(
            go.Scatter(
                x=x,
                y=y,
                name=name,
                mode="lines+markers",
                error_y=error_y,
                line={"color": _COLORS[i % len(_COLORS)]},
                hovertemplate=f"{escape(name)}<br>layer %{{x}}<br>%{{y:.4f}} {unit}<extra></extra>",
            )
        )
    fig.update_layout(
        title=title,
        xaxis_title=RESIDUAL_AXIS,
        yaxis_title=unit,
        template="plotly_white",
        height=380,
        margin={"t": 50, "l": 60, "r": 20, "b": 50},
    )
    return fig


def lens_bench_table_html(bench: Any, digits: int = 3) -> str:
    """The bench's summary table (``bench.table()``) as an HTML table."""
    df = bench.table()
    head = "".join(f"<th>{escape(str(c))}</th>" for c in df.columns)
    rows = []
    for _, r in df.iterrows():
        cells = [f"<td>{escape(str(r['lens']))}</td>"]
        cells += [f"<td>{float(r[c]):.{digits}f}</td>" for c in df.columns[1:]]
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return (
        f'<table class="bench"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'
    )


def lens_bench_page(bench: Any, *, title: str | None = None):
    """An offline ``HtmlPage``: the summary table, then one figure per metric.

    Examples:
        >>> from tlmicroscope.models import tiny_model
        >>> from tlmicroscope.lenses.bench import lens_bench
        >>> model = tiny_model(n_layers=2)
        >>> bench = lens_bench(model, ["words to read " * 40], lenses=["logit"], n_tokens=64,
        ...                    seq_len=32, holdout=0.5, cbe_k=2, cbe_max_iter=3, sra_n_samples=4,
        ...                    progress=False)
        >>> html = lens_bench_page(bench).render()
        >>> 'data-section="summary"' in html, html.count("Plotly.newPlot")
        (True, 8)
    """
    from tlmicroscope.viz.html import HtmlPage

    page = HtmlPage(
        title=title or f"Lens bench: {', '.join(bench.lens_names)}",
        intro=bench.provenance.describe(),
    )
    notes = "".join(f"<li>{escape(k)}: {escape(v)}</li>" for k, v in bench.notes.items())
    page.add_section(
        "Summary",
        lens_bench_table_html(bench) + (f"<ul>{notes}</ul>" if notes else ""),
        caption=(
            f"Means over the lensed layers (the output row excluded) of {bench.n_tokens} held-out "
            "tokens "
            f"({bench.n_bytes} bytes); fidelity at layers {list(bench.cbe_layers)}, SRA over "
            "layers "
            f"{_span(list(bench.sra_layers))}."
        ),
    )
    captions = {
        "kl": "Lower is better: how far the lens's distribution is from the model's final one.",
        "cross_entropy": "The lens used as a next-token predictor; the output row is the model's "
        "own loss.",
        "bias_kl": "Systematic skew: the corpus-averaged distributions compared (Belrose et al.'s "
        "bias).",
        "depth_fraction": "The first layer from which the lens's top-1 token agrees with the model "
        "at every later layer.",
        "fidelity_rho": "Rank correlation between each CBE direction's influence on the lens and "
        "on the model.",
        "sra": "How well the lens's change under a resampled residual update aligns with the "
        "model's (±1 std).",
    }
    for metric in (
        "kl",
        "kl_bpb",
        "cross_entropy",
        "cross_entropy_bpb",
        "bias_kl",
        "depth_fraction",
        "fidelity_rho",
        "sra",
    ):
        fig = lens_bench_figure(bench, metric)
        page.add_section(
            fig.layout.title.text + (" (bits per byte)" if metric.endswith("_bpb") else ""),
            fig,
            caption=captions.get(metric, ""),
        )
    return page


def _span(layers: list) -> list:
    """The first and last of more than two layers, with ``"..."`` between."""
    return layers[:1] + ["..."] + layers[-1:] if len(layers) > 2 else layers
