"""The causal panel: causal basis energies of the report's lens.

Causal basis extraction is training-like (L-BFGS over thousands of corpus tokens), so this section
never extracts a basis. It loads the folder given by the report setting ``causal_basis``, else the
artifact store's basis for the lens (``artifacts.artifact_path("causal-basis", model,
variant=lens.name)``, where the demo puts its quick one), else the one ``tlmicroscope cbe`` saved
at its default location, ``default_cbe_dir(model, lens) / "basis"``
(``out/cbe-<model>-<lens>/basis``). A quick basis is said to be one in the caption. It shows

* the basis's energies (the expected KL of the lens when each direction is mean/zero/resample
  ablated, measured on the extraction corpus), and
* each direction's lens influence on the report's own text: the same KL, with the basis's mode
  and mean, on this text's hidden states at the basis's layer. These come from the report's shared
  capture (``needs=("resid",)``), so the section makes no forward pass of its own.

Without a lens, a saved basis, or with a basis made for another model or another lens, the section
is shown as missing with the command that extracts the right one.

Examples:
    >>> from tlmicroscope.models import tiny_model
    >>> from tlmicroscope.app import report
    >>> rep = report(tiny_model(n_layers=2), "hello there", sections=["causal_basis"])
    >>> rep.missing["causal_basis"][:44]
    'The causal basis energies are shown for the '
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

import torch

from tlmicroscope.app.prerequisites import model_cli_args, quick_note
from tlmicroscope.app.sections import MissingPrerequisite, ReportContext, Section, register_section
from tlmicroscope.causal.basis import CausalBasis, default_cbe_dir, lens_digest
from tlmicroscope.causal.lens_influence import lens_influence

__all__ = ["default_basis_path", "text_lens_influence"]


def default_basis_path(model: Any, lens: Any, root: str | Path = "out") -> Path:
    """The folder the section loads a ``CausalBasis`` from: ``out/cbe-<model>-<lens>/basis``."""
    return default_cbe_dir(model, lens, root=root) / "basis"


def _extract_command(model: Any, lens_name: str, out_dir: Path) -> str:
    """The ``tlmicroscope cbe`` command that writes the basis this section looks for (a trained
    lens is assumed to be where ``train-lens`` writes by default: the artifact store's
    ``tuned-lens`` folder for the model, ``default_lens_dir(model)``)."""
    from tlmicroscope.lenses.train import default_lens_dir

    lens_arg = lens_name if lens_name in ("logit", "logit-paper") else str(default_lens_dir(model))
    model_args = model_cli_args(model)
    parts = ["tlmicroscope", "cbe", *model_args[:2], "--lens", lens_arg, "--k", "10"]
    parts += ["--out-dir", str(out_dir), *model_args[2:]]
    return " ".join(shlex.quote(p) for p in parts)


def _load_basis(ctx: ReportContext, lens: Any) -> tuple[CausalBasis, Path]:
    from tlmicroscope import artifacts
    from tlmicroscope.io import FittedFileError

    given = ctx.settings.get("causal_basis")
    store = artifacts.artifact_path("causal-basis", ctx.model, variant=lens.name)
    path = Path(given) if given else default_basis_path(ctx.model, lens)
    if not given and (store / "config.json").is_file():
        path = store  # the artifact store's basis for this lens (e.g. the demo's quick one)
    out_dir = path.parent if path.name == "basis" else path
    fix = _extract_command(ctx.model, lens.name, out_dir)
    if not (path / "config.json").is_file():
        where = path if given else f"{store} (the artifact store) or {path}"
        raise MissingPrerequisite(
            f"No causal basis is saved at {where} for the {lens.name} lens. Extracting one runs "
            "L-BFGS over a corpus (a few minutes), which a report never does.",
            fix=fix,
        )
    try:
        basis = CausalBasis.load(path, ctx.model)
    except (ValueError, FittedFileError) as exc:  # saved for another model, or corrupt
        raise MissingPrerequisite(
            f"The causal basis at {path} cannot be used here: {exc}", fix=fix
        ) from None
    if basis.lens != lens.name:
        raise MissingPrerequisite(
            f"The causal basis at {path} was extracted through the {basis.lens} lens, but this "
            "report's "
            f"lens is {lens.name}.",
            fix=fix,
        )
    saved_digest = basis.provenance.settings.get("lens_digest") if basis.provenance else None
    if saved_digest is not None and saved_digest != lens_digest(lens):
        raise MissingPrerequisite(
            f"The causal basis at {path} was extracted through another {lens.name} lens (its "
            f"fingerprint {saved_digest} differs from this lens's {lens_digest(lens)}); "
            "re-extract it.",
            fix=fix,
        )
    return basis, path


def text_lens_influence(
    basis: CausalBasis, lens: Any, model: Any, hidden: torch.Tensor, *, seed: int = 0
) -> torch.Tensor:
    """``[k]`` KL (nats) of the lens on ``hidden`` with each direction ablated; see
    ``tlmicroscope.causal.lens_influence.lens_influence`` (kept here under its old name)."""
    return lens_influence(basis, lens, model, hidden, seed=seed)


@register_section(
    "causal_basis", "Causal basis energies", needs=("resid",), settings=("causal_basis", "seed")
)
def _causal_basis(ctx: ReportContext) -> Section:
    from scipy.stats import spearmanr

    from tlmicroscope.lenses.base import resolve_lens
    from tlmicroscope.lenses.train import default_lens_dir
    from tlmicroscope.viz.causal import cbe_energy_figure, cbe_text_influence_figure

    if ctx.lens is None:
        lens_dir = default_lens_dir(ctx.model)
        # all the model options: with --process-weights, train-lens writes to lens_dir too
        model_args = " ".join(map(shlex.quote, model_cli_args(ctx.model)))
        raise MissingPrerequisite(
            "The causal basis energies are shown for the report's lens, and this report has none. "
            "Train a tuned lens, extract its causal basis, and pass the lens to the report.",
            fix=(
                f"tlmicroscope train-lens {model_args} && "
                f"{_extract_command(ctx.model, 'tuned', default_cbe_dir(ctx.model, 'tuned'))} && "
                f"tlmicroscope report --lens {shlex.quote(str(lens_dir))} --text-file TEXT.txt"
            ),
        )
    lens = resolve_lens(ctx.lens)
    basis, path = _load_basis(ctx, lens)

    items: list[Any] = [cbe_energy_figure(basis)]
    n_conv = int(basis.converged.sum())
    caption = (
        (basis.provenance.describe() if basis.provenance else f"lens {basis.lens}")
        + f" | Loaded from {path}: {basis.k} directions at blocks.{basis.layer}.hook_resid_pre, "
        f"{basis.mode} ablation, extracted on {basis.n_tokens} tokens; {n_conv}/{basis.k} "
        "converged (orange bars did not, their energies are lower bounds). "
        + quick_note(basis, "causal-basis", ctx.model)
    )
    hook = basis.hook_name
    resample_too_short = basis.mode == "resample" and int(ctx.tokens.numel()) < 2
    if ctx.cache is not None and hook in ctx.cache and not resample_too_short:
        seed = int(ctx.settings.get("seed", 0))
        influence = ctx.memo(
            f"causal_basis:influence:{path}",
            lambda: text_lens_influence(basis, lens, ctx.model, ctx.cache[hook], seed=seed),
        )
        items.append(cbe_text_influence_figure(basis, influence))
        caption += (
            f" The second chart ablates each direction on this text's {int(ctx.tokens.shape[-1])} "
            "tokens (same layer, mode and mean), from the report's shared capture."
        )
        if basis.k >= 3 and float(influence.std()) > 0:
            rho = float(spearmanr(basis.energies.numpy(), influence.numpy()).statistic)
            caption += (
                f" Spearman ρ between the corpus energies and this text's influences: {rho:.2f}."
            )
    return Section(items, caption)
