"""The Jacobian lens: TransformerLens's estimator wrapped as a tlmicroscope lens (TransformerLens
4 only; on 3.9 every entry point names the version it needs)."""

from __future__ import annotations

import pytest
import torch

from tlmicroscope.models import access

PROMPTS = [
    "the cat sat on the mat today",
    "a dog ran in the park at noon",
    "some birds sang in trees",
    "rain fell on the quiet town",
    "the river ran past the mill",
]
needs_tl4 = pytest.mark.skipif(
    access.TL_MAJOR < 4, reason="the Jacobian lens needs TransformerLens 4.x"
)


@pytest.fixture(scope="module")
def fitted(tiny):
    from tlmicroscope.lenses.jacobian import JacobianLens

    return JacobianLens.fit(tiny, PROMPTS[:2], skip_first_positions=2, progress=False)


def test_tl3_entry_points_say_they_need_tl4(monkeypatch, tmp_path):
    from tlmicroscope.lenses import jacobian

    if access.TL_MAJOR >= 4:  # simulate TransformerLens 3.9, where the module does not exist
        import builtins

        real_import = builtins.__import__

        def no_jlens(name, globals=None, locals=None, fromlist=(), level=0):
            if (
                name == "transformer_lens.tools.analysis"
                and fromlist
                and "JacobianLens" in fromlist
            ):
                raise ImportError("cannot import name 'JacobianLens'")
            return real_import(name, globals, locals, fromlist, level)

        monkeypatch.setattr(builtins, "__import__", no_jlens)
        monkeypatch.setattr(access, "TL_VERSION", "3.9.0")
        monkeypatch.setattr(access, "TL_MAJOR", 3)
    for call in (
        lambda: jacobian.JacobianLens.fit(None, ["x"]),
        lambda: jacobian.JacobianLens.load(tmp_path),
        lambda: jacobian.fit_jacobian_lens(None, prompts=["x"], out_dir=tmp_path),
        lambda: jacobian.load_slices(tmp_path),
    ):
        with pytest.raises(
            jacobian.TransformerLensVersionError, match=r"needs TransformerLens 4\.x.*3\.9"
        ) as exc:
            call()
        assert "pip install 'transformer-lens>=4.3'" in str(exc.value)
        assert isinstance(exc.value, ImportError)  # the CLI reports ImportErrors as a clean error


@needs_tl4
def test_cli_fit_jlens_on_tl3_says_so(monkeypatch, capsys):
    from tlmicroscope import cli
    from tlmicroscope.lenses import jacobian

    def refuse(what="x"):
        raise jacobian.TransformerLensVersionError(f"{what} needs TransformerLens 4.x")

    monkeypatch.setattr(jacobian, "require_jacobian_lens", refuse)
    assert cli.main(["fit-jlens", "--model", "tiny-llama"]) == 2
    assert "fit-jlens needs TransformerLens 4.x" in capsys.readouterr().err


@needs_tl4
def test_transform_shifts_block_outputs_to_block_inputs(tiny, fitted):
    L = tiny.cfg.n_layers
    assert fitted.identity_layers == (0,)
    h = torch.randn(5, tiny.cfg.d_model)
    assert torch.equal(fitted.transform(h, 0), h)
    for layer in range(1, L):  # resid_pre of block l is the output of block l-1
        assert torch.allclose(
            fitted.transform(h, layer), h @ fitted.inner.jacobians[layer - 1].T, atol=1e-6
        )
    with pytest.raises(ValueError, match="model's output"):
        fitted.transform(h, L)


@needs_tl4
def test_readout_matches_transformer_lens_readout(tiny, fitted):
    """Our readout (shared Readout, resid_pre index l) equals TransformerLens's own J-lens readout
    (its final norm and unembedding, block-output index l-1) logit for logit."""
    from tlmicroscope.lenses import Readout

    toks = tiny.to_tokens("the cat ran past the mill")
    ref = fitted.inner.readout(tiny, toks, return_full_logits=True)
    _, cache = tiny.run_with_cache(toks)
    readout = Readout.for_model(tiny)
    for k in fitted.inner.source_layers:
        h = cache[f"blocks.{k + 1}.hook_resid_pre"][0]
        ours = readout(fitted.transform(h, k + 1), final_norm=True).float()
        assert torch.allclose(ours, ref.lens_logits[k], atol=1e-4, rtol=1e-4)


@needs_tl4
def test_transport_matrix_is_the_averaged_jacobian(tiny_llama):
    """Independent check of what the wrapped estimator fits: torch.autograd.functional.jacobian of
    the last block's output w.r.t. one block output, summed over later targets, averaged over
    sources."""
    from tlmicroscope.lenses.jacobian import JacobianLens

    model, prompt, skip = tiny_llama, PROMPTS[0], 2
    lens = JacobianLens.fit(model, [prompt], skip_first_positions=skip, progress=False)
    toks = model.to_tokens(prompt)
    L, T = model.cfg.n_layers, toks.shape[1]
    _, cache = model.run_with_cache(toks)
    h1 = cache["blocks.1.hook_resid_pre"]  # output of block 0

    def last_from(h):
        def patch(act, hook):
            return h

        out = {}

        def grab(act, hook):
            out["x"] = act

        model.run_with_hooks(
            toks,
            fwd_hooks=[
                ("blocks.1.hook_resid_pre", patch),
                (f"blocks.{L - 1}.hook_resid_post", grab),
            ],
        )
        return out["x"][0]

    jac = torch.autograd.functional.jacobian(last_from, h1)  # [T d, 1 T d]
    valid = range(skip, T - 1)
    want = torch.stack([jac[list(valid)][:, :, 0, t, :].sum(0) for t in valid]).mean(0)
    assert torch.allclose(lens.transform(torch.eye(model.cfg.d_model), 1).T, want, atol=1e-4)


@needs_tl4
def test_save_load_in_reference_format_and_load_lens(tiny, fitted, tmp_path):
    from tlmicroscope.lenses import load_lens
    from tlmicroscope.lenses.jacobian import ARTIFACT, JacobianLens, require_jacobian_lens

    folder = fitted.save(tmp_path / "jl")
    raw = torch.load(folder / ARTIFACT, weights_only=True)
    assert {"J", "n_prompts", "source_layers", "d_model"} <= set(raw)  # Anthropic's reference keys
    assert raw["source_layers"] == list(range(tiny.cfg.n_layers - 1)) and raw["n_prompts"] == 2
    again = require_jacobian_lens().load(str(folder / ARTIFACT))  # TransformerLens reads our file
    for k in fitted.inner.source_layers:
        assert torch.equal(again.jacobians[k], fitted.inner.jacobians[k])
    for loaded in (
        load_lens(folder, tiny),
        load_lens(folder / ARTIFACT, tiny),
        JacobianLens.load(folder),
    ):
        assert isinstance(loaded, JacobianLens)
        assert torch.equal(loaded.jacobians, fitted.jacobians)


@needs_tl4
def test_artifact_for_another_model_is_refused(tiny_llama, tiny_gpt2, tmp_path):
    from tlmicroscope.io import ModelMismatchError
    from tlmicroscope.lenses import load_lens, prediction_trajectory
    from tlmicroscope.lenses.jacobian import ARTIFACT, JacobianLens
    from tlmicroscope.models import tiny_model

    lens = JacobianLens.fit(tiny_llama, PROMPTS[:1], skip_first_positions=2, progress=False)
    folder = lens.save(tmp_path / "jl")
    for path in (folder, folder / ARTIFACT):  # same sizes, other weights: the fingerprint tells
        with pytest.raises(ModelMismatchError, match="unembed_sha256.*another model"):
            load_lens(path, tiny_gpt2)
    with pytest.raises(ModelMismatchError, match="n_layers is 3 for the lens but 2"):
        prediction_trajectory(tiny_model("llama", n_layers=2), "hello", lens=lens)
    with pytest.raises(ModelMismatchError, match="d_model=32.*fit-jlens"):
        load_lens(folder, tiny_model("llama", n_layers=3, d_model=48))


@needs_tl4
def test_corrupt_artifact_names_the_problem(tiny_llama, tmp_path):
    from tlmicroscope.io import FittedFileError
    from tlmicroscope.lenses.jacobian import ARTIFACT, JacobianLens

    lens = JacobianLens.fit(tiny_llama, PROMPTS[:1], skip_first_positions=2, progress=False)
    folder = lens.save(tmp_path / "jl")
    (folder / ARTIFACT).write_bytes((folder / ARTIFACT).read_bytes()[:100])
    with pytest.raises(FittedFileError, match="corrupt"):
        JacobianLens.load(folder, tiny_llama)
    with pytest.raises(FittedFileError, match="fit-jlens"):
        JacobianLens.load(tmp_path / "nothing.pt")


@needs_tl4
def test_resumed_and_extended_fit_equals_one_shot(tiny_llama, tmp_path, monkeypatch):
    from tlmicroscope.lenses.jacobian import (
        JacobianLens,
        fit_jacobian_lens,
        load_slices,
        require_jacobian_lens,
    )

    tl_cls = require_jacobian_lens()
    real_fit = tl_cls.fit.__func__
    calls = []

    def counting_fit(cls, model, prompts, **kw):
        calls.append(list(prompts))
        if len(calls) == 2 and fail["on"]:
            raise KeyboardInterrupt  # interrupted during the second slice
        return real_fit(cls, model, prompts, **kw)

    fail = {"on": True}
    monkeypatch.setattr(tl_cls, "fit", classmethod(counting_fit))
    out = tmp_path / "fit"
    with pytest.raises(KeyboardInterrupt):
        fit_jacobian_lens(
            tiny_llama,
            prompts=PROMPTS[:4],
            out_dir=out,
            slice_size=2,
            skip_first_positions=2,
            progress=False,
        )
    assert len(load_slices(out)) == 1
    fail["on"] = False
    calls.clear()
    fit_jacobian_lens(
        tiny_llama,
        prompts=PROMPTS[:4],
        out_dir=out,
        slice_size=2,
        skip_first_positions=2,
        progress=False,
    )
    assert calls == [PROMPTS[2:4]]  # the saved slice was not refitted
    calls.clear()
    resumed = fit_jacobian_lens(
        tiny_llama,
        prompts=PROMPTS,
        out_dir=out,
        slice_size=2,
        skip_first_positions=2,
        progress=False,
    )  # extended by one prompt
    assert calls == [PROMPTS[4:]]
    one_shot = JacobianLens.fit(tiny_llama, PROMPTS, skip_first_positions=2, progress=False)
    assert resumed.n_prompts == one_shot.n_prompts == 5
    assert torch.allclose(resumed.jacobians, one_shot.jacobians, atol=1e-6)
    with pytest.raises(ValueError, match="other settings.*resume=False"):
        fit_jacobian_lens(
            tiny_llama,
            prompts=PROMPTS,
            out_dir=out,
            slice_size=3,
            skip_first_positions=2,
            progress=False,
        )


@needs_tl4
def test_plugs_in_wherever_a_lens_is_accepted(tiny_llama):
    from tlmicroscope.causal.basis import extract_causal_basis
    from tlmicroscope.causal.fidelity import causal_fidelity
    from tlmicroscope.lenses import Readout, evaluate_lens, prediction_trajectory
    from tlmicroscope.lenses.jacobian import JacobianLens
    from tlmicroscope.microscope.contributions import layer_contributions
    from tlmicroscope.report import report

    model = tiny_llama
    lens = JacobianLens.fit(model, PROMPTS[:2], skip_first_positions=2, progress=False)
    text = "the cat ran past the mill"
    traj = prediction_trajectory(model, text, lens=lens, top_k=2)
    toks = model.to_tokens(text)
    _, cache = model.run_with_cache(toks)
    h = cache["blocks.2.hook_resid_pre"][0]
    q = torch.log_softmax(Readout.for_model(model)(h @ lens.inner.jacobians[1].T).float(), -1)
    p = torch.log_softmax(model(toks)[0].float(), -1)
    assert traj.provenance.lens == "jacobian"
    assert torch.allclose(traj.kl[2, 0], (p.exp() * (p - q)).sum(-1), atol=1e-4)
    ev = evaluate_lens(
        model, lens=lens, corpus=[text * 20], n_tokens=64, seq_len=32, holdout=0.3, progress=False
    )
    assert ev.lens_name == "jacobian" and float(ev.kl[-1]) < 1e-5
    contrib = layer_contributions(model, text, lens=lens)
    assert contrib is not None
    basis = extract_causal_basis(
        model,
        lens=lens,
        corpus=toks.repeat(2, 1),
        layer=1,
        k=2,
        max_iter=3,
        progress=False,
        on_nonconvergence="ignore",
    )
    fid = causal_fidelity(model, lens=lens, basis=basis, layer=1, tokens=toks, progress=False)
    assert fid.lens == "jacobian" and fid.lens_influence.shape == (2,)
    html = report(model, text, lens=lens)
    assert "jacobian" in str(html)


@needs_tl4
def test_cli_fit_jlens_then_lens_bench(tmp_path, capsys):
    import json

    from tlmicroscope import cli

    corpus = tmp_path / "c.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    out = tmp_path / "jl"
    rc = cli.main(
        [
            "fit-jlens",
            "--model",
            "tiny-llama",
            "--corpus",
            str(corpus),
            "--out",
            str(out),
            "--prompts",
            "3",
            "--prompt-tokens",
            "12",
            "--skip-first",
            "2",
            "--slice-size",
            "2",
            "--curve",
            "--curve-tokens",
            "64",
        ]
    )
    assert rc == 0, capsys.readouterr().err
    curve = json.loads((out / "curve.json").read_text())
    assert [r["n_prompts"] for r in curve] == [2, 3]
    html = tmp_path / "bench.html"
    rc = cli.main(
        [
            "lens-bench",
            "--model",
            "tiny-llama",
            "--corpus",
            str(corpus),
            "--lens",
            "logit",
            "--lens",
            str(out),
            "--tokens",
            "64",
            "--seq-len",
            "32",
            "--depth-tokens",
            "32",
            "--cbe-k",
            "2",
            "--cbe-max-iter",
            "3",
            "--cbe-tokens",
            "32",
            "--sra-samples",
            "4",
            "--out",
            str(html),
        ]
    )
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "| jacobian |" in captured.out
    data = json.loads(html.with_suffix(".json").read_text())
    assert data["lens_names"] == ["logit", "jacobian"]
    assert "Plotly.newPlot" in html.read_text()


@needs_tl4
def test_partial_fit_reads_unfitted_layers_with_the_identity(tiny_llama):
    from tlmicroscope.lenses.jacobian import JacobianLens

    lens = JacobianLens.fit(
        tiny_llama, PROMPTS[:1], skip_first_positions=2, source_layers=[1], progress=False
    )
    assert lens.inner.source_layers == [1] and lens.identity_layers == (0, 1)
    h = torch.randn(3, 32)
    assert torch.equal(lens.transform(h, 1), h)
    assert torch.allclose(lens.transform(h, 2), h @ lens.inner.jacobians[1].T)
