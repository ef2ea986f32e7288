"""Causal basis extraction (CBE): the directions of a layer's residual that its lens relies on.

At layer l, CBE finds orthonormal v_1..v_k one at a time. v_j maximises the energy
``E(v) = E_x[KL(q_l(h) || q_l(ablate(h, v)))]`` (q_l the lens at layer l, ablation as in
``ablation.py``, mean by default) over unit vectors orthogonal to v_1..v_{j-1}, with L-BFGS
(strong Wolfe line search) started from the j-th left singular vector of the lens-composed
unembedding ``Aᵀ W_U`` (A the lens's linear part). The vectors are finally sorted by energy.
This is the method of Belrose et al. (``tuned_lens/causal/subspaces.py``) with two changes: the
composed unembedding is formed correctly for a tuned lens (the reference applies the d×d
translator to a d×V matrix and crashes), and each evaluation reuses precomputed logits (see
``_lens_ablation.py``), which makes it many times faster.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from jaxtyping import Bool, Float, Int

from tlmicroscope.causal._hidden import check_lens_layer, hidden_states
from tlmicroscope.causal._lens_ablation import LensAblationObjective, affine_map
from tlmicroscope.causal.ablation import ABLATION_MODES, derangement, subspace_ablation_hooks
from tlmicroscope.deprecation import renamed_arguments
from tlmicroscope.lenses.base import resolve_lens
from tlmicroscope.lenses.readout import Readout
from tlmicroscope.results import Provenance

__all__ = [
    "CBEConvergenceError",
    "CBEConvergenceWarning",
    "CausalBasis",
    "default_cbe_dir",
    "extract_causal_basis",
    "lens_digest",
]

_KIND = "causal_basis"


def default_cbe_dir(model_or_name: Any, lens: Any = "logit", root: str | Path = "out") -> Path:
    """Where ``tlmicroscope cbe`` writes by default: ``out/cbe-<model>-<lens>/`` (the basis in its
    ``basis/`` subfolder); ``<model>`` is the artifact store's name for it (``model_key``).

    The report's "causal basis energies" section looks for a saved basis there.

    Examples:
        >>> default_cbe_dir("smollm2-135m", "tuned").as_posix()
        'out/cbe-smollm2-135m-tuned'
    """
    from tlmicroscope.lenses.train import default_lens_dir

    slug = default_lens_dir(model_or_name, root=root).name.removeprefix("tuned-lens-")
    name = lens if isinstance(lens, str) else str(getattr(lens, "name", type(lens).__name__))
    name = "".join(c if c.isalnum() or c in "-_." else "-" for c in name.lower())
    return Path(root) / f"cbe-{slug}-{name}"


def lens_digest(lens: Any) -> str:
    """A short fingerprint of a lens: its name, plus a hash of its tensors for a trained lens.

    A saved basis records it (``provenance.settings["lens_digest"]``) so a report can tell whether
    the basis was extracted through the very lens it shows.
    """
    import hashlib

    h = hashlib.sha256(
        f"{getattr(lens, 'name', type(lens).__name__)}|{getattr(lens, 'final_norm', True)}".encode()
    )
    state = lens.state_dict() if isinstance(lens, torch.nn.Module) else {}
    for key in sorted(state):
        h.update(key.encode())
        h.update(state[key].detach().cpu().contiguous().float().numpy().tobytes())
    return h.hexdigest()[:16]


class CBEConvergenceWarning(UserWarning):
    """Some CBE directions stopped at the evaluation budget before their energy settled."""


class CBEConvergenceError(RuntimeError):
    """Raised instead of the warning with ``on_nonconvergence="raise"``."""


@dataclass(eq=False)
class CausalBasis:
    """An ordered orthonormal basis of the directions a lens uses at one layer.

    ``extract_causal_basis`` returns one. It also follows the fitted-object contract
    (``tlmicroscope.artifacts.Fitted``, kind ``"causal-basis"``): construct it with settings only
    (``CausalBasis(layer=15, k=8, lens="logit")``), ``fit(model, corpus)`` fills the fitted
    fields, ``save()`` puts it in the artifact store and ``CausalBasis.load(None, model)`` reads
    it back.

    Attributes:
        energies: ``[k]`` expected KL (nats) of the lens's prediction when each direction is
            ablated, in decreasing order (``None`` until fitted).
        vectors: ``[d_model k]`` orthonormal columns, in the same order.
        mean: ``[d_model]`` mean of the hidden states (the target of mean ablation).
        layer: Residual index (``blocks.{layer}.hook_resid_pre``); as a setting ``None`` takes the
            middle block at ``fit``.
        mode: Ablation mode the energies were computed with.
        converged: ``[k]`` whether each direction's energy settled within the tolerance.
        n_evals: ``[k]`` objective evaluations spent on each direction.
        n_tokens: Hidden-state rows the basis was extracted on (as a setting: rows to use).
        lens: Name of the lens (as a setting: the lens to fit through, a name; ``fit(lens=obj)``
            takes a lens object).
        model_fingerprint: The model it belongs to (see ``tlmicroscope.io.model_fingerprint``).
        provenance: Model, lens and settings.
        k: Number of directions.
        seq_len, max_iter, tol, seed: Settings of ``extract_causal_basis`` used by ``fit``.
        quick: Fitted with quick settings (``QUICK``).

    Examples:
        >>> from tlmicroscope.models import tiny_model
        >>> model = tiny_model(n_layers=2)
        >>> toks = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))
        >>> basis = CausalBasis(layer=1, k=2).fit(model, toks, progress=False)
        >>> tuple(basis.vectors.shape), basis.k
        ((32, 2), 2)
    """

    energies: Float[torch.Tensor, " k"] | None = None
    vectors: Float[torch.Tensor, "d_model k"] | None = None
    mean: Float[torch.Tensor, " d_model"] | None = None
    layer: int | None = None
    mode: str = "mean"
    converged: Bool[torch.Tensor, " k"] | None = None
    n_evals: Int[torch.Tensor, " k"] | None = None
    n_tokens: int = 2048
    lens: str = "logit"
    model_fingerprint: dict[str, Any] = field(default_factory=dict, repr=False)
    provenance: Provenance | None = None
    k: int = 8
    seq_len: int = 256
    max_iter: int = 100
    tol: float = 1e-4
    seed: int = 0
    quick: bool = False

    kind: ClassVar[str] = "causal-basis"
    #: Settings ``fit(..., quick=True)`` uses for those left at their defaults (the demo's basis:
    #: 62 s on SmolLM2-135M under load, 3 of 4 directions converged; README, "The demo").
    QUICK: ClassVar[dict[str, Any]] = {"k": 4, "n_tokens": 512, "max_iter": 30}

    def __post_init__(self) -> None:
        if self.vectors is not None:
            self.k = int(self.vectors.shape[1])

    @property
    def fitted(self) -> bool:
        return self.vectors is not None

    def _check_fitted(self) -> None:
        if self.vectors is None:
            raise ValueError(
                "This CausalBasis is not fitted: call .fit(model, corpus), "
                "extract_causal_basis(...) or CausalBasis.load(path, model)."
            )

    @property
    def d_model(self) -> int:
        self._check_fitted()
        return int(self.vectors.shape[0])

    @property
    def hook_name(self) -> str:
        return f"blocks.{self.layer}.hook_resid_pre"

    def fit(
        self,
        model: Any,
        corpus: Any = None,
        *,
        n_tokens: int | None = None,
        seed: int | None = None,
        progress: bool = True,
        quick: bool = False,
        lens: Any = None,
        on_nonconvergence: Literal["warn", "raise", "ignore"] = "warn",
    ) -> CausalBasis:
        """Extract the basis for ``model`` on ``corpus`` (default: the embedded corpus) with this
        object's settings (``extract_causal_basis``) and fill in the fitted fields; returns self.

        ``n_tokens`` and ``seed`` override the settings; ``lens`` (a lens object or name)
        overrides the ``lens`` setting; ``quick=True`` takes ``QUICK`` for the settings left at
        their defaults.
        """
        self.quick = bool(quick)
        defaults = {f.name: f.default for f in fields(self)}
        for name, value in self.QUICK.items() if quick else ():
            if getattr(self, name) == defaults[name]:  # those given win
                setattr(self, name, value)
        if n_tokens is not None:
            self.n_tokens = int(n_tokens)
        if seed is not None:
            self.seed = int(seed)
        layer = self.layer if self.layer is not None else int(model.cfg.n_layers) // 2
        got = extract_causal_basis(
            model,
            corpus,
            lens=lens if lens is not None else self.lens,
            layer=layer,
            k=int(self.k),
            mode=self.mode,
            max_iter=int(self.max_iter),
            tol=float(self.tol),
            n_tokens=int(self.n_tokens),
            seq_len=int(self.seq_len),
            seed=int(self.seed),
            progress=progress,
            on_nonconvergence=on_nonconvergence,
        )
        for f in ("energies", "vectors", "mean", "layer", "mode", "converged", "n_evals"):
            setattr(self, f, getattr(got, f))
        self.n_tokens, self.lens = got.n_tokens, got.lens
        self.model_fingerprint, self.provenance = got.model_fingerprint, got.provenance
        self.k = int(got.vectors.shape[1])
        return self

    def ablation_hooks(
        self,
        directions: Any = None,
        *,
        mode: str | None = None,
        positions: Any = None,
        seed: int = 0,
    ) -> list[tuple[str, Any]]:
        """Hooks ablating some of these directions (default all) at this basis's layer."""
        self._check_fitted()
        vecs = self.vectors if directions is None else self.vectors[:, directions]
        return subspace_ablation_hooks(
            self.hook_name,
            vecs,
            mode or self.mode,
            self.mean,
            positions,
            seed=seed,
            d_model=self.d_model,
        )

    def to_dataframe(self):
        import pandas as pd

        return pd.DataFrame(
            {
                "direction": range(self.k),
                "energy": self.energies.tolist(),
                "converged": self.converged.tolist(),
                "n_evals": self.n_evals.tolist(),
            }
        )

    def save(self, path: str | Path | None = None) -> Path:
        """Save as ``path/tensors.safetensors`` + ``path/config.json`` (atomically); ``path=None``
        saves to the artifact store's place for its model."""
        from tlmicroscope.artifacts import save_path
        from tlmicroscope.io import save_fitted

        self._check_fitted()
        tensors = {
            "energies": self.energies,
            "vectors": self.vectors,
            "mean": self.mean,
            "converged": self.converged.to(torch.uint8),
            "n_evals": self.n_evals.long(),
        }
        config = {
            "layer": self.layer,
            "mode": self.mode,
            "n_tokens": self.n_tokens,
            "lens": self.lens,
            "seq_len": self.seq_len,
            "max_iter": self.max_iter,
            "tol": self.tol,
            "seed": self.seed,
            "quick": bool(self.quick),
            "provenance": None if self.provenance is None else self.provenance.to_dict(),
        }
        fp = self.model_fingerprint or None
        return save_fitted(
            save_path(self.kind, path, fp), tensors, kind=_KIND, config=config, fingerprint=fp
        )

    @classmethod
    def load(cls, path: str | Path | None = None, model: Any = None) -> CausalBasis:
        """Load a saved basis (``path=None``: the artifact store's for ``model``); with ``model``,
        refuse one saved for another model."""
        from tlmicroscope.artifacts import load_path
        from tlmicroscope.io import FittedFileError, config_bool, config_int, load_fitted

        path = load_path(cls.kind, path, model)
        tensors, meta = load_fitted(path, kind=_KIND, model=model)
        cfg = meta["config"]
        missing = {"energies", "vectors", "mean", "converged", "n_evals"} - set(tensors)
        if missing:
            raise FittedFileError(
                f"{path} lacks the tensors {sorted(missing)}; the file is corrupt."
            )
        prov = cfg.get("provenance")
        settings = {k: cfg[k] for k in ("seq_len", "max_iter", "tol", "seed") if k in cfg}
        return cls(
            energies=tensors["energies"],
            vectors=tensors["vectors"],
            mean=tensors["mean"],
            layer=config_int(cfg, "layer", path, minimum=0),
            mode=str(cfg["mode"]),
            converged=tensors["converged"].bool(),
            n_evals=tensors["n_evals"],
            n_tokens=config_int(cfg, "n_tokens", path),
            lens=str(cfg["lens"]),
            model_fingerprint=meta.get("model") or {},
            provenance=None if prov is None else Provenance(**prov),
            quick=config_bool(cfg, "quick", path, default=False),
            **settings,
        )


def _init_directions(readout: Readout, M: torch.Tensor | None, k: int) -> torch.Tensor:
    """The top-k left singular vectors of the lens-composed unembedding ``Aᵀ W_U`` (``[d V]``).

    They are the eigenvectors of ``Aᵀ (W_U W_Uᵀ) A``, a d×d problem solved in float64 (the
    same vectors as an SVD of the d×V matrix, up to sign). Like the reference, the raw
    unembedding is used (without the final norm's weight).
    """
    W = readout.W_raw.double()
    gram = W @ W.T
    if M is not None:
        M64 = M.double()
        gram = M64 @ gram @ M64.T
    evals, evecs = torch.linalg.eigh(gram)
    return evecs[:, evals.argsort(descending=True)[:k]].float()


@renamed_arguments(
    renamed={"corpus_or_tokens": "corpus"},
    old_positional=("model", "lens", "corpus", "layer", "k", "mode"),
)
def extract_causal_basis(
    model: Any,
    corpus: Any = None,
    *,
    lens: Any,
    layer: int,
    k: int,
    mode: Literal["mean", "zero", "resample"] = "mean",
    max_iter: int = 100,
    tol: float = 1e-4,
    n_tokens: int = 2048,
    seq_len: int = 256,
    seed: int = 0,
    progress: bool = True,
    on_nonconvergence: Literal["warn", "raise", "ignore"] = "warn",
) -> CausalBasis:
    """Extract the k directions of layer ``layer``'s residual stream that most move the lens.

    Args:
        model: A TransformerLens model (only read; its weights get no gradients).
        corpus: A corpus source (``None`` or ``"embedded"`` for the embedded corpus, a file or
            folder path, an iterable of texts) cut into ``seq_len`` windows up to ``n_tokens``;
            token ids ``[batch pos]``; a text; an ``ActivationCache`` holding
            ``blocks.{layer}.hook_resid_pre``; or hidden states themselves, a float
            ``[N d_model]`` or ``[batch pos d_model]`` tensor.
        lens: ``None``/``"logit"``, ``"logit-paper"``, or any lens (a ``TunedLens``).
        layer: Residual index 0..n_layers-1 (``blocks.{layer}.hook_resid_pre``); the model's
            output has no lens translator.
        k: Number of directions, 1..d_model.
        mode: Ablation used in the energy: ``"mean"`` (default, as in the paper), ``"zero"`` or
            ``"resample"`` (a seeded derangement of the rows, fixed during each solve).
        max_iter: L-BFGS iterations per solve, and the evaluation budget of each direction.
        tol: Stop a direction when the relative energy change between evaluations is below this.
        n_tokens: Hidden-state rows used from a corpus (ignored for tokens and hidden states).
        seq_len: Window length for a corpus.
        seed: Seed of the corpus sample and of the resample donors.
        progress: Show a tqdm bar over directions.
        on_nonconvergence: What to do when a direction exhausts ``max_iter`` evaluations before
            settling: ``"warn"`` (a ``CBEConvergenceWarning`` naming them), ``"raise"``, or
            ``"ignore"``. The ``converged`` field records it in every case.

    The old form ``extract_causal_basis(model, lens, corpus_or_tokens, layer, k, mode)`` still
    works for one release, with a ``DeprecationWarning``.

    Returns:
        A ``CausalBasis``; ``basis.save(path)`` / ``CausalBasis.load(path, model)`` store it.

    Raises:
        ValueError: k out of 1..d_model, a layer without a lens translator, a lens for another
            model, too few tokens for the ablation, hidden states of another width or with NaNs.

    Examples:
        >>> from tlmicroscope.models import tiny_model
        >>> model = tiny_model(n_layers=2)
        >>> toks = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))
        >>> basis = extract_causal_basis(model, toks, lens="logit", layer=1, k=3, progress=False)
        >>> tuple(basis.vectors.shape), bool((basis.energies[:-1] >= basis.energies[1:]).all())
        ((32, 3), True)
        >>> torch.allclose(basis.vectors.T @ basis.vectors, torch.eye(3), atol=1e-4)
        True
    """
    from tlmicroscope.io import model_fingerprint

    lens = resolve_lens(lens)
    lens.check_model(model)
    _check_cbe_settings(model, mode, k, max_iter, tol, on_nonconvergence)
    layer = check_lens_layer(model, lens, layer)
    if corpus is None:
        corpus = "embedded"
    h = hidden_states(model, corpus, layer, n_tokens=n_tokens, seq_len=seq_len, seed=seed)
    n = h.shape[0]
    if mode != "zero" and n < 2:
        raise ValueError(
            f"{mode.capitalize()} ablation needs at least 2 hidden-state rows (a mean or a donor), "
            f"got {n}. Pass more text or tokens (thousands of tokens make a stable mean)."
        )
    if n < 64:
        warnings.warn(
            f"CBE on only {n} tokens: the energies and directions will be noisy.",
            UserWarning,
            stacklevel=3,  # the caller, past renamed_arguments' wrapper
        )

    readout = Readout.for_model(model)
    donors = derangement(n, seed=seed) if mode == "resample" else None
    objective = LensAblationObjective(readout, lens, layer, h, mode, donors=donors)
    if not objective.affine:
        warnings.warn(
            f"The lens {lens.name!r} is not affine at layer {layer}: CBE falls back to autograd "
            "through the lens, which is much slower.",
            UserWarning,
            stacklevel=3,
        )
    d_model = int(model.cfg.d_model)
    M = objective.M if objective.affine else (affine_map(lens, layer, d_model, h[:1]) or (None,))[0]
    vectors, energies, converged, n_evals, last_change = _solve_directions(
        objective, _init_directions(readout, M, k), layer, max_iter, tol, progress
    )
    order = energies.argsort(descending=True)
    result = CausalBasis(
        energies=energies[order],
        vectors=vectors[:, order].contiguous(),
        mean=objective.mean.clone(),
        layer=layer,
        mode=mode,
        converged=converged[order],
        n_evals=n_evals[order],
        n_tokens=n,
        lens=lens.name,
        model_fingerprint=model_fingerprint(model),
        provenance=Provenance.from_model(
            model,
            lens=lens,
            layer=layer,
            k=k,
            mode=mode,
            max_iter=max_iter,
            tol=tol,
            n_tokens=n,
            seed=seed,
            method="cbe-lbfgs",
            lens_digest=lens_digest(lens),
        ),
    )
    if not bool(converged.all()) and on_nonconvergence != "ignore":
        bad = torch.nonzero(~converged).flatten().tolist()
        msg = (
            f"CBE at layer {layer}: {len(bad)} of {k} directions (extraction order {bad}) used all "
            f"{max_iter} evaluations without the relative energy change falling below tol={tol} "
            f"(last changes {[f'{float(last_change[i]):.2g}' for i in bad]}). Raise max_iter, "
            "loosen tol, or treat these directions' energies as lower bounds; basis.converged "
            "records this."
        )
        if on_nonconvergence == "raise":
            raise CBEConvergenceError(msg)
        warnings.warn(msg, CBEConvergenceWarning, stacklevel=3)
    return result


def _check_cbe_settings(
    model: Any, mode: str, k: Any, max_iter: int, tol: float, on_nonconvergence: str
) -> None:
    """Refuse an unknown mode or policy, k outside 1..d_model, or a non-positive budget."""
    d_model = int(model.cfg.d_model)
    if mode not in ABLATION_MODES:
        raise ValueError(f"mode must be one of {ABLATION_MODES}, got {mode!r}.")
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= d_model:
        raise ValueError(f"k must be an integer in 1..d_model={d_model}, got {k!r}.")
    if on_nonconvergence not in ("warn", "raise", "ignore"):
        raise ValueError(
            f"on_nonconvergence must be 'warn', 'raise' or 'ignore', got {on_nonconvergence!r}."
        )
    if max_iter < 1 or not tol > 0:
        raise ValueError(f"max_iter must be >= 1 and tol > 0, got {max_iter} and {tol}.")


def _solve_directions(
    objective: LensAblationObjective,
    vectors: torch.Tensor,
    layer: int,
    max_iter: int,
    tol: float,
    progress: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Maximise the energy of each direction in turn, orthogonal to those before it.

    ``vectors`` ``[d_model k]`` holds the starting points and is overwritten with the solutions.
    Returns ``(vectors, energies, converged, n_evals, last_change)`` in extraction order.
    """
    from tqdm.auto import tqdm

    k = vectors.shape[1]
    energies = torch.zeros(k)
    converged = torch.zeros(k, dtype=torch.bool)
    n_evals = torch.zeros(k, dtype=torch.long)
    last_change = torch.full((k,), math.nan)
    bar = tqdm(range(k), desc=f"CBE layer {layer}", disable=not progress, unit="dir")
    for j in bar:
        basis_so_far = vectors[:, :j]

        def project(x: torch.Tensor, B: torch.Tensor = basis_so_far) -> torch.Tensor:
            if B.shape[1]:
                x = x - B @ (B.T @ x)
            return x / (x.norm() + torch.finfo(x.dtype).eps)

        v, ok, state = _lbfgs_direction(objective, project, vectors[:, j], max_iter, tol)
        with torch.no_grad():
            vectors[:, j] = project(v.detach())
            energies[j] = float(objective.energy(vectors[:, j]))
        converged[j], n_evals[j] = ok, state["nfev"]
        last_change[j] = abs(state["delta"] / state["last"]) if state["last"] else math.nan
        bar.set_postfix(energy=f"{float(energies[j]):.4g}", evals=state["nfev"])
    return vectors, energies, converged, n_evals, last_change


def _lbfgs_direction(
    objective: LensAblationObjective,
    project: Any,
    start: torch.Tensor,
    max_iter: int,
    tol: float,
) -> tuple[torch.Tensor, bool, dict[str, Any]]:
    """One L-BFGS solve on the projected unit sphere; ``(v, converged, state)``."""
    v = torch.nn.Parameter(project(start.clone()))
    opt = torch.optim.LBFGS([v], line_search_fn="strong_wolfe", max_iter=max_iter)
    state: dict[str, Any] = {"nfev": 0, "last": 0.0, "delta": math.inf, "finite": True}

    def closure() -> torch.Tensor:
        state["nfev"] += 1
        opt.zero_grad(set_to_none=False)
        energy = objective.energy(project(v))
        loss = -energy
        if not torch.isfinite(loss):
            state["finite"] = False
            v.grad.zero_()
            return torch.zeros(())
        loss.backward()
        new = float(energy.detach())
        state["delta"], state["last"] = new - state["last"], new
        return loss.detach()

    while state["nfev"] < max_iter and state["finite"]:
        opt.step(closure)
        with torch.no_grad():
            v.copy_(project(v))
        if abs(state["delta"]) <= tol * abs(state["last"]):
            return v, True, state
    return v, False, state
