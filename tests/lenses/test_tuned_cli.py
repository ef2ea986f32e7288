"""The train-lens and eval-lens subcommands, and the demo picking up a trained lens."""

import json

import pytest
import torch

import tlmicroscope.app.commands.tuned as tuned_cli
from tlmicroscope.cli import main
from tlmicroscope.lenses import TunedLens, load_lens
from tlmicroscope.lenses.train import default_lens_dir

pytestmark = pytest.mark.models


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.jsonl"
    rows = [
        {"text": f"Document {i} says the lens reads each layer of the model. " * 6}
        for i in range(6)
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


@pytest.fixture
def use_tiny(monkeypatch, tiny_llama):
    monkeypatch.setattr(tuned_cli, "load_from_args", lambda args: tiny_llama)
    return tiny_llama


def test_train_then_eval(use_tiny, corpus, tmp_path, capsys):
    out = tmp_path / "lens"
    args = [
        "train-lens",
        "--corpus",
        str(corpus),
        "--out",
        str(out),
        "--steps",
        "3",
        "--tokens-per-step",
        "128",
        "--seq-len",
        "32",
        "--init-tokens",
        "128",
        "--precision",
        "fp32",
        "--checkpoint-every",
        "2",
        "--eval-tokens",
        "64",
    ]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert str(out.resolve()) in captured.out
    assert "tuned KL" in captured.out and "tokens/s" in captured.err
    lens = load_lens(out, use_tiny)
    assert isinstance(lens, TunedLens) and lens.settings["steps"] == 3
    assert (out / "checkpoint" / "config.json").is_file() and (out / "training.json").is_file()
    # a second run into the same folder needs --resume; with it, there is nothing left to do
    assert main(args) == 2
    assert "--resume" in capsys.readouterr().err
    assert main(args + ["--resume"]) == 0
    assert torch.equal(load_lens(out, use_tiny).weight, lens.weight)

    html, js = tmp_path / "eval.html", tmp_path / "eval.json"
    assert (
        main(
            [
                "eval-lens",
                "--lens",
                str(out),
                "--corpus",
                str(corpus),
                "--tokens",
                "64",
                "--seq-len",
                "32",
                "--bias",
                "--transfer",
                "--html",
                str(html),
                "--json",
                str(js),
            ]
        )
        == 0
    )
    rows = json.loads(js.read_text())
    assert [r["label"] for r in rows] == ["h0", "h1", "h2", "h3"] and "logit_kl" in rows[0]
    assert html.stat().st_size > 10_000


def test_cli_errors_are_one_clear_line(use_tiny, corpus, tmp_path, capsys):
    assert (
        main(
            [
                "train-lens",
                "--corpus",
                str(corpus),
                "--out",
                str(tmp_path / "x"),
                "--seq-len",
                "4096",
                "--tokens-per-step",
                "4096",
            ]
        )
        == 2
    )
    assert "context" in capsys.readouterr().err
    assert main(["eval-lens", "--lens", str(tmp_path / "missing")]) == 2
    assert "train-lens" in capsys.readouterr().err


def test_default_location(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setenv("TLMICROSCOPE_HOME", str(tmp_path / "store"))
    assert default_lens_dir("smollm2-135m") == default_lens_dir(
        "HuggingFaceTB/SmolLM2-135M-Instruct"
    )
    assert default_lens_dir("smollm2-135m") == tmp_path / "store" / "smollm2-135m" / "tuned-lens"
    # The second embedded model: its short names and the label a loaded Gemma carries agree.
    assert {
        default_lens_dir(n) for n in ("gemma3-270m", "gemma-3-270m", "google/gemma-3-270m")
    } == {tmp_path / "store" / "gemma3-270m" / "tuned-lens"}
    assert default_lens_dir(tiny_llama).parent.name == "tiny-llama-l3-d32-s0"
    assert default_lens_dir("smollm2", processed=True).parent.name == "smollm2-135m-processed"
    # the layout of earlier versions, under a given root
    assert str(default_lens_dir("smollm2-135m", root="out")) == "out/tuned-lens-smollm2-135m"
    assert default_lens_dir(tiny_llama, root="o").name == "tuned-lens-tiny-llama-l3-d32-s0"


def test_process_weights_fits_land_in_the_processed_folder(
    use_tiny, corpus, tmp_path, monkeypatch, capsys
):
    """train-lens --process-weights (no --out) writes to <store>/<model>-processed/tuned-lens;
    eval-lens and lens-bench look there with the flag, and in the unprocessed folder without it."""
    from tlmicroscope.app.commands.bench import _default_lenses

    store = tmp_path / "store"
    monkeypatch.setenv("TLMICROSCOPE_HOME", str(store))
    model_args = ["--model", "smollm2-135m", "--process-weights"]
    train = ["train-lens", "--corpus", str(corpus), "--steps", "1", "--tokens-per-step", "64"]
    train += ["--seq-len", "32", "--init-tokens", "64", "--precision", "fp32", *model_args]
    assert main(train) == 0
    processed = store / "smollm2-135m-processed" / "tuned-lens"
    assert (processed / "config.json").is_file()
    assert not (store / "smollm2-135m").exists()
    evaluate = ["eval-lens", "--corpus", str(corpus), "--tokens", "32", "--seq-len", "32"]
    assert main(evaluate + model_args) == 0
    capsys.readouterr()
    assert main(evaluate + ["--model", "smollm2-135m"]) == 2  # the unprocessed folder is empty
    assert str(store / "smollm2-135m" / "tuned-lens") in capsys.readouterr().err
    assert _default_lenses("smollm2-135m", processed=True) == ["logit", str(processed)]
    assert _default_lenses("smollm2-135m") == ["logit"]
