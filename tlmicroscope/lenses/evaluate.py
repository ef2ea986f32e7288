"""``evaluate_lens``: how well a lens reads each layer, over a corpus, in nats and bits per byte.

Per layer (residual index ``0..n_layers``, the last being the model's own output) it records the
mean over tokens of:

* ``kl``: KL(final distribution || lens distribution) at the same position;
* ``cross_entropy``: -log q(next token), over positions that have a next token in their window;
* ``entropy``: the lens distribution's entropy;

and optionally the **bias** (KL from the final distribution's marginal over the corpus to the
lens's marginal, the paper's measure of systematic skew) and the **transfer matrix** (translator
``i`` applied to the residual of layer ``j``). The reference reports everything in bits per
byte: nats x (tokens / UTF-8 bytes) / ln 2, with the bytes those very tokens decode to; both
units are kept here. Logits are produced one row chunk at a time, so memory stays at one
``[chunk d_vocab]`` buffer whatever the number of layers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from jaxtyping import Float

from tlmicroscope.corpus import CorpusSource
from tlmicroscope.deprecation import looks_like_lens, renamed_arguments
from tlmicroscope.inputs import ensure_eval
from tlmicroscope.lenses.base import lens_logits, resolve_lens
from tlmicroscope.lenses.readout import Readout, check_readout_identity
from tlmicroscope.lenses.train import _forward, lens_token_windows
from tlmicroscope.lenses.trajectory import layer_label
from tlmicroscope.results import Provenance

__all__ = ["STATISTICS", "LensEvaluation", "evaluate_lens", "nats_to_bits_per_byte"]

#: Per-layer statistics of an evaluation (nats).
STATISTICS = ("kl", "cross_entropy", "entropy")


def nats_to_bits_per_byte(n_tokens: int, n_bytes: int) -> float:
    """The factor turning nats per token into bits per byte: ``(tokens / bytes) / ln 2``.

    Examples:
        >>> round(nats_to_bits_per_byte(100, 400), 6)  # 4 bytes per token
        0.360674
    """
    if n_bytes <= 0:
        raise ValueError(f"Cannot convert to bits per byte: the text has {n_bytes} bytes.")
    return (n_tokens / n_bytes) / math.log(2)


@dataclass(frozen=True)
class LensEvaluation:
    """Per-layer quality of a lens over a corpus.

    Attributes:
        lens_name: The lens's name ("tuned", "logit", ...).
        layers: Residual indices 0..n_layers (n_layers is the model's output, read without a lens).
        layer_labels: ``"h0"``..``"h{n_layers}"`` (``tlmicroscope.layers``).
        kl, cross_entropy, entropy: ``[layer]`` means, nats.
        bias_kl: KL(marginal final || marginal lens) ``[layer]`` (nats), when requested.
        transfer_kl: ``[translator residual]`` mean KL(final || readout(translator_i(h_j))), nats,
            when requested; the transfer penalty is ``transfer_kl[i, j] - transfer_kl[j, j]``.
        n_tokens, n_bytes: Tokens evaluated and the UTF-8 bytes they decode to.
        nats_to_bpb: The bits-per-byte factor, ``(n_tokens / n_bytes) / ln 2``.
        baseline: The logit lens's evaluation on the same tokens, when requested.
        provenance: Model, lens, settings.
    """

    lens_name: str
    layers: tuple[int, ...]
    layer_labels: tuple[str, ...]
    kl: Float[torch.Tensor, " layer"]
    cross_entropy: Float[torch.Tensor, " layer"]
    entropy: Float[torch.Tensor, " layer"]
    bias_kl: Float[torch.Tensor, " layer"] | None
    transfer_kl: Float[torch.Tensor, "translator layer"] | None
    n_tokens: int
    n_bytes: int
    nats_to_bpb: float
    provenance: Provenance
    baseline: LensEvaluation | None = field(default=None)

    def statistic(self, name: str, unit: Literal["nats", "bpb"] = "nats") -> torch.Tensor:
        """A per-layer statistic (``kl``, ``cross_entropy``, ``entropy``, ``bias_kl``).

        In nats, or in bits per byte with ``unit="bpb"``.
        """
        value = getattr(self, name, None) if name in (*STATISTICS, "bias_kl") else None
        if value is None:
            raise ValueError(
                f"{name!r} is not in this evaluation (have {STATISTICS} and bias_kl if asked for)."
            )
        if unit == "nats":
            return value
        if unit == "bpb":
            return value * self.nats_to_bpb
        raise ValueError(f"unit must be 'nats' or 'bpb', got {unit!r}.")

    def bits_per_byte(self, name: str = "kl") -> torch.Tensor:
        return self.statistic(name, "bpb")

    def to_dataframe(self):
        """One row per layer: every statistic in nats and bits per byte (and the baseline's)."""
        import pandas as pd

        rows = []
        for i, (layer, label) in enumerate(zip(self.layers, self.layer_labels)):
            row: dict[str, Any] = {"layer": layer, "label": label, "lens": self.lens_name}
            for name in (*STATISTICS, "bias_kl"):
                v = getattr(self, name)
                if v is not None:
                    row[name] = float(v[i])
                    row[f"{name}_bpb"] = float(v[i]) * self.nats_to_bpb
            if self.baseline is not None:
                for name in ("kl", "cross_entropy"):
                    row[f"{self.baseline.lens_name}_{name}"] = float(
                        getattr(self.baseline, name)[i]
                    )
            rows.append(row)
        return pd.DataFrame(rows)


class _Accumulator:
    """Running sums of the statistics of one lens over every layer (and its marginals)."""

    def __init__(self, n: int, d_vocab: int, bias: bool):
        self.kl = torch.zeros(n, dtype=torch.float64)
        self.ce = torch.zeros(n, dtype=torch.float64)
        self.entropy = torch.zeros(n, dtype=torch.float64)
        self.marginal = torch.zeros(n, d_vocab, dtype=torch.float64) if bias else None


def _row_stats(
    z: torch.Tensor,
    p: torch.Tensor,
    neg_h_p: torch.Tensor,
    tgt: torch.Tensor,
    has_tgt: torch.Tensor,
    marginal: torch.Tensor | None,
):
    """KL, CE (summed over rows with a target) and entropy sums of logits ``z`` (overwritten)."""
    z -= z.amax(-1, keepdim=True)
    pz = torch.linalg.vecdot(p, z)
    z_t = z.gather(1, tgt.unsqueeze(1)).squeeze(1)
    ez = z.exp()
    s = ez.sum(-1)
    qz = torch.linalg.vecdot(ez, z) / s
    log_s = torch.log(s)
    kl = (neg_h_p - pz + log_s).clamp_min(0)
    ce = ((log_s - z_t) * has_tgt).sum()
    if marginal is not None:
        marginal += (ez / s.unsqueeze(1)).sum(0).double().to(marginal.device)
    return kl.sum(), ce, (log_s - qz).sum()


def _decoded_bytes(model: Any, windows: torch.Tensor) -> int:
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        return 0
    return sum(
        len(tok.decode(w.tolist(), skip_special_tokens=True).encode("utf-8")) for w in windows
    )


def _kl_of_marginals(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    p = p / p.sum(-1, keepdim=True)
    q = q / q.sum(-1, keepdim=True)
    return (p * (torch.log(p.clamp_min(1e-300)) - torch.log(q.clamp_min(1e-300)))).sum(-1)


def _batch_size_from_tokens(micro_batch_tokens: int, kwargs: dict[str, Any]) -> int:
    """The old ``micro_batch_tokens`` (tokens per forward pass) as sequences per forward pass."""
    return max(1, int(micro_batch_tokens) // int(kwargs.get("seq_len", 256)))


def _lens_first(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """``evaluate_lens(model, lens, ...)``: the old order, recognised by a lens in second place."""
    return len(args) >= 2 and "lens" not in kwargs and looks_like_lens(args[1])


@renamed_arguments(
    renamed={
        "tokens": "n_tokens",
        "micro_batch_tokens": ("batch_size", _batch_size_from_tokens),
        "chunk_rows": "chunk_size",
    },
    old_positional=("model", "lens", "corpus"),
    old_order_if=_lens_first,
)
def evaluate_lens(
    model: Any,
    corpus: CorpusSource = None,
    *,
    lens: Any = None,
    n_tokens: int = 4096,
    seq_len: int = 256,
    split: Literal["heldout", "train", "all"] = "heldout",
    holdout: float = 0.1,
    baseline: bool = True,
    bias: bool = False,
    transfer: bool = False,
    batch_size: int = 2,
    chunk_size: int = 128,
    progress: bool = True,
    text_field: str = "text",
) -> LensEvaluation:
    """Evaluate a lens layer by layer on a corpus (default: the embedded one's held-out tail).

    Args:
        model: A TransformerLens model.
        corpus: ``None``/``"embedded"``, a .txt/.jsonl file or folder, or an iterable of strings.
        lens: A ``TunedLens`` (or any lens; ``None``/``"logit"`` for the logit lens).
        n_tokens: Evaluate about this many tokens (whole windows of ``seq_len``; at least one).
        seq_len: Window length in tokens.
        split: ``"heldout"``: the corpus's last ``holdout`` fraction, which training never reads.
        baseline: Also evaluate the logit lens on the same tokens (``result.baseline``).
        bias: Also compute the bias, KL between the corpus-marginal distributions.
        transfer: Also compute the ``[translator layer]`` transfer matrix (n_layers^2 readouts).
        batch_size: Windows per forward pass.
        chunk_size: Token rows read out through the lens together (``[chunk_size d_vocab]``
            blocks); smaller saves memory.

    The old spellings ``evaluate_lens(model, lens, corpus)``, ``tokens=`` (now ``n_tokens=``),
    ``micro_batch_tokens=`` (tokens per pass, now ``batch_size=`` windows per pass) and
    ``chunk_rows=`` (now ``chunk_size=``) still work for one release, with a
    ``DeprecationWarning``.

    Raises:
        ValueError: a lens made for another model; ``seq_len`` over ``n_ctx``; a corpus too small.

    Examples:
        >>> from tlmicroscope.models import tiny_model
        >>> from tlmicroscope.lenses import TunedLens
        >>> model = tiny_model(n_layers=2)
        >>> ev = evaluate_lens(model, ["some text to read " * 20], lens=TunedLens.for_model(model),
        ...                    n_tokens=64, seq_len=32, holdout=0.3, progress=False)
        >>> ev.layer_labels, torch.allclose(ev.kl, ev.baseline.kl)  # untrained == logit lens
        (('h0', 'h1', 'h2'), True)
        >>> float(ev.kl[-1]) < 1e-5  # the output row is the model itself
        True
    """
    from tqdm.auto import tqdm

    if batch_size < 1 or chunk_size < 1:
        raise ValueError(
            f"batch_size and chunk_size must be positive, got {batch_size} and {chunk_size}."
        )
    ensure_eval(model)
    main = resolve_lens(lens)
    main.check_model(model)
    lenses = [main] + (
        [resolve_lens("logit")] if baseline and getattr(main, "name", "") != "logit" else []
    )
    L, V = int(model.cfg.n_layers), int(model.cfg.d_vocab)
    windows = lens_token_windows(
        model, corpus, seq_len=seq_len, split=split, holdout=holdout, text_field=text_field
    )
    n_win = max(1, min(windows.shape[0], -(-int(n_tokens) // seq_len)))
    windows = windows[:n_win]
    state = _EvalState(
        readout=Readout.for_model(model),
        accs=[_Accumulator(L + 1, V, bias) for _ in lenses],
        final_marginal=torch.zeros(V, dtype=torch.float64) if bias else None,
        transfer_sum=torch.zeros(L, L, dtype=torch.float64) if transfer else None,
    )
    batches = [list(range(i, min(i + batch_size, n_win))) for i in range(0, n_win, batch_size)]
    for bi, batch in enumerate(
        tqdm(batches, desc=f"evaluating {main.name} lens", disable=not progress)
    ):
        _evaluate_batch(model, windows[batch], lenses, state, chunk_size, check=bi == 0)
    n_tok = n_win * seq_len
    n_bytes = _decoded_bytes(model, windows)
    factor = nats_to_bits_per_byte(n_tok, n_bytes) if n_bytes > 0 else float("nan")
    results = []
    for lens_i, acc in zip(lenses, state.accs):
        bias_kl = None
        if acc.marginal is not None:
            bias_kl = _kl_of_marginals(state.final_marginal.unsqueeze(0), acc.marginal).float()
        transfer_kl = None
        if state.transfer_sum is not None and lens_i is main:
            transfer_kl = (state.transfer_sum / n_tok).float()
        results.append(
            LensEvaluation(
                lens_name=str(getattr(lens_i, "name", type(lens_i).__name__)),
                layers=tuple(range(L + 1)),
                layer_labels=tuple(layer_label(i, L) for i in range(L + 1)),
                kl=(acc.kl / n_tok).float(),
                cross_entropy=(acc.ce / max(1, state.n_ce)).float(),
                entropy=(acc.entropy / n_tok).float(),
                bias_kl=bias_kl,
                transfer_kl=transfer_kl,
                n_tokens=n_tok,
                n_bytes=n_bytes,
                nats_to_bpb=factor,
                provenance=Provenance.from_model(
                    model, lens=lens_i, tokens=n_tok, seq_len=seq_len, split=split, holdout=holdout
                ),
            )
        )
    if len(results) > 1:
        import dataclasses

        return dataclasses.replace(results[0], baseline=results[1])
    return results[0]


@dataclass
class _EvalState:
    """Running sums of one ``evaluate_lens`` call, shared by its batches."""

    readout: Readout
    accs: list[_Accumulator]
    final_marginal: torch.Tensor | None
    transfer_sum: torch.Tensor | None
    n_ce: int = 0


def _evaluate_batch(
    model: Any,
    toks: torch.Tensor,
    lenses: list[Any],
    state: _EvalState,
    chunk_size: int,
    *,
    check: bool,
) -> None:
    """Add a batch of windows to ``state``: each lens at each layer, ``chunk_size`` rows apiece."""
    L, d, V = int(model.cfg.n_layers), int(model.cfg.d_model), int(model.cfg.d_vocab)
    readout, main = state.readout, lenses[0]
    resid, logits = _forward(model, toks, list(range(L + 1)), logits=True)
    with torch.inference_mode():
        resid = resid.reshape(L + 1, -1, d)
        logits = logits.reshape(-1, V).float()
        if check:
            check_readout_identity(readout, resid[L][-8:], logits[-8:])
        dev = logits.device
        tgt = torch.zeros(toks.shape, dtype=torch.long, device=dev)
        tgt[:, :-1] = toks[:, 1:].to(dev)
        has = torch.zeros(toks.shape, device=dev)
        has[:, :-1] = 1
        tgt, has = tgt.reshape(-1), has.reshape(-1)
        state.n_ce += int(has.sum())
        for lo in range(0, logits.shape[0], chunk_size):
            sl = slice(lo, min(lo + chunk_size, logits.shape[0]))
            zf = logits[sl]
            logp = torch.log_softmax(zf, -1)
            p = logp.exp()
            neg_h_p = torch.linalg.vecdot(p, logp)
            if state.final_marginal is not None:
                state.final_marginal += p.sum(0).double().cpu()
            for lens_i, acc in zip(lenses, state.accs):
                for layer in range(L + 1):
                    if layer == L:
                        z = zf.clone()
                    else:
                        z = lens_logits(lens_i, readout, resid[layer, sl], layer)
                    m = acc.marginal[layer] if acc.marginal is not None else None
                    kl, ce, ent = _row_stats(z, p, neg_h_p, tgt[sl], has[sl], m)
                    acc.kl[layer] += float(kl)
                    acc.ce[layer] += float(ce)
                    acc.entropy[layer] += float(ent)
            if state.transfer_sum is not None:
                for i in range(L):
                    for j in range(L):
                        # translator i applied to h^j: the transfer matrix's cell
                        z = lens_logits(main, readout, resid[j, sl], i)
                        state.transfer_sum[i, j] += float(
                            _row_stats(z, p, neg_h_p, tgt[sl], has[sl], None)[0]
                        )


def compare_layers(evaluation: LensEvaluation, statistic: str = "kl") -> Sequence[bool]:
    """Per lensed layer, whether the lens beats its baseline on ``statistic`` (lower is better)."""
    if evaluation.baseline is None:
        raise ValueError("This evaluation has no baseline; run evaluate_lens(..., baseline=True).")
    ours = evaluation.statistic(statistic)[:-1]
    theirs = evaluation.baseline.statistic(statistic)[:-1]
    return [bool(a < b) for a, b in zip(ours, theirs)]
