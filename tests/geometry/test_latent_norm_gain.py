"""Latent norm states after the norm's gain (the paper's), against the norm modules' own outputs."""

from __future__ import annotations

import pytest
import torch

from tlmicroscope.geometry import capture_components


def _model_with_random_norms(arch: str, kind: str):
    from tlmicroscope.models import tiny_model

    model = tiny_model(arch, kind=kind, n_layers=2, d_model=32, seed=1)
    g = torch.Generator().manual_seed(7)
    n_set = 0
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.split(".")[-1]
            if any(f"{n}." in name for n in ("ln1", "ln2", "ln_final")) and leaf in (
                "w",
                "weight",
                "b",
                "bias",
            ):
                p.copy_(
                    torch.randn(p.shape, generator=g) * (0.5 if leaf in ("b", "bias") else 1.0)
                    + (1.0 if leaf in ("w", "weight") else 0.0)
                )
                n_set += 1
    assert n_set > 0, "the tiny model's norms have no weights to randomise"
    return model


def _module_outputs(model, toks):
    """Forward hooks on the norm modules themselves: what each returns is the paper's state."""
    got: dict[tuple[str, int], torch.Tensor] = {}
    handles = []
    mods = [("ln_final", model.cfg.n_layers, model.ln_final)]
    for layer, block in enumerate(model.blocks):
        mods += [(c, layer, getattr(block, c)) for c in ("ln1", "ln2")]
    try:
        for comp, layer, mod in mods:

            def keep(module, inputs, output, key=(comp, layer)):
                got.setdefault(
                    key, (output[0] if isinstance(output, tuple) else output).detach().float()
                )

            handles.append(mod.register_forward_hook(keep))
        with torch.no_grad():
            model(toks)
    finally:
        for h in handles:
            h.remove()
    return got


@pytest.mark.models
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_norm_states_are_the_norm_modules_outputs(arch, model_kind):
    model = _model_with_random_norms(arch, model_kind)
    toks = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(0))
    expected = _module_outputs(model, toks)
    comps = ("ln1", "ln2", "ln_final")
    after = capture_components(model, toks, components=comps, progress=False)
    before = capture_components(model, toks, components=comps, progress=False, norm_gain=False)
    assert after.provenance.settings["norm_gain"] is True
    for i, (comp, layer) in enumerate(zip(after.components, after.layers)):
        want = expected[(comp, layer)]
        torch.testing.assert_close(after.activations[i], want, atol=1e-5, rtol=1e-4)
        # The hook's vectors are the pre-gain ones: they differ, and the gain maps one to the other.
        assert not torch.allclose(before.activations[i], want, atol=1e-3)
    # The same from a cache of the hooks (the cache path applies the gain too).
    names = list(dict.fromkeys(after.hook_names))
    with torch.no_grad():
        _, cache = model.run_with_cache(toks, names_filter=names)
    from_cache = capture_components(cache, toks, components=comps, progress=False)
    torch.testing.assert_close(from_cache.activations, after.activations, atol=1e-5, rtol=1e-4)
    # Averaging commutes with the per-state affine map.
    avg = capture_components(model, toks, components=comps, average="samples", progress=False)
    torch.testing.assert_close(
        avg.activations[:, 0], after.activations.mean(1), atol=1e-5, rtol=1e-4
    )
