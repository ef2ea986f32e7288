"""Filler-token removal: the text filters on hand-made texts, and the experiment on a tiny model."""

import numpy as np
import pytest
import torch

from tlmicroscope.microscope import REMOVALS, filler_removal_experiment, remove_filler
from tlmicroscope.microscope.removal import _paired_bootstrap, corpus_passages
from tlmicroscope.tasks import MultipleChoiceItem, choice_logprobs, continuations, few_shot_prompts

TEXT = (
    "The cat, which sat on a mat, didn't move.\nIt was 3.5 meters away; an owl watched (quietly)!"
)


def test_each_removal_on_a_hand_made_text():
    assert (
        remove_filler(TEXT, "articles")
        == "cat, which sat on mat, didn't move.\nIt was 3.5 meters away; owl watched (quietly)!"
    )
    assert (
        remove_filler(TEXT, "punctuation")
        == "The cat which sat on a mat didn't move\nIt was 3.5 meters away an owl watched quietly"
    )
    assert (
        remove_filler(TEXT, "stop_words")
        == "cat, sat mat, move.\n3.5 meters away; owl watched (quietly)!"
    )
    assert (
        remove_filler(TEXT, "stop_words+punctuation")
        == "cat sat mat move\n3.5 meters away owl watched quietly"
    )
    assert remove_filler(TEXT, "punctuation+stop_words") == remove_filler(
        TEXT, "stop_words+punctuation"
    )


def test_spacing_case_and_edges():
    assert remove_filler("  The  end ", "articles") == " end "
    assert remove_filler("THE An a", "articles") == ""
    assert remove_filler("well-known rock'n'roll", "punctuation") == "well-known rock'n'roll"
    assert remove_filler("Para one.\n\nThe para two.", "articles") == "Para one.\n\npara two."
    assert remove_filler("", "stop_words") == ""
    with pytest.raises(ValueError, match="Unknown removal 'adverbs'"):
        remove_filler("x", "adverbs")
    assert set(REMOVALS) == {"stop_words", "punctuation", "articles", "stop_words+punctuation"}


def test_paired_bootstrap_interval():
    rng = np.random.default_rng(0)
    base = rng.normal(size=400)
    other = base + 0.3 + 0.1 * rng.normal(size=400)
    delta, (lo, hi) = _paired_bootstrap(base, other, 2000, np.random.default_rng(1))
    assert delta == pytest.approx((other - base).mean())
    assert lo < delta < hi and hi - lo < 0.05 and lo > 0.25


def test_corpus_passages_are_consecutive_words():
    doc = " ".join(f"w{i}" for i in range(100))
    ps = corpus_passages([doc], n_passages=5, context_words=20, continuation_words=5)
    assert len(ps) == 4
    ctx, cont = ps[0]
    assert ctx.split() == [f"w{i}" for i in range(20)] and cont.split() == [
        f"w{i}" for i in range(20, 25)
    ]
    with pytest.raises(ValueError, match="No document"):
        corpus_passages(["short text"], context_words=20, continuation_words=5)


@pytest.mark.models
def test_experiment_matches_direct_scoring(tiny_llama, tmp_path):
    items = [
        MultipleChoiceItem(f"Is the number {i} even or odd?", ("even", "odd"), i % 2, "parity")
        for i in range(8)
    ]
    corpus = ["The quick brown fox jumps over the lazy dog and the cat, again. " * 20]
    res = filler_removal_experiment(
        tiny_llama,
        items,
        corpus=corpus,
        removals=("articles", "punctuation"),
        n_shots=1,
        n_passages=4,
        context_words=15,
        continuation_words=4,
        n_boot=200,
        progress=False,
    )
    assert (
        res.conditions == ("original", "articles", "punctuation")
        and res.n_items == 8
        and res.n_passages == 4
    )
    prompts = few_shot_prompts(items, n_shots=1, seed=0, pool=items)
    lp = choice_logprobs(tiny_llama, prompts, [continuations(i) for i in items])
    expected = (lp.argmax(-1) == torch.tensor([i.answer for i in items])).float().numpy()
    np.testing.assert_array_equal(res.correct[0], expected)
    assert res.accuracy[0] == pytest.approx(expected.mean())
    assert res.accuracy_delta[1] == pytest.approx(res.accuracy[1] - res.accuracy[0])
    passages = corpus_passages(corpus, n_passages=4, context_words=15, continuation_words=4)
    ctx = [remove_filler(c, "punctuation") for c, _ in passages]
    lp = choice_logprobs(tiny_llama, ctx, [[" " + c] for _, c in passages])
    n_tok = [
        len(tiny_llama.tokenizer(" " + c, add_special_tokens=False)["input_ids"])
        for _, c in passages
    ]
    np.testing.assert_allclose(res.passage_loss[2], -lp[:, 0].numpy() / np.array(n_tok), rtol=1e-5)
    assert res.loss_ci[2, 0] <= res.loss_delta[2] <= res.loss_ci[2, 1]
    assert res.removed_fraction[0] == 0 and res.removed_fraction[1] > 0
    df = res.to_dataframe()
    assert list(df["condition"]) == list(res.conditions)


@pytest.mark.models
def test_mmlu_files_and_skipping_parts(tiny_llama, tmp_path):
    csv = tmp_path / "astronomy_test.csv"
    csv.write_text(
        "What orbits the Earth?,Mars,The Moon,Venus,The Sun,B\n"
        "What is a star?,A gas ball,A rock,A planet,A moon,A\n"
    )
    res = filler_removal_experiment(
        tiny_llama, csv, corpus=False, removals=("stop_words",), n_boot=50, progress=False
    )
    assert res.n_items == 2 and res.n_passages == 0 and np.isnan(res.loss).all()
    assert res.provenance.settings["dataset"] == "mmlu" and res.provenance.settings["n_shots"] == 0
    with pytest.raises(TypeError, match="dataset must be"):
        filler_removal_experiment(tiny_llama, [1, 2], corpus=False, progress=False)
    with pytest.raises(ValueError, match="Unknown removal"):
        filler_removal_experiment(tiny_llama, csv, removals=("nouns",), progress=False)
