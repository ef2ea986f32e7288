"""TunedLens: the logit lens at init, the translator formula, save/load, and the reference
format."""

import hashlib
import json

import numpy as np
import pytest
import torch

from tlmicroscope.io import FittedFileError, ModelMismatchError
from tlmicroscope.lenses import Lens, TunedLens, load_lens, prediction_trajectory
from tlmicroscope.models import tiny_model

pytestmark = pytest.mark.models


def _randomize(lens, seed=0, scale=0.1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        lens.weight.copy_(scale * torch.randn(lens.weight.shape, generator=g))
        lens.bias.copy_(scale * torch.randn(lens.bias.shape, generator=g))
    return lens


def test_untrained_lens_equals_logit_lens_exactly(tiny):
    lens = TunedLens.for_model(tiny)
    assert isinstance(lens, Lens)
    h = torch.randn(2, 5, tiny.cfg.d_model)
    for layer in range(tiny.cfg.n_layers):
        assert torch.equal(lens.transform(h, layer), h)
    text = "The lens reads every layer."
    tuned = prediction_trajectory(tiny, text, lens=lens, top_k=5)
    logit = prediction_trajectory(tiny, text, top_k=5)
    for stat in ("kl", "entropy", "cross_entropy", "target_rank", "max_prob", "top_tokens"):
        torch.testing.assert_close(
            getattr(tuned, stat), getattr(logit, stat), rtol=0, atol=0, equal_nan=True, msg=stat
        )
    assert tuned.provenance.lens == "tuned"


def test_transform_is_the_linear_translator(tiny):
    lens = _randomize(TunedLens.for_model(tiny))
    d = tiny.cfg.d_model
    h = torch.randn(3, 4, d)
    for layer in range(tiny.cfg.n_layers):
        linear = torch.nn.Linear(d, d)
        with torch.no_grad():
            linear.weight.copy_(lens.weight[layer])
            linear.bias.copy_(lens.bias[layer])
        torch.testing.assert_close(lens.transform(h, layer), h + linear(h), rtol=0, atol=1e-6)


def test_transform_is_differentiable_in_h(tiny_llama):
    lens = _randomize(TunedLens.for_model(tiny_llama))
    h = torch.randn(4, tiny_llama.cfg.d_model, requires_grad=True)
    lens.transform(h, 1).sum().backward()
    # d/dh sum(h + h W^T + b) = 1 + 1 W: each column sum of W added to one
    expected = torch.ones(4, 1) * (1 + lens.weight[1].detach().sum(0))
    torch.testing.assert_close(h.grad, expected)
    # float64 inputs get float64 parameters (for gradcheck-style use)
    h64 = torch.randn(2, tiny_llama.cfg.d_model, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: lens.transform(x, 0), (h64,))


def test_bad_layers_are_refused(tiny_llama):
    lens = TunedLens.for_model(tiny_llama)
    n = tiny_llama.cfg.n_layers
    h = torch.randn(2, tiny_llama.cfg.d_model)
    with pytest.raises(ValueError, match="model's output"):
        lens.transform(h, n)
    with pytest.raises(ValueError, match="0..2"):
        lens.transform(h, -1)
    with pytest.raises(TypeError):
        lens.transform(h, True)
    with pytest.raises(ValueError, match="d_model"):
        lens.transform(torch.randn(2, 7), 0)


def test_save_load_round_trip_is_exact(tiny, tmp_path):
    lens = _randomize(TunedLens.for_model(tiny), seed=3)
    lens.settings = {"recipe": "muon", "steps": 7}
    lens.save(tmp_path / "lens")
    for loaded in (TunedLens.load(tmp_path / "lens", tiny), load_lens(tmp_path / "lens", tiny)):
        assert isinstance(loaded, TunedLens)
        assert torch.equal(loaded.weight, lens.weight) and torch.equal(loaded.bias, lens.bias)
        assert loaded.settings == {"recipe": "muon", "steps": 7}
        assert loaded.model_info == lens.model_info
    meta = json.loads((tmp_path / "lens" / "config.json").read_text())
    assert meta["kind"] == "tuned_lens"
    assert (
        meta["model"]["n_layers"] == tiny.cfg.n_layers
        and len(meta["model"]["unembed_sha256"]) == 64
    )
    # saving again over the folder replaces it atomically
    _randomize(lens, seed=4).save(tmp_path / "lens")
    assert torch.equal(TunedLens.load(tmp_path / "lens", tiny).weight, lens.weight)


def test_mismatched_model_is_refused_naming_the_field(tiny_llama, tmp_path):
    lens = TunedLens.for_model(tiny_llama)
    lens.save(tmp_path / "lens")
    other_weights = tiny_model("llama", n_layers=3, seed=5)
    with pytest.raises(ModelMismatchError, match="unembed_sha256"):
        TunedLens.load(tmp_path / "lens", other_weights)
    deeper = tiny_model("llama", n_layers=4, seed=0)
    with pytest.raises(ModelMismatchError, match="n_layers"):
        load_lens(tmp_path / "lens", deeper)
    with pytest.raises(ValueError, match="n_layers"):
        prediction_trajectory(deeper, "abc", lens=lens)
    # a lens without a recorded model still checks the shapes
    bare = TunedLens(3, 16)
    with pytest.raises(ModelMismatchError, match="d_model"):
        bare.check_model(tiny_llama)


def test_corrupt_and_truncated_files_give_clear_errors(tiny_llama, tmp_path):
    TunedLens.for_model(tiny_llama).save(tmp_path / "lens")
    tensors = tmp_path / "lens" / "tensors.safetensors"
    data = tensors.read_bytes()
    tensors.write_bytes(data[: len(data) // 2])
    with pytest.raises(FittedFileError, match="truncated or corrupt"):
        TunedLens.load(tmp_path / "lens", tiny_llama)
    TunedLens.for_model(tiny_llama).save(tmp_path / "lens2")
    (tmp_path / "lens2" / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_lens(tmp_path / "lens2", tiny_llama)
    # tensors that disagree with the config
    from tlmicroscope.io import save_fitted

    save_fitted(
        tmp_path / "lens3",
        {"weight": torch.zeros(2, 32, 32), "bias": torch.zeros(2, 32)},
        kind="tuned_lens",
        config={"n_layers": 3, "d_model": 32},
    )
    with pytest.raises(FittedFileError, match="do not match"):
        TunedLens.load(tmp_path / "lens3")
    save_fitted(
        tmp_path / "lens4",
        {"weight": torch.full((3, 32, 32), float("nan")), "bias": torch.zeros(3, 32)},
        kind="tuned_lens",
        config={"n_layers": 3, "d_model": 32},
    )
    with pytest.raises(FittedFileError, match="NaN"):
        TunedLens.load(tmp_path / "lens4")


# ------------------------------------------------------------------- the reference's format
def _reference_hash(model) -> str:
    """The reference's unembed_hash, computed independently: nn.Linear layout [d_vocab d_model]."""
    W = model.W_U.detach().float().T.numpy()
    return hashlib.sha256(np.array_str(W, precision=1).encode()).hexdigest()


def _write_reference_folder(path, model, *, seed=0, unembed_hash=None, bias=True):
    """What the reference package's TunedLens.save writes: a ModuleList state dict + its config."""
    d, n = model.cfg.d_model, model.cfg.n_layers
    torch.manual_seed(seed)
    translators = torch.nn.ModuleList([torch.nn.Linear(d, d, bias=bias) for _ in range(n)])
    path.mkdir(parents=True)
    torch.save(translators.state_dict(), path / "params.pt")
    config = {
        "base_model_name_or_path": "tiny",
        "d_model": d,
        "num_hidden_layers": n,
        "bias": bias,
        "base_model_revision": None,
        "unembed_hash": unembed_hash if unembed_hash is not None else _reference_hash(model),
        "lens_type": "linear_tuned_lens",
    }
    (path / "config.json").write_text(json.dumps(config))
    return translators


def test_reference_format_loads(tiny, tmp_path, recwarn):
    translators = _write_reference_folder(tmp_path / "ref", tiny)
    lens = load_lens(tmp_path / "ref", tiny)
    assert isinstance(lens, TunedLens)
    assert not [w for w in recwarn if "hash" in str(w.message)]  # the hash matched
    h = torch.randn(6, tiny.cfg.d_model)
    for i, translator in enumerate(translators):
        with torch.no_grad():
            torch.testing.assert_close(lens.transform(h, i), h + translator(h), rtol=0, atol=1e-6)
    traj = prediction_trajectory(tiny, "abc", lens=lens)
    assert traj.provenance.lens == "tuned"


def test_reference_format_without_bias(tiny_llama, tmp_path):
    _write_reference_folder(tmp_path / "ref", tiny_llama, bias=False)
    lens = TunedLens.load(tmp_path / "ref", tiny_llama)
    assert not lens.has_bias and torch.count_nonzero(lens.bias) == 0


def test_reference_format_checks_and_errors(tiny_llama, tmp_path):
    _write_reference_folder(tmp_path / "other_hash", tiny_llama, unembed_hash="0" * 64)
    with pytest.warns(UserWarning, match="unembedding hash"):
        TunedLens.load(tmp_path / "other_hash", tiny_llama)
    _write_reference_folder(tmp_path / "ref", tiny_llama)
    with pytest.raises(ModelMismatchError, match="n_layers"):
        TunedLens.load(tmp_path / "ref", tiny_model("llama", n_layers=2))
    # truncated params.pt
    data = (tmp_path / "ref" / "params.pt").read_bytes()
    (tmp_path / "ref" / "params.pt").write_bytes(data[: len(data) // 3])
    with pytest.raises(FittedFileError, match="truncated or corrupt"):
        TunedLens.load(tmp_path / "ref", tiny_llama)
    # a pickle holding code is refused by weights_only loading, never run
    _write_reference_folder(tmp_path / "evil", tiny_llama)
    torch.save(
        {"0.weight": torch.zeros(32, 32), "payload": _Payload()}, tmp_path / "evil" / "params.pt"
    )
    with pytest.raises(FittedFileError, match="weights_only"):
        TunedLens.load(tmp_path / "evil", tiny_llama)
    assert not _Payload.ran
    # a missing layer
    _write_reference_folder(tmp_path / "partial", tiny_llama)
    state = torch.load(tmp_path / "partial" / "params.pt", weights_only=True)
    del state["2.weight"]
    torch.save(state, tmp_path / "partial" / "params.pt")
    with pytest.raises(FittedFileError, match=r"layers \[2\]"):
        TunedLens.load(tmp_path / "partial", tiny_llama)


class _Payload:
    ran = False

    def __reduce__(self):
        return (_mark_ran, ())


def _mark_ran():
    _Payload.ran = True
    return None
