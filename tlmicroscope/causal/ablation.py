"""Subspace ablation as TransformerLens hooks.

With an orthonormal basis ``B`` (``[d k]``) and ``P = B Bᵀ``, an activation row ``u`` becomes

* zero:     ``u - P u`` (its component in the subspace is removed);
* mean:     ``u + P (μ - u)`` (its component is set to that of the mean ``μ``);
* resample: ``u + P (u' - u)`` (its component is taken from another row ``u'``).

``P`` is never formed: ``P x = B (Bᵀ x)`` costs ``O(d k)`` per row. The hooks are plain
``(hook_name, hook_fn)`` pairs, so they work with ``run_with_hooks``, ``model.hooks(...)`` and
``transformer_lens.patching`` (add them with ``model.hooks`` around a patching call).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, Literal

import torch
from jaxtyping import Float

__all__ = [
    "ABLATION_MODES",
    "AblationMode",
    "ablate_rows",
    "ablate_subspace",
    "as_orthonormal_basis",
    "derangement",
    "subspace_ablation_hooks",
]

AblationMode = Literal["mean", "zero", "resample"]
ABLATION_MODES = ("mean", "zero", "resample")

# Hook sites whose last dimension is the residual width d_model.
_RESIDUAL_SUFFIXES = (
    "hook_resid_pre",
    "hook_resid_mid",
    "hook_resid_post",
    "hook_attn_out",
    "hook_mlp_out",
    "hook_embed",
    "hook_pos_embed",
)


def _check_mode(mode: str) -> None:
    if mode not in ABLATION_MODES:
        raise ValueError(f"mode must be one of {ABLATION_MODES}, got {mode!r}.")


def as_orthonormal_basis(
    basis: Any, d_model: int | None = None, *, orthonormalize: bool = True, atol: float = 1e-4
) -> Float[torch.Tensor, "d_model k"]:
    """Validate a basis and return orthonormal columns spanning the same subspace.

    Args:
        basis: A ``CausalBasis``, a ``[d_model]`` vector or a ``[d_model k]`` matrix of columns.
        d_model: The width the basis must have (the model's ``cfg.d_model``).
        orthonormalize: Replace non-orthonormal (but independent) columns by an orthonormal basis
            of their span (QR). The ablation depends only on the span, so nothing changes;
            ``False`` refuses such a basis instead.
        atol: Tolerance of the orthonormality check ``|BᵀB - I| <= atol``.

    Raises:
        ValueError: wrong width, NaN or infinite entries, a zero column, linearly dependent
            columns, or (with ``orthonormalize=False``) columns that are not orthonormal.

    Examples:
        >>> B = as_orthonormal_basis(torch.tensor([[3.0, 1.0], [0.0, 1.0], [0.0, 0.0]]))
        >>> torch.allclose(B.T @ B, torch.eye(2), atol=1e-6)
        True
        >>> as_orthonormal_basis(torch.ones(4), d_model=8)
        Traceback (most recent call last):
        ...
        ValueError: The basis has width 4 but the model's d_model is 8: it was made for another
        model (or another site). Extract it again for this model.
    """
    vectors = getattr(basis, "vectors", basis)
    B = torch.as_tensor(vectors)
    if B.is_complex() or not B.is_floating_point():
        B = B.float()
    if B.ndim == 1:
        B = B[:, None]
    if B.ndim != 2:
        raise ValueError(
            f"A basis is a [d_model] vector or a [d_model k] matrix; got shape {tuple(B.shape)}."
        )
    d, k = B.shape
    if d_model is not None and d != int(d_model):
        raise ValueError(
            f"The basis has width {d} but the model's d_model is {d_model}: it was made for "
            "another model (or another site). Extract it again for this model."
        )
    if k == 0:
        raise ValueError("The basis has no vectors.")
    if k > d:
        raise ValueError(f"A basis of width {d} holds at most {d} independent vectors, got {k}.")
    if not torch.isfinite(B).all():
        raise ValueError("The basis holds NaN or infinite entries.")
    B64 = B.double()
    norms = B64.norm(dim=0)
    if (norms <= 1e-12 * max(1.0, float(norms.max()))).any():
        bad = torch.nonzero(norms <= 1e-12 * max(1.0, float(norms.max()))).flatten().tolist()
        raise ValueError(f"Basis column(s) {bad} are zero; a zero vector spans no direction.")
    gram = B64.T @ B64
    if torch.allclose(gram, torch.eye(k, dtype=torch.float64), atol=atol):
        return B
    if not orthonormalize:
        raise ValueError(
            "The basis columns are not orthonormal (max |BᵀB - I| = "
            f"{float((gram - torch.eye(k, dtype=torch.float64)).abs().max()):.3g}); pass "
            "orthonormalize=True or orthonormalise them (torch.linalg.qr)."
        )
    Q, R = torch.linalg.qr(B64 / norms)
    diag = R.diagonal().abs()
    rank = int((diag > 1e-6 * float(diag.max())).sum())
    if rank < k:
        raise ValueError(
            f"The {k} basis columns are linearly dependent (rank {rank}); pass independent "
            "directions."
        )
    return Q.to(B.dtype)


def derangement(n: int, *, seed: int = 0, device: Any = None) -> torch.Tensor:
    """A seeded permutation of ``range(n)`` with no fixed point (each row gets another's value).

    Examples:
        >>> perm = derangement(5, seed=1)
        >>> sorted(perm.tolist()), bool((perm != torch.arange(5)).all())
        ([0, 1, 2, 3, 4], True)
    """
    if n < 2:
        raise ValueError(f"Resample ablation needs at least 2 rows to swap between, got {n}.")
    g = torch.Generator().manual_seed(int(seed))
    idx = torch.arange(n)
    while True:  # rejection sampling: about e tries on average
        perm = torch.randperm(n, generator=g)
        if not (perm == idx).any():
            return perm.to(device) if device is not None else perm


def ablate_rows(
    u: Float[torch.Tensor, "... d"],
    basis: Float[torch.Tensor, "d k"],
    mode: AblationMode = "mean",
    *,
    mean: Float[torch.Tensor, " d"] | None = None,
    donors: Float[torch.Tensor, "... d"] | None = None,
) -> Float[torch.Tensor, "... d"]:
    """Ablate the span of an orthonormal ``basis`` in each row of ``u`` (the formulas above).

    Args:
        u: Rows to ablate; the last dimension is the basis width.
        basis: Orthonormal columns (see ``as_orthonormal_basis``).
        mode: ``"zero"``, ``"mean"`` or ``"resample"``.
        mean: μ for mean ablation (default: the mean of ``u``'s rows).
        donors: The rows u' for resample ablation, shaped like ``u`` (default: ``u``'s rows under
            a seeded derangement).

    Examples:
        >>> v = torch.tensor([[1.0], [0.0]])
        >>> ablate_rows(torch.tensor([[2.0, 5.0], [4.0, 1.0]]), v, "mean")
        tensor([[3., 5.],
                [3., 1.]])
    """
    _check_mode(mode)
    B = basis.to(device=u.device, dtype=u.dtype)
    if mode == "zero":
        target_minus_u = -u
    elif mode == "mean":
        if mean is None:
            flat = u.reshape(-1, u.shape[-1])
            if flat.shape[0] < 2:
                raise ValueError("Mean ablation needs at least 2 rows to average, or pass mean=.")
            mean = flat.mean(0)
        target_minus_u = mean.to(device=u.device, dtype=u.dtype) - u
    else:
        if donors is None:
            flat = u.reshape(-1, u.shape[-1])
            donors = flat[derangement(flat.shape[0], device=u.device)].reshape(u.shape)
        target_minus_u = donors.to(device=u.device, dtype=u.dtype) - u
    return u + (target_minus_u @ B) @ B.T


def _position_index(positions: Any, n_pos: int, device: Any) -> torch.Tensor | None:
    if positions is None:
        return None
    if isinstance(positions, slice):
        idx = torch.arange(n_pos)[positions]
    else:
        idx = torch.as_tensor(positions, dtype=torch.long).reshape(-1)
        if idx.numel() and (idx.max() >= n_pos or idx.min() < -n_pos):
            raise ValueError(
                f"positions {idx.tolist()} lie outside the {n_pos} positions of the input."
            )
        idx = idx % n_pos
    return idx.to(device)


def subspace_ablation_hooks(
    hook_name: str,
    basis: Any,
    mode: AblationMode = "mean",
    mean: Float[torch.Tensor, " d_model"] | None = None,
    positions: Any = None,
    *,
    seed: int = 0,
    d_model: int | None = None,
) -> list[tuple[str, Callable]]:
    """Hooks that ablate a subspace at one hook point: ``[(hook_name, hook_fn)]``.

    Args:
        hook_name: A standard TransformerLens hook name, e.g. ``"blocks.3.hook_resid_pre"``.
        basis: A ``CausalBasis``, a ``[d]`` vector or ``[d k]`` columns (orthonormalised if needed).
        mode: ``"mean"`` (default), ``"zero"`` or ``"resample"``.
        mean: μ for mean ablation, ``[d]``. Defaults to the basis's own mean for a
            ``CausalBasis``, else to the mean over every batch row and position of the activation
            being ablated (so it depends on the batch).
        positions: Ablate only these positions (an int, a list, a tensor or a slice); default all.
        seed: Seed of the donor derangement in resample mode; donors are other rows (batch ×
            position) of the same activation.
        d_model: Check the basis width up front (``ablate_subspace`` passes the model's).

    Examples:
        >>> from tlmicroscope.models import tiny_model
        >>> model = tiny_model(n_layers=2)
        >>> toks = model.to_tokens("hello there")
        >>> v = torch.zeros(model.cfg.d_model); v[0] = 1.0
        >>> hooks = subspace_ablation_hooks("blocks.1.hook_resid_pre", v, mode="zero")
        >>> seen = []
        >>> def spy_fn(act, hook):
        ...     seen.append(act[..., 0].abs().max().item())
        >>> spy = ("blocks.1.hook_resid_pre", spy_fn)
        >>> _ = model.run_with_hooks(toks, fwd_hooks=hooks + [spy])
        >>> seen[0]
        0.0
    """
    _check_mode(mode)
    if not isinstance(hook_name, str) or not hook_name:
        raise ValueError(f"hook_name must be a hook point name, got {hook_name!r}.")
    if mean is None and mode == "mean" and not isinstance(basis, torch.Tensor):
        mean = getattr(basis, "mean", None)  # a CausalBasis carries the mean of its hidden states
    B = as_orthonormal_basis(basis, d_model)
    d = B.shape[0]
    if mean is not None:
        mean = torch.as_tensor(mean)
        if mean.shape != (d,):
            raise ValueError(
                f"mean must have shape ({d},) like the basis rows, got {tuple(mean.shape)}."
            )
        if not torch.isfinite(mean).all():
            raise ValueError("mean holds NaN or infinite entries.")
    on_device: dict[tuple[Any, Any], tuple[torch.Tensor, torch.Tensor | None]] = {}

    def hook_fn(act: torch.Tensor, hook: Any = None) -> torch.Tensor:
        if act.shape[-1] != d:
            raise ValueError(
                f"The activation at {hook_name} has width {act.shape[-1]} but the basis has width "
                f"{d}: the basis was made for another model or another site."
            )
        key = (act.device, act.dtype)
        if key not in on_device:
            on_device[key] = (
                B.to(device=act.device, dtype=act.dtype),
                None if mean is None else mean.to(device=act.device, dtype=act.dtype),
            )
        Bd, mu = on_device[key]
        flat_all = act.reshape(-1, d)
        if mode == "mean" and mu is None:
            if flat_all.shape[0] < 2:
                raise ValueError(
                    f"Mean ablation at {hook_name} without a given mean averages the activation's "
                    "rows, but it has only one; pass mean= (e.g. a CausalBasis's mean)."
                )
            mu = flat_all.mean(0)
        if act.ndim < 3:  # no position axis: ablate every row
            donors = (
                flat_all[derangement(flat_all.shape[0], seed=seed, device=act.device)].reshape(
                    act.shape
                )
                if mode == "resample"
                else None
            )
            return ablate_rows(act, Bd, mode, mean=mu, donors=donors)
        idx = _position_index(positions, act.shape[1], act.device)
        donors = None
        if mode == "resample":
            perm = derangement(flat_all.shape[0], seed=seed, device=act.device)
            donors = flat_all[perm].reshape(act.shape)
        if idx is None:
            return ablate_rows(act, Bd, mode, mean=mu, donors=donors)
        out = act.clone()
        sel = act.index_select(1, idx)
        don = None if donors is None else donors.index_select(1, idx)
        out[:, idx] = ablate_rows(sel, Bd, mode, mean=mu, donors=don)
        return out

    return [(hook_name, hook_fn)]


def _hook_exists(model: Any, name: str) -> bool:
    hook_dict = getattr(model, "hook_dict", None)
    if isinstance(hook_dict, dict) and name in hook_dict:
        return True
    try:
        model.get_submodule(name)
        return True
    except (AttributeError, TypeError):
        return False


@contextlib.contextmanager
def ablate_subspace(
    model: Any,
    hook_name: str,
    basis: Any,
    mode: AblationMode = "mean",
    mean: Float[torch.Tensor, " d_model"] | None = None,
    positions: Any = None,
    *,
    seed: int = 0,
) -> Iterator[Any]:
    """Ablate a subspace at ``hook_name`` inside the ``with`` block; the hook is always removed.

    The basis width is checked against the model's ``d_model`` for residual-stream sites, and the
    hook name against the model's hook points, before anything runs.

    Examples:
        >>> from tlmicroscope.models import tiny_model
        >>> model = tiny_model(n_layers=2)
        >>> toks = model.to_tokens("hello")
        >>> B = torch.linalg.qr(torch.randn(model.cfg.d_model, 3)).Q
        >>> with ablate_subspace(model, "blocks.1.hook_resid_pre", B, mode="zero"):
        ...     ablated = model(toks)
        >>> bool((ablated - model(toks)).abs().max() > 0)  # the hook is gone after the block
        True
    """
    if not _hook_exists(model, hook_name):
        raise ValueError(
            f"The model has no hook point {hook_name!r}; use a standard name such as "
            "'blocks.0.hook_resid_pre' (see tlmicroscope.capture.hook_name)."
        )
    width = int(model.cfg.d_model) if hook_name.endswith(_RESIDUAL_SUFFIXES) else None
    hooks = subspace_ablation_hooks(
        hook_name, basis, mode, mean, positions, seed=seed, d_model=width
    )
    with model.hooks(fwd_hooks=hooks):  # removes the hook in its own finally, even on an exception
        yield model
