"""The report's "causal basis energies" section: a saved basis from its default location, the
lens influence on the report's text against a brute-force ablation, and the missing paths."""

from __future__ import annotations

import shlex

import pytest
import torch
from safetensors.torch import load_file

from tlmicroscope.app.panels.causal import default_basis_path
from tlmicroscope.causal import extract_causal_basis
from tlmicroscope.inputs import to_tokens
from tlmicroscope.lenses import Readout, TunedLens
from tlmicroscope.lenses.base import lens_logits
from tlmicroscope.report import report

pytestmark = [
    pytest.mark.models,
    pytest.mark.filterwarnings("ignore:CBE on only", "ignore::UserWarning"),
]

TEXT = "The cat sat on the mat, and the dog sat on the log. " * 2


def _random_tuned_lens(model, seed: int = 0, scale: float = 0.1) -> TunedLens:
    lens = TunedLens.for_model(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        lens.weight.copy_(scale * torch.randn(lens.weight.shape, generator=g))
        lens.bias.copy_(scale * torch.randn(lens.bias.shape, generator=g))
    return lens


def _spy(monkeypatch):
    """Record the figures the section draws (the section imports them from this module)."""
    import tlmicroscope.viz.causal as vc

    seen: dict[str, object] = {}
    for name in ("cbe_energy_figure", "cbe_text_influence_figure"):
        original = getattr(vc, name)

        def wrapped(*args, _name=name, _original=original, **kwargs):
            seen[_name] = fig = _original(*args, **kwargs)
            return fig

        monkeypatch.setattr(vc, name, wrapped)
    return seen


def _brute_force_influence(model, lens, tokens, vectors, mean, layer):
    """KL(lens(h) || lens(h with v mean-ablated)) per direction, via run_with_cache and the plain
    readout."""
    hook = f"blocks.{layer}.hook_resid_pre"
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=[hook])
        h = cache[hook].reshape(-1, model.cfg.d_model).double()
        readout = Readout(model)
        n_layers = model.cfg.n_layers
        logp = torch.log_softmax(
            lens_logits(lens, readout, h.float(), layer, n_layers).double(), -1
        )
        out = []
        for j in range(vectors.shape[1]):
            v = vectors[:, j].double()
            h2 = h + ((mean.double() - h) @ v)[:, None] * v
            logq = torch.log_softmax(
                lens_logits(lens, readout, h2.float(), layer, n_layers).double(), -1
            )
            out.append(float((logp.exp() * (logp - logq)).sum(-1).mean()))
    return torch.tensor(out, dtype=torch.float64)


def test_section_plots_the_saved_basis_and_its_influence_on_the_text(
    tiny_llama, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    lens = _random_tuned_lens(tiny_llama)
    toks = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1))
    basis = extract_causal_basis(
        tiny_llama,
        lens=lens,
        corpus=toks,
        layer=1,
        k=4,
        max_iter=30,
        progress=False,
        on_nonconvergence="ignore",
    )
    path = default_basis_path(tiny_llama, lens)
    assert path.as_posix() == "out/cbe-tiny-llama-l3-d32-s0-tuned/basis"
    basis.save(path)
    seen = _spy(monkeypatch)

    calls = []
    tiny_llama.add_hook(
        "blocks.0.hook_resid_pre", lambda act, hook: calls.append(1), is_permanent=True
    )
    try:
        rep = report(tiny_llama, TEXT, lens=lens, sections=["trajectory", "causal_basis"])
    finally:
        tiny_llama.reset_hooks(including_permanent=True)
    assert rep.rendered == ["trajectory", "causal_basis"], (rep.missing, rep.failed)
    assert len(calls) == 1  # the section read the shared capture: no forward pass of its own

    saved = load_file(str(path / "tensors.safetensors"))  # the file itself, not CausalBasis.load
    torch.testing.assert_close(
        torch.tensor(seen["cbe_energy_figure"].data[0].y, dtype=torch.float32), saved["energies"]
    )
    text_fig = seen["cbe_text_influence_figure"]
    torch.testing.assert_close(
        torch.tensor(text_fig.data[0].y, dtype=torch.float32), saved["energies"]
    )
    expect = _brute_force_influence(
        tiny_llama, lens, to_tokens(tiny_llama, TEXT), saved["vectors"], saved["mean"], layer=1
    )
    torch.testing.assert_close(
        torch.tensor(text_fig.data[1].y, dtype=torch.float64), expect, rtol=2e-3, atol=1e-6
    )
    html = rep.html()
    assert "cbe-tiny-llama-l3-d32-s0-tuned" in html and "lens_digest" in html


def test_missing_basis_names_the_command_that_extracts_it(tiny_llama, tmp_path, monkeypatch):
    """Without a saved basis the section gives the cbe command; running it makes it render."""
    from tlmicroscope.cli import main
    from tlmicroscope.lenses.train import default_lens_dir
    from tlmicroscope.models import access

    monkeypatch.chdir(tmp_path)
    lens = _random_tuned_lens(tiny_llama, seed=2)
    lens.save(default_lens_dir(tiny_llama))
    rep = report(tiny_llama, TEXT, lens=lens, sections=["causal_basis"])
    assert rep.rendered == [] and "No causal basis is saved" in rep.missing["causal_basis"]
    html = rep.html()
    fix = (
        f"tlmicroscope cbe --model tiny-llama --lens {default_lens_dir(tiny_llama)} --k 10 "
        "--out-dir out/cbe-tiny-llama-l3-d32-s0-tuned"  # the lens in the artifact store
    )
    if access.is_bridge(tiny_llama) and access.has_hooked_transformer():
        fix += " --kind bridge"  # the command must load the same class of model again
    assert fix in html

    argv = shlex.split(fix)[1:] + [
        "--n-tokens",
        "256",
        "--seq-len",
        "64",
        "--max-iter",
        "20",
        "--fidelity-windows",
        "0",
    ]
    assert main(argv) == 0
    rep = report(tiny_llama, TEXT, lens=lens, sections=["causal_basis"])
    assert rep.rendered == ["causal_basis"], (rep.missing, rep.failed)


def test_section_needs_a_lens_and_refuses_a_basis_of_another_lens(
    tiny_llama, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    rep = report(tiny_llama, TEXT, sections=["causal_basis"])
    assert "has none" in rep.missing["causal_basis"]
    assert "tlmicroscope train-lens --model tiny-llama" in rep.html()

    lens_a, lens_b = _random_tuned_lens(tiny_llama, seed=3), _random_tuned_lens(tiny_llama, seed=4)
    toks = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    basis = extract_causal_basis(
        tiny_llama,
        lens=lens_a,
        corpus=toks,
        layer=2,
        k=2,
        max_iter=10,
        progress=False,
        on_nonconvergence="ignore",
    )
    basis.save(default_basis_path(tiny_llama, lens_a))
    rep = report(tiny_llama, TEXT, lens=lens_b, sections=["causal_basis"])
    assert "another tuned lens" in rep.missing["causal_basis"]
    assert report(tiny_llama, TEXT, lens=lens_a, sections=["causal_basis"]).rendered == [
        "causal_basis"
    ]

    logit_basis = extract_causal_basis(
        tiny_llama,
        lens="logit",
        corpus=toks,
        layer=2,
        k=2,
        max_iter=10,
        progress=False,
        on_nonconvergence="ignore",
    )
    logit_basis.save(tmp_path / "elsewhere")
    rep = report(
        tiny_llama,
        TEXT,
        lens=lens_a,
        sections=["causal_basis"],
        causal_basis=str(tmp_path / "elsewhere"),
    )
    assert "through the logit lens" in rep.missing["causal_basis"]


def test_section_refuses_a_basis_saved_for_another_model(
    tiny_llama, tiny_gpt2, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    toks = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    other = extract_causal_basis(
        tiny_gpt2,
        lens="logit",
        corpus=toks,
        layer=1,
        k=2,
        max_iter=10,
        progress=False,
        on_nonconvergence="ignore",
    )
    other.save(tmp_path / "gpt2-basis")
    rep = report(
        tiny_llama,
        TEXT,
        lens="logit",
        sections=["causal_basis"],
        causal_basis=str(tmp_path / "gpt2-basis"),
    )
    assert "cannot be used here" in rep.missing["causal_basis"]
    assert "tlmicroscope cbe --model tiny-llama --lens logit" in rep.html()


def test_a_basis_in_the_artifact_store_is_found_for_its_lens(tiny_llama, tmp_path, monkeypatch):
    from tlmicroscope import artifacts

    monkeypatch.setenv("TLMICROSCOPE_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)  # and nothing in the old out/ default
    rep = report(tiny_llama, TEXT, lens="logit", sections=["causal_basis"])
    store = artifacts.artifact_path("causal-basis", tiny_llama, variant="logit")
    assert str(store) in rep.missing["causal_basis"]  # it says it looked in the store
    toks = to_tokens(tiny_llama, TEXT)
    basis = extract_causal_basis(
        tiny_llama,
        lens="logit",
        corpus=toks,
        layer=1,
        k=2,
        max_iter=10,
        progress=False,
        on_nonconvergence="ignore",
    )
    basis.save(store)
    rep = report(tiny_llama, TEXT, lens="logit", sections=["causal_basis"])
    assert rep.rendered == ["causal_basis"], (rep.missing, rep.failed)
    assert f"Loaded from {store}" in rep.html()
