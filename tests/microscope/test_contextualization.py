"""Contextualization by prefix decoding on tiny models: training, the value of C, persistence,
resume."""

import pytest
import torch
import torch.nn.functional as F

from tlmicroscope.capture import capture
from tlmicroscope.corpus import token_windows
from tlmicroscope.io import FittedFileError, ModelMismatchError
from tlmicroscope.microscope import ContextualizationProbe, contextualization
from tlmicroscope.models import tiny_model

pytestmark = pytest.mark.models

SMALL = dict(
    prefix_length=6,
    mlp_hidden=48,
    window_length=24,
    windows_per_step=6,
    positions_per_window=4,
    lr=3e-3,
    decoder_lr=1e-3,
    warmup=3,
)


def _held_out(model):
    return token_windows(model, None, seq_len=32, n_windows=6, shuffle=True, seed=99)


@pytest.mark.parametrize("decoder", ["frozen", "last_k"])
def test_training_lowers_C_below_the_untrained_probe(tiny_llama, decoder):
    untrained = ContextualizationProbe(decoder=decoder, trainable_blocks=1, steps=0, **SMALL).fit(
        tiny_llama, progress=False
    )
    trained = ContextualizationProbe(decoder=decoder, trainable_blocks=1, steps=40, **SMALL).fit(
        tiny_llama, progress=False
    )
    held = _held_out(tiny_llama)
    before = contextualization(tiny_llama, held, probe=untrained).C.nanmean()
    after = contextualization(tiny_llama, held, probe=trained).C.nanmean()
    assert after < before - 0.05
    assert len(trained.history_) == 40 and trained.steps_done_ == 40


def test_C_is_the_prefix_cross_entropy_from_the_soft_embedding(tiny_gpt2):
    probe = ContextualizationProbe(decoder="frozen", steps=3, **SMALL).fit(
        tiny_gpt2, progress=False
    )
    text = "Rebuild the prefix."
    ctx = contextualization(tiny_gpt2, text, probe=probe)
    toks = tiny_gpt2.to_tokens(text)[0]
    P = probe.prefix_length
    states = capture(
        tiny_gpt2, text, sites=("resid",), layers=range(1, tiny_gpt2.cfg.n_layers + 1)
    )["resid"][:, 0]
    for i in (1, 3, 10):
        m = min(i, P)
        prefix = toks[i - m : i]
        with torch.no_grad():
            e = probe.encoder_(states[:, i][None])
            emb = tiny_gpt2.W_E[prefix[:-1]]
            x = torch.cat([e, emb], 0)[None]
            logits = tiny_gpt2.run_with_hooks(
                torch.cat([toks[:1], prefix[:-1]])[None],
                fwd_hooks=[("hook_embed", lambda act, hook, x=x: x.to(act.dtype))],
            )
            ce = F.cross_entropy(logits[0], prefix)
        assert float(ctx.C[0, i]) == pytest.approx(float(ce), abs=1e-4)
        assert int(ctx.prefix_length[0, i]) == m
    assert torch.isnan(ctx.C[0, 0]) and ctx.prefix_length[0, 0] == 0
    total = contextualization(tiny_gpt2, text, probe=probe, reduction="sum")
    assert torch.allclose(total.C[0, 1:], ctx.C[0, 1:] * ctx.prefix_length[0, 1:], atol=1e-4)


@pytest.mark.parametrize("decoder", ["frozen", "last_k", "full"])
def test_save_and_load_give_the_same_C(tiny_llama, tmp_path, decoder):
    probe = ContextualizationProbe(decoder=decoder, trainable_blocks=2, steps=4, **SMALL).fit(
        tiny_llama, progress=False
    )
    probe.save(tmp_path / "probe")
    back = ContextualizationProbe.load(tmp_path / "probe", tiny_llama)
    assert back.settings() == probe.settings() and back.history_ == probe.history_
    text = "Saved probes measure the same."
    assert torch.allclose(
        contextualization(tiny_llama, text, probe=back).C,
        contextualization(tiny_llama, text, probe=tmp_path / "probe").C,
        equal_nan=True,
    )
    assert torch.allclose(
        contextualization(tiny_llama, text, probe=probe).C,
        contextualization(tiny_llama, text, probe=back).C,
        equal_nan=True,
        atol=1e-6,
    )
    import json

    cfg = json.loads((tmp_path / "probe" / "config.json").read_text())["config"]
    assert cfg["settings"]["decoder"] == decoder and cfg["position_0"].startswith("NaN")
    assert (len(cfg["decoder_parameters"]) > 0) == (decoder != "frozen")


def test_probe_for_another_model_is_refused(tiny_llama, tmp_path):
    probe = ContextualizationProbe(decoder="last_k", trainable_blocks=1, steps=1, **SMALL).fit(
        tiny_llama, progress=False
    )
    probe.save(tmp_path / "probe")
    other = tiny_model("llama", n_layers=3, d_model=32, seed=3)
    with pytest.raises(ModelMismatchError, match="unembed_sha256"):
        ContextualizationProbe.load(tmp_path / "probe", other)
    with pytest.raises(ModelMismatchError):
        contextualization(other, "x y", probe=probe)
    (tmp_path / "probe" / "config.json").write_text("{not json")
    with pytest.raises(FittedFileError, match="not valid JSON"):
        ContextualizationProbe.load(tmp_path / "probe", tiny_llama)


def test_checkpoint_resume_reproduces_an_uninterrupted_run(tiny_llama, tmp_path, monkeypatch):
    settings = dict(decoder="last_k", trainable_blocks=1, steps=8, **SMALL)
    straight = ContextualizationProbe(**settings).fit(tiny_llama, progress=False)

    interrupted = ContextualizationProbe(**settings)
    original = ContextualizationProbe._batch_loss
    calls = {"n": 0}

    def flaky(self, *args):
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt
        return original(self, *args)

    monkeypatch.setattr(ContextualizationProbe, "_batch_loss", flaky)
    with pytest.raises(KeyboardInterrupt):
        interrupted.fit(
            tiny_llama, checkpoint_dir=tmp_path / "ckpt", checkpoint_every=2, progress=False
        )
    monkeypatch.setattr(ContextualizationProbe, "_batch_loss", original)
    resumed = ContextualizationProbe(**settings).fit(
        tiny_llama, checkpoint_dir=tmp_path / "ckpt", checkpoint_every=2, progress=False
    )
    assert len(resumed.history_) == 8
    assert resumed.history_[:4] == pytest.approx(straight.history_[:4], abs=1e-6)
    for (k, a), b in zip(
        straight.encoder_.state_dict().items(), resumed.encoder_.state_dict().values()
    ):
        assert torch.allclose(a, b, atol=1e-5), k
    with pytest.raises(ValueError, match="prefix_length=6"):
        ContextualizationProbe(**{**settings, "prefix_length": 5}).fit(
            tiny_llama, checkpoint_dir=tmp_path / "ckpt", progress=False
        )


def test_bad_settings_and_inputs(tiny_llama):
    with pytest.raises(ValueError, match="decoder must be"):
        ContextualizationProbe(decoder="lora").fit(tiny_llama, progress=False)
    with pytest.raises(ValueError, match="trainable_blocks"):
        ContextualizationProbe(decoder="last_k", trainable_blocks=9).fit(tiny_llama, progress=False)
    with pytest.raises(ValueError, match="fewer than one window"):
        ContextualizationProbe(window_length=64).fit(tiny_llama, ["tiny"], progress=False)
    with pytest.raises(ValueError, match="Pass a fitted ContextualizationProbe"):
        contextualization(tiny_llama, "hello")
    with pytest.raises(ValueError, match="not fitted"):
        contextualization(tiny_llama, "hello", probe=ContextualizationProbe())
    probe = ContextualizationProbe(decoder="frozen", steps=1, **SMALL).fit(
        tiny_llama, progress=False
    )
    with pytest.raises(ValueError, match="reduction"):
        contextualization(tiny_llama, "hello", probe=probe, reduction="max")
    with pytest.raises(ValueError, match="empty"):
        contextualization(tiny_llama, "", probe=probe)


@pytest.mark.parametrize("decoder", ["frozen", "last_k"])
def test_training_leaves_the_model_untouched(tiny_llama, decoder):
    before = {k: v.clone() for k, v in tiny_llama.state_dict().items()}
    flags = [p.requires_grad for p in tiny_llama.parameters()]
    ContextualizationProbe(decoder=decoder, trainable_blocks=1, steps=3, **SMALL).fit(
        tiny_llama, progress=False
    )
    after = tiny_llama.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert flags == [p.requires_grad for p in tiny_llama.parameters()]
    assert all(p.grad is None for p in tiny_llama.parameters())
