"""Figures built from result objects: plotly for charts, circuitsvis for token views, offline
HTML.
"""

from tlmicroscope.viz.bench import lens_bench_figure, lens_bench_page, lens_bench_table_html
from tlmicroscope.viz.causal import (
    cbe_energy_figure,
    fidelity_scatter,
    injection_auroc_figure,
    prediction_depth_figure,
    prediction_depth_tokens,
    stimulus_response_figure,
)
from tlmicroscope.viz.html import CircuitsVisView, HtmlPage, figure_fragment
from tlmicroscope.viz.latent import (
    first_token_plot,
    norm_heatmap,
    norm_profile_plot,
    pca_pair_grid,
    positional_cosine_heatmap,
    projection_scatter,
    separation_plot,
    trajectory_plot,
    vocabulary_norm_histogram,
)
from tlmicroscope.viz.lens import (
    STAT_TITLES,
    colored_tokens,
    logit_lens_table,
    trajectory_heatmap,
    trajectory_tokens,
)
from tlmicroscope.viz.token_geometry import (
    id_loss_correlation_figure,
    layer_geometry_figure,
    sweep_profile_figure,
)
from tlmicroscope.viz.tuned import (
    lens_comparison_figure,
    training_curve_figure,
    trajectory_comparison,
    transfer_heatmap,
)

__all__ = [
    "STAT_TITLES",
    "CircuitsVisView",
    "HtmlPage",
    "colored_tokens",
    "figure_fragment",
    "logit_lens_table",
    "trajectory_heatmap",
    "trajectory_tokens",
]
__all__ += [  # latent-space geometry
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
__all__ += [  # token geometry
    "id_loss_correlation_figure",
    "layer_geometry_figure",
    "sweep_profile_figure",
]
__all__ += [  # tuned lens
    "lens_bench_figure",
    "lens_bench_page",
    "lens_bench_table_html",
    "lens_comparison_figure",
    "training_curve_figure",
    "trajectory_comparison",
    "transfer_heatmap",
]
__all__ += [  # causal directions
    "cbe_energy_figure",
    "fidelity_scatter",
    "injection_auroc_figure",
    "prediction_depth_figure",
    "prediction_depth_tokens",
    "stimulus_response_figure",
]
