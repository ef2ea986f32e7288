"""Filler-token removal: does a model need the "filler" tokens that carry the most context?

LLM-Microscope §4.2 removes a class of tokens from the input text and measures the task score,
reported as a delta from the original text. The classes are stop words, punctuation, articles
(a, an, the), and stop words plus punctuation. Here each removal is scored two ways:

* **multiple-choice accuracy**: the question (and the questions of the few-shot examples) is
  filtered, the answer choices are not; each choice is scored by its summed log-likelihood after
  the prompt (``tlmicroscope.tasks.choice_logprobs``), and the item counts as correct when the
  right choice scores highest;
* **language-model loss**: passages of a corpus are split into a context and a continuation of
  ``continuation_words`` words; the context is filtered, the continuation is not, and the loss is
  the mean cross-entropy of the continuation's tokens. This asks whether the removed tokens
  carried information the model uses to predict what follows, rather than measuring how odd the
  filtered text itself looks.

Deltas (removed − original) come with paired bootstrap confidence intervals over items or passages.
Removal works on words of the text, not on model tokens: a word is a run of letters or digits with
inner apostrophes or hyphens ("don't", "well-known", "3.5"); stop words are
``token_classes.STOP_WORDS``; punctuation is every other non-space character.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tlmicroscope.corpus import CorpusSource, read_texts
from tlmicroscope.deprecation import renamed_arguments
from tlmicroscope.inputs import ensure_eval
from tlmicroscope.microscope.token_classes import ARTICLES, STOP_WORDS
from tlmicroscope.results import Provenance

__all__ = [
    "REMOVALS",
    "FillerRemovalResult",
    "corpus_passages",
    "filler_removal_experiment",
    "remove_filler",
]

#: The removal conditions of the paper's Table 1.
REMOVALS = ("stop_words", "punctuation", "articles", "stop_words+punctuation")

_PIECES = re.compile(r"\s+|\d+(?:[.,]\d+)*|[^\W_]+(?:['’\-][^\W_]+)*|[^\w\s]|_")


def remove_filler(text: str, removal: str) -> str:
    """``text`` without the words or characters of one removal class, spacing tidied.

    Examples:
        >>> remove_filler("The cat, which sat on a mat, didn't move.", "stop_words")
        'cat, sat mat, move.'
        >>> remove_filler("The cat, which sat on a mat, didn't move.", "punctuation")
        "The cat which sat on a mat didn't move"
        >>> remove_filler("The cat sat on a mat.", "articles")
        'cat sat on mat.'
        >>> remove_filler("Pi is 3.14, roughly!", "stop_words+punctuation")
        'Pi 3.14 roughly'
    """
    parts = set(removal.split("+"))
    unknown = parts - {"stop_words", "punctuation", "articles"}
    if unknown or not parts:
        raise ValueError(
            f"Unknown removal {removal!r}; choose from {REMOVALS} (or join classes with '+')."
        )
    kept: list[str] = []
    for piece in _PIECES.findall(text):
        low = piece.lower()
        if piece.isspace():
            kept.append(piece)
            continue
        is_word = piece[0].isalnum()
        drop = (
            (is_word and "stop_words" in parts and low in STOP_WORDS)
            or (is_word and "articles" in parts and low in ARTICLES)
            or (not is_word and "punctuation" in parts)
        )
        if not drop:
            kept.append(piece)
    return _join(kept, text)


def _join(pieces: list[str], original: str) -> str:
    out: list[str] = []
    for piece in pieces:
        if piece.isspace() and out and out[-1].isspace():  # two gaps met where a piece was removed
            out[-1] = "\n" * max(out[-1].count("\n"), piece.count("\n")) or " "
        else:
            out.append(piece)
    text = "".join(out)
    if not original[:1].isspace():
        text = text.lstrip()
    if not original[-1:].isspace():
        text = text.rstrip()
    return text


def corpus_passages(
    source: CorpusSource = None,
    *,
    n_passages: int = 100,
    context_words: int = 120,
    continuation_words: int = 24,
    seed: int = 0,
) -> list[tuple[str, str]]:
    """``(context, continuation)`` pairs of consecutive words from a corpus (seeded choice).

    Raises:
        ValueError: the corpus has no document long enough for one passage.
    """
    need = context_words + continuation_words
    cands: list[tuple[str, str]] = []
    for doc in read_texts(source):
        words = doc.split()
        for start in range(0, len(words) - need + 1, need):
            chunk = words[start : start + need]
            cands.append((" ".join(chunk[:context_words]), " ".join(chunk[context_words:])))
    if not cands:
        raise ValueError(
            f"No document in the corpus has {need} words; use a larger corpus or shorter passages."
        )
    rng = np.random.default_rng(seed)
    idx = rng.permutation(len(cands))[: min(n_passages, len(cands))]
    return [cands[i] for i in sorted(idx)]


@dataclass(frozen=True)
class FillerRemovalResult:
    """Scores of the original text and of each removal, with deltas and bootstrap intervals.

    Attributes:
        conditions: ``"original"`` then each removal.
        accuracy: Multiple-choice accuracy per condition (NaN when no task set was scored).
        accuracy_delta, accuracy_ci: Removal − original, and its 95 % bootstrap interval
            ``[cond 2]``.
        loss: Mean continuation cross-entropy per condition, nats (NaN when no corpus was scored).
        loss_delta, loss_ci: Removal − original (positive = the model got worse), and its interval.
        n_items, n_passages: How many questions and passages were scored.
        correct: Per-item correctness ``[cond item]``; ``passage_loss`` per-passage loss
            ``[cond passage]``.
        removed_fraction: Share of characters removed from the filtered texts, per condition.
    """

    conditions: tuple[str, ...]
    accuracy: np.ndarray
    accuracy_delta: np.ndarray
    accuracy_ci: np.ndarray
    loss: np.ndarray
    loss_delta: np.ndarray
    loss_ci: np.ndarray
    n_items: int
    n_passages: int
    correct: np.ndarray
    passage_loss: np.ndarray
    removed_fraction: np.ndarray
    provenance: Provenance

    def to_dataframe(self):
        import pandas as pd

        return pd.DataFrame(
            {
                "condition": self.conditions,
                "accuracy": self.accuracy,
                "accuracy_delta": self.accuracy_delta,
                "accuracy_ci_low": self.accuracy_ci[:, 0],
                "accuracy_ci_high": self.accuracy_ci[:, 1],
                "loss": self.loss,
                "loss_delta": self.loss_delta,
                "loss_ci_low": self.loss_ci[:, 0],
                "loss_ci_high": self.loss_ci[:, 1],
                "removed_fraction": self.removed_fraction,
            }
        )


def _paired_bootstrap(base: np.ndarray, other: np.ndarray, n_boot: int, rng: np.random.Generator):
    n = base.shape[0]
    if n == 0:
        return np.nan, (np.nan, np.nan)
    diff = other - base
    idx = rng.integers(0, n, size=(n_boot, n))
    means = diff[idx].mean(1)
    return float(diff.mean()), (float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975)))


def _load_items(dataset: Any) -> tuple[list[Any], str]:
    from tlmicroscope import tasks

    if dataset is None or (isinstance(dataset, str) and dataset == "shipped"):
        return tasks.load_tasks(), "shipped"
    if isinstance(dataset, (str, Path)):
        return tasks.read_mmlu(dataset), "mmlu"
    items = list(dataset)
    if not items or not all(isinstance(i, tasks.MultipleChoiceItem) for i in items):
        raise TypeError(
            "dataset must be None (the shipped set), an MMLU CSV/JSONL path or folder, or a "
            "list of tlmicroscope.tasks.MultipleChoiceItem."
        )
    return items, "items"


def _mc_correct(
    model, items, pool, removal, n_shots, seed, style, batch_size, progress
) -> np.ndarray:
    """Correctness per item; the question of each item and of its shots (drawn, seeded, from the
    same category of the whole ``pool``) is filtered, the choices are not."""
    from tlmicroscope import tasks

    def strip(item):
        return (
            item
            if removal == "original"
            else replace(item, question=remove_filler(item.question, removal))
        )

    prompts = tasks.few_shot_prompts(
        [strip(i) for i in items],
        n_shots=n_shots,
        seed=seed,
        style=style,
        pool=[strip(i) for i in pool],
    )
    conts = [tasks.continuations(i, style=style) for i in items]
    lp = tasks.choice_logprobs(model, prompts, conts, batch_size=batch_size, progress=progress)
    return (lp.argmax(-1) == torch.tensor([i.answer for i in items])).numpy().astype(float)


def _passage_loss(model, passages, removal, batch_size, progress) -> np.ndarray:
    from tlmicroscope import tasks

    contexts = [c if removal == "original" else remove_filler(c, removal) for c, _ in passages]
    conts = [" " + cont for _, cont in passages]
    n_tok = np.array(
        [len(model.tokenizer(c, add_special_tokens=False)["input_ids"]) for c in conts]
    )
    lp = tasks.choice_logprobs(
        model,
        [c or "\n" for c in contexts],
        [[c] for c in conts],
        batch_size=batch_size,
        progress=progress,
    )
    return -lp[:, 0].numpy() / n_tok


@renamed_arguments(renamed={"dataset": "items", "n_bootstrap": "n_boot"})
def filler_removal_experiment(
    model: Any,
    items: Any = None,
    *,
    corpus: CorpusSource | bool = None,
    removals: Sequence[str] = REMOVALS,
    n_shots: int | None = None,
    style: str | None = None,
    max_items: int | None = None,
    n_passages: int = 100,
    context_words: int = 120,
    continuation_words: int = 24,
    n_boot: int = 2000,
    batch_size: int = 16,
    seed: int = 0,
    progress: bool = True,
) -> FillerRemovalResult:
    """Score the original text and each filler removal on multiple-choice items and corpus passages.

    Args:
        model: A TransformerLens model with a tokenizer.
        items: ``None`` for the shipped task set, a path to MMLU-format CSV/JSONL files (a file
            or a folder), a list of ``MultipleChoiceItem``, or ``False`` to skip the task score.
        corpus: Source of the LM-loss passages (``None``: the embedded corpus); ``False`` skips it.
        removals: Conditions from ``REMOVALS`` (or classes joined with ``+``).
        n_shots: Solved examples before each question (default 3 for the shipped set, 0 for
            MMLU files: the paper's zero-shot setting).
        style: ``"text"`` (answer with the choice's text) or ``"letter"`` (MMLU's A/B/C/D; the
            default for MMLU files).
        max_items: Score a seeded sample of at most this many questions.
        n_passages, context_words, continuation_words: The LM-loss passages.
        n_boot: Paired bootstrap resamples for the intervals.

    The old keywords ``dataset=`` (now ``items=``) and ``n_bootstrap=`` (now ``n_boot=``) still
    work for one release, with a ``DeprecationWarning``.

    Examples:
        >>> from tlmicroscope.models import tiny_model
        >>> from tlmicroscope.tasks import MultipleChoiceItem
        >>> items = [MultipleChoiceItem("Is the sky blue?", ("yes", "no"), 0, "demo")] * 4
        >>> res = filler_removal_experiment(tiny_model(n_layers=1), items, corpus=["word " * 200],
        ...     removals=("articles",), n_shots=0, n_passages=3, context_words=20,
        ...     continuation_words=5, progress=False)
        >>> res.conditions, res.n_items, res.n_passages
        (('original', 'articles'), 4, 3)
    """
    ensure_eval(model)
    for r in removals:
        remove_filler("a", r)  # validates the name before any forward pass
    conditions = ("original", *removals)
    rng = np.random.default_rng(seed)
    n_cond = len(conditions)
    correct = np.zeros((n_cond, 0))
    kind, shots, chosen = "none", None, []
    if items is not False:
        correct, kind, shots, chosen = _task_scores(
            model, items, conditions, n_shots, style, max_items, seed, batch_size, progress
        )
    losses = np.zeros((n_cond, 0))
    passages: list[tuple[str, str]] = []
    if corpus is not False:
        passages = corpus_passages(
            corpus,
            n_passages=n_passages,
            context_words=context_words,
            continuation_words=continuation_words,
            seed=seed,
        )
        losses = np.stack(
            [_passage_loss(model, passages, c, batch_size, progress) for c in conditions]
        )
    acc = correct.mean(1) if correct.shape[1] else np.full(n_cond, np.nan)
    loss = losses.mean(1) if losses.shape[1] else np.full(n_cond, np.nan)
    acc_d, acc_ci, loss_d, loss_ci = _paired_differences(correct, losses, n_boot, rng)
    texts = [c for c, _ in passages] or [i.question for i in chosen]
    removed = np.array([_removed_share(texts, c) for c in conditions])
    prov = Provenance.from_model(
        model,
        dataset=kind,
        n_shots=shots,
        n_bootstrap=n_boot,
        context_words=context_words,
        continuation_words=continuation_words,
        seed=seed,
    )
    return FillerRemovalResult(
        conditions,
        acc,
        acc_d,
        acc_ci,
        loss,
        loss_d,
        loss_ci,
        int(correct.shape[1]),
        len(passages),
        correct,
        losses,
        removed,
        prov,
    )


def _task_scores(
    model: Any,
    items: Any,
    conditions: Sequence[str],
    n_shots: int | None,
    style: str | None,
    max_items: int | None,
    seed: int,
    batch_size: int,
    progress: bool,
) -> tuple[np.ndarray, str, int, list]:
    """``(correct [condition item], kind, n_shots, items scored)`` on the multiple-choice items."""
    pool, kind = _load_items(items)
    chosen = pool
    if max_items is not None and len(chosen) > max_items:
        keep = np.sort(np.random.default_rng(seed).permutation(len(chosen))[:max_items])
        chosen = [pool[i] for i in keep]
    shots = n_shots if n_shots is not None else (0 if kind == "mmlu" else 3)
    sty = style or ("letter" if kind == "mmlu" else "text")
    correct = np.stack(
        [
            _mc_correct(model, chosen, pool, c, shots, seed, sty, batch_size, progress)
            for c in conditions
        ]
    )
    return correct, kind, shots, chosen


def _paired_differences(
    correct: np.ndarray, losses: np.ndarray, n_boot: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Each condition minus the original, with paired bootstrap intervals, for accuracy and loss.

    NaN where that score was skipped (no items or no passages).
    """
    n_cond = correct.shape[0]
    acc_d, acc_ci = np.zeros(n_cond), np.zeros((n_cond, 2))
    loss_d, loss_ci = np.zeros(n_cond), np.zeros((n_cond, 2))
    for k in range(n_cond):
        acc_d[k], acc_ci[k] = (
            _paired_bootstrap(correct[0], correct[k], n_boot, rng)
            if correct.shape[1]
            else (np.nan, (np.nan, np.nan))
        )
        loss_d[k], loss_ci[k] = (
            _paired_bootstrap(losses[0], losses[k], n_boot, rng)
            if losses.shape[1]
            else (np.nan, (np.nan, np.nan))
        )
    return acc_d, acc_ci, loss_d, loss_ci


def _removed_share(texts: list[str], removal: str) -> float:
    if removal == "original" or not texts:
        return 0.0
    before = sum(len(t) for t in texts)
    after = sum(len(remove_filler(t, removal)) for t in texts)
    return 1.0 - after / max(before, 1)
