"""The lens protocol and the logit lens.

A lens maps the residual stream h^l entering block l to a vector the shared readout turns into
next-token logits: ``logits_l = readout(lens.transform(h, l))``. The logit lens is the identity
transform; a tuned lens adds a learned affine translator per layer; causal basis extraction reads
through either. The model's own output (index ``n_layers``, the last block's ``resid_post``) is
never lensed.

A lens may also read the residual between a block's attention and its MLP (``resid_mid``): it says
so with an optional ``readable_sites`` attribute and a ``transform_site(h, layer, site)`` method.
A lens without them reads only ``resid_pre`` (``lens_sites``), so existing lenses keep working and
a request it cannot serve gets an error naming the fix (``check_lens_sites``).
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
from jaxtyping import Float

from tlmicroscope.lenses.readout import Readout

__all__ = [
    "RESIDUAL_SITES",
    "Lens",
    "LogitLens",
    "check_lens_sites",
    "lens_features",
    "lens_logits",
    "lens_sites",
    "lens_transform",
    "resolve_lens",
]

#: The residual sites a lens can be asked to read: the block input and the mid-block residual.
RESIDUAL_SITES = ("resid_pre", "resid_mid")


@runtime_checkable
class Lens(Protocol):
    """What every lens provides.

    Attributes:
        name: A short label recorded in results ("logit", "tuned", ...).
        final_norm: Whether the readout applies the final norm to this lens's output.

    Optional: ``readable_sites`` (default ``("resid_pre",)``) and ``transform_site(h, layer,
    site)`` for lenses that also read ``resid_mid``; see ``lens_sites``.
    """

    name: str
    final_norm: bool

    def transform(
        self, h: Float[torch.Tensor, "... d_model"], layer: int
    ) -> Float[torch.Tensor, "... d_model"]:
        """Map the residual entering block ``layer`` into the space the readout expects."""
        ...

    def check_model(self, model: Any) -> None:
        """Raise a ``ValueError`` naming the difference if the lens was made for another model."""
        ...


class LogitLens:
    """The logit lens: read each layer's residual with the model's own final norm and unembedding.

    Args:
        final_norm: ``False`` reproduces LLM-Microscope's logit lens, which skips the final norm on
            intermediate layers (use ``LogitLens.paper()``); the default applies it, recomputing
            its statistics from each layer's residual.

    Examples:
        >>> lens = LogitLens()
        >>> h = torch.randn(3, 8)
        >>> torch.equal(lens.transform(h, 0), h)
        True
        >>> LogitLens.paper().name
        'logit (paper: no final norm)'
    """

    readable_sites = RESIDUAL_SITES

    def __init__(self, *, final_norm: bool = True):
        self.final_norm = bool(final_norm)
        self.name = "logit" if self.final_norm else "logit (paper: no final norm)"

    @classmethod
    def paper(cls) -> LogitLens:
        """LLM-Microscope's variant: no final norm on intermediate layers."""
        return cls(final_norm=False)

    def transform(self, h: torch.Tensor, layer: int) -> torch.Tensor:
        return h

    def transform_site(self, h: torch.Tensor, layer: int, site: str) -> torch.Tensor:
        return h

    def check_model(self, model: Any) -> None:
        return None

    def __repr__(self) -> str:
        return f"LogitLens(final_norm={self.final_norm})"


def lens_sites(lens: Any) -> tuple[str, ...]:
    """The residual sites ``lens`` can read: its ``readable_sites``, or ``("resid_pre",)``.

    Examples:
        >>> lens_sites(LogitLens())
        ('resid_pre', 'resid_mid')
        >>> from tlmicroscope.lenses.tuned import TunedLens
        >>> lens_sites(TunedLens(n_layers=2, d_model=8))
        ('resid_pre',)
    """
    return tuple(getattr(lens, "readable_sites", ("resid_pre",)))


def check_lens_sites(lens: Any, sites: Any) -> None:
    """Raise a ``ValueError`` naming the fix if ``lens`` cannot read one of ``sites``."""
    has_method = callable(getattr(lens, "transform_site", None))
    missing = [
        s for s in sites if s not in lens_sites(lens) or (s != "resid_pre" and not has_method)
    ]
    if not missing:
        return
    name = getattr(lens, "name", type(lens).__name__)
    raise ValueError(
        f"The {name!r} lens ({type(lens).__name__}) has no readout for {', '.join(missing)}: it "
        "reads only "
        f"{lens_sites(lens)} (a tuned lens has one translator per block input, trained on "
        "hook_resid_pre). "
        "Read the mid-block residual through the logit lens (lens='logit'), leave resid_mid out "
        "(sites='pre'), or give the lens a readable_sites attribute that lists 'resid_mid' and a "
        "transform_site(h, layer, site) method (a translator trained on blocks.{l}.hook_resid_mid)."
    )


def lens_transform(
    lens: Any, h: Float[torch.Tensor, "... d_model"], layer: int, site: str = "resid_pre"
) -> Float[torch.Tensor, "... d_model"]:
    """``lens.transform(h, layer)`` for ``resid_pre``; ``lens.transform_site(h, layer, site)``
    otherwise.

    Examples:
        >>> h = torch.randn(2, 8)
        >>> torch.equal(lens_transform(LogitLens(), h, 0, "resid_mid"), h)
        True
    """
    if site == "resid_pre":
        return lens.transform(h, layer)
    check_lens_sites(lens, [site])
    return lens.transform_site(h, layer, site)


def resolve_lens(lens: Any) -> Lens:
    """``None`` or ``"logit"`` mean the logit lens; anything else must follow the protocol."""
    if lens is None or lens == "logit":
        return LogitLens()
    if lens == "logit-paper":
        return LogitLens.paper()
    if not isinstance(lens, Lens):
        raise TypeError(
            f"{type(lens).__name__} is not a lens: it needs name, final_norm, transform(h, layer) "
            "and check_model(model)."
        )
    return lens


def lens_features(
    lens: Lens,
    readout: Readout,
    h: Float[torch.Tensor, "... d_model"],
    layer: int,
    *,
    site: str = "resid_pre",
) -> tuple[Float[torch.Tensor, "... d_model"], torch.Tensor, torch.Tensor | None]:
    """The first half of ``lens_logits``: ``(x, W, b)`` with ``readout.finish(x @ W + b)`` its
    logits.

    ``x`` is the lens's transform of ``h`` (``lens_transform``), normalised by the final norm's
    statistics when the lens reads through the final norm, float32 at least; ``(W, b)`` the
    readout's matching unembedding (``Readout.weights``). Kernels that reduce blocks of logits
    without building them (trajectories) start here; everything else calls ``lens_logits``.

    Examples:
        >>> from tlmicroscope.models import tiny_model
        >>> model = tiny_model(n_layers=2)
        >>> readout, h = Readout.for_model(model), torch.randn(3, model.cfg.d_model)
        >>> x, W, b = lens_features(LogitLens(), readout, h, 1)
        >>> z = readout.finish(x @ W if b is None else x @ W + b)
        >>> torch.allclose(z, lens_logits(LogitLens(), readout, h, 1), atol=1e-5)
        True
    """
    if h.shape[-1] != readout.d_model:
        raise ValueError(
            f"Expected residual vectors of width d_model={readout.d_model}, got {h.shape[-1]} "
            f"(shape {tuple(h.shape)}): pass [..., d_model] rows of h^{layer}."
        )
    x = lens_transform(lens, h, layer, site)
    final_norm = bool(getattr(lens, "final_norm", True))
    x = readout.normalize(x) if final_norm else (x if x.dtype == torch.float64 else x.float())
    W, b = readout.weights(final_norm)
    return x, W, b


def lens_logits(
    lens: Lens,
    readout: Readout,
    h: Float[torch.Tensor, "... d_model"],
    layer: int,
    n_layers: int | None = None,
    *,
    site: str = "resid_pre",
    log_probs: bool = False,
) -> Float[torch.Tensor, "... d_vocab"]:
    """The one way from (lens, layer, residual) to logits: what ``lens`` reads from h at ``layer``.

    Every lens readout in tlmicroscope goes through here (trajectories through its first half,
    ``lens_features``): the lens's transform for ``site``, the final norm's statistics recomputed
    from the result when the lens reads through the final norm, the unembedding with the norm's
    gain folded in, then the model's output transform (soft cap, logit scale). Index
    ``n_layers`` (the last block's ``resid_post``, h^L) is the model's own output and is never
    lensed. Differentiable in ``h``; float32 (float64 input stays float64).

    Args:
        lens: A ``Lens`` (``resolve_lens`` turns ``None``/``"logit"`` into one).
        readout: The model's ``Readout.for_model(model)``.
        h: Residual vectors ``[... d_model]`` at residual index ``layer`` (h^layer).
        layer: The residual index, 0..n_layers.
        n_layers: The model's number of blocks; with ``layer == n_layers`` the plain readout.
        site: ``"resid_pre"`` (h^layer) or ``"resid_mid"`` (block ``layer``'s mid residual).
        log_probs: Return log-probabilities (``log_softmax`` of the logits) instead.

    Examples:
        >>> from tlmicroscope.models import tiny_model
        >>> model = tiny_model(n_layers=2)
        >>> logits, cache = model.run_with_cache(model.to_tokens("hi"))
        >>> readout = Readout.for_model(model)
        >>> out = lens_logits(LogitLens(), readout, cache["blocks.1.hook_resid_post"], 2, 2)
        >>> torch.allclose(out, logits, atol=1e-4)
        True
        >>> lp = lens_logits(LogitLens(), readout, cache["blocks.1.hook_resid_pre"], 1,
        ...                  log_probs=True)
        >>> torch.allclose(lp.exp().sum(-1), torch.ones(lp.shape[:-1]))
        True
    """
    if n_layers is not None and layer == n_layers:
        z = readout(h)
    else:
        x, W, b = lens_features(lens, readout, h, layer, site=site)
        z = x.to(W.dtype) @ W
        if z.dtype not in (torch.float32, torch.float64):
            z = z.float()
        if b is not None:
            z = z + b.to(z.dtype)
        z = readout.finish(z)
    return torch.log_softmax(z, -1) if log_probs else z


# Saved-lens loaders by the ``kind`` in their config.json; lens classes register themselves.
_LENS_LOADERS: dict[str, str] = {
    "tuned_lens": "tlmicroscope.lenses.tuned:TunedLens",
    "jacobian_lens": "tlmicroscope.lenses.jacobian:JacobianLens",
}


def load_lens(path: Any, model: Any) -> Lens:
    """Load a saved lens folder for ``model``, whatever its kind (refused for another model).

    The folder's ``config.json`` names its kind; the class registered for that kind loads it
    with ``Class.load(path, model)``.
    """
    import importlib
    import json
    from pathlib import Path

    def registered(kind: str) -> Any:  # the class by name: base imports no lens module
        module, cls_name = _LENS_LOADERS[kind].split(":")
        return getattr(importlib.import_module(module), cls_name)

    path = Path(path)
    if path.is_file() and path.suffix == ".pt":  # a bare Jacobian-lens artifact (reference format)
        return registered("jacobian_lens").load(path, model)
    from tlmicroscope.io import FittedFileError, recover_dir

    recover_dir(path)  # a save killed half-way: restore the previous copy first
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"No saved lens at {path} (expected {cfg_path}).")
    try:
        meta = json.loads(cfg_path.read_text())
    except ValueError as exc:
        raise ValueError(
            f"{cfg_path} is not valid JSON; the lens file is corrupt ({exc})."
        ) from exc
    if not isinstance(meta, dict):
        raise FittedFileError(
            f"{cfg_path} holds a JSON {type(meta).__name__}, not an object; the lens "
            "file is corrupt."
        )
    kind = meta.get("kind") or (
        "tuned_lens" if "lens_type" in meta or (path / "params.pt").is_file() else None
    )
    if kind not in _LENS_LOADERS:
        raise ValueError(f"{path} holds a {kind!r}, which is not a lens tlmicroscope can load.")
    return registered(kind).load(path, model)
