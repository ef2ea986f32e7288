"""Hook-name helpers and capture of chosen sites, whole or streamed layer by layer.

Sites are addressed only by TransformerLens's standard hook names, which both ``HookedTransformer``
and ``TransformerBridge`` accept. ``capture`` runs the model with hooks on exactly the requested
names and copies each activation into one preallocated ``[layer batch pos ...]`` tensor per site,
so nothing else is cached. ``stream`` hands each activation to a callback during the forward pass,
so per-layer statistics never need every layer in memory at once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from tlmicroscope.inputs import TextOrTokens, check_layers, resolve_input
from tlmicroscope.results import Provenance

__all__ = [
    "BLOCK_SITES",
    "GLOBAL_SITES",
    "Captured",
    "absent_sites",
    "capture",
    "hook_name",
    "residual_stream_names",
    "site_exists",
    "site_hooks",
    "stream",
]

#: Per-block sites and their hook-name templates.
BLOCK_SITES: dict[str, str] = {
    "resid_pre": "blocks.{layer}.hook_resid_pre",
    "resid_mid": "blocks.{layer}.hook_resid_mid",
    "resid_post": "blocks.{layer}.hook_resid_post",
    "attn_out": "blocks.{layer}.hook_attn_out",
    "mlp_out": "blocks.{layer}.hook_mlp_out",
    "ln1": "blocks.{layer}.ln1.hook_normalized",
    "ln2": "blocks.{layer}.ln2.hook_normalized",
    "z": "blocks.{layer}.attn.hook_z",
    "pattern": "blocks.{layer}.attn.hook_pattern",
    "mlp_post": "blocks.{layer}.mlp.hook_post",
}

#: Sites outside the blocks. ``"resid"`` is the residual stream h^0..h^L: ``hook_resid_pre`` of
#: each block, then ``hook_resid_post`` of the last block (index L).
GLOBAL_SITES: dict[str, str] = {
    "embed": "hook_embed",
    "pos_embed": "hook_pos_embed",
    "ln_final": "ln_final.hook_normalized",
}

#: The sites some families lack; every family has the others, so only these are ever looked up.
_FAMILY_SITES = ("resid_mid", "ln1", "ln2", "pos_embed", "mlp_post")


def site_exists(model: Any, site: str) -> bool:
    """Whether ``model`` has ``site`` (judged by its ``hook_dict`` at block 0).

    Not every family has every site: blocks that run attention and MLP in parallel (GPT-NeoX,
    Cohere) have no ``resid_mid``, Cohere's and OLMo-2's no ``ln2`` (or ``ln1``), rotary models
    no ``pos_embed``.
    """
    return not absent_sites(model, [site])


def absent_sites(model: Any, sites: Sequence[str]) -> list[str]:
    """The ``sites`` that ``model`` lacks (see ``site_exists``), looking its hooks up once."""
    wanted = [s for s in sites if s in _FAMILY_SITES]
    hooks = getattr(model, "hook_dict", None) if wanted else None  # a walk of the modules: once
    if hooks is None:
        return []
    return [
        s
        for s in wanted
        if (GLOBAL_SITES[s] if s in GLOBAL_SITES else BLOCK_SITES[s].format(layer=0)) not in hooks
    ]


def _why_absent(model: Any, site: str) -> str:
    cfg = model.cfg
    if site == "pos_embed":
        return f"it has no learned positional embedding ({cfg.positional_embedding_type} positions)"
    if getattr(cfg, "parallel_attn_mlp", False) and site == "resid_mid":
        return (
            "its blocks run attention and MLP in parallel on the same input, so there is no "
            "residual state between them"
        )
    if getattr(cfg, "parallel_attn_mlp", False) and site == "ln2":
        return "its attention and MLP run in parallel and read one shared norm (ln1)"
    if site in ("ln1", "ln2"):
        return "its blocks normalise the attention and MLP outputs, not their inputs (no pre-norm)"
    if site == "mlp_post":
        return "its MLP is a mixture of experts, with no single hidden activation"
    return "TransformerLens exposes no such hook for it"


def _refuse_absent_sites(model: Any, sites: Sequence[str]) -> None:
    absent = absent_sites(model, sites)
    if not absent:
        return
    cfg = model.cfg
    arch = getattr(cfg, "original_architecture", None) or getattr(cfg, "architecture", None)
    label = str(
        getattr(model, "_tlmicroscope_name", None) or getattr(cfg, "model_name", "this model")
    )
    reasons = "; ".join(f"no {s}: {_why_absent(model, s)}" for s in absent)
    raise ValueError(
        f"{label} ({arch or type(model).__name__}) lacks a site asked for: {reasons}. "
        f"Leave {absent} out of the sites or components."
    )


def hook_name(site: str, layer: int | None = None, *, n_layers: int | None = None) -> str:
    """The standard hook name for a site.

    Examples:
        >>> hook_name("resid_pre", 3)
        'blocks.3.hook_resid_pre'
        >>> hook_name("ln_final")
        'ln_final.hook_normalized'
        >>> hook_name("resid", 2, n_layers=2)
        'blocks.1.hook_resid_post'
    """
    if site in GLOBAL_SITES:
        return GLOBAL_SITES[site]
    if site == "resid":
        if layer is None or n_layers is None:
            raise ValueError("site 'resid' needs a layer in 0..n_layers and n_layers.")
        return residual_stream_names(n_layers)[layer]
    if site not in BLOCK_SITES:
        known = sorted([*BLOCK_SITES, *GLOBAL_SITES, "resid"])
        raise ValueError(f"Unknown site {site!r}; known sites are {known}.")
    if layer is None:
        raise ValueError(f"Site {site!r} is per block: pass a layer.")
    return BLOCK_SITES[site].format(layer=layer)


def residual_stream_names(n_layers: int) -> list[str]:
    """The L+1 hook names of the residual stream h^0..h^L, as lenses read it."""
    names = [f"blocks.{layer}.hook_resid_pre" for layer in range(n_layers)]
    return names + [f"blocks.{n_layers - 1}.hook_resid_post"]


def _site_layers(site: str, layers: Sequence[int] | None, n_layers: int) -> list[int | None]:
    if site in GLOBAL_SITES:
        return [None]
    if site == "resid":
        return list(check_layers(layers, n_layers + 1, "residual layer"))
    return list(check_layers(layers, n_layers))


def site_hooks(
    site: str, layers: Sequence[int] | None, n_layers: int
) -> list[tuple[int | None, str]]:
    """``(layer, hook_name)`` for each requested layer of a site."""
    return [
        (layer, hook_name(site, layer, n_layers=n_layers))
        for layer in _site_layers(site, layers, n_layers)
    ]


@dataclass(frozen=True)
class Captured:
    """Stacked activations per site, ``[layer batch pos ...]``, with the hook names they came from.

    Examples:
        >>> from tlmicroscope.models import tiny_model
        >>> cap = capture(tiny_model(n_layers=2), "hi there", sites=("resid_post", "mlp_out"))
        >>> tuple(cap["resid_post"].shape), cap.labels("mlp_out")
        ((2, 1, 8, 32), ['blocks.0.hook_mlp_out', 'blocks.1.hook_mlp_out'])
    """

    activations: dict[str, torch.Tensor]
    layers: dict[str, tuple[int | None, ...]]
    hook_names: dict[str, tuple[str, ...]]
    tokens: torch.Tensor | None
    positions: torch.Tensor | None
    logits: torch.Tensor | None
    provenance: Provenance
    str_tokens: list[list[str]] | None = field(default=None)

    def __getitem__(self, site: str) -> torch.Tensor:
        if site not in self.activations:
            raise KeyError(
                f"Site {site!r} was not captured; captured sites: {list(self.activations)}."
            )
        return self.activations[site]

    def labels(self, site: str) -> list[str]:
        return list(self.hook_names[site])


def _positions_index(positions: Any, n_pos: int) -> torch.Tensor | None:
    if positions is None:
        return None
    if isinstance(positions, slice):
        return torch.arange(n_pos)[positions]
    idx = torch.as_tensor(positions, dtype=torch.long).reshape(-1)
    if idx.numel() and (idx.max() >= n_pos or idx.min() < -n_pos):
        raise ValueError(f"positions must lie in [-{n_pos}, {n_pos}) for {n_pos} tokens.")
    return idx % n_pos


def _stop_layer(plan: dict[str, list[tuple[int | None, str]]], n_layers: int, need_logits: bool):
    """The earliest ``stop_at_layer`` that still fires every requested hook (None: run it all)."""
    if need_logits:
        return None
    last = -1
    for site, pairs in plan.items():
        if site in ("ln_final",):
            return None
        for layer, name in pairs:
            if layer is None:
                continue
            if site == "resid" and name.endswith("hook_resid_post"):
                return None
            last = max(last, layer)
    return last + 1 if 0 <= last + 1 < n_layers else None


def stream(
    model: Any,
    tokens: TextOrTokens,
    callback: Callable[[str, int | None, torch.Tensor], None],
    *,
    sites: Sequence[str] = ("resid_post",),
    layers: Sequence[int] | None = None,
    positions: Any = None,
    return_logits: bool = True,
    prepend_bos: bool | None = None,
    truncate: bool = False,
    extra_hooks: Sequence[tuple[str, Callable]] = (),
) -> torch.Tensor | None:
    """Run the model once and call ``callback(site, layer, activation)`` as each activation is made.

    The callback sees ``[batch pos ...]`` tensors (restricted to ``positions`` when given) under
    ``torch.inference_mode``; it should reduce or copy what it needs, since the tensor is the
    model's own. Hooks are removed even when the callback raises.

    Returns:
        The logits, or ``None`` when ``return_logits=False`` (then the forward pass stops after the
        last block it needs).

    Examples:
        >>> from tlmicroscope.models import tiny_model
        >>> norms = {}
        >>> _ = stream(tiny_model(n_layers=2), "abc",
        ...            lambda site, layer, act: norms.__setitem__(layer, act.norm().item()))
        >>> sorted(norms)
        [0, 1]
    """
    resolved = resolve_input(model, tokens, prepend_bos=prepend_bos, truncate=truncate)
    model, toks = resolved.model, resolved.tokens
    n_layers = model.cfg.n_layers
    _refuse_absent_sites(model, sites)
    pos_idx = _positions_index(positions, toks.shape[-1])
    plan = {site: site_hooks(site, layers, n_layers) for site in sites}

    def make_hook(site: str, layer: int | None):
        def hook(act: torch.Tensor, hook: Any) -> None:
            if pos_idx is not None and site != "pattern":
                act = act.index_select(1, pos_idx.to(act.device))
            callback(site, layer, act)

        return hook

    fwd_hooks = [
        (name, make_hook(site, layer)) for site, pairs in plan.items() for layer, name in pairs
    ]
    fwd_hooks += list(extra_hooks)
    stop = _stop_layer(plan, n_layers, return_logits)
    with torch.inference_mode():
        out = model.run_with_hooks(
            toks, fwd_hooks=fwd_hooks, stop_at_layer=stop, reset_hooks_end=True
        )
    return out if return_logits else None


def capture(
    model_or_cache: Any,
    tokens: TextOrTokens | None = None,
    *,
    sites: Sequence[str] = ("resid_post",),
    layers: Sequence[int] | None = None,
    positions: Any = None,
    return_logits: bool = False,
    prepend_bos: bool | None = None,
    truncate: bool = False,
) -> Captured:
    """Capture the requested sites and layers as stacked ``[layer batch pos ...]`` tensors.

    Args:
        model_or_cache: A model (run once with hooks on exactly the requested names) or an
            ``ActivationCache`` that already holds them.
        tokens: Text or token ids (optional with a cache).
        sites: Names from ``BLOCK_SITES``, ``GLOBAL_SITES`` or ``"resid"`` (h^0..h^L).
        layers: Layer indices (default all). For ``"resid"`` they run 0..n_layers.
        positions: Keep only these positions (an index list, tensor or slice); bounds memory.
        return_logits: Keep the model's logits too (a model input only).

    Raises:
        ValueError: an unknown site, a layer out of range, or a cache missing a requested hook.
    """
    resolved = resolve_input(
        model_or_cache, tokens, prepend_bos=prepend_bos, truncate=truncate, require_tokens=False
    )
    model, cache, toks = resolved.model, resolved.cache, resolved.tokens
    n_layers = model.cfg.n_layers
    plan = {site: site_hooks(site, layers, n_layers) for site in sites}
    prov = Provenance.from_model(model, sites=list(sites))
    str_tokens = None
    if toks is not None and getattr(model, "tokenizer", None) is not None:
        str_tokens = [model.to_str_tokens(row) for row in toks]

    acts: dict[str, torch.Tensor] = {}
    cache_n_pos: dict[str, int] = {}
    if cache is not None:
        missing = [name for pairs in plan.values() for _, name in pairs if name not in cache]
        if missing:
            raise ValueError(
                f"The ActivationCache lacks {len(missing)} requested hooks, e.g. {missing[:3]}. "
                "Run model.run_with_cache(tokens, names_filter=[...]) with those names, or pass "
                "the model."
            )
        for site, pairs in plan.items():
            first = cache[pairs[0][1]]
            cache_n_pos[site] = first.shape[1] if first.ndim > 1 else 0
            pos_idx = _positions_index(positions, cache_n_pos[site]) if site != "pattern" else None
            stack = [cache[name] for _, name in pairs]
            t = torch.stack(stack)
            acts[site] = t if pos_idx is None else t.index_select(2, pos_idx)
        if return_logits:
            raise ValueError("return_logits needs the model: a cache does not hold the logits.")
        logits = None
    else:
        order = {
            site: {layer: i for i, (layer, _) in enumerate(pairs)} for site, pairs in plan.items()
        }

        def collect(site: str, layer: int | None, act: torch.Tensor) -> None:
            buf = acts.get(site)
            if buf is None:
                buf = acts[site] = torch.empty(
                    (len(plan[site]), *act.shape), dtype=act.dtype, device=act.device
                )
            buf[order[site][layer]] = act

        logits = stream(
            model,
            toks,
            collect,
            sites=sites,
            layers=layers,
            positions=positions,
            return_logits=return_logits,
        )
    n_pos = toks.shape[-1] if toks is not None else next(iter(cache_n_pos.values()), 0)
    return Captured(
        activations=acts,
        layers={site: tuple(layer for layer, _ in pairs) for site, pairs in plan.items()},
        hook_names={site: tuple(name for _, name in pairs) for site, pairs in plan.items()},
        tokens=toks,
        positions=_positions_index(positions, n_pos),
        logits=logits,
        provenance=prov,
        str_tokens=str_tokens,
    )
