"""The layer vocabulary: one name for every residual position and block site, used everywhere.

A model with ``L`` blocks has ``L + 1`` residual positions, h^0..h^L:

* h^0 is the embedding stream entering block 0 (``blocks.0.hook_resid_pre``: token embedding,
  plus positional embedding where the model adds one);
* h^l, for l in 1..L, is what block l-1 writes out (``blocks.{l-1}.hook_resid_post``, which is
  also ``blocks.{l}.hook_resid_pre`` for l < L);
* h^L·norm is the last residual after the final norm (``ln_final.hook_normalized``), and
  ``logits`` the model's output.

Inside block l the sites sit in forward order ``resid_pre (h^l) -> ln1 -> attn -> attn_out ->
resid_mid -> ln2 -> mlp -> mlp_out -> resid_post (h^{l+1})`` and are named ``b{l}.{site}``
(``b3.attn_out``; block numbers are TransformerLens's, from 0). Each name has four spellings:

* ``h0``, HTML ``h<sup>0</sup>``, hook ``blocks.0.hook_resid_pre``: the embedding stream;
* ``h3``, ``h<sup>3</sup>``, ``blocks.2.hook_resid_post``: the residual after block 2;
* ``b2.ln1``, ``b<sub>2</sub>.ln1``, ``blocks.2.ln1.hook_normalized``: block 2's attention
  input after its norm (before the gain);
* ``h30·norm``, ``h<sup>30</sup>·norm``, ``ln_final.hook_normalized``: h^30 after the final norm.

``site(...)``/``residual(...)`` build a ``Site`` holding all four; ``parse_hook`` and
``parse_label`` go back from a hook name or a label; ``residual_label`` is the short form results
use for their ``layer_labels``. ``token_text``/``str_tokens`` render token ids: an id with no
tokenizer (or past its vocabulary) always prints as ``<id>``.

Examples:
    >>> from tlmicroscope import layers
    >>> layers.residual_label(0), layers.residual_label(3), layers.residual_hook(3, n_layers=4)
    ('h0', 'h3', 'blocks.2.hook_resid_post')
    >>> layers.parse_hook("blocks.2.hook_resid_post").label
    'h3'
    >>> layers.parse_hook("blocks.3.hook_resid_pre").label  # the same residual, the same name
    'h3'
    >>> s = layers.site("attn_out", 2)
    >>> s.label, s.html, s.hook
    ('b2.attn_out', 'b<sub>2</sub>.attn_out', 'blocks.2.hook_attn_out')
    >>> layers.parse_label("h4·norm", n_layers=4).hook
    'ln_final.hook_normalized'
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "BLOCK_SITES",
    "BLOCK_SITE_ORDER",
    "NORM_SUFFIX",
    "RESIDUAL_AXIS",
    "LayerLabels",
    "Site",
    "as_str_tokens",
    "block_label",
    "block_site_label",
    "component_label",
    "layer_labels",
    "parse_hook",
    "parse_label",
    "residual",
    "residual_hook",
    "residual_html",
    "residual_index",
    "residual_label",
    "residual_labels",
    "site",
    "str_tokens",
    "token_text",
]

#: Appended to a residual's label after the final norm: ``"h30·norm"``.
NORM_SUFFIX = "·norm"

#: Axis title for a figure whose axis is the residual h^l.
RESIDUAL_AXIS = "residual h^l (h0 = embeddings, hL = last block's output)"

#: Block sites: hook-name template (``{l}`` the block) and a one-line description.
BLOCK_SITES: dict[str, tuple[str, str]] = {
    "resid_pre": ("blocks.{l}.hook_resid_pre", "the residual entering block {l} (h^{l})"),
    "ln1": (
        "blocks.{l}.ln1.hook_normalized",
        "block {l}'s attention input after its norm (before the gain)",
    ),
    "attn_out": ("blocks.{l}.hook_attn_out", "what block {l}'s attention adds to the residual"),
    "resid_mid": (
        "blocks.{l}.hook_resid_mid",
        "the residual between block {l}'s attention and its MLP",
    ),
    "ln2": (
        "blocks.{l}.ln2.hook_normalized",
        "block {l}'s MLP input after its norm (before the gain)",
    ),
    "mlp_out": ("blocks.{l}.hook_mlp_out", "what block {l}'s MLP adds to the residual"),
    "resid_post": (
        "blocks.{l}.hook_resid_post",
        "the residual leaving block {l} (h^{l+1})",
    ),
}

#: Block sites in forward order.
BLOCK_SITE_ORDER: tuple[str, ...] = tuple(BLOCK_SITES)

_RESID_LABEL = re.compile(r"h(\d+)(" + re.escape(NORM_SUFFIX) + r")?")
_BLOCK_LABEL = re.compile(r"b(\d+)\.(\w+)")
_BLOCK_HOOK = re.compile(r"blocks\.(\d+)\.(hook_\w+|ln[12]\.hook_normalized)")


@dataclass(frozen=True)
class Site:
    """One named place in the model: its plain label, HTML label, hook name and description.

    Attributes:
        kind: ``"resid"`` (h^index), ``"resid_norm"`` (h^L after the final norm), ``"logits"``,
            or a block site from ``BLOCK_SITES``.
        index: The residual index (for ``resid``/``resid_norm``) or the block (block sites);
            ``None`` for ``logits``.
        label: The plain-text name (``"h3"``, ``"b2.attn_out"``, ``"h30·norm"``, ``"logits"``).
        html: The same name for HTML and plotly (``"h<sup>3</sup>"``).
        hook: The TransformerLens hook name, or ``None`` for the logits.
        description: One line saying what the vector is.

    Examples:
        >>> residual(0).description
        'the embedding stream entering block 0'
    """

    kind: str
    index: int | None
    label: str
    html: str
    hook: str | None
    description: str

    def __str__(self) -> str:
        return self.label


class LayerLabels(tuple):
    """A ``tuple[str, ...]`` of layer labels that may also be called, returning itself.

    Results expose ``layer_labels`` as a property; some used to expose a method, and
    ``result.layer_labels()`` keeps working through this.

    Examples:
        >>> labels = LayerLabels(["h0", "h1"])
        >>> labels, labels() == labels, isinstance(labels, tuple)
        (('h0', 'h1'), True, True)
    """

    __slots__ = ()

    def __call__(self) -> LayerLabels:
        return self

    def __repr__(self) -> str:
        return tuple.__repr__(self)


def layer_labels(labels: Iterable[str]) -> LayerLabels:
    """``LayerLabels`` of ``labels`` (what a result's ``layer_labels`` property returns)."""
    return LayerLabels(str(x) for x in labels)


def _check_index(index: int, n_layers: int | None) -> int:
    index = int(index)
    if index < 0 or (n_layers is not None and index > n_layers):
        top = "L" if n_layers is None else str(n_layers)
        raise ValueError(
            f"Residual index {index} is out of range: residuals are h^0..h^{top} "
            f"(0 = the embedding stream, {top} = the last block's output)."
        )
    return index


def residual_label(index: int, n_layers: int | None = None, *, normed: bool = False) -> str:
    """The plain label of h^index: ``"h3"``; ``"h3·norm"`` after the final norm.

    Examples:
        >>> residual_label(0), residual_label(4, 4, normed=True)
        ('h0', 'h4·norm')
    """
    return f"h{_check_index(index, n_layers)}" + (NORM_SUFFIX if normed else "")


def residual_labels(
    n_layers: int, *, final_norm: bool = False, indices: Iterable[int] | None = None
) -> LayerLabels:
    """Labels of the residuals ``indices`` (default h^0..h^L); the last one ``"hL·norm"`` with
    ``final_norm`` (when the analysis read h^L after the final norm).

    Examples:
        >>> residual_labels(2), residual_labels(2, final_norm=True)
        (('h0', 'h1', 'h2'), ('h0', 'h1', 'h2·norm'))
    """
    chosen = range(n_layers + 1) if indices is None else indices
    return layer_labels(
        residual_label(i, n_layers, normed=final_norm and int(i) == n_layers) for i in chosen
    )


def residual_html(index: int, n_layers: int | None = None, *, normed: bool = False) -> str:
    """The HTML label of h^index: ``"h<sup>3</sup>"`` (``"h<sup>3</sup>·norm"`` normed).

    Examples:
        >>> residual_html(12)
        'h<sup>12</sup>'
    """
    return f"h<sup>{_check_index(index, n_layers)}</sup>" + (NORM_SUFFIX if normed else "")


def residual_hook(index: int, n_layers: int | None = None) -> str:
    """The hook holding h^index: ``blocks.0.hook_resid_pre`` for 0, else the block before's
    ``hook_resid_post``.

    Examples:
        >>> residual_hook(0), residual_hook(1)
        ('blocks.0.hook_resid_pre', 'blocks.0.hook_resid_post')
    """
    index = _check_index(index, n_layers)
    return "blocks.0.hook_resid_pre" if index == 0 else f"blocks.{index - 1}.hook_resid_post"


def residual(index: int, n_layers: int | None = None, *, normed: bool = False) -> Site:
    """The ``Site`` of h^index (after the final norm with ``normed``; needs ``n_layers``).

    Examples:
        >>> residual(2, 4).hook, residual(4, 4, normed=True).hook
        ('blocks.1.hook_resid_post', 'ln_final.hook_normalized')
    """
    index = _check_index(index, n_layers)
    if normed:
        if n_layers is None or index != n_layers:
            raise ValueError(
                f"Only the last residual h^L passes through the final norm; got h^{index} "
                f"with n_layers={n_layers} (pass n_layers=L and index L)."
            )
        return Site(
            "resid_norm",
            index,
            residual_label(index, normed=True),
            residual_html(index, normed=True),
            "ln_final.hook_normalized",
            f"h^{index} after the final norm (before its gain)",
        )
    if index == 0:
        what = "the embedding stream entering block 0"
    elif n_layers is not None and index == n_layers:
        what = f"the residual after the last block ({index - 1}), read by the unembedding"
    else:
        what = f"the residual after block {index - 1}"
    return Site(
        "resid", index, residual_label(index), residual_html(index), residual_hook(index), what
    )


def block_label(block: int) -> str:
    """The plain label of block ``block`` as a whole: ``"b3"`` (its sites are ``"b3.attn_out"``...).

    Examples:
        >>> block_label(3)
        'b3'
    """
    if int(block) < 0:
        raise ValueError(f"Blocks are numbered from 0, got {block}.")
    return f"b{int(block)}"


def block_site_label(kind: str, block: int) -> str:
    """The plain label of a block site: ``"b3.attn_out"``; residual sites give ``h`` labels.

    Examples:
        >>> block_site_label("mlp_out", 3), block_site_label("resid_pre", 3)
        ('b3.mlp_out', 'h3')
    """
    return site(kind, block).label


def site(kind: str, block: int | None = None, *, n_layers: int | None = None) -> Site:
    """The ``Site`` of a block site (``BLOCK_SITES``) in ``block``, or of ``"logits"``.

    ``resid_pre`` of block l and ``resid_post`` of block l-1 both give h^l.

    Examples:
        >>> site("resid_post", 2).label, site("ln2", 0).hook, site("logits").label
        ('h3', 'blocks.0.ln2.hook_normalized', 'logits')
    """
    if kind == "logits":
        return Site("logits", None, "logits", "logits", None, "the model's output logits")
    if kind not in BLOCK_SITES:
        raise ValueError(
            f"Unknown site {kind!r}; choose from {[*BLOCK_SITES, 'logits']} (or use "
            "residual(index) for h^index)."
        )
    if block is None or int(block) < 0 or (n_layers is not None and int(block) >= n_layers):
        raise ValueError(
            f"Site {kind!r} needs a block in 0..{'L-1' if n_layers is None else n_layers - 1}, "
            f"got {block!r}."
        )
    block = int(block)
    if kind == "resid_pre":
        return residual(block, n_layers)
    if kind == "resid_post":
        return residual(block + 1, n_layers)
    template, what = BLOCK_SITES[kind]
    return Site(
        kind,
        block,
        f"b{block}.{kind}",
        f"b<sub>{block}</sub>.{kind}",
        template.format(l=block),
        what.format(l=block),
    )


def component_label(component: str, layer: int | None, n_layers: int) -> str:
    """The label of a captured latent state (``geometry.COMPONENTS``) of block ``layer``.

    ``embed`` is h^0, ``resid_post`` of block l is h^{l+1}, ``ln_final`` is h^L·norm, every other
    component ``b{l}.{component}``; ``layer=None`` (averaged over layers) gives
    ``"{component} mean"``.

    Examples:
        >>> [component_label(c, l, 4) for c, l in [("embed", -1), ("attn_out", 1),
        ...                                          ("resid_post", 3), ("ln_final", 4)]]
        ['h0', 'b1.attn_out', 'h4', 'h4·norm']
    """
    if component == "embed":
        return residual_label(0)
    if component == "ln_final":
        return residual_label(n_layers, normed=True)
    if layer is None:
        return f"{component} mean"
    return site(component, layer, n_layers=n_layers).label


def parse_hook(hook: str, n_layers: int | None = None) -> Site:
    """The ``Site`` a TransformerLens hook name holds (both residual aliases give h^l).

    Examples:
        >>> parse_hook("blocks.0.hook_resid_pre").label, parse_hook("blocks.1.hook_mlp_out").label
        ('h0', 'b1.mlp_out')
        >>> parse_hook("ln_final.hook_normalized", n_layers=2).label
        'h2·norm'
    """
    if hook == "ln_final.hook_normalized":
        if n_layers is None:
            raise ValueError(f"{hook} is h^L after the final norm: pass n_layers to name L.")
        return residual(n_layers, n_layers, normed=True)
    m = _BLOCK_HOOK.fullmatch(hook)
    if m is not None:
        block, name = int(m.group(1)), m.group(2)
        kind = name.removeprefix("hook_").replace(".hook_normalized", "")
        if kind in BLOCK_SITES:
            return site(kind, block, n_layers=n_layers)
    known = [t.format(l="{l}") for t, _ in BLOCK_SITES.values()]
    raise ValueError(
        f"{hook!r} is not a hook the layer vocabulary names; it names {known} and "
        "'ln_final.hook_normalized'."
    )


def parse_label(label: str, n_layers: int | None = None) -> Site:
    """The ``Site`` a plain label names (``"h3"``, ``"h30·norm"``, ``"b2.ln1"``, ``"logits"``).

    Examples:
        >>> parse_label("h0").hook, parse_label("b1.resid_mid").hook
        ('blocks.0.hook_resid_pre', 'blocks.1.hook_resid_mid')
    """
    label = str(label).strip()
    if label == "logits":
        return site("logits")
    m = _RESID_LABEL.fullmatch(label)
    if m is not None:
        return residual(int(m.group(1)), n_layers, normed=m.group(2) is not None)
    m = _BLOCK_LABEL.fullmatch(label)
    if m is not None and m.group(2) in BLOCK_SITES:
        return site(m.group(2), int(m.group(1)), n_layers=n_layers)
    raise ValueError(
        f"{label!r} is not a layer label: write 'h<index>' (h0 = embeddings), "
        f"'h<L>{NORM_SUFFIX}', 'b<block>.<site>' with a site from {list(BLOCK_SITES)}, "
        "or 'logits'."
    )


def residual_index(label_or_hook: str | int, n_layers: int | None = None) -> int:
    """The residual index l of h^l from a label (``"h3"``), a hook name or an int.

    Examples:
        >>> residual_index("h3"), residual_index("blocks.2.hook_resid_post"), residual_index(5)
        (3, 3, 5)
    """
    if isinstance(label_or_hook, int):
        return _check_index(label_or_hook, n_layers)
    text = str(label_or_hook)
    s = parse_hook(text, n_layers) if "hook" in text else parse_label(text, n_layers)
    if s.kind != "resid":
        raise ValueError(f"{text!r} names {s.label} ({s.description}), not a residual h^l.")
    return int(s.index)


# --------------------------------------------------------------------------------- tokens
def token_text(token_id: int, tokenizer: Any = None) -> str:
    """The text of one token id; ``"<id>"`` when there is no tokenizer or the id is past it.

    Examples:
        >>> token_text(12)
        '<12>'
        >>> from tlmicroscope.models.tiny import byte_tokenizer
        >>> token_text(104, byte_tokenizer())
        'h'
    """
    if tokenizer is None:
        return f"<{int(token_id)}>"
    from tlmicroscope.vocab import decode_ids

    return decode_ids(tokenizer, [int(token_id)])[0]


def str_tokens(model_or_tokenizer: Any, tokens: Any) -> tuple[tuple[str, ...], ...]:
    """Token text per row of ``tokens`` ``[batch pos]``: the one ``str_tokens`` type of results.

    ``model_or_tokenizer`` is a model (its ``to_str_tokens`` is used), a tokenizer or ``None``;
    without a tokenizer every id reads ``"<id>"``.

    Examples:
        >>> import torch
        >>> str_tokens(None, torch.tensor([[3, 4]]))
        (('<3>', '<4>'),)
    """
    tok = getattr(model_or_tokenizer, "tokenizer", model_or_tokenizer)
    to_str = getattr(model_or_tokenizer, "to_str_tokens", None)
    if tok is not None and callable(to_str):  # the model's own decoding, token by token
        return tuple(tuple(str(t) for t in to_str(row)) for row in tokens)
    if tok is not None and not callable(getattr(tok, "batch_decode", None)):
        tok = None
    rows = tokens.tolist() if hasattr(tokens, "tolist") else [list(r) for r in tokens]
    if rows and not isinstance(rows[0], list):
        rows = [rows]
    if tok is None:
        return tuple(tuple(token_text(t) for t in row) for row in rows)
    from tlmicroscope.vocab import decode_ids

    return tuple(tuple(decode_ids(tok, row)) for row in rows)


def as_str_tokens(rows: Sequence[Sequence[Any]] | None) -> tuple[tuple[str, ...], ...] | None:
    """``rows`` of token text (lists, arrays or tuples) as ``tuple[tuple[str, ...], ...]``."""
    if rows is None:
        return None
    return tuple(tuple(str(t) for t in row) for row in rows)
