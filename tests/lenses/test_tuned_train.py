"""Tuned-lens training on tiny models: the objective's gradients, learning, init, resume, bad
input."""

import json

import pytest
import torch

import tlmicroscope.lenses.train as train_module
from tlmicroscope.distributed import DistContext
from tlmicroscope.io import load_fitted
from tlmicroscope.lenses import Readout, TunedLens
from tlmicroscope.lenses._tuned_kl import FinalDistribution, LensObjective
from tlmicroscope.lenses.evaluate import evaluate_lens
from tlmicroscope.lenses.train import (
    CHECKPOINT_DIR,
    TrainingDivergedError,
    lens_token_windows,
    lstsq_init,
    train_tuned_lens,
)

pytestmark = pytest.mark.models

TEXT = [
    "A lens reads what each layer of a language model would predict. " * 6,
    "The tuned lens learns one affine map per layer, trained to match the final output. " * 6,
    "Residual streams carry information from one block to the next, layer after layer. " * 6,
    "Python's documentation explains modules, functions, classes and the standard library. " * 6,
]
FAST = dict(
    tokens_per_step=128,
    seq_len=32,
    precision="fp32",
    progress=False,
    init_tokens=256,
    micro_batch_tokens=64,
    chunk_rows=48,
)


def test_objective_gradients_match_autograd(tiny):
    readout = Readout(tiny)
    d = tiny.cfg.d_model
    g = torch.Generator().manual_seed(1)
    h = 3 * torch.randn(21, d, generator=g)
    final_logits = 2 * torch.randn(21, tiny.cfg.d_vocab, generator=g)
    W = (0.2 * torch.randn(d, d, generator=g)).requires_grad_()
    b = (0.2 * torch.randn(d, generator=g)).requires_grad_()
    # the textbook objective, through autograd and the model's own final norm module
    logq = torch.log_softmax(tiny.unembed(tiny.ln_final(h + h @ W.T + b)), -1)
    logp = torch.log_softmax(final_logits, -1)
    loss = (logp.exp() * (logp - logq)).sum()
    # autograd.grad, not backward(): the session-wide model's parameters must not collect .grad
    W_grad, b_grad = torch.autograd.grad(loss, [W, b])
    obj = LensObjective(readout, chunk_rows=8)
    kl, gW, gb = obj.layer_loss_and_grads(
        h, W.detach(), b.detach(), FinalDistribution.from_logits(final_logits), grad_scale=0.5
    )
    torch.testing.assert_close(kl, loss.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gW, 0.5 * W_grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gb, 0.5 * b_grad, rtol=1e-4, atol=1e-6)
    # bfloat16 GEMMs: same loss to about 1e-2 relative
    kl16, gW16, _ = LensObjective(readout, compute_dtype=torch.bfloat16).layer_loss_and_grads(
        h, W.detach(), b.detach(), FinalDistribution.from_logits(final_logits), grad_scale=0.5
    )
    assert abs(float(kl16) - float(loss.detach())) / float(loss.detach()) < 2e-2
    assert torch.nn.functional.cosine_similarity(gW16.flatten(), gW.flatten(), dim=0) > 0.99


@pytest.mark.parametrize("recipe", ["muon", "sgd"])
def test_a_few_steps_lower_heldout_kl_at_every_layer(tiny, recipe):
    res = train_tuned_lens(tiny, TEXT, steps=12, init="zero", recipe=recipe, holdout=0.2, **FAST)
    ev = evaluate_lens(
        tiny, lens=res.lens, corpus=TEXT, n_tokens=256, seq_len=32, holdout=0.2, progress=False
    )
    tuned, logit = ev.kl[:-1], ev.baseline.kl[:-1]
    assert (tuned < logit).all(), (tuned, logit)
    assert res.kl.shape == (12, tiny.cfg.n_layers)
    assert res.tokens_seen.tolist() == [128 * i for i in range(12)]
    assert res.lens.settings["recipe"] == recipe and res.lens.settings["tokens_seen"] == 12 * 128


def test_lstsq_init_is_the_weighted_ridge_solution(tiny):
    lens = TunedLens.for_model(tiny)
    windows = lens_token_windows(tiny, TEXT, seq_len=32)
    ids = list(range(6))
    ridge = 1e-3
    lstsq_init(tiny, lens, windows, ids, micro=2, ridge=ridge, ctx=DistContext())
    # independent solution: torch.linalg.lstsq on the stacked rows plus ridge rows, in float64
    L, d = tiny.cfg.n_layers, tiny.cfg.d_model
    names = [f"blocks.{i}.hook_resid_pre" for i in range(L)] + [f"blocks.{L - 1}.hook_resid_post"]
    _, cache = tiny.run_with_cache(windows[ids], names_filter=names)
    hs = [cache[n].reshape(-1, d).double() for n in names]
    target = Readout(tiny).normalize(hs[-1])
    eye = torch.eye(d, dtype=torch.float64)
    for layer in range(L):
        x = hs[layer]
        s = x.pow(2).mean(-1, keepdim=True).sqrt()
        X = torch.cat([x / s, 1 / s], 1)
        lam = ridge * (X[:, :d] ** 2).sum(0).mean()
        X_aug = torch.cat(
            [X, torch.cat([lam.sqrt() * eye, torch.zeros(d, 1, dtype=torch.float64)], 1)]
        )
        T_aug = torch.cat([target, torch.zeros(d, d, dtype=torch.float64)])
        B = torch.linalg.lstsq(X_aug, T_aug).solution
        torch.testing.assert_close(
            lens.weight[layer].double(), (B[:-1] - eye).T, rtol=1e-3, atol=2e-3
        )
        torch.testing.assert_close(lens.bias[layer].double(), B[-1], rtol=1e-3, atol=2e-3)


def test_lstsq_init_starts_below_the_logit_lens(tiny_llama):
    res = train_tuned_lens(tiny_llama, TEXT, steps=1, init="lstsq", **FAST)
    zero = train_tuned_lens(tiny_llama, TEXT, steps=1, init="zero", **FAST)
    # the first step's KL is measured before any update: the init itself, on unseen windows
    assert (res.kl[0] < zero.kl[0]).all()


def test_seed_makes_runs_reproducible(tiny_llama):
    a = train_tuned_lens(tiny_llama, TEXT, steps=3, seed=1, **FAST)
    b = train_tuned_lens(tiny_llama, TEXT, steps=3, seed=1, **FAST)
    c = train_tuned_lens(tiny_llama, TEXT, steps=3, seed=2, **FAST)
    assert torch.equal(a.lens.weight, b.lens.weight) and torch.equal(a.kl, b.kl)
    assert not torch.equal(a.lens.weight, c.lens.weight)


def test_model_stays_frozen(tiny_llama):
    before = {k: v.clone() for k, v in tiny_llama.state_dict().items()}
    flags = {k: p.requires_grad for k, p in tiny_llama.named_parameters()}
    lens = TunedLens.for_model(tiny_llama).fit(tiny_llama, TEXT, steps=2, **FAST)
    assert torch.count_nonzero(lens.weight) > 0
    after = tiny_llama.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert flags == {k: p.requires_grad for k, p in tiny_llama.named_parameters()}


@pytest.mark.parametrize("recipe", ["muon", "sgd", "adam"])
def test_resume_equals_an_uninterrupted_run(tiny_llama, tmp_path, recipe):
    full = train_tuned_lens(
        tiny_llama,
        TEXT,
        steps=6,
        recipe=recipe,
        out_dir=str(tmp_path / "a"),
        checkpoint_every=2,
        **FAST,
    )
    part = train_tuned_lens(
        tiny_llama,
        TEXT,
        steps=6,
        recipe=recipe,
        out_dir=str(tmp_path / "b"),
        checkpoint_every=2,
        stop_after=3,
        **FAST,
    )
    assert part.kl.shape[0] == 3
    resumed = train_tuned_lens(
        tiny_llama,
        TEXT,
        steps=6,
        recipe=recipe,
        out_dir=str(tmp_path / "b"),
        checkpoint_every=2,
        resume=True,
        **FAST,
    )
    assert torch.equal(resumed.lens.weight, full.lens.weight)
    assert torch.equal(resumed.lens.bias, full.lens.bias)
    assert torch.equal(resumed.kl, full.kl)
    saved = TunedLens.load(tmp_path / "b", tiny_llama)
    assert torch.equal(saved.weight, full.lens.weight)
    history = json.loads((tmp_path / "b" / "training.json").read_text())
    assert history["step"] == 6 and len(history["history"]["kl"]) == 6


def test_existing_checkpoint_needs_resume_and_same_settings(tiny_llama, tmp_path):
    out = str(tmp_path / "run")
    train_tuned_lens(tiny_llama, TEXT, steps=2, out_dir=out, **FAST)
    with pytest.raises(ValueError, match="resume=True"):
        train_tuned_lens(tiny_llama, TEXT, steps=2, out_dir=out, **FAST)
    with pytest.raises(ValueError, match="steps=2"):
        train_tuned_lens(tiny_llama, TEXT, steps=4, out_dir=out, resume=True, **FAST)
    with pytest.raises(ValueError, match="training data differ"):
        train_tuned_lens(
            tiny_llama, TEXT[:3] + ["other text " * 40], steps=2, out_dir=out, resume=True, **FAST
        )
    from tlmicroscope.models import tiny_model

    with pytest.raises(ValueError, match="another model"):
        train_tuned_lens(
            tiny_model("llama", n_layers=3, seed=9), TEXT, steps=2, out_dir=out, resume=True, **FAST
        )


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tiny_llama, tmp_path, monkeypatch):
    out = tmp_path / "run"
    good = train_tuned_lens(tiny_llama, TEXT, steps=5, stop_after=2, **FAST)
    real_forward = train_module._forward
    calls = {"n": 0}

    def poisoned(model, toks, layers, logits):
        resid, out_logits = real_forward(model, toks, layers, logits)
        if logits:
            calls["n"] += 1
            if calls["n"] > 2 * 2:  # two micro-batches per step: the third step sees NaN
                resid = resid.clone()
                resid[1, 0, 3] = float("nan")
        return resid, out_logits

    monkeypatch.setattr(train_module, "_forward", poisoned)
    with pytest.raises(TrainingDivergedError, match="NaN or infinite.*checkpoint"):
        train_tuned_lens(tiny_llama, TEXT, steps=5, out_dir=str(out), checkpoint_every=1, **FAST)
    tensors, meta = load_fitted(
        out / CHECKPOINT_DIR, kind="tuned_lens_checkpoint", model=tiny_llama
    )
    assert meta["config"]["step"] == 2
    assert torch.equal(tensors["lens.weight"], good.lens.weight)
    assert torch.equal(TunedLens.load(out, tiny_llama).weight, good.lens.weight)


def test_interrupted_checkpoint_save_keeps_the_previous_one(tiny_llama, tmp_path, monkeypatch):
    import safetensors.torch

    out = tmp_path / "run"
    real_save = safetensors.torch.save_file
    calls = {"n": 0}

    def failing_save(tensors, filename, metadata=None):
        calls["n"] += 1
        if calls["n"] == 3:  # the second checkpoint (each checkpoint also saves the lens)
            real_save(tensors, filename, metadata=metadata)
            with open(filename, "r+b") as f:
                f.truncate(100)  # a partly written file, then the disk fills up
            raise OSError(28, "No space left on device")
        return real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", failing_save)
    with pytest.raises(OSError, match="No space left"):
        train_tuned_lens(tiny_llama, TEXT, steps=4, out_dir=str(out), checkpoint_every=1, **FAST)
    _, meta = load_fitted(out / CHECKPOINT_DIR, kind="tuned_lens_checkpoint", model=tiny_llama)
    assert meta["config"]["step"] == 1
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []
    monkeypatch.setattr(safetensors.torch, "save_file", real_save)
    resumed = train_tuned_lens(tiny_llama, TEXT, steps=4, out_dir=str(out), resume=True, **FAST)
    full = train_tuned_lens(tiny_llama, TEXT, steps=4, **FAST)
    assert torch.equal(resumed.lens.weight, full.lens.weight)


def test_bad_input_is_refused_with_the_fix(tiny_llama):
    with pytest.raises(ValueError, match="fewer than one step"):
        train_tuned_lens(
            tiny_llama,
            ["short text " * 20],
            steps=2,
            tokens_per_step=4096,
            seq_len=32,
            progress=False,
        )
    with pytest.raises(ValueError, match="fewer than one window"):
        train_tuned_lens(tiny_llama, ["tiny"], steps=2, **FAST)
    with pytest.raises(ValueError, match="context of 128"):
        train_tuned_lens(
            tiny_llama, TEXT, steps=2, tokens_per_step=512, seq_len=256, progress=False
        )
    with pytest.raises(ValueError, match="multiple of seq_len"):
        train_tuned_lens(tiny_llama, TEXT, steps=2, tokens_per_step=100, seq_len=32, progress=False)
    with pytest.raises(ValueError, match="recipe"):
        train_tuned_lens(tiny_llama, TEXT, steps=2, recipe="lbfgs", **FAST)
    with pytest.raises(FileNotFoundError):
        train_tuned_lens(tiny_llama, "/no/such/corpus.jsonl", steps=2, **FAST)


def test_progress_bar_shows_the_loss(tiny_llama, capsys):
    train_tuned_lens(tiny_llama, TEXT, steps=2, **{**FAST, "progress": True})
    assert "kl=" in capsys.readouterr().err
