"""The multiple-choice task set, MMLU readers, prompt building and answer scoring."""

from __future__ import annotations

import json

import pytest
import torch

from tlmicroscope.tasks import (
    CATEGORIES,
    MultipleChoiceItem,
    choice_logprobs,
    continuations,
    few_shot_prompts,
    format_prompt,
    load_tasks,
    read_mmlu,
)


def test_item_validation():
    with pytest.raises(ValueError, match="at least two"):
        MultipleChoiceItem("Q?", ("a",), 0, "x")
    with pytest.raises(ValueError, match="repeats"):
        MultipleChoiceItem("Q?", ("a", "a"), 0, "x")
    with pytest.raises(ValueError, match="out of range"):
        MultipleChoiceItem("Q?", ("a", "b"), -1, "x")
    with pytest.raises(ValueError, match="non-empty question"):
        MultipleChoiceItem("  ", ("a", "b"), 0, "x")
    item = MultipleChoiceItem("Q?", ["a", "b"], 1, "x")
    assert item.choices == ("a", "b") and item.answer_text == "b"
    with pytest.raises(AttributeError):
        item.answer = 0  # frozen


def test_shipped_task_set_is_well_formed():
    items = load_tasks()
    assert 250 <= len(items) <= 400
    assert {it.category for it in items} == set(CATEGORIES)
    for cat in CATEGORIES:
        assert len(load_tasks(cat)) >= 40
    assert len({it.question for it in items}) == len(items)
    for it in items:
        assert len(it.choices) == 4
        if it.category == "arithmetic":  # the stored answer is the true result
            a, op, b = it.question.removeprefix("What is ").rstrip("?").split()
            expected = {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
            assert int(it.answer_text) == expected
    assert [it.category for it in load_tasks(["plurals", "capitals"])].count("antonyms") == 0
    with pytest.raises(ValueError, match="Unknown task categories"):
        load_tasks(["capitals", "chess"])


def test_fixed_label_categories_are_balanced_and_opt_in():
    from tlmicroscope.tasks import ALL_CATEGORIES, FIXED_LABEL_CATEGORIES

    assert not {it.category for it in load_tasks()} & set(
        FIXED_LABEL_CATEGORIES
    )  # the default is unchanged
    assert len(load_tasks(ALL_CATEGORIES)) == len(load_tasks()) + sum(
        len(load_tasks(c)) for c in FIXED_LABEL_CATEGORIES
    )
    expected = {"sentiment": ("negative", "positive"), "yes_no": ("No", "Yes")}
    for cat in FIXED_LABEL_CATEGORIES:
        items = load_tasks(cat)
        assert len(items) >= 80 and len({it.question for it in items}) == len(items)
        assert {it.choices for it in items} == {expected[cat]}  # the same labels for every item
        answers = [it.answer for it in items]
        assert answers.count(0) == answers.count(1)  # balanced: a constant guess scores 0.5
    for it in load_tasks("sentiment"):  # the label is the adjective's polarity, by construction
        assert it.question.startswith('Is the review "The ') and it.question.endswith(
            '." positive or negative?'
        )


def test_read_mmlu_csv_jsonl_and_folder(tmp_path):
    folder = tmp_path / "test"
    folder.mkdir()
    (folder / "astronomy_test.csv").write_text(
        'What orbits Earth?,Mars,The Moon,Venus,The Sun,B\n"Comma, inside?",x,y,z,w,d\n'
    )
    (folder / "header.csv").write_text("question,A,B,C,D,answer\nQ1,a,b,c,d,A\n")
    rows = [
        {"question": "2+2?", "choices": ["3", "4"], "answer": 1, "subject": "math"},
        {"question": "Sky?", "choices": ["blue", "green", "red"], "answer": "A"},
    ]
    (folder / "extra_dev.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    items = read_mmlu(folder)
    assert [(i.category, i.answer_text) for i in items] == [
        ("astronomy", "The Moon"),
        ("astronomy", "w"),
        ("math", "4"),
        ("extra", "blue"),
        ("header", "a"),
    ]
    assert items[1].question == "Comma, inside?"
    (tmp_path / "bad.csv").write_text("Q,a,b,c,d,E\n")
    with pytest.raises(ValueError, match="not one of the letters"):
        read_mmlu(tmp_path / "bad.csv")
    (tmp_path / "short.csv").write_text("Q,a\n")
    with pytest.raises(ValueError, match="columns"):
        read_mmlu(tmp_path / "short.csv")
    (tmp_path / "nochoices.jsonl").write_text('{"question": "Q", "answer": 0}\n')
    with pytest.raises(ValueError, match="choices"):
        read_mmlu(tmp_path / "nochoices.jsonl")
    with pytest.raises(FileNotFoundError):
        read_mmlu(tmp_path / "missing.csv")


def test_prompts():
    q = MultipleChoiceItem("What is 2 + 3?", ("4", "5", "6", "7"), 1, "arithmetic")
    shot = MultipleChoiceItem("What is 1 + 1?", ("2", "3", "1", "0"), 0, "arithmetic")
    letter = format_prompt(q, [shot], style="letter", instruction="Multiple choice about math.")
    assert letter.splitlines()[0] == "Multiple choice about math."
    assert "A. 2\nB. 3\nC. 1\nD. 0\nAnswer: A" in letter and letter.endswith("D. 7\nAnswer:")
    assert continuations(q, style="letter") == [" A", " B", " C", " D"]
    assert format_prompt(q, show_choices=True).splitlines()[1] == "Choices: 4, 5, 6, 7"
    items = load_tasks("antonyms")[:10]
    prompts = few_shot_prompts(items, n_shots=3, seed=4)
    for it, p in zip(items, prompts):
        blocks = p.split("\n\n")
        assert len(blocks) == 4 and blocks[-1] == f"Question: {it.question}\nAnswer:"
        assert it.question not in "\n\n".join(blocks[:-1])  # never its own shot
    assert prompts == few_shot_prompts(items, n_shots=3, seed=4)
    with pytest.raises(ValueError, match="fewer than n_shots"):
        few_shot_prompts(items[:2], n_shots=2)


def _brute_force_logprob(model, prompt: str, cont: str) -> float:
    ctx = model.to_tokens(prompt)[0]
    cont_ids = torch.tensor(model.tokenizer(cont, add_special_tokens=False)["input_ids"])
    ids = torch.cat([ctx, cont_ids])[None]
    with torch.no_grad():
        logp = torch.log_softmax(model(ids)[0].float(), -1)
    return float(sum(logp[len(ctx) - 1 + i, int(t)] for i, t in enumerate(cont_ids)))


@pytest.mark.models
def test_choice_logprobs_match_scoring_each_answer_separately(tiny_llama):
    prompts = ["Question: 2 + 10?\nAnswer:", "Q: hi\nA:", "x"]
    # Shared prefixes (" 12"/" 13"/" 1"), single tokens and a ragged row exercise the run planning.
    choices = [[" 12", " 13", " 1", " 2"], [" hello", " h"], [" yes", " no", " maybe"]]
    got = choice_logprobs(tiny_llama, prompts, choices, batch_size=3)
    assert got.shape == (3, 4)
    for i, (p, opts) in enumerate(zip(prompts, choices)):
        for j, c in enumerate(opts):
            assert got[i, j].item() == pytest.approx(
                _brute_force_logprob(tiny_llama, p, c), abs=1e-4
            )
    assert got[1, 2] == -torch.inf and got[2, 3] == -torch.inf
    with pytest.raises(ValueError, match="empty after tokenization"):
        choice_logprobs(tiny_llama, ["a"], [[""]])
    with pytest.raises(ValueError, match="2 prompts but 1"):
        choice_logprobs(tiny_llama, ["a", "b"], [[" x"]])
    with pytest.raises(ValueError, match="context"):
        choice_logprobs(tiny_llama, ["word " * 40], [[" x"]])
