"""``component_lens``: the direct effect of every attention head and every MLP on chosen tokens'
logits.

The final residual is a sum:
``h_L = resid_pre_0 + sum_l (sum_h z_lh W_O[l,h] + b_O[l] + mlp_out_l)``.
The readout is ``finish(scale(h_L) * centre(h_L) . W[:, t] + b[t])``, with ``W`` the unembedding
with the final norm's gain (and any logit scale) folded in, ``centre`` the LayerNorm's mean
removal (absent for RMSNorm) and ``scale`` its ``1/rms`` (Readout). Freezing ``scale`` at its value
for the whole final residual makes the readout linear in the pieces, so each piece has an exact
share of the logit and the shares plus ``b[t]`` add up to it. A head's share needs no
``[batch pos head d_model]`` tensor: it is ``scale * z_lh . (W_O[l,h] @ centre(W[:, t]))``.

Nothing assumes folded weights: the final norm's gain and bias are read from the model as it is,
and the sum is checked at run time against the model's own logits (and the pieces against
``hook_attn_out`` and the final residual). For models with a final-logit soft cap (Gemma 2) the
shares add up to the logit *before* the cap (after any logit scale); the model's logit is
``cap * tanh(sum / cap)``, checked as such. Families whose attention output is normalised again
(Gemma 2/3's post-attention norm) have no per-head linear split: use ``heads=False`` (per block).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from jaxtyping import Float, Int

from tlmicroscope.inputs import TextOrTokens, resolve_input
from tlmicroscope.layers import (
    LayerLabels,
    block_label,
    layer_labels,
    site,
    str_tokens,
)
from tlmicroscope.lenses._target_ids import resolve_targets
from tlmicroscope.lenses.readout import Readout, check_readout_identity
from tlmicroscope.results import Provenance
from tlmicroscope.vocab import token_strings

__all__ = ["ComponentLens", "component_lens"]


@dataclass(frozen=True)
class ComponentLens:
    """Direct logit contributions of embeddings, heads, attention biases and MLPs, per target.

    Attributes:
        heads: ``[layer head batch pos target]`` each head's share of the target's logit (NaN
            with ``heads=False``).
        attn: ``[layer batch pos target]`` each block's whole attention output (heads + bias).
        attn_bias: ``[layer batch pos target]`` the attention output bias's share.
        mlp: ``[layer batch pos target]`` each MLP output's share (its bias included).
        embed: ``[batch pos target]`` the embeddings' share (``blocks.0.hook_resid_pre``, with
            positional embeddings when the model has them; ``pos_embed`` splits those out).
        bias: ``[batch pos target]`` the unembedding's (and final norm's) bias.
        logit: ``[batch pos target]`` the sum of every share: the pre-transform logit (after any
            logit scale, before a soft cap), ``logit_space`` says which.
        model_logit: The model's own logit of the target (after its output transform).
        target_ids: ``[batch pos target]`` token read; ``target_names`` one label per target.
        max_residual_error, max_logit_error: The run-time identity checks' largest differences.
    """

    heads: Float[torch.Tensor, "layer head batch pos target"]
    attn: Float[torch.Tensor, "layer batch pos target"]
    attn_bias: Float[torch.Tensor, "layer batch pos target"]
    mlp: Float[torch.Tensor, "layer batch pos target"]
    embed: Float[torch.Tensor, "batch pos target"]
    pos_embed: Float[torch.Tensor, "batch pos target"] | None
    bias: Float[torch.Tensor, "batch pos target"]
    logit: Float[torch.Tensor, "batch pos target"]
    model_logit: Float[torch.Tensor, "batch pos target"] | None
    target_ids: Int[torch.Tensor, "batch pos target"]
    target_names: tuple[str, ...]
    target_strings: np.ndarray
    tokens: Int[torch.Tensor, "batch pos"]
    str_tokens: tuple[tuple[str, ...], ...]
    n_layers: int
    n_heads: int
    logit_space: str
    per_head: bool
    max_residual_error: float
    max_logit_error: float | None
    provenance: Provenance

    @property
    def layer_labels(self) -> LayerLabels:
        """One label per block of the ``layer`` axis: ``"b0"``..``"b{n_layers-1}"``."""
        return layer_labels(block_label(i) for i in range(self.n_layers))

    def _check_head(self, layer: int, head: int) -> None:
        if not 0 <= int(layer) < self.n_layers:
            raise ValueError(
                f"Layer {layer} is out of range: valid layers are 0..{self.n_layers - 1}."
            )
        if not 0 <= int(head) < self.n_heads:
            raise ValueError(
                f"Head {head} is out of range: this model has {self.n_heads} heads per layer, "
                f"valid heads are 0..{self.n_heads - 1}."
            )

    def head(self, layer: int, head: int) -> Float[torch.Tensor, "batch pos target"]:
        """One head's share ``[batch pos target]``; an index out of range names the valid range."""
        self._check_head(layer, head)
        if not self.per_head:
            raise ValueError(
                "This result was computed with heads=False (per block); rerun with heads=True."
            )
        return self.heads[int(layer), int(head)]

    def head_map(
        self, *, batch: int = 0, pos: int = -1, target: int = 0
    ) -> Float[torch.Tensor, "layer head"]:
        """The ``[layer head]`` map of one position's target logit shares (for heatmaps)."""
        n_pos = self.tokens.shape[1]
        if not -n_pos <= pos < n_pos:
            raise ValueError(f"pos {pos} is out of range for {n_pos} positions.")
        if not 0 <= target < len(self.target_names):
            raise ValueError(
                f"target {target} is out of range: valid targets are "
                f"0..{len(self.target_names) - 1}."
            )
        return self.heads[:, :, batch, pos, target]

    def to_dataframe(self, *, batch: int = 0, pos: int = -1):
        """Long format: one row per (component, target) at one position."""
        import pandas as pd

        rows = []
        for t, name in enumerate(self.target_names):

            def add(label: str, layer: Any, head: Any, v: torch.Tensor, t=t, name=name) -> None:
                rows.append(
                    {
                        "component": label,
                        "layer": layer,
                        "head": head,
                        "target": name,
                        "logit_share": float(v[batch, pos, t]),
                    }
                )

            add("embed", None, None, self.embed)
            if self.pos_embed is not None:
                add("pos_embed", None, None, self.pos_embed)
            for layer in range(self.n_layers):
                if self.per_head:
                    for h in range(self.n_heads):
                        add(f"L{layer}H{h}", layer, h, self.heads[layer, h])
                    add(f"{block_label(layer)}.attn_bias", layer, None, self.attn_bias[layer])
                else:
                    add(site("attn_out", layer).label, layer, None, self.attn[layer])
                add(site("mlp_out", layer).label, layer, None, self.mlp[layer])
            add("unembed bias", None, None, self.bias)
        return pd.DataFrame(rows)


def _str_tokens(model: Any, toks: torch.Tensor) -> tuple[tuple[str, ...], ...]:
    return str_tokens(model, toks)


def _hook_names(model: Any, per_head: bool, has_pos: bool) -> list[str]:
    n = int(model.cfg.n_layers)
    names = ["blocks.0.hook_resid_pre", f"blocks.{n - 1}.hook_resid_post"] + (
        ["hook_pos_embed"] if has_pos else []
    )
    for layer in range(n):
        names += [f"blocks.{layer}.hook_attn_out", f"blocks.{layer}.hook_mlp_out"]
        if per_head:
            names.append(f"blocks.{layer}.attn.hook_z")
    return names


def _target_ids(
    model: Any,
    targets: Any,
    toks: torch.Tensor,
    logits: torch.Tensor | None,
    h_final: torch.Tensor,
    readout: Readout,
) -> tuple[torch.Tensor, tuple[str, ...]]:
    B, P = toks.shape
    if isinstance(targets, str) and targets in ("predicted", "next"):
        if targets == "predicted":
            z = logits if logits is not None else readout(h_final)
            ids = z.argmax(-1)
        else:
            ids = torch.zeros_like(toks)
            ids[:, :-1] = toks[:, 1:]
            ids[:, -1] = -1
        return ids.unsqueeze(-1), (targets,)
    resolved = resolve_targets(model, targets, per_row=False)
    if resolved.mask.sum(-1).max() > 1:
        raise ValueError(
            "A set of tokens has no single logit to split (probabilities add, logits do not); "
            "pass the tokens as separate targets."
        )
    ids = resolved.ids[0, :, 0].to(toks.device)
    return ids.expand(B, P, -1).clone(), resolved.names


def _component_cache(
    model: Any, cache: Any, toks: torch.Tensor, names: list[str], logits: torch.Tensor | None
) -> tuple[torch.Tensor | None, Any]:
    """The model's logits and a cache of ``names``: run the model, or check the cache given."""
    if cache is None:
        return model.run_with_cache(toks, names_filter=names)
    lacking = [x for x in names if x not in cache]
    if lacking:
        raise ValueError(
            f"The ActivationCache lacks {lacking[:3]} (and {max(0, len(lacking) - 3)} more); "
            f"run model.run_with_cache(tokens, names_filter=[...]) with all of {names[:4]}..., "
            "or pass the model."
        )
    return logits, cache


def _head_shares(
    model: Any,
    cache: Any,
    layer: int,
    attn_out: torch.Tensor,
    u: torch.Tensor,
    scale: torch.Tensor,
    rtol: float,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Block ``layer``'s per-head shares ``[head B P T]``, its output bias and the split's gap.

    The heads' sum must be ``hook_attn_out`` (no post-attention norm), or the split is not exact.
    """
    z = cache[f"blocks.{layer}.attn.hook_z"].float()  # [B P H d_head]
    W_O = model.blocks[layer].attn.W_O.detach().float()  # [H d_head d_model]
    b_O = getattr(model.blocks[layer].attn, "b_O", None)
    b_vec = b_O.detach().float() if b_O is not None else torch.zeros(W_O.shape[-1], device=z.device)
    rebuilt = torch.einsum("bphe,hed->bpd", z, W_O) + b_vec
    gap = float((rebuilt - attn_out).abs().max()) / max(1.0, float(attn_out.abs().max()))
    if not gap <= rtol:
        raise ValueError(
            f"Block {layer}'s heads do not add up to its hook_attn_out (relative gap {gap:.3g}): "
            "its attention output is transformed after W_O (a post-attention norm, as Gemma 2/3 "
            "have), so per-head direct effects are not linear shares of it. Use heads=False for "
            "per-block shares."
        )
    v_t = torch.einsum("hed,bptd->bpthe", W_O, u)  # W_O[h] @ centre(w_t)
    return torch.einsum("bphe,bpthe->hbpt", z * scale.unsqueeze(-1), v_t), b_vec, gap


def _final_residual(
    cache: Any, toks: torch.Tensor, logits: torch.Tensor | None, readout: Readout, n: int
) -> tuple[torch.Tensor, float | None]:
    """h^L (float32) from the cache, checked against the tokens, and the readout identity's
    largest difference on the last rows (``None`` without logits)."""
    h_final = cache[f"blocks.{n - 1}.hook_resid_post"].float()
    B, P = toks.shape
    if tuple(h_final.shape[:2]) != (B, P):
        raise ValueError(
            f"Cache activations {tuple(h_final.shape[:2])} do not match the tokens {(B, P)}."
        )
    if logits is None:
        return h_final, None
    diff = check_readout_identity(
        readout, h_final.reshape(B * P, -1)[-8:], logits.reshape(B * P, -1)[-8:]
    )
    return h_final, diff


def _frozen_readout(
    readout: Readout, h_final: torch.Tensor, safe: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(scale, u, b)``: the final norm's scale of h^L ``[B P 1]`` (frozen for every piece), the
    targets' unembedding columns ``[B P T d_model]`` (centred for a LayerNorm, since
    ``centre(v) . w == v . centre(w)``) and the readout's bias."""
    B, P, T = safe.shape
    centred = readout.kind == "LN"

    def centre(v: torch.Tensor) -> torch.Tensor:
        return v - v.mean(-1, keepdim=True) if centred else v

    hc = centre(h_final)
    scale = (
        torch.rsqrt(hc.pow(2).mean(-1, keepdim=True) + readout.eps)
        if readout.kind is not None
        else torch.ones_like(hc[..., :1])
    )
    W, b = readout.weights(readout.kind is not None)
    W_t = W.float()[:, safe.reshape(-1)].T.reshape(B, P, T, -1)
    return scale, centre(W_t), b


def _block_shares(
    model: Any,
    cache: Any,
    share: Any,
    u: torch.Tensor,
    scale: torch.Tensor,
    heads: bool,
    rtol: float,
    shape: tuple[int, int, int],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float, float]:
    """Every block's attention, attention-bias, MLP and per-head shares ``[layer (head) B P T]``,
    the worst head-split gap, and the check that the pieces rebuild h^L (its relative gap)."""
    n, n_heads = int(model.cfg.n_layers), int(model.cfg.n_heads)
    h_final = cache[f"blocks.{n - 1}.hook_resid_post"].float()
    dev = h_final.device
    total_vec = cache["blocks.0.hook_resid_pre"].float().clone()
    attn = torch.empty(n, *shape, device=dev)
    attn_bias = torch.zeros(n, *shape, device=dev)
    mlp = torch.empty(n, *shape, device=dev)
    head_sh = torch.full((n, n_heads, *shape), float("nan"), device=dev)
    worst_attn = 0.0
    for layer in range(n):
        attn_out = cache[f"blocks.{layer}.hook_attn_out"].float()
        mlp_out = cache[f"blocks.{layer}.hook_mlp_out"].float()
        total_vec += attn_out + mlp_out
        mlp[layer] = share(mlp_out)
        attn[layer] = share(attn_out)
        if not heads:
            continue
        head_sh[layer], b_vec, gap = _head_shares(model, cache, layer, attn_out, u, scale, rtol)
        worst_attn = max(worst_attn, gap)
        attn_bias[layer] = share(b_vec.expand(*shape[:2], -1))
    res_gap = float((total_vec - h_final).abs().max()) / max(1.0, float(h_final.abs().max()))
    if not res_gap <= rtol:
        raise ValueError(
            f"The embeddings and every attn_out/mlp_out miss the final residual by a relative "
            f"{res_gap:.3g}: this model's residual stream has another term, so direct effects "
            "do not decompose it."
        )
    return attn, attn_bias, mlp, head_sh, worst_attn, res_gap


def _check_logit_sum(
    readout: Readout,
    total: torch.Tensor,
    logits: torch.Tensor | None,
    safe: torch.Tensor,
    valid: torch.Tensor,
    rtol: float,
) -> tuple[torch.Tensor | None, float | None]:
    """The model's logit of each target and how far the shares' sum is from it (``None``s
    without logits); raises when the shares miss it."""
    if logits is None:
        return None, None
    model_logit = logits.float().gather(-1, safe)
    ours = readout.finish(total.clone())
    logit_gap = float((ours - model_logit)[valid].abs().max()) if bool(valid.any()) else 0.0
    if not logit_gap <= rtol * max(1.0, float(model_logit.abs().max())) + 1e-4:
        raise ValueError(
            f"The shares add up to a logit {logit_gap:.3g} away from the model's: the model "
            f"computes something this decomposition lacks ({readout.describe()})."
        )
    return model_logit, logit_gap


def _logit_space(readout: Readout) -> str:
    """What the shares add up to: the logit, or the pre-soft-cap logit, with any scale in it."""
    space = (
        "pre-softcap logit (cap * tanh(logit / cap) is the model's)"
        if readout.softcap is not None
        else "logit"
    )
    if readout.scale != 1.0:
        space += f", logit scale {readout.scale:g} included"
    return space


def component_lens(
    model_or_cache: Any,
    tokens: TextOrTokens | None = None,
    *,
    targets: Any = "predicted",
    heads: bool = True,
    logits: torch.Tensor | None = None,
    prepend_bos: bool | None = None,
    truncate: bool = False,
    rtol: float = 1e-3,
) -> ComponentLens:
    """Split chosen tokens' logits into the direct effect of every head, MLP, embedding and bias.

    Args:
        model_or_cache: A model, or an ``ActivationCache`` holding ``blocks.0.hook_resid_pre``,
            the last ``hook_resid_post``, every ``hook_attn_out``, ``hook_mlp_out`` and (per head)
            ``attn.hook_z``, and ``hook_pos_embed`` for learned positions; pass ``tokens`` too.
        targets: ``"predicted"`` (each position's top-1 token), ``"next"`` (the next token; none
            at the last position) or tokens to split (a string, an id or a list of them).
        heads: Split each attention output into heads (``False``: per block, for families whose
            attention output is normalised again, e.g. Gemma's post-attention norm).
        logits: With a cache, the model's logits, so the sum is checked against them.
        rtol: Relative tolerance of the run-time identity checks.

    Returns:
        A ``ComponentLens``.

    Raises:
        ValueError: a cache missing a hook, an empty target list, a target outside the
            vocabulary, or pieces that do not add up (the message says which identity failed).

    Examples:
        >>> from tlmicroscope.models import tiny_model
        >>> model = tiny_model("gpt2", n_layers=2)
        >>> cl = component_lens(model, "hello", targets=["o", "x"])
        >>> tuple(cl.heads.shape)  # layer head batch pos target
        (2, 4, 1, 5, 2)
        >>> parts = (cl.embed + cl.pos_embed + cl.heads.sum(1).sum(0) + cl.attn_bias.sum(0)
        ...          + cl.mlp.sum(0)
        ...          + cl.bias)
        >>> bool(torch.allclose(parts, cl.model_logit, atol=1e-4))
        True
        >>> cl.head(1, 4)
        Traceback (most recent call last):
        ...
        ValueError: Head 4 is out of range: this model has 4 heads per layer, valid heads are 0..3.
    """
    resolved = resolve_input(model_or_cache, tokens, prepend_bos=prepend_bos, truncate=truncate)
    model, cache, toks = resolved.model, resolved.cache, resolved.tokens
    n = int(model.cfg.n_layers)
    n_heads = int(model.cfg.n_heads)
    has_pos = getattr(model.cfg, "positional_embedding_type", "standard") == "standard"
    if not (isinstance(targets, str) and targets in ("predicted", "next")):
        resolve_targets(model, targets)  # bad targets fail before the forward pass
    names = _hook_names(model, bool(heads), has_pos)
    with torch.inference_mode():
        logits, cache = _component_cache(model, cache, toks, names, logits)
        readout = Readout.for_model(model)
        h_final, identity_diff = _final_residual(cache, toks, logits, readout, n)
        B, P = toks.shape
        ids, target_names = _target_ids(model, targets, toks, logits, h_final, readout)
        valid = ids >= 0
        safe = ids.clamp_min(0)
        T = ids.shape[-1]

        scale, u, b = _frozen_readout(readout, h_final, safe)

        def share(v: torch.Tensor) -> torch.Tensor:  # [B P d_model] -> [B P T]
            return torch.einsum("bpd,bptd->bpt", v.float() * scale, u)

        resid0 = cache["blocks.0.hook_resid_pre"].float()
        pos = cache["hook_pos_embed"].float() if has_pos else None
        embed = share(resid0 - pos) if pos is not None else share(resid0)
        pos_share = share(pos) if pos is not None else None
        attn, attn_bias, mlp, head_sh, worst_attn, res_gap = _block_shares(
            model, cache, share, u, scale, bool(heads), rtol, (B, P, T)
        )
        bias = b.float()[safe] if b is not None else torch.zeros(B, P, T, device=h_final.device)
        total = (
            embed + (pos_share if pos_share is not None else 0) + attn.sum(0) + mlp.sum(0) + bias
        )
        if heads:
            parts = head_sh.sum(1) + attn_bias
            gap = float((parts - attn).abs().max()) / max(1.0, float(attn.abs().max()))
            worst_attn = max(worst_attn, gap)
        model_logit, logit_gap = _check_logit_sum(readout, total, logits, safe, valid, rtol)
    nan = float("nan")
    inv = ~valid
    space = _logit_space(readout)
    prov = Provenance.from_model(
        model,
        targets=list(target_names),
        heads=bool(heads),
        final_norm="frozen scale of the final residual",
        logit_space=space,
        readout_identity_max_abs_diff=identity_diff,
        max_residual_error=res_gap,
        max_attn_split_error=worst_attn,
        max_logit_error=logit_gap,
    )

    def out(t: torch.Tensor) -> torch.Tensor:
        return t.masked_fill(inv, nan).cpu()

    return ComponentLens(
        heads=head_sh.masked_fill(inv, nan).cpu(),
        attn=out(attn),
        attn_bias=out(attn_bias),
        mlp=out(mlp),
        embed=out(embed),
        pos_embed=None if pos_share is None else out(pos_share),
        bias=out(bias),
        logit=out(total),
        model_logit=None if model_logit is None else out(model_logit),
        target_ids=ids.cpu(),
        target_names=tuple(target_names),
        target_strings=token_strings(model, safe.cpu()),
        tokens=toks.cpu(),
        str_tokens=_str_tokens(model, toks),
        n_layers=n,
        n_heads=n_heads,
        logit_space=space,
        per_head=bool(heads),
        max_residual_error=res_gap,
        max_logit_error=logit_gap,
        provenance=prov,
    )
