"""``layer_geometry``: the token cloud of one prompt at every layer, from one forward pass.

For each residual-stream layer h^0..h^L (the paper's HF ``hidden_states``: ``hook_resid_pre`` of
each block, then the last block's ``hook_resid_post``, by default passed through the model's final
norm as Hugging Face's last hidden state is) it records

* the intrinsic dimension by GRIDE at range scalings 2, 4, ... and by TwoNN,
* the neighbourhood overlap chi_k with the next layer for k = 1..6,
* the mean cosine similarity between tokens, with and without the diagonal,

and, for the prompt, the intrinsic dimension of the logits (GRIDE), the contextual entropy (mean
softmax entropy) and the mean next-token cross-entropy (the loss).

Each layer is reduced inside its hook as the forward pass runs, so a long prompt never holds
more than two layers' activations; only the residual hooks are attached. The logits' cloud
``z_i = W^T n_i + b`` (n_i the normalised last residual, W the unembedding with the norm weight
folded in) is measured through coordinates ``y_i = n_i C`` with ``C C^T = W W^T``, which have the
same pairwise distances as the ``[N d_vocab]`` logits at ``d_model`` cost.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float, Int

from tlmicroscope.capture import capture, stream
from tlmicroscope.geometry.cosine import cosine_similarity
from tlmicroscope.geometry.intrinsic_dimension import (
    gride_from_distances,
    gride_scales,
    remove_duplicates,
    twonn_from_distances,
)
from tlmicroscope.geometry.neighbours import as_points, nearest_neighbours, overlap_from_indices
from tlmicroscope.inputs import TextOrTokens, resolve_input
from tlmicroscope.layers import residual_labels
from tlmicroscope.lenses.readout import Readout
from tlmicroscope.models import access
from tlmicroscope.results import Provenance

__all__ = ["LayerGeometry", "cloud_geometry", "layer_geometry", "min_tokens"]

_NAN = float("nan")


@dataclass(frozen=True)
class LayerGeometry:
    """Token-cloud geometry of one prompt at every layer.

    Attributes:
        layers: Residual indices 0..L (0 = embeddings, L = the output residual).
        layer_labels: ``"h0"`` (the embeddings), ``"h1"``, ..., and ``"hL·norm"`` when the final
            norm was applied (``tlmicroscope.layers``).
        gride: ``[layer scale]`` GRIDE intrinsic dimension at each range scaling (NaN where a
            layer has too few distinct token vectors for that scale).
        gride_error: ``[layer scale]`` its Cramér-Rao error.
        gride_scales: The range scalings n2.
        twonn: ``[layer]`` TwoNN estimate (``twonn_variant``).
        twonn_variant: ``"base"``, ``"ml"`` or ``"microscope"``.
        overlap: ``[layer_pair k]`` chi_k between layer l and l+1 (row l), l = 0..L-1.
        overlap_k: The neighbourhood sizes k.
        cosine: ``[layer]`` mean cosine similarity between distinct tokens.
        cosine_with_diagonal: ``[layer]`` the paper's mean over all N^2 entries.
        n_unique: ``[layer]`` distinct token vectors (the ID is computed on these).
        logits_gride, logits_gride_error: ``[scale]`` GRIDE of the logits' cloud (``None`` if
            not computed).
        contextual_entropy: Mean softmax entropy of the model's predictions (nats).
        loss: Mean next-token cross-entropy over the N - 1 predictions (nats); NaN without targets.
        n_tokens: N.
        tokens: The ``[pos]`` token ids.
        provenance: Model, weight processing and the estimator settings.
    """

    layers: tuple[int, ...]
    layer_labels: tuple[str, ...]
    gride: Float[torch.Tensor, "layer scale"]
    gride_error: Float[torch.Tensor, "layer scale"]
    gride_scales: tuple[int, ...]
    twonn: Float[torch.Tensor, " layer"]
    twonn_variant: str
    overlap: Float[torch.Tensor, "layer_pair k"]
    overlap_k: tuple[int, ...]
    cosine: Float[torch.Tensor, " layer"]
    cosine_with_diagonal: Float[torch.Tensor, " layer"]
    n_unique: Int[torch.Tensor, " layer"]
    logits_gride: Float[torch.Tensor, " scale"] | None
    logits_gride_error: Float[torch.Tensor, " scale"] | None
    contextual_entropy: float
    loss: float
    n_tokens: int
    tokens: Int[torch.Tensor, " pos"] | None
    provenance: Provenance

    def id(self, scale: int = 2) -> Float[torch.Tensor, " layer"]:
        """GRIDE intrinsic dimension per layer at range scaling ``scale`` (the paper's main: 2)."""
        if scale not in self.gride_scales:
            raise ValueError(f"Scale {scale} was not estimated; scales are {self.gride_scales}.")
        return self.gride[:, self.gride_scales.index(scale)]

    def overlap_at(self, k: int = 2) -> Float[torch.Tensor, " layer_pair"]:
        if k not in self.overlap_k:
            raise ValueError(f"k={k} was not computed; k values are {self.overlap_k}.")
        return self.overlap[:, self.overlap_k.index(k)]

    def peak_layer(self, scale: int = 2, *, skip_embedding: bool = True) -> int:
        """The layer with the largest ID (the embedding layer is skipped, as in the paper)."""
        ids = self.id(scale).clone()
        if skip_embedding:
            ids[0] = -math.inf
        return self.layers[int(torch.nan_to_num(ids, nan=-math.inf).argmax())]

    def to_record(self) -> dict[str, Any]:
        """A JSON-ready dict of every number (what ``geometry_sweep`` writes per prompt)."""

        def lst(t):
            return None if t is None else t.tolist()

        return {
            "n_tokens": self.n_tokens,
            "loss": self.loss,
            "contextual_entropy": self.contextual_entropy,
            "layers": list(self.layers),
            "gride_scales": list(self.gride_scales),
            "gride": lst(self.gride),
            "gride_error": lst(self.gride_error),
            "twonn": lst(self.twonn),
            "twonn_variant": self.twonn_variant,
            "overlap_k": list(self.overlap_k),
            "overlap": lst(self.overlap),
            "cosine": lst(self.cosine),
            "cosine_with_diagonal": lst(self.cosine_with_diagonal),
            "n_unique": lst(self.n_unique),
            "logits_gride": lst(self.logits_gride),
            "logits_gride_error": lst(self.logits_gride_error),
        }

    def to_dataframe(self):
        """One row per layer: ID at every scale, TwoNN, overlap with the next layer, cosine."""
        import pandas as pd

        rows = []
        for li, layer in enumerate(self.layers):
            row = {
                "layer": layer,
                "label": self.layer_labels[li],
                "n_unique": int(self.n_unique[li]),
            }
            row.update(
                {f"gride_{s}": float(self.gride[li, j]) for j, s in enumerate(self.gride_scales)}
            )
            row["twonn"] = float(self.twonn[li])
            for j, k in enumerate(self.overlap_k):
                row[f"overlap_{k}"] = (
                    float(self.overlap[li, j]) if li < len(self.layers) - 1 else _NAN
                )
            row["cosine"] = float(self.cosine[li])
            row["cosine_with_diagonal"] = float(self.cosine_with_diagonal[li])
            rows.append(row)
        return pd.DataFrame(rows)


@dataclass
class _CloudStats:
    gride: torch.Tensor
    gride_error: torch.Tensor
    twonn: float
    n_unique: int
    first_k: torch.Tensor | None
    cosine: Any


def cloud_geometry(
    points,
    scales: Sequence[int],
    *,
    overlap_k: int = 6,
    twonn_variant: str = "base",
    fraction: float = 0.9,
    with_cosine: bool = True,
) -> _CloudStats:
    """ID (GRIDE at ``scales`` and TwoNN), the first ``overlap_k`` neighbours and the cosine of one
    cloud, sharing one neighbour search where the cloud has no duplicates.

    The ID is computed on the distinct vectors; scales needing more distinct points than there
    are give NaN. The neighbours (for the overlap) are those of all tokens, duplicates included.
    """
    x = as_points(points)
    unique, _, n_dup = remove_duplicates(x)
    n = unique.shape[0]
    if n < 3:
        raise ValueError(
            f"This layer has {n} distinct token vectors among {x.shape[0]} tokens; the intrinsic "
            "dimension needs at least 3. Use a longer or more varied prompt."
        )
    usable = [s for s in scales if s + 1 <= n]  # duplicates can leave too few points for a scale
    id_ranks = sorted({1, 2} | {r for s in usable for r in (s // 2, s)})
    first_k = None
    if n_dup == 0:
        nn = nearest_neighbours(
            x, ranks=sorted(set(id_ranks) | set(range(1, overlap_k + 1))), need_indices=overlap_k
        )
        if overlap_k:
            first_k = nn.first(overlap_k)
    else:
        nn = nearest_neighbours(unique, ranks=id_ranks, need_indices=False)
        if overlap_k:
            first_k = nearest_neighbours(x, overlap_k).indices
    if bool((nn.at(1) <= 0).any()):
        raise ValueError(
            "Distinct token vectors at zero distance (float64 underflow); rescale the activations."
        )
    ids = torch.full((len(scales),), _NAN, dtype=torch.float64)
    errors = ids.clone()
    if usable:
        got, err, _, _ = gride_from_distances(nn.distances, nn.ranks, usable)
        ids[: len(usable)], errors[: len(usable)] = got, err
    if twonn_variant == "microscope":
        centred = x - x.mean(0, keepdim=True)
        scale = float(torch.linalg.vector_norm(centred, dim=1).mean())
        r = nearest_neighbours(x, ranks=(1, 2), need_indices=False)
        twonn, _, _ = twonn_from_distances(r.at(1), r.at(2), variant="microscope", scale=scale)
    else:
        twonn, _, _ = twonn_from_distances(
            nn.at(1), nn.at(2), variant=twonn_variant, fraction=fraction
        )
    cos = cosine_similarity(x) if with_cosine else None
    return _CloudStats(ids, errors, twonn, n, first_k, cos)


_LOGIT_FRAMES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _logit_frame(model: Any, readout: Readout) -> torch.Tensor:
    """``C`` with ``C C^T = W W^T`` (float64), so ``|n_i C - n_j C| = |z_i - z_j|``; cached per
    model.
    """
    key = (readout.W.data_ptr(), tuple(readout.W.shape))
    hit = _LOGIT_FRAMES.get(model)
    if hit is not None and hit[0] == key:
        return hit[1]
    w = readout.W.detach().to(torch.float64)
    evals, evecs = torch.linalg.eigh(w @ w.T)
    frame = evecs * evals.clamp_min(0).sqrt()
    try:
        _LOGIT_FRAMES[model] = (key, frame)
    except TypeError:  # pragma: no cover - a model that cannot be weakly referenced
        pass
    return frame


def _final_normed(readout: Readout, model: Any, h: torch.Tensor) -> torch.Tensor:
    """The final norm with its weight and bias, as Hugging Face's last hidden state."""
    norm = access.final_norm(model)
    out = readout.normalize(h)
    if norm.weight is not None:
        out = out * norm.weight.to(out.dtype)
    if norm.bias is not None:
        out = out + norm.bias.to(out.dtype)
    return out


def _entropy_and_loss(z: torch.Tensor, tokens: torch.Tensor | None) -> tuple[float, float]:
    """Mean softmax entropy and mean next-token cross-entropy, float64, 128 rows at a time."""
    n = z.shape[0]
    ent, nll = 0.0, 0.0
    for s in range(0, n, 128):
        logp = torch.log_softmax(z[s : s + 128].to(torch.float64), -1)
        ent -= float((logp.exp() * logp).sum())
        if tokens is not None:
            rows = torch.arange(s, min(s + 128, n - 1), device=logp.device)
            tgt = tokens[rows + 1].to(logp.device)
            nll -= float(logp[rows - s].gather(1, tgt.unsqueeze(1)).sum())
    loss = nll / (n - 1) if tokens is not None and n > 1 else _NAN
    return ent / n, loss


def min_tokens(max_scale: int | None = None, overlap_k: Sequence[int] = (1, 2, 3, 4, 5, 6)) -> int:
    """The fewest tokens ``layer_geometry`` accepts with these settings.

    TwoNN and GRIDE at n2 = 2 need 3 points, GRIDE at ``max_scale`` needs ``max_scale + 1`` and
    the overlap at the largest k needs k + 1. (Every layer also needs 3 distinct token vectors;
    the paper's authors trust token-cloud IDs from about 500 tokens.)

    Examples:
        >>> min_tokens(), min_tokens(max_scale=16), min_tokens(overlap_k=(1, 2))
        (7, 17, 3)
    """
    ks = [int(k) for k in overlap_k]
    return max(3, max(ks, default=0) + 1, 0 if max_scale is None else int(max_scale) + 1)


def _stacked(
    stats: dict[int, _CloudStats],
    overlaps: dict[int, torch.Tensor],
    layers: Sequence[int],
    ks: Sequence[int],
) -> dict[str, torch.Tensor]:
    """The per-layer statistics as ``LayerGeometry``'s ``[layer ...]`` tensors."""
    n_pairs = len(layers) - 1
    nan_pairs = torch.full((len(ks),), _NAN, dtype=torch.float64)
    return {
        "gride": torch.stack([stats[i].gride for i in layers]),
        "gride_error": torch.stack([stats[i].gride_error for i in layers]),
        "twonn": torch.tensor([stats[i].twonn for i in layers], dtype=torch.float64),
        "overlap": torch.stack([overlaps.get(i, nan_pairs) for i in range(n_pairs)])
        if ks
        else torch.empty((n_pairs, 0), dtype=torch.float64),
        "cosine": torch.tensor([stats[i].cosine.mean for i in layers], dtype=torch.float64),
        "cosine_with_diagonal": torch.tensor(
            [stats[i].cosine.mean_with_diagonal for i in layers], dtype=torch.float64
        ),
        "n_unique": torch.tensor([stats[i].n_unique for i in layers]),
    }


def _prompt_length(
    model: Any, cache: Any, toks: torch.Tensor | None, kmax: int, max_scale: int | None
) -> int:
    """The prompt's number of tokens, refused when too short for the estimators asked for."""
    n_layers = model.cfg.n_layers
    if toks is not None:
        n_pos = int(toks.shape[1])
    else:
        if "blocks.0.hook_resid_pre" not in cache:
            raise ValueError(
                "The ActivationCache lacks blocks.0.hook_resid_pre. Run "
                "model.run_with_cache(tokens, names_filter=lambda n: n.endswith('hook_resid_pre') "
                f"or n == 'blocks.{n_layers - 1}.hook_resid_post') or pass the model."
            )
        n_pos = int(cache["blocks.0.hook_resid_pre"].shape[-2])
    if max_scale is not None and n_pos < int(max_scale) + 1:
        raise ValueError(
            f"GRIDE at scale {max_scale} needs at least {int(max_scale) + 1} tokens, but the "
            f"prompt has {n_pos}. Use a longer prompt (the paper uses 1024 tokens) or max_scale "
            f"<= {gride_scales(None, max(3, n_pos))[-1]}."
        )
    if n_pos < 3:
        raise ValueError(
            f"The intrinsic dimension needs a prompt of at least 3 tokens, got {n_pos}."
        )
    if n_pos < kmax + 1:
        raise ValueError(
            f"The neighbourhood overlap at k={kmax} needs at least {kmax + 1} tokens, but the "
            f"prompt has {n_pos}. Use a longer prompt or overlap_k up to {n_pos - 1}."
        )
    return n_pos


def _cached_output_logits(
    model: Any, cache: Any, output_logits: torch.Tensor | None, n_pos: int
) -> torch.Tensor | None:
    """With a cache, the cached run's ``[pos d_vocab]`` logits (checked), else ``None``."""
    if output_logits is None or cache is None:
        return None
    z_out = output_logits.detach()
    z_out = z_out[0] if z_out.ndim == 3 and z_out.shape[0] == 1 else z_out
    if z_out.ndim != 2 or tuple(z_out.shape) != (n_pos, model.cfg.d_vocab):
        raise ValueError(
            f"output_logits must be the [1 {n_pos} {model.cfg.d_vocab}] logits of the cached "
            f"run, got shape {tuple(output_logits.shape)}."
        )
    return z_out


def _logit_statistics(
    model: Any,
    readout: Readout,
    h_last: torch.Tensor,
    scales: Sequence[int],
    logits: bool,
    toks: torch.Tensor | None,
    model_logits: torch.Tensor | None,
    z_out: torch.Tensor | None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, float, float]:
    """GRIDE of the logits' cloud (with ``logits``), the contextual entropy and the loss."""
    logits_ids = logits_err = None
    entropy = loss = _NAN
    if logits:
        normed = readout.normalize(h_last.to(torch.float64))
        coords = normed @ _logit_frame(model, readout).to(normed.device)
        lst = cloud_geometry(coords, scales, overlap_k=0, with_cosine=False)
        logits_ids, logits_err = lst.gride, lst.gride_error
    if logits or (toks is not None and model_logits is not None):
        if model_logits is not None:
            z = model_logits[0]
        elif z_out is not None:
            z = z_out
        else:  # a cache holds no logits: read them out of the last residual
            z = readout(h_last.to(readout.W.dtype))
        entropy, loss = _entropy_and_loss(z, None if toks is None else toks[0])
        entropy = entropy if logits else _NAN
    return logits_ids, logits_err, entropy, loss


def layer_geometry(
    model_or_cache: Any,
    tokens: TextOrTokens | None = None,
    *,
    max_scale: int | None = None,
    overlap_k: Sequence[int] = (1, 2, 3, 4, 5, 6),
    twonn_variant: str = "base",
    fraction: float = 0.9,
    final_norm: bool = True,
    logits: bool = True,
    output_logits: Float[torch.Tensor, "batch pos d_vocab"] | None = None,
    prepend_bos: bool | None = False,
    truncate: bool = False,
) -> LayerGeometry:
    """Intrinsic dimension, neighbourhood overlap and cosine similarity of one prompt per layer.

    Args:
        model_or_cache: A TransformerLens model (run once with the residual hooks only), or an
            ``ActivationCache`` holding every ``blocks.{l}.hook_resid_pre`` and the last
            ``hook_resid_post``.
        tokens: One prompt: text or ``[pos]``/``[1 pos]`` ids. With a cache it supplies the
            targets for the loss (optional).
        max_scale: Largest GRIDE range scaling (a power of two); ``None`` goes to 256 or as far
            as the shortest layer's distinct tokens allow.
        overlap_k: Neighbourhood sizes for the overlap with the next layer.
        twonn_variant: ``"base"``, ``"ml"`` or ``"microscope"``.
        fraction: TwoNN "base" fit fraction.
        final_norm: Apply the model's final norm to the last layer, as Hugging Face's
            ``hidden_states[L]`` (the paper's setting); ``False`` keeps the raw residual.
        logits: Also compute the logits' ID and the contextual entropy.
        output_logits: With a cache, the model's logits from the same run (``[1 pos d_vocab]``
            or ``[pos d_vocab]``, e.g. what ``run_with_cache`` returned) for the contextual
            entropy and the loss; without them they are read out of the last residual.
            Ignored for a model input, whose own forward pass gives them.
        prepend_bos: BOS policy for text; the paper uses no BOS (default ``False``).
        truncate: Keep the first ``n_ctx`` tokens of a longer text.

    Raises:
        ValueError: a batch of several prompts, too few tokens for ``max_scale`` or the largest
            ``overlap_k`` (the message names the minimum; see ``min_tokens``), too few distinct
            token vectors in a layer, NaN activations, a cache missing a residual hook, or
            ``output_logits`` of the wrong shape.

    Examples:
        >>> from tlmicroscope.models import tiny_model
        >>> geo = layer_geometry(tiny_model(n_layers=2), "The cat sat on the mat. " * 4)
        >>> geo.layer_labels, geo.gride_scales
        (('h0', 'h1', 'h2·norm'), (2, 4, 8, 16, 32, 64))
        >>> tuple(geo.overlap.shape), tuple(geo.gride.shape)
        ((2, 6), (3, 6))
    """
    resolved = resolve_input(
        model_or_cache, tokens, prepend_bos=prepend_bos, truncate=truncate, require_tokens=False
    )
    model, cache, toks = resolved.model, resolved.cache, resolved.tokens
    if toks is not None and toks.shape[0] != 1:
        raise ValueError(
            f"layer_geometry measures one prompt's token cloud, got a batch of {toks.shape[0]}. "
            "Loop over the prompts, or use geometry_sweep for a corpus."
        )
    ks = tuple(sorted({int(k) for k in overlap_k}))
    if ks and ks[0] < 1:
        raise ValueError(f"overlap_k must hold positive sizes, got {tuple(overlap_k)}.")
    kmax = max(ks) if ks else 0
    n_layers = model.cfg.n_layers
    n_pos = _prompt_length(model, cache, toks, kmax, max_scale)
    z_out = _cached_output_logits(model, cache, output_logits, n_pos)
    scales = gride_scales(max_scale, n_pos)
    readout = Readout.for_model(model)
    stats: dict[int, _CloudStats] = {}
    overlaps: dict[int, torch.Tensor] = {}
    state: dict[str, Any] = {}

    def measure(layer: int, act: torch.Tensor) -> None:
        h = act[0].detach()
        if layer == n_layers:
            state["h_last"] = h
            if final_norm:
                h = _final_normed(readout, model, h.to(torch.float64))
        st = cloud_geometry(
            h, scales, overlap_k=kmax, twonn_variant=twonn_variant, fraction=fraction
        )
        if layer - 1 in stats and kmax:
            prev = stats[layer - 1].first_k
            overlaps[layer - 1] = overlap_from_indices(prev, st.first_k, ks).overlap
            stats[layer - 1].first_k = None
        stats[layer] = st

    model_logits = None
    if cache is not None:
        cap = capture(cache, sites=("resid",))
        for layer in range(n_layers + 1):
            measure(layer, cap["resid"][layer])
    else:
        model_logits = stream(
            model, toks, lambda site, layer, act: measure(layer, act), sites=("resid",)
        )
    n_tokens = int(state["h_last"].shape[0])
    logits_ids, logits_err, entropy, loss = _logit_statistics(
        model, readout, state["h_last"], scales, logits, toks, model_logits, z_out
    )
    layers = tuple(range(n_layers + 1))
    labels = residual_labels(n_layers, final_norm=final_norm)
    prov = Provenance.from_model(
        model,
        geometry="token cloud",
        max_scale=max(scales),
        twonn_variant=twonn_variant,
        final_norm=final_norm,
        prepend_bos=prepend_bos,
        overlap_k=list(ks),
    )
    return LayerGeometry(
        layers=layers,
        layer_labels=labels,
        gride_scales=tuple(scales),
        twonn_variant=twonn_variant,
        overlap_k=ks,
        **_stacked(stats, overlaps, layers, ks),
        logits_gride=logits_ids,
        logits_gride_error=logits_err,
        contextual_entropy=entropy,
        loss=loss,
        n_tokens=n_tokens,
        tokens=None if toks is None else toks[0].cpu(),
        provenance=prov,
    )
