"""Capture of every sub-block's output (Ning and Rangaraju's latent states) on TransformerLens
hooks.

The paper records, per block, the attention input norm, the attention output, the residual after
attention, the MLP input norm, the MLP output and the residual after the MLP, plus the embedding and
the final norm. Here those are the standard hook names:

========== ================================ ===============
component  hook                             paper's name
========== ================================ ===============
embed      ``blocks.0.hook_resid_pre`` (h^0) ``initial``
ln1        ``blocks.{l}.ln1.hook_normalized`` ``norm_attn``
attn_out   ``blocks.{l}.hook_attn_out``      ``attn``
resid_mid  ``blocks.{l}.hook_resid_mid``     ``post_attn``
ln2        ``blocks.{l}.ln2.hook_normalized`` ``norm_mlp``
mlp_out    ``blocks.{l}.hook_mlp_out``       ``mlp``
resid_post ``blocks.{l}.hook_resid_post``    ``post_mlp``
ln_final   ``ln_final.hook_normalized``      ``norm_f``
========== ================================ ===============

TransformerLens's ``hook_normalized`` is the normalised vector *before* the norm's gain (and
bias), while the paper hooks the norm module's output, after the gain; the two differ by a
per-dimension scale. ``capture_components`` gives the paper's states by default
(``norm_gain=True``: the norm's weight, and bias where it has one, applied to ``hook_normalized``,
so ``ln1``/``ln2``/``ln_final`` are what the norm module returns); ``norm_gain=False`` keeps the
hook's pre-gain vectors. A norm whose gain was folded into the next weights (``fold_ln``) has no
weight left, and both give the same vectors.

Capture streams: each activation is reduced (averaged) or copied into one preallocated
``[state batch pos d_model]`` buffer while the forward pass runs, windows go through the model a
batch at a time, and the forward stops right after the last requested hook (the unembedding is
never computed). Memory is that buffer, plus one batch's forward pass.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from tlmicroscope.capture import hook_name, stream
from tlmicroscope.geometry.component_states import (
    ComponentStates,
    _check_axes,
    layer_norm_parameter_free,
    unit_length,
)
from tlmicroscope.inputs import TextOrTokens, check_layers, resolve_input
from tlmicroscope.results import Provenance
from tlmicroscope.vocab import token_strings

__all__ = [
    "ATTN_VS_MLP",
    "COMPONENTS",
    "NORM_COMPONENTS",
    "PAPER_NAMES",
    "POST_ADD",
    "ComponentStates",
    "capture_components",
    "default_components",
    "intermediate_layers",
    "layer_norm_parameter_free",
    "state_plan",
    "stream_states",
    "unit_length",
]

#: Components in forward order; see the module docstring for their hooks.
COMPONENTS: tuple[str, ...] = (
    "embed",
    "ln1",
    "attn_out",
    "resid_mid",
    "ln2",
    "mlp_out",
    "resid_post",
    "ln_final",
)
#: The names the reference code (Vainateya/Feature_Geometry_Visualization) gives them.
PAPER_NAMES = {
    "embed": "initial",
    "ln1": "norm_attn",
    "attn_out": "attn",
    "resid_mid": "post_attn",
    "ln2": "norm_mlp",
    "mlp_out": "mlp",
    "resid_post": "post_mlp",
    "ln_final": "norm_f",
}
#: The sub-block outputs before they are added to the residual (the attention-vs-MLP figure).
ATTN_VS_MLP = ("attn_out", "mlp_out")
#: The residual-stream states of the layerwise figure (the paper's "not pre_add" states).
POST_ADD = ("embed", "resid_mid", "resid_post", "ln_final")

#: The states read at a norm's ``hook_normalized`` (before its gain unless ``norm_gain``).
NORM_COMPONENTS = ("ln1", "ln2", "ln_final")

_BLOCK_COMPONENTS = ("ln1", "attn_out", "resid_mid", "ln2", "mlp_out", "resid_post")
_FP16_MAX = float(torch.finfo(torch.float16).max)


def default_components(model: Any, wanted: Sequence[str] = COMPONENTS) -> tuple[str, ...]:
    """``wanted`` less the sites the model lacks (``resid_mid``/``ln2`` of parallel blocks)."""
    from tlmicroscope.capture import absent_sites

    absent = set(absent_sites(model, wanted))
    return tuple(c for c in wanted if c not in absent)


def intermediate_layers(n_layers: int) -> list[int]:
    """The "intermediate" blocks the reference singles out, scaled to any depth.

    The reference picks blocks 2-8 of GPT-2's 12 and 6-27 of LLaMA-7B's 32 by eye; this takes
    blocks from about n/6 up to about 0.8 n (2-9 of 12, 5-23 of 30, 5-25 of 32).

    Examples:
        >>> intermediate_layers(12)
        [2, 3, 4, 5, 6, 7, 8, 9]
        >>> intermediate_layers(2)
        [0, 1]
    """
    if n_layers < 3:
        return list(range(n_layers))
    start = max(1, round(n_layers / 6))
    stop = max(start + 1, round(0.8 * n_layers))
    return list(range(start, stop))


@dataclass(frozen=True)
class _State:
    component: str
    layer: int  # block index; -1 for the embedding, n_layers for the final norm
    hook: str


def state_plan(
    components: Sequence[str], layers: Sequence[int] | None, n_layers: int
) -> list[_State]:
    """The requested (component, layer, hook) states in the order the forward pass makes them."""
    unknown = [c for c in components if c not in COMPONENTS]
    if unknown:
        raise ValueError(f"Unknown components {unknown}; choose from {list(COMPONENTS)}.")
    if not components:
        raise ValueError(f"Pass at least one component from {list(COMPONENTS)}.")
    chosen = sorted(set(check_layers(layers, n_layers)))
    plan: list[_State] = []
    if "embed" in components:
        plan.append(_State("embed", -1, hook_name("resid", 0, n_layers=n_layers)))
    for layer in chosen:
        for comp in _BLOCK_COMPONENTS:
            if comp in components:
                plan.append(_State(comp, layer, hook_name(comp, layer)))
    if "ln_final" in components:
        plan.append(_State("ln_final", n_layers, hook_name("ln_final")))
    return plan


def _norm_affines(
    model: Any, plan: Sequence[_State]
) -> dict[int, tuple[torch.Tensor, torch.Tensor | None]]:
    """``{state index: (gain, bias or None)}`` for the planned norm states whose norm has a gain.

    The gain includes Gemma's ``1 + weight`` offset where the model applies one (as
    ``lenses.readout`` reads the final norm).
    """
    from tlmicroscope.models.access import named_param, norm_uses_offset

    out: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}
    for i, st in enumerate(plan):
        if st.component not in NORM_COMPONENTS:
            continue
        if st.component == "ln_final":
            module = getattr(model, "ln_final", None)
        else:
            module = getattr(model.blocks[st.layer], st.component, None)
        if not isinstance(module, torch.nn.Module):
            if st.hook not in getattr(model, "hook_dict", {}):
                # The block has no such norm at all: the capture refuses the site, saying why.
                continue
            raise ValueError(
                f"The model has no {st.component} norm module at layer {st.layer} to read its gain "
                "from; pass norm_gain=False for the hook's pre-gain vectors."
            )
        weight = named_param(module, "weight", "w")
        if weight is None:
            continue  # LNPre/RMSPre: the hook is already the module's output
        bias = named_param(module, "bias", "b")
        gain = weight.detach().float() + (1.0 if norm_uses_offset(module, model.cfg) else 0.0)
        out[i] = (gain, None if bias is None else bias.detach().float())
    return out


def _apply_affine(
    act: torch.Tensor, affine: tuple[torch.Tensor, torch.Tensor | None]
) -> torch.Tensor:
    gain, bias = affine
    out = act.float() * gain.to(act.device)
    return out if bias is None else out + bias.to(act.device)


class _StopForward(Exception):
    """Raised from the last needed hook so the rest of the model (and the unembedding) never
    runs."""


def stream_states(
    model: Any,
    tokens: torch.Tensor,
    plan: Sequence[_State],
    callback: Callable[[int, torch.Tensor], None],
    *,
    positions: torch.Tensor | None = None,
) -> None:
    """Run one batch and call ``callback(state_index, act[batch pos d_model])`` once per planned
    state.

    Built on ``tlmicroscope.capture.stream``; the forward pass stops after the last planned hook,
    and hooks are removed however it ends.
    """
    n_layers = model.cfg.n_layers
    by_hook = {s.hook: i for i, s in enumerate(plan)}
    last = len(plan) - 1
    pos_idx = positions

    delivered: set[int] = set()

    def deliver(i: int, act: torch.Tensor) -> None:
        # HookedTransformer applies ln1 once each for the query, key and value inputs, so its
        # hook_normalized fires three times per forward; every state is handed over only once.
        if i in delivered:
            return
        delivered.add(i)
        callback(i, act)
        if i == last:
            raise _StopForward

    def on_site(site: str, layer: int | None, act: torch.Tensor) -> None:
        i = by_hook.get(hook_name(site, layer, n_layers=n_layers))
        if i is not None:  # None: the placeholder site used when only the embedding is wanted
            deliver(i, act)

    extra = []
    if plan[0].component == "embed":

        def on_embed(act: torch.Tensor, hook: Any) -> None:
            if pos_idx is not None:
                act = act.index_select(1, pos_idx.to(act.device))
            deliver(0, act)

        extra.append((plan[0].hook, on_embed))
    sites = [c for c in (*_BLOCK_COMPONENTS, "ln_final") if any(s.component == c for s in plan)]
    layers = sorted({s.layer for s in plan if s.component in _BLOCK_COMPONENTS}) or None
    if not sites:  # only the embedding: stream still needs a site of its own
        sites, layers = ["resid_pre"], [0]
    try:
        stream(
            model,
            tokens,
            on_site,
            sites=sites,
            layers=layers,
            positions=positions,
            return_logits=False,
            extra_hooks=extra,
        )
    except _StopForward:
        pass


def _select_positions(
    n_pos: int, positions: Any, drop_first: bool, max_positions: int | None
) -> torch.Tensor:
    if positions is None:
        idx = torch.arange(n_pos)
    elif isinstance(positions, slice):
        idx = torch.arange(n_pos)[positions]
    else:
        idx = torch.as_tensor(positions, dtype=torch.long).reshape(-1)
        if idx.numel() and (idx.max() >= n_pos or idx.min() < -n_pos):
            raise ValueError(f"positions must lie in [-{n_pos}, {n_pos}) for {n_pos} tokens.")
        idx = idx % n_pos
    if drop_first:
        idx = idx[idx != 0]
    if idx.numel() == 0:
        raise ValueError(
            "No positions left to capture"
            + (" after dropping position 0 (a one-token input?)." if drop_first else ".")
        )
    if max_positions is not None:
        if max_positions < 1:
            raise ValueError(f"max_positions must be at least 1, got {max_positions}.")
        if idx.numel() > max_positions:  # evenly spaced, so position colour scales stay readable
            pick = torch.linspace(0, idx.numel() - 1, max_positions).round().long().unique()
            idx = idx[pick]
    return idx


def capture_components(
    model_or_cache: Any,
    tokens: TextOrTokens | None = None,
    *,
    components: Sequence[str] | None = None,
    layers: Sequence[int] | None = None,
    positions: Any = None,
    drop_first: bool = False,
    max_positions: int | None = None,
    average: str | Sequence[str] = (),
    layer_norm: bool = False,
    unit: bool = False,
    dtype: torch.dtype = torch.float32,
    batch_size: int = 8,
    progress: bool = True,
    prepend_bos: bool | None = None,
    truncate: bool = False,
    norm_gain: bool = True,
) -> ComponentStates:
    """Capture the paper's per-block states for one prompt or a batch of corpus windows.

    Preprocessing follows the reference's order: average, then the parameter-free LayerNorm,
    then unit length. Averages are accumulated as the forward passes go, so averaging over samples
    holds ``[state pos d_model]`` however many windows are run.

    Args:
        model_or_cache: A TransformerLens model, or an ``ActivationCache`` holding the hooks.
        tokens: Text, a list of equal-length texts, or ids ``[batch pos]`` (e.g. from
            ``tlmicroscope.corpus.token_windows``).
        components: Which of ``COMPONENTS`` (default all eight, less ``resid_mid``/``ln2`` on
            models whose blocks run attention and MLP in parallel and so lack them).
        layers: Blocks to capture (default all); the embedding and final norm are always one state.
        positions: Positions to keep (indices or a slice; default all).
        drop_first: Drop position 0, as the reference does for raw (non-unit) projections.
        max_positions: Keep at most this many positions, evenly spaced: bounds memory.
        average: Any of ``"samples"``, ``"positions"``, ``"layers"``.
        layer_norm: Apply a LayerNorm without parameters to each vector (after averaging).
        unit: Scale each vector to unit length (after the LayerNorm).
        dtype: Storage dtype. ``torch.float16`` halves memory for large captures (values above
            65504 are refused); reductions and projections compute in float32 or float64.
        batch_size: Windows per forward pass.
        progress: Show a progress bar over batches when there is more than one.
        norm_gain: Give ``ln1``/``ln2``/``ln_final`` after the norm's gain (and bias), as the
            paper's hooks on the norm modules do (default); ``False`` keeps TransformerLens's
            ``hook_normalized`` vectors, before the gain.

    Returns:
        A ``ComponentStates`` with ``activations[state batch pos d_model]``.

    Raises:
        ValueError: an unknown component or averaging axis, bad layers or positions, a cache
            missing a hook, or float16 storage of values that overflow it.

    Examples:
        >>> from tlmicroscope.models import tiny_model
        >>> comps = ("attn_out", "mlp_out")
        >>> st = capture_components(tiny_model(n_layers=2), "hello", components=comps)
        >>> tuple(st.activations.shape), st.state_labels()
        ((4, 1, 5, 32), ('b0.attn_out', 'b0.mlp_out', 'b1.attn_out', 'b1.mlp_out'))
        >>> capture_components(tiny_model(n_layers=2), "hello", average="samples", unit=True,
        ...                    components=("resid_post",)).activations.norm(dim=-1).round().unique()
        tensor([1.])
    """
    axes = _check_axes(average)
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
    if dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise ValueError(
            f"dtype must be a floating dtype (float32, float16, bfloat16), got {dtype}."
        )
    resolved = resolve_input(
        model_or_cache, tokens, prepend_bos=prepend_bos, truncate=truncate, require_tokens=False
    )
    model, cache, toks = resolved.model, resolved.cache, resolved.tokens
    n_layers = model.cfg.n_layers
    if components is None:
        components = COMPONENTS if cache is not None else default_components(model)
    plan = state_plan(components, layers, n_layers)
    settings = dict(
        components=list(components),
        layers=None if layers is None else list(layers),
        drop_first=drop_first,
        max_positions=max_positions,
        average=list(axes),
        layer_norm=layer_norm,
        unit=unit,
        dtype=str(dtype).replace("torch.", ""),
        norm_gain=norm_gain,
    )
    affines = _norm_affines(model, plan) if norm_gain else {}
    if cache is not None:
        raw = _from_cache(cache, plan)
        for i, affine in affines.items():
            raw[i] = _apply_affine(raw[i], affine)
        n_pos = raw.shape[2]
    else:
        n_pos = toks.shape[-1]
    pos_idx = _select_positions(n_pos, positions, drop_first, max_positions)
    if cache is not None:
        acts = raw.index_select(2, pos_idx)
        n_batch = acts.shape[1]
        if "positions" in axes:
            acts = acts.mean(2, keepdim=True)
        if "samples" in axes:
            acts = acts.mean(1, keepdim=True)
    else:
        acts, n_batch = _capture_streamed(
            model, toks, plan, pos_idx, axes, dtype, batch_size, progress, affines=affines
        )
    if acts.dtype != dtype:
        acts = _to_storage(acts, dtype)
    # Averaged samples or positions have no tokens of their own (and the states' shapes would no
    # longer match the tokens').
    pooled = "samples" in axes or "positions" in axes
    kept_tokens = None if toks is None or pooled else toks[:, pos_idx.to(toks.device)].cpu()
    states = ComponentStates(
        activations=acts,
        components=tuple(s.component for s in plan),
        layers=tuple(s.layer for s in plan),
        hook_names=tuple(s.hook for s in plan),
        tokens=kept_tokens,
        str_tokens=None if kept_tokens is None else token_strings(model, kept_tokens),
        positions=None if "positions" in axes else pos_idx.clone(),
        n_layers=n_layers,
        averaged=tuple(a for a in axes if a != "layers"),
        provenance=Provenance.from_model(model, n_sequences=n_batch, **settings),
    )
    if "layers" in axes:
        states = states.mean("layers")
    if layer_norm or unit:
        states = states.normalized(layer_norm=layer_norm, unit=unit)
    return states


def _to_storage(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if dtype == torch.float16:
        peak = float(x.abs().max()) if x.numel() else 0.0
        if not math.isfinite(peak) or peak > _FP16_MAX:
            raise ValueError(
                f"An activation of magnitude {peak:.3g} does not fit in float16 (max 65504). "
                "Capture with dtype=torch.bfloat16 or torch.float32."
            )
    return x.to(dtype)


def _cache_name(cache: Any, hook: str) -> str | None:
    """The cache entry holding ``hook``'s activation: the hook itself, or for
    ``blocks.{l}.hook_resid_post`` the identical ``blocks.{l+1}.hook_resid_pre`` (a cache of the
    residual stream h^0..h^L holds only the latter for every block but the last)."""
    if hook in cache:
        return hook
    m = re.fullmatch(r"blocks\.(\d+)\.hook_resid_post", hook)
    if m is not None:
        alias = f"blocks.{int(m.group(1)) + 1}.hook_resid_pre"
        if alias in cache:
            return alias
    return None


def _from_cache(cache: Any, plan: Sequence[_State]) -> torch.Tensor:
    names = [_cache_name(cache, s.hook) for s in plan]
    missing = [s.hook for s, n in zip(plan, names) if n is None]
    if missing:
        raise ValueError(
            f"The ActivationCache lacks {len(missing)} of the requested hooks, e.g. {missing[:3]}. "
            "Run model.run_with_cache(tokens, names_filter=[...]) with those names, or pass the "
            "model."
        )
    return torch.stack([cache[n].detach() for n in names]).float().cpu()


def _capture_streamed(
    model: Any,
    toks: torch.Tensor,
    plan: Sequence[_State],
    pos_idx: torch.Tensor,
    axes: tuple[str, ...],
    dtype: torch.dtype,
    batch_size: int,
    progress: bool,
    affines: dict[int, tuple[torch.Tensor, torch.Tensor | None]] | None = None,
) -> tuple[torch.Tensor, int]:
    from tqdm.auto import tqdm

    n_batch = toks.shape[0]
    n_pos = 1 if "positions" in axes else pos_idx.numel()
    out_b = 1 if "samples" in axes else n_batch
    summed = "samples" in axes
    # Sums accumulate in float32 whatever the storage dtype; copies go straight to storage.
    buf_dtype = torch.float32 if summed else dtype
    # Allocated here, outside the forward's inference mode, so it can be updated in place later.
    alloc = torch.zeros if summed else torch.empty  # every copied slot gets written
    buf = alloc((len(plan), out_b, n_pos, int(model.cfg.d_model)), dtype=buf_dtype)
    all_pos = pos_idx.numel() == toks.shape[-1] and bool(
        (pos_idx == torch.arange(toks.shape[-1])).all()
    )
    stream_pos = None if all_pos else pos_idx
    starts = range(0, n_batch, batch_size)
    bar = tqdm(starts, desc="capturing", unit="batch", disable=not progress or len(starts) < 2)
    for start in bar:
        chunk = toks[start : start + batch_size]

        def on_state(i: int, act: torch.Tensor, start: int = start) -> None:
            a = act.detach()
            if affines and i in affines:
                a = _apply_affine(a, affines[i])
            if "positions" in axes:
                a = a.float().mean(1, keepdim=True)
            if summed:
                buf[i, 0] += a.float().sum(0).cpu()
            else:
                if dtype == torch.float16 and a.abs().max() > _FP16_MAX:
                    raise ValueError(
                        f"An activation at {plan[i].hook} exceeds float16's range (65504). "
                        "Capture with dtype=torch.bfloat16 or torch.float32."
                    )
                buf[i, start : start + a.shape[0]] = a.to("cpu", buf_dtype)

        stream_states(model, chunk, plan, on_state, positions=stream_pos)
    if summed:
        buf /= n_batch
    return buf, n_batch
