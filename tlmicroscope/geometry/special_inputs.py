"""Special inputs of the latent-geometry paper: repeated-token sequences and every token fed alone.

* **Repeated tokens** (arXiv v1 of Ning and Rangaraju): BOS followed by one token many times. On
  LLaMA the mean intermediate norm stayed low for about 100 positions, then climbed to a BOS-like
  massive norm, and the states converged. ``repeated_token_sequence`` builds the input; measure it
  with ``norm_profile``, ``capture_components`` and ``project``.
* **Every token alone** (the reference's "singular" mode): each vocabulary id as a one-token
  sequence, which showed that most tokens get a massive norm when they come first.
  ``vocabulary_norms`` measures the norms in batches with a progress bar; ``vocabulary_states``
  keeps the vectors.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from jaxtyping import Float, Int

from tlmicroscope.geometry.components import (
    ComponentStates,
    capture_components,
    intermediate_layers,
)
from tlmicroscope.geometry.norms import norm_profile
from tlmicroscope.layers import LayerLabels, component_label, layer_labels
from tlmicroscope.results import Provenance
from tlmicroscope.vocab import token_strings

__all__ = [
    "VocabularyNorms",
    "repeated_token_sequence",
    "single_token_inputs",
    "vocabulary_norms",
    "vocabulary_states",
]


def _token_id(model: Any, token: int | str) -> int:
    if isinstance(token, str):
        tok = getattr(model, "tokenizer", None)
        if tok is None:
            raise ValueError("This model has no tokenizer; pass the token id instead of text.")
        ids = tok(token, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise ValueError(
                f"{token!r} is {len(ids)} tokens ({ids}) for this tokenizer, not one; pick a "
                "single "
                "token, or pass its id."
            )
        return int(ids[0])
    if not 0 <= int(token) < model.cfg.d_vocab:
        raise ValueError(f"Token id {token} is outside the vocabulary [0, {model.cfg.d_vocab}).")
    return int(token)


def _bos_id(model: Any) -> int:
    tok = getattr(model, "tokenizer", None)
    bos = getattr(tok, "bos_token_id", None) if tok is not None else None
    if bos is None:
        raise ValueError(
            "This model's tokenizer has no BOS token; pass bos=False (or prepend_bos=False)."
        )
    return int(bos)


def repeated_token_sequence(
    model: Any, token: int | str, length: int, *, n_sequences: int = 1, bos: bool = True
) -> Int[torch.Tensor, "batch pos"]:
    """``length`` positions of one token, position 0 replaced by BOS (as the reference does).

    Args:
        token: A token id, or text that is exactly one token.
        length: Total positions, BOS included; at most the model's context.
        n_sequences: Identical rows (a batch).
        bos: Put the tokenizer's BOS at position 0.

    Examples:
        >>> from tlmicroscope.models import tiny_model
        >>> repeated_token_sequence(tiny_model(n_layers=1), "e", 5).tolist()
        [[256, 101, 101, 101, 101]]
    """
    if not 1 <= length <= model.cfg.n_ctx:
        raise ValueError(
            f"length must lie in [1, {model.cfg.n_ctx}] (the model's context), got {length}."
        )
    if n_sequences < 1:
        raise ValueError(f"n_sequences must be at least 1, got {n_sequences}.")
    ids = torch.full((n_sequences, length), _token_id(model, token), dtype=torch.long)
    if bos:
        ids[:, 0] = _bos_id(model)
    return ids


def single_token_inputs(
    model: Any, token_ids: Sequence[int] | torch.Tensor | None = None, *, prepend_bos: bool = False
) -> Int[torch.Tensor, "batch pos"]:
    """Each id as its own sequence: ``[n 1]``, or ``[n 2]`` behind a BOS (default: the whole
    vocabulary).
    """
    d_vocab = int(model.cfg.d_vocab)
    ids = (
        torch.arange(d_vocab)
        if token_ids is None
        else torch.as_tensor(token_ids, dtype=torch.long).reshape(-1)
    )
    if ids.numel() == 0:
        raise ValueError("token_ids is empty: pass at least one id.")
    if ids.min() < 0 or ids.max() >= d_vocab:
        raise ValueError(f"token ids must lie in [0, {d_vocab}).")
    if prepend_bos:
        return torch.stack([torch.full_like(ids, _bos_id(model)), ids], 1)
    return ids.unsqueeze(1)


@dataclass(frozen=True)
class VocabularyNorms:
    """The norm of each token's state when it is fed alone, per component and layer.

    Attributes:
        norms: ``[state token]``.
        token_ids, str_tokens: The tokens measured and their text.
        components, layers: Component and block of each state.
        n_layers: The model's number of blocks.
        prepend_bos: Whether each token came after a BOS (then its position is 1, not 0).
        provenance: Model and settings.
    """

    norms: Float[torch.Tensor, "state token"]
    token_ids: Int[torch.Tensor, " token"]
    str_tokens: np.ndarray
    components: tuple[str, ...]
    layers: tuple[int | None, ...]
    n_layers: int
    prepend_bos: bool
    provenance: Provenance | None = None

    @property
    def layer_labels(self) -> LayerLabels:
        """One label per state (``tlmicroscope.layers``): ``"h4"`` for block 3's ``resid_post``,
        ``"b3.attn_out"``, ...; calling it, ``layer_labels()``, still works."""
        return layer_labels(
            component_label(c, lay, self.n_layers) for c, lay in zip(self.components, self.layers)
        )

    def mean_norm(self, layers: Sequence[int] | None = None) -> Float[torch.Tensor, " token"]:
        """Mean norm per token over these blocks (default the intermediate ones, as the
        reference).
        """
        chosen = set(intermediate_layers(self.n_layers) if layers is None else layers)
        rows = [i for i, lay in enumerate(self.layers) if lay in chosen]
        if not rows:
            raise ValueError(
                f"None of the blocks {sorted(chosen)} were measured ({list(self.layer_labels)})."
            )
        return self.norms[rows].mean(0)

    def top(self, k: int = 20, layers: Sequence[int] | None = None, largest: bool = True):
        """The ``k`` tokens with the largest (or smallest) mean norm, as a DataFrame."""
        import pandas as pd

        m = self.mean_norm(layers)
        vals, idx = torch.topk(m, min(k, m.numel()), largest=largest)
        return pd.DataFrame(
            {
                "token_id": self.token_ids[idx].numpy(),
                "token": self.str_tokens[idx.numpy()],
                "mean_norm": vals.numpy(),
            }
        )


def vocabulary_norms(
    model: Any,
    token_ids: Sequence[int] | torch.Tensor | None = None,
    *,
    components: str | Sequence[str] = "resid_post",
    layers: Sequence[int] | None = None,
    prepend_bos: bool = False,
    batch_size: int = 1024,
    progress: bool = True,
) -> VocabularyNorms:
    """Feed every token (or ``token_ids``) alone and record its state norms at each layer.

    On the embedded model the whole vocabulary (49152 tokens) takes about a minute on two cores.

    Examples:
        >>> from tlmicroscope.models import tiny_model
        >>> vn = vocabulary_norms(tiny_model(n_layers=2), [72, 105], progress=False)
        >>> tuple(vn.norms.shape), list(vn.str_tokens)
        ((2, 2), ['H', 'i'])
    """
    inputs = single_token_inputs(model, token_ids, prepend_bos=prepend_bos)
    prof = norm_profile(
        model,
        inputs,
        components=components,
        layers=layers,
        batch_size=batch_size,
        progress=progress,
    )
    ids = inputs[:, -1]
    return VocabularyNorms(
        norms=prof.norms[:, :, -1].contiguous(),
        token_ids=ids,
        str_tokens=token_strings(model, ids),
        components=prof.components,
        layers=prof.layers,
        n_layers=prof.n_layers,
        prepend_bos=prepend_bos,
        provenance=prof.provenance.with_settings(prepend_bos=prepend_bos)
        if prof.provenance
        else None,
    )


def vocabulary_states(
    model: Any,
    token_ids: Sequence[int] | torch.Tensor | None = None,
    *,
    components: Sequence[str] | None = None,
    layers: Sequence[int] | None = None,
    prepend_bos: bool = False,
    dtype: torch.dtype = torch.float32,
    batch_size: int = 1024,
    progress: bool = True,
) -> ComponentStates:
    """The states of tokens fed alone, as ``ComponentStates`` with one sample per token.

    Memory is states × tokens × d_model: choose ``token_ids``, ``layers`` and ``dtype`` accordingly
    (the full SmolLM2 vocabulary at one layer is 49152 × 576 floats, 113 MB in float32).
    ``components`` defaults to every one of ``COMPONENTS`` the model has.
    """
    inputs = single_token_inputs(model, token_ids, prepend_bos=prepend_bos)
    return capture_components(
        model,
        inputs,
        components=components,
        layers=layers,
        positions=[-1],
        dtype=dtype,
        batch_size=batch_size,
        progress=progress,
    )
