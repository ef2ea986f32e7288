"""Figures built from result objects: plotly for charts, circuitsvis for token views, offline HTML."""

from tlmicroscope.viz.html import CircuitsVisView, HtmlPage, figure_fragment
from tlmicroscope.viz.lens import (
    STAT_TITLES,
    colored_tokens,
    logit_lens_table,
    trajectory_heatmap,
    trajectory_tokens,
)

__all__ = [
    "HtmlPage",
    "CircuitsVisView",
    "figure_fragment",
    "trajectory_heatmap",
    "logit_lens_table",
    "colored_tokens",
    "trajectory_tokens",
    "STAT_TITLES",
]
