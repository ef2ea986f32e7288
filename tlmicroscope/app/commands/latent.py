"""Subcommand ``latent``: the latent-geometry figures of a corpus on one offline HTML page."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from tlmicroscope.app.cli import DEFAULT_TEXT, add_model_args, load_from_args, log


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "latent",
        help="latent-space geometry of corpus windows (PCA/UMAP, attention vs MLP, norms, "
        "positions) as HTML",
    )
    p.add_argument(
        "--corpus",
        default="embedded",
        help="'embedded' (pydoc topics), a .txt/.jsonl file or a folder",
    )
    p.add_argument("--n-windows", type=int, default=8, help="corpus windows to capture")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per window")
    p.add_argument("--seed", type=int, default=0, help="window draw and UMAP seed")
    p.add_argument("--text", default=DEFAULT_TEXT, help="a text whose token trajectories are drawn")
    p.add_argument(
        "--layers",
        default=None,
        help="intermediate blocks for the attention-vs-MLP and position figures, e.g. 5:24 "
        "(default: about n/6 to 0.8 n)",
    )
    p.add_argument("--umap", action="store_true", help="add the UMAP figure (needs umap-learn)")
    p.add_argument(
        "--vocab-norms",
        action="store_true",
        help="add the histogram of every vocabulary token's norm when fed alone (slow)",
    )
    p.add_argument("--max-points", type=int, default=20_000, help="points drawn per scatter")
    p.add_argument(
        "--float16", action="store_true", help="store captured states in float16 (half memory)"
    )
    p.add_argument("--out", default="latent.html", help="HTML file to write")
    add_model_args(p)
    p.set_defaults(func=_latent)


def _parse_layers(spec: str | None, n_layers: int) -> list[int]:
    from tlmicroscope.geometry.components import intermediate_layers

    if not spec:
        return intermediate_layers(n_layers)
    try:
        if ":" in spec:
            a, b = spec.split(":")
            chosen = list(range(int(a or 0), int(b) if b else n_layers))
        else:
            chosen = [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--layers must look like 5:24 or 3,4,5, got {spec!r}.") from None
    bad = [x for x in chosen if not 0 <= x < n_layers]
    if bad or not chosen:
        raise ValueError(f"--layers {spec!r} must name blocks in 0..{n_layers - 1}.")
    return chosen


def _latent(args: argparse.Namespace) -> int:
    from tlmicroscope.viz import HtmlPage
    from tlmicroscope.viz.html import escape

    if args.n_windows < 1 or args.seq_len < 4:
        raise ValueError("--n-windows must be at least 1 and --seq-len at least 4.")
    model = load_from_args(args)
    n_layers = model.cfg.n_layers
    mid = _parse_layers(args.layers, n_layers)
    windows, states = _capture_windows(model, args)
    page = HtmlPage(
        title=f"Latent-space geometry: {states.provenance.model}",
        intro=(
            f"{windows.shape[0]} windows of {windows.shape[1]} tokens from {escape(args.corpus)}; "
            f"intermediate blocks {mid[0]}-{mid[-1]} of {n_layers}. After Ning and Rangaraju, "
            "'Visualizing LLM Latent Space Geometry Through Dimensionality Reduction'."
        ),
    )
    pair = _attn_mlp_sections(page, states, mid, args)
    sep = _separation_section(page, states, args.seed)
    if args.umap:
        _umap_section(page, pair, args)
    _residual_section(page, states, args.max_points)
    prof = _norm_section(page, states)
    _position_section(page, model, states, mid)
    _trajectory_section(page, model, args.text)
    if args.vocab_norms:
        _vocabulary_section(page, model, mid)
    out = page.save(args.out)
    ratio = prof.first_token_ratio
    peak = int(ratio.argmax())
    log(
        f"separation peaks at block {sep.most_separated()} (accuracy "
        f"{float(sep.accuracy.max()):.3f}); first-token ratio peaks at {float(ratio[peak]):.1f}x "
        f"in block {prof.layers[peak]}"
    )
    print(Path(out).resolve())
    return 0


def _capture_windows(model: Any, args: argparse.Namespace) -> tuple[Any, Any]:
    """The corpus windows and every sub-block state of them, in one capture."""
    import torch

    from tlmicroscope.corpus import token_windows
    from tlmicroscope.geometry import capture_components

    windows = token_windows(
        model,
        args.corpus,
        seq_len=min(args.seq_len, model.cfg.n_ctx),
        n_windows=args.n_windows,
        shuffle=True,
        seed=args.seed,
    )
    t0 = time.perf_counter()
    states = capture_components(
        model,
        windows,
        components=("embed", "attn_out", "resid_mid", "mlp_out", "resid_post", "ln_final"),
        dtype=torch.float16 if args.float16 else torch.float32,
    )
    log(
        f"captured {states.n_states} states × {windows.shape[0]} windows × {windows.shape[1]} "
        f"tokens in {time.perf_counter() - t0:.1f} s"
    )
    return windows, states


def _attn_mlp_sections(page: Any, states: Any, mid: list[int], args: argparse.Namespace) -> Any:
    """Attention vs MLP outputs of the intermediate blocks, position 0 left out (the reference's
    figure); returns the states drawn."""
    from tlmicroscope.geometry import project
    from tlmicroscope.geometry.components import ATTN_VS_MLP
    from tlmicroscope.viz.latent import projection_scatter

    mp = args.max_points
    pair = states.select(components=ATTN_VS_MLP, layers=mid).drop_first()
    raw = project(pair, n_components=3)
    unit = project(pair.normalized(unit=True), n_components=3)
    page.add_section(
        "Attention vs MLP outputs (PCA)",
        projection_scatter(raw, "component", max_points=mp, title="Raw vectors"),
        projection_scatter(unit, "component", max_points=mp, title="Unit vectors"),
        projection_scatter(
            raw.transform(pair.mean("samples")),
            "component",
            max_points=mp,
            title="Sample means, projected with the PCA fitted on every vector",
        ),
        caption="Attention outputs blue, MLP outputs red, darker = earlier block. "
        + states.provenance.describe(),
    )
    return pair


def _separation_section(page: Any, states: Any, seed: int) -> Any:
    from tlmicroscope.geometry import component_separation
    from tlmicroscope.geometry.components import ATTN_VS_MLP
    from tlmicroscope.viz.latent import separation_plot

    both = states.select(components=ATTN_VS_MLP)
    sep = component_separation(both, max_points=500, seed=seed)
    sep2 = component_separation(both, max_points=500, n_pca=2, seed=seed)
    table = sep.to_dataframe().round(3)
    table.insert(2, "accuracy_top2_pcs", sep2.accuracy.numpy().round(3))
    page.add_section(
        "Attention vs MLP: separation by block",
        separation_plot(sep, also=sep2),
        _table(table),
        caption="Cross-validated accuracy of a logistic-regression probe (0.5 = chance), in the "
        "full space and in each block's top two principal components, and the cosine "
        "silhouette of the two groups. " + sep.provenance.describe(),
    )
    return sep


def _umap_section(page: Any, pair: Any, args: argparse.Namespace) -> None:
    from tlmicroscope.app.prerequisites import require_umap
    from tlmicroscope.geometry import project
    from tlmicroscope.geometry.projection import UMAP_INSTALL
    from tlmicroscope.viz.latent import projection_scatter

    title = "Attention vs MLP outputs (UMAP, cosine)"
    try:
        require_umap()
    except ImportError as exc:
        page.add_notice(title, str(exc).splitlines()[0], UMAP_INSTALL)
        return
    um = project(pair, "umap", seed=args.seed, fit_size=min(20_000, pair.n_points))
    page.add_section(
        title,
        projection_scatter(um, "component", max_points=args.max_points),
        caption=pair.provenance.describe(),
    )


def _residual_section(page: Any, states: Any, max_points: int) -> None:
    """Layerwise residual stream: unit vectors, PCA fitted on all, as sample and sequence means."""
    from tlmicroscope.geometry import project
    from tlmicroscope.geometry.components import POST_ADD
    from tlmicroscope.viz.latent import projection_scatter

    post = states.select(components=POST_ADD).normalized(unit=True)
    layer_proj = project(post, n_components=2)
    page.add_section(
        "Residual stream by layer (unit vectors)",
        projection_scatter(
            layer_proj.transform(post.mean("samples")),
            "layer",
            max_points=max_points,
            title="Mean over samples: one point per layer and position",
        ),
        projection_scatter(
            layer_proj.transform(post.mean("positions")),
            "layer",
            max_points=max_points,
            title="Mean over positions: one point per layer and window",
        ),
        caption="Embedding, post-attention and post-MLP residuals and the final norm. "
        + states.provenance.describe(),
    )


def _norm_section(page: Any, states: Any) -> Any:
    from tlmicroscope.geometry import norm_profile
    from tlmicroscope.viz.latent import first_token_plot, norm_profile_plot

    prof = norm_profile(states, components="resid_post")
    ratio = prof.first_token_ratio
    peak = int(ratio.argmax())
    page.add_section(
        "Norms by position and layer",
        norm_profile_plot(prof),
        first_token_plot(prof),
        _table(prof.to_dataframe().round(2)),
        caption="Residual after each block. Position 0 / median of the others peaks at "
        f"{float(ratio[peak]):.1f}× in block {prof.layers[peak]}. " + states.provenance.describe(),
    )
    return prof


def _position_section(page: Any, model: Any, states: Any, mid: list[int]) -> None:
    from tlmicroscope.geometry import positional_geometry
    from tlmicroscope.viz.latent import pca_pair_grid, positional_cosine_heatmap

    geo = positional_geometry(
        model
        if _has_learned_positions(model)
        else states.select(components=("resid_mid", "resid_post"), layers=mid).mean("samples")
    )
    page.add_section(
        "Positions",
        pca_pair_grid(geo.projection, "position"),
        positional_cosine_heatmap(geo),
        caption=geo.summary(),
    )


def _trajectory_section(page: Any, model: Any, text: str) -> None:
    from tlmicroscope.geometry import token_trajectories
    from tlmicroscope.viz.html import escape
    from tlmicroscope.viz.latent import trajectory_plot

    traj = token_trajectories(model, text, positions=None)
    page.add_section(
        "Token trajectories",
        trajectory_plot(traj),
        caption=f"{escape(text)!s}: residual h^0..h^L of each token, unit length, one PCA.",
    )


def _vocabulary_section(page: Any, model: Any, mid: list[int]) -> None:
    from tlmicroscope.geometry import vocabulary_norms
    from tlmicroscope.viz.latent import vocabulary_norm_histogram

    vn = vocabulary_norms(model, layers=mid)
    page.add_section(
        "Every token fed alone",
        vocabulary_norm_histogram(vn),
        _table(vn.top(15)),
        caption=vn.provenance.describe(),
    )


def _has_learned_positions(model) -> bool:
    from tlmicroscope.models import access

    return access.positional_embedding_weights(model) is not None


def _table(df) -> str:
    """A DataFrame as an HTML table (pandas escapes the cells)."""
    return df.to_html(index=False, border=0)
