"""Multiple-choice tasks: the shipped set, MMLU-format readers, few-shot prompts, answer scoring.

The shipped set (``tlmicroscope/data/tasks.jsonl``) holds a few hundred short items in four
categories: country capitals, antonyms, plurals and one- or two-digit arithmetic, each with four
answer choices. They were generated from word lists and seeded distractors, then chosen by
measuring the embedded SmolLM2-135M-Instruct with 3-shot prompts (``format_prompt``) and summed
answer log-likelihoods (``choice_logprobs``); ``benchmarks/task_set_accuracy.py`` rebuilds the
candidates, re-measures and prints the accuracy per category.

Those answers differ per item. ``FIXED_LABEL_CATEGORIES`` are tasks whose answers are the same
labels for every item, like the GLUE/SuperGLUE tasks of the tuned-lens paper's injection
experiment: ``sentiment`` (is a one-sentence review negative or positive, like SST-2) and
``yes_no`` (yes/no questions of common knowledge, like BoolQ without the passage). They were
written for that experiment, with balanced labels, and are not loaded unless asked for
(``load_tasks(ALL_CATEGORIES)`` or by name).

A prompt ends in ``"Answer:"`` and each answer continuation is ``" " + choice`` (or ``" A"`` ...
in the letter style used for MMLU), so an answer is scored as the summed log-likelihood of its
continuation tokens given the prompt, as lm-evaluation-harness does.
"""

from __future__ import annotations

import csv
import json
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import torch
from jaxtyping import Float

__all__ = [
    "ALL_CATEGORIES",
    "CATEGORIES",
    "FIXED_LABEL_CATEGORIES",
    "LETTERS",
    "MultipleChoiceItem",
    "ScoringRun",
    "ScoringTarget",
    "accuracy",
    "choice_logprobs",
    "continuations",
    "few_shot_prompts",
    "format_prompt",
    "load_tasks",
    "pad_token_id",
    "padded_batches",
    "read_mmlu",
    "scoring_plan",
    "targets_by_run",
]

#: Categories of the shipped task set whose answers differ per item (``load_tasks()``'s default).
CATEGORIES = ("capitals", "antonyms", "plurals", "arithmetic")
#: Shipped categories whose answers are the same labels for every item (binary: no/yes style).
FIXED_LABEL_CATEGORIES = ("sentiment", "yes_no")
#: Every shipped category.
ALL_CATEGORIES = CATEGORIES + FIXED_LABEL_CATEGORIES
LETTERS = "ABCDEFGHIJ"
ChoiceStyle = Literal["text", "letter"]


@dataclass(frozen=True)
class MultipleChoiceItem:
    """One multiple-choice question.

    Attributes:
        question: The question text, without "Question:" or "Answer:".
        choices: The answer options (at least two, distinct, non-empty).
        answer: Index of the correct option in ``choices``.
        category: A label such as ``"capitals"`` or an MMLU subject.

    Examples:
        >>> item = MultipleChoiceItem("What is 2 + 2?", ("3", "4", "5", "22"), 1, "arithmetic")
        >>> item.answer_text
        '4'
        >>> MultipleChoiceItem("Q?", ("a", "b"), 2, "x")
        Traceback (most recent call last):
        ...
        ValueError: answer index 2 is out of range for 2 choices in 'Q?'.
    """

    question: str
    choices: tuple[str, ...]
    answer: int
    category: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "choices", tuple(str(c) for c in self.choices))
        if not str(self.question).strip():
            raise ValueError("A multiple-choice item needs a non-empty question.")
        if len(self.choices) < 2:
            raise ValueError(
                f"{self.question!r} needs at least two choices, got {len(self.choices)}."
            )
        if any(not c.strip() for c in self.choices):
            raise ValueError(f"{self.question!r} has an empty choice.")
        if len(set(self.choices)) != len(self.choices):
            raise ValueError(f"{self.question!r} repeats a choice: {self.choices}.")
        if not isinstance(self.answer, int) or not 0 <= self.answer < len(self.choices):
            raise ValueError(
                f"answer index {self.answer} is out of range for {len(self.choices)} choices "
                f"in {self.question!r}."
            )

    @property
    def answer_text(self) -> str:
        return self.choices[self.answer]

    def to_dict(self) -> dict[str, Any]:
        return {
            "question": self.question,
            "choices": list(self.choices),
            "answer": self.answer,
            "category": self.category,
        }


def _item_from_dict(
    row: dict[str, Any], where: str, default_category: str = ""
) -> MultipleChoiceItem:
    for key in ("question", "choices", "answer"):
        if key not in row:
            raise ValueError(f"{where} has no {key!r} field (expected question, choices, answer).")
    choices = row["choices"]
    if isinstance(choices, dict):  # {"A": ..., "B": ...}
        choices = [choices[k] for k in sorted(choices)]
    if not isinstance(choices, (list, tuple)):
        raise ValueError(f"{where}: 'choices' must be a list of strings.")
    answer = row["answer"]
    if isinstance(answer, str):
        answer = _letter_index(answer, len(choices), where)
    category = str(row.get("category") or row.get("subject") or default_category)
    try:
        return MultipleChoiceItem(str(row["question"]), tuple(choices), int(answer), category)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None


def _letter_index(letter: str, n_choices: int, where: str) -> int:
    s = letter.strip().upper()
    if s.isdigit():
        return int(s)
    if len(s) != 1 or s not in LETTERS[:n_choices]:
        raise ValueError(
            f"{where}: answer {letter!r} is not one of the letters {list(LETTERS[:n_choices])}."
        )
    return LETTERS.index(s)


def load_tasks(categories: str | Iterable[str] | None = None) -> list[MultipleChoiceItem]:
    """The shipped multiple-choice task set, optionally restricted to some categories.

    Args:
        categories: One name or several from ``ALL_CATEGORIES`` (default: the four-choice
            ``CATEGORIES``; the fixed-label ``FIXED_LABEL_CATEGORIES`` only when named), in file
            order.

    Examples:
        >>> items = load_tasks("capitals")
        >>> len(items) > 50, items[0].category, len(items[0].choices)
        (True, 'capitals', 4)
        >>> load_tasks("poetry")
        Traceback (most recent call last):
        ...
        ValueError: Unknown task categories ['poetry']; the shipped set has ('capitals', ...).
        >>> load_tasks("yes_no")[0].choices
        ('No', 'Yes')
    """
    if isinstance(categories, str):
        categories = [categories]
    wanted = list(CATEGORIES) if categories is None else list(categories)
    unknown = [c for c in wanted if c not in ALL_CATEGORIES]
    if unknown:
        raise ValueError(
            f"Unknown task categories {unknown}; the shipped set has {ALL_CATEGORIES}."
        )
    text = resources.files("tlmicroscope").joinpath("data/tasks.jsonl").read_text(encoding="utf-8")
    items = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if line.strip():
            item = _item_from_dict(json.loads(line), f"tasks.jsonl:{lineno}")
            if item.category in wanted:
                items.append(item)
    return items


def read_mmlu(path: str | Path, *, category: str | None = None) -> list[MultipleChoiceItem]:
    """Read MMLU-format questions a user has on disk.

    Accepts a CSV file as MMLU ships it (columns question, A, B, C, D, answer letter; a header row
    is detected and skipped), a JSONL file with ``question``/``choices``/``answer`` (an index or a
    letter; ``subject`` or ``category`` optional), or a folder of such files (MMLU's
    ``data/test``); the category defaults to the file name without ``_test``/``_dev``/``_val``.

    Examples:
        >>> import tempfile, os
        >>> d = tempfile.mkdtemp(); p = os.path.join(d, "astronomy_test.csv")
        >>> _ = open(p, "w").write('What orbits Earth?,Mars,The Moon,Venus,The Sun,B\\n')
        >>> [(i.category, i.answer_text) for i in read_mmlu(p)]
        [('astronomy', 'The Moon')]
    """
    path = Path(path).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in (".csv", ".jsonl"))
        if not files:
            raise ValueError(f"The folder {path} holds no .csv or .jsonl MMLU files.")
        return [item for f in files for item in read_mmlu(f, category=category)]
    if not path.is_file():
        raise FileNotFoundError(f"No MMLU file at {path}.")
    default = category or _subject_from_name(path)
    items: list[MultipleChoiceItem] = []
    if path.suffix.lower() == ".jsonl":
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError as exc:
                    raise ValueError(f"{path}:{lineno} is not valid JSON: {exc}") from exc
                items.append(_item_from_dict(row, f"{path}:{lineno}", default))
    elif path.suffix.lower() == ".csv":
        with open(path, encoding="utf-8", newline="") as f:
            for lineno, row in enumerate(csv.reader(f), 1):
                if not row or not any(cell.strip() for cell in row):
                    continue
                if len(row) < 4:
                    raise ValueError(
                        f"{path}:{lineno} has {len(row)} columns; MMLU CSV rows are question, "
                        "two or more choices, then the answer letter."
                    )
                if lineno == 1 and row[-1].strip().lower() in ("answer", "target", "label"):
                    continue  # a header row
                where = f"{path}:{lineno}"
                choices = tuple(row[1:-1])
                answer = _letter_index(row[-1], len(choices), where)
                try:
                    items.append(MultipleChoiceItem(row[0], choices, answer, default))
                except ValueError as exc:
                    raise ValueError(f"{where}: {exc}") from None
    else:
        raise ValueError(f"{path} is neither .csv nor .jsonl; MMLU files come as CSV or JSONL.")
    if not items:
        raise ValueError(f"{path} holds no questions.")
    return items


def _subject_from_name(path: Path) -> str:
    stem = path.stem
    for suffix in ("_test", "_dev", "_val", "_validation", "_train"):
        if stem.endswith(suffix):
            return stem[: -len(suffix)]
    return stem


def _block(item: MultipleChoiceItem, style: ChoiceStyle, show_choices: bool) -> str:
    lines = [f"Question: {item.question}"]
    if style == "letter":
        lines += [f"{LETTERS[i]}. {c}" for i, c in enumerate(item.choices)]
    elif show_choices:
        lines.append("Choices: " + ", ".join(item.choices))
    lines.append("Answer:")
    return "\n".join(lines)


def format_prompt(
    item: MultipleChoiceItem,
    shots: Sequence[MultipleChoiceItem] = (),
    *,
    style: ChoiceStyle = "text",
    show_choices: bool = False,
    instruction: str | None = None,
) -> str:
    """A few-shot prompt: each shot answered, then ``item`` ending in ``"Answer:"``.

    Args:
        item: The question to ask.
        shots: Solved examples placed before it (their correct answers are shown).
        style: ``"text"`` answers with the choice's text; ``"letter"`` lists the choices as
            ``A.``, ``B.`` ... and answers with the letter (the MMLU format).
        show_choices: In the text style, also list the choices on a ``Choices:`` line.
        instruction: An optional first line, e.g. MMLU's "The following are multiple choice
            questions about ...".

    Examples:
        >>> q = MultipleChoiceItem("What is the capital of Peru?", ("Lima", "Quito"), 0, "capitals")
        >>> chile = "What is the capital of Chile?"
        >>> shot = MultipleChoiceItem(chile, ("Lima", "Santiago"), 1, "capitals")
        >>> print(format_prompt(q, [shot]))
        Question: What is the capital of Chile?
        Answer: Santiago
        <BLANKLINE>
        Question: What is the capital of Peru?
        Answer:
    """
    if style not in ("text", "letter"):
        raise ValueError(f"style must be 'text' or 'letter', got {style!r}.")
    parts = [instruction.strip()] if instruction else []
    for shot in shots:
        answer = LETTERS[shot.answer] if style == "letter" else shot.answer_text
        parts.append(f"{_block(shot, style, show_choices)} {answer}")
    parts.append(_block(item, style, show_choices))
    return "\n\n".join(parts)


def continuations(item: MultipleChoiceItem, *, style: ChoiceStyle = "text") -> list[str]:
    """The answer continuations scored after a prompt: ``" " + choice`` or ``" A"``, ``" B"`` ...

    Examples:
        >>> continuations(MultipleChoiceItem("2+2?", ("3", "4"), 1, "arithmetic"))
        [' 3', ' 4']
    """
    if style == "letter":
        return [f" {LETTERS[i]}" for i in range(len(item.choices))]
    return [f" {c}" for c in item.choices]


def few_shot_prompts(
    items: Sequence[MultipleChoiceItem],
    *,
    n_shots: int = 3,
    seed: int = 0,
    pool: Sequence[MultipleChoiceItem] | None = None,
    style: ChoiceStyle = "text",
    show_choices: bool = False,
) -> list[str]:
    """One few-shot prompt per item, with shots drawn (seeded) from the same category of ``pool``.

    The item itself is never one of its own shots. ``pool`` defaults to ``items``.

    Examples:
        >>> items = load_tasks("plurals")[:5]
        >>> prompts = few_shot_prompts(items, n_shots=2)
        >>> prompts[0].count("Question:"), prompts[0].endswith("Answer:")
        (3, True)
    """
    pool = list(items) if pool is None else list(pool)
    rng = random.Random(seed)
    prompts = []
    for item in items:
        same = [p for p in pool if p.category == item.category and p.question != item.question]
        if len(same) < n_shots:
            raise ValueError(
                f"Category {item.category!r} has {len(same)} other items, fewer than "
                f"n_shots={n_shots}; "
                "lower n_shots or pass a larger pool."
            )
        shots = rng.sample(same, n_shots)
        prompts.append(format_prompt(item, shots, style=style, show_choices=show_choices))
    return prompts


@dataclass(frozen=True)
class ScoringRun:
    """A token sequence to run once: a prompt, maybe followed by a continuation's first tokens."""

    prompt: int
    ids: torch.Tensor
    start: int  # number of prompt tokens


@dataclass(frozen=True)
class ScoringTarget:
    """A continuation scored inside a run: its tokens are predicted at ``positions`` of ``run``."""

    prompt: int
    choice: int
    run: int
    positions: torch.Tensor
    tokens: torch.Tensor


def _tokenizer(model: Any) -> Any:
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        raise ValueError(
            "This model has no tokenizer; answer scoring needs text prompts and choices."
        )
    return tok


def scoring_plan(
    model: Any, prompts: Sequence[str], choices: Sequence[Sequence[str]]
) -> tuple[list[ScoringRun], list[ScoringTarget]]:
    """The fewest forward passes that score every continuation of every prompt.

    A continuation t_1..t_m needs the logits after ``prompt + t_1..t_{m-1}``. In a causal model any
    run that has that context as a prefix provides them, so per prompt only the contexts that are
    not a prefix of another are run: one run for all single-token answers, plus one per distinct
    longer answer prefix. Shared by ``choice_logprobs`` and the injection experiment
    (``tlmicroscope.causal.injection``), which score answers the same way.

    Examples:
        >>> from tlmicroscope.models import tiny_model
        >>> runs, targets = scoring_plan(tiny_model(n_layers=1), ["Q: 2+2="], [["4", "5", "45"]])
        >>> len(runs), [t.run for t in targets]  # "4" is a prefix of "45": one run scores all
        (1, [0, 0, 0])
    """
    from tlmicroscope.inputs import to_tokens

    if len(prompts) != len(choices):
        raise ValueError(f"Got {len(prompts)} prompts but {len(choices)} lists of choices.")
    if not prompts:
        raise ValueError("No prompts to score.")
    tok = _tokenizer(model)
    n_ctx = int(model.cfg.n_ctx)
    runs: list[ScoringRun] = []
    targets: list[ScoringTarget] = []
    for i, (prompt, opts) in enumerate(zip(prompts, choices)):
        if not opts:
            raise ValueError(f"Prompt {i} has no choices to score.")
        ctx = to_tokens(model, prompt)[0].cpu().tolist()
        conts = []
        for j, cont in enumerate(opts):
            ids = tok(cont, add_special_tokens=False)["input_ids"]
            if not ids:
                raise ValueError(
                    f"Choice {j} of prompt {i} ({cont!r}) is empty after tokenization."
                )
            if len(ctx) + len(ids) - 1 > n_ctx:
                raise ValueError(
                    f"Prompt {i} with choice {j} is {len(ctx) + len(ids)} tokens, over the model's "
                    f"context of {n_ctx}; use fewer shots or shorter questions."
                )
            conts.append(ids)
        needs = [tuple(ctx + ids[:-1]) for ids in conts]
        maximal = [
            n
            for n in dict.fromkeys(needs)
            if not any(len(o) > len(n) and o[: len(n)] == n for o in needs)
        ]
        first = len(runs)
        runs += [ScoringRun(i, torch.tensor(m, dtype=torch.long), len(ctx)) for m in maximal]
        for j, (ids, need) in enumerate(zip(conts, needs)):
            r = next(first + k for k, m in enumerate(maximal) if m[: len(need)] == need)
            pos = torch.arange(len(ctx) - 1, len(ctx) - 1 + len(ids))
            targets.append(ScoringTarget(i, j, r, pos, torch.tensor(ids, dtype=torch.long)))
    return runs, targets


def padded_batches(runs: list[ScoringRun], batch_size: int, pad_id: int):
    """``(run indices, [batch pos] tokens)`` for runs of similar length, right-padded.

    Right padding needs no attention mask: in a causal model a token never sees the positions
    after it, so the padding cannot change the logits of the real tokens.

    Examples:
        >>> import torch
        >>> runs = [ScoringRun(0, torch.tensor([5, 6, 7]), 2), ScoringRun(1, torch.tensor([8]), 1)]
        >>> [(idx, toks.tolist()) for idx, toks in padded_batches(runs, 2, 0)]
        [([1, 0], [[8, 0, 0], [5, 6, 7]])]
    """
    order = sorted(range(len(runs)), key=lambda k: len(runs[k].ids))
    for lo in range(0, len(order), batch_size):
        idx = order[lo : lo + batch_size]
        width = max(len(runs[k].ids) for k in idx)
        toks = torch.full((len(idx), width), pad_id, dtype=torch.long)
        for r, k in enumerate(idx):
            toks[r, : len(runs[k].ids)] = runs[k].ids
        yield idx, toks


def pad_token_id(model: Any) -> int:
    """The id used for padding: the tokenizer's pad, else its end or start of text, else 0.

    Examples:
        >>> from types import SimpleNamespace
        >>> pad_token_id(SimpleNamespace(tokenizer=None))
        0
    """
    tok = getattr(model, "tokenizer", None)
    for attr in ("pad_token_id", "eos_token_id", "bos_token_id"):
        v = getattr(tok, attr, None) if tok is not None else None
        if v is not None:
            return int(v)
    return 0


def targets_by_run(targets: list[ScoringTarget]) -> dict[int, list[ScoringTarget]]:
    """The targets of each run, by run index (in the order given).

    Examples:
        >>> import torch
        >>> one = torch.tensor([0])
        >>> t = [ScoringTarget(0, j, r, one, one) for j, r in [(0, 1), (1, 0)]]
        >>> {run: [x.choice for x in ts] for run, ts in targets_by_run(t).items()}
        {1: [0], 0: [1]}
    """
    by_run: dict[int, list[ScoringTarget]] = {}
    for t in targets:
        by_run.setdefault(t.run, []).append(t)
    return by_run


def choice_logprobs(
    model: Any,
    prompts: Sequence[str],
    choices: Sequence[Sequence[str]],
    *,
    batch_size: int = 16,
    progress: bool = False,
) -> Float[torch.Tensor, "n_prompts n_choices"]:
    """Summed log-likelihood of each answer continuation given its prompt.

    Args:
        model: A TransformerLens model with a tokenizer.
        prompts: Prompts (e.g. from ``format_prompt``), each ending where the answer starts.
        choices: For each prompt, its continuations as text, e.g. ``[" Paris", " Rome"]``
            (``continuations(item)`` builds them). The prompt is tokenized on its own and the
            continuation's tokens are appended, so the score is
            ``sum_t log p(cont_t | prompt, cont_<t)``.
        batch_size: Sequences per forward pass.
        progress: Show a tqdm bar.

    Returns:
        ``[n_prompts n_choices]`` in nats; a prompt with fewer choices than the widest gets
        ``-inf`` in its missing columns.

    Examples:
        >>> from tlmicroscope.models import tiny_model
        >>> lp = choice_logprobs(tiny_model(n_layers=1), ["Q: 1+1? A:"], [[" 2", " 11"]])
        >>> tuple(lp.shape), bool((lp < 0).all())
        ((1, 2), True)
    """
    from tqdm.auto import tqdm

    from tlmicroscope.inputs import ensure_eval

    ensure_eval(model)
    runs, targets = scoring_plan(model, prompts, choices)
    by_run = targets_by_run(targets)
    n_choices = max(len(c) for c in choices)
    out = torch.full((len(prompts), n_choices), -torch.inf)
    device = getattr(model.cfg, "device", None)
    batches = list(padded_batches(runs, batch_size, pad_token_id(model)))
    with torch.inference_mode():
        for idx, toks in tqdm(batches, desc="scoring answers", disable=not progress):
            logits = model(toks.to(device) if device is not None else toks)
            for r, k in enumerate(idx):
                for t in by_run[k]:
                    lp = torch.log_softmax(logits[r, t.positions].float(), -1)
                    out[t.prompt, t.choice] = (
                        lp.gather(1, t.tokens[:, None].to(lp.device)).sum().cpu()
                    )
    return out


def accuracy(
    model: Any,
    items: Sequence[MultipleChoiceItem],
    *,
    n_shots: int = 3,
    seed: int = 0,
    style: ChoiceStyle = "text",
    show_choices: bool = False,
    batch_size: int = 16,
    progress: bool = False,
) -> dict[str, float]:
    """Fraction of items whose correct answer gets the highest log-likelihood, per category and
    overall.

    Returns:
        ``{category: accuracy, ..., "all": accuracy}``.
    """
    prompts = few_shot_prompts(
        items, n_shots=n_shots, seed=seed, style=style, show_choices=show_choices
    )
    conts = [continuations(it, style=style) for it in items]
    lp = choice_logprobs(model, prompts, conts, batch_size=batch_size, progress=progress)
    correct = (lp.argmax(-1) == torch.tensor([it.answer for it in items])).float()
    out: dict[str, float] = {}
    for cat in dict.fromkeys(it.category for it in items):
        mask = torch.tensor([it.category == cat for it in items])
        out[cat] = float(correct[mask].mean())
    out["all"] = float(correct.mean())
    return out
