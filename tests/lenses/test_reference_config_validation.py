"""Lens configs are checked field by field, against the model, before anything is read or allocated.

The bad cases are the ones issue 14 lists: a reference-format ``config.json`` with ``d_model``
65536 (51 GB of translators for 3 layers), -1 or 2**40; ``"bias": "false"`` (a non-empty string,
which ``bool`` reads as True); ``d_model`` 32.9 (which ``int`` truncates); a list instead of an
object; and ``"format_version": "one"`` in our own format. Each gets a ``FittedFileError`` or
``ModelMismatchError`` naming the file and the field.
"""

import json

import pytest
import torch

from tlmicroscope.io import FittedFileError, ModelMismatchError, load_fitted, save_fitted
from tlmicroscope.lenses import TunedLens, load_lens
from tlmicroscope.lenses.reference_format import read_reference_lens

pytestmark = pytest.mark.models


def _reference_folder(path, model, **overrides):
    """A reference-format folder (params.pt + config.json) for ``model``, config fields
    overridden."""
    d, n = model.cfg.d_model, model.cfg.n_layers
    torch.manual_seed(0)
    state = {}
    for i in range(n):
        state[f"{i}.weight"] = 0.01 * torch.randn(d, d)
        state[f"{i}.bias"] = 0.01 * torch.randn(d)
    path.mkdir(parents=True, exist_ok=True)
    torch.save(state, path / "params.pt")
    config = {
        "base_model_name_or_path": "tiny",
        "d_model": d,
        "num_hidden_layers": n,
        "bias": True,
        "lens_type": "linear_tuned_lens",
        "unembed_hash": None,
    }
    config.update(overrides)
    (path / "config.json").write_text(json.dumps(config))
    return state


@pytest.fixture
def no_params_read(monkeypatch):
    """Fail the test if params.pt is opened: the config must be refused before."""

    def refuse(*args, **kwargs):
        raise AssertionError("params.pt was read before the config was checked")

    monkeypatch.setattr(torch, "load", refuse)


def test_a_good_reference_folder_still_loads(tiny_llama, tmp_path):
    state = _reference_folder(tmp_path / "ref", tiny_llama)
    lens = load_lens(tmp_path / "ref", tiny_llama)
    h = torch.randn(5, tiny_llama.cfg.d_model)
    expected = h + h @ state["1.weight"].T + state["1.bias"]  # nn.Linear convention, by hand
    torch.testing.assert_close(lens.transform(h, 1), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("d_model", [65536, 2**40])
def test_huge_d_model_is_refused_against_the_model_before_reading(
    tiny_llama, tmp_path, no_params_read, d_model
):
    _reference_folder(tmp_path / "ref", tiny_llama, d_model=d_model)
    with pytest.raises(
        ModelMismatchError, match=rf"'d_model' is {d_model} in .*config.json but 32"
    ):
        load_lens(tmp_path / "ref", tiny_llama)
    with pytest.raises(ModelMismatchError, match="'d_model'"):
        read_reference_lens(tmp_path / "ref", tiny_llama)


@pytest.mark.parametrize("d_model", [65536, 2**40])
def test_huge_d_model_without_a_model_is_refused_by_the_file_shapes(
    tiny_llama, tmp_path, monkeypatch, d_model
):
    """Without a model, the tensors in params.pt bound what is allocated: nothing of d_model^2."""
    _reference_folder(tmp_path / "ref", tiny_llama, d_model=d_model)
    sizes = []
    real_stack = torch.stack
    monkeypatch.setattr(
        torch, "stack", lambda ts, *a, **k: sizes.append(len(ts)) or real_stack(ts, *a, **k)
    )
    with pytest.raises(FittedFileError, match=rf"0.weight has shape \(32, 32\).*d_model={d_model}"):
        read_reference_lens(tmp_path / "ref")
    assert sizes == []  # refused before any stacking (allocation) of translators


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("d_model", -1, r"field 'd_model' is -1, outside at least 1"),
        ("d_model", 0, r"field 'd_model' is 0"),
        ("d_model", 32.9, r"field 'd_model' must be an integer, got number 32.9"),
        ("d_model", "32", r"field 'd_model' must be an integer, got string '32'"),
        ("d_model", True, r"field 'd_model' must be an integer, got boolean True"),
        ("num_hidden_layers", 2.0, r"field 'num_hidden_layers' must be an integer"),
        ("num_hidden_layers", None, r"field 'num_hidden_layers' must be an integer, got null"),
        ("bias", "false", r"field 'bias' must be true or false, got string 'false'"),
        ("bias", 0, r"field 'bias' must be true or false, got integer 0"),
        ("unembed_hash", 5, r"field 'unembed_hash' must be a string"),
    ],
)
def test_reference_field_of_the_wrong_type_or_value(
    tiny_llama, tmp_path, no_params_read, field, value, message
):
    _reference_folder(tmp_path / "ref", tiny_llama, **{field: value})
    for model in (tiny_llama, None):
        with pytest.raises(FittedFileError, match=message) as info:
            TunedLens.load(tmp_path / "ref", model)
        assert str(tmp_path / "ref" / "config.json") in str(info.value)  # names the file


def test_reference_missing_field_and_list_config(tiny_llama, tmp_path, no_params_read):
    _reference_folder(tmp_path / "ref", tiny_llama)
    cfg = json.loads((tmp_path / "ref" / "config.json").read_text())
    del cfg["num_hidden_layers"]
    (tmp_path / "ref" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FittedFileError, match="field 'num_hidden_layers' is missing"):
        TunedLens.load(tmp_path / "ref", tiny_llama)
    (tmp_path / "ref" / "config.json").write_text(json.dumps([cfg]))
    with pytest.raises(FittedFileError, match=r"config.json holds a JSON list, not an object"):
        TunedLens.load(tmp_path / "ref", tiny_llama)
    with pytest.raises(FittedFileError, match=r"config.json holds a JSON list, not an object"):
        load_lens(tmp_path / "ref", tiny_llama)


def test_reference_bias_false_is_read_as_false(tiny_llama, tmp_path):
    """JSON false means no bias: biases in params.pt then contradict the config and are refused."""
    _reference_folder(tmp_path / "ref", tiny_llama, bias=False)
    with pytest.raises(FittedFileError, match="holds biases although config.json says bias=false"):
        TunedLens.load(tmp_path / "ref", tiny_llama)
    state = torch.load(tmp_path / "ref" / "params.pt", weights_only=True)
    torch.save(
        {k: v for k, v in state.items() if k.endswith("weight")}, tmp_path / "ref" / "params.pt"
    )
    lens = TunedLens.load(tmp_path / "ref", tiny_llama)
    assert lens.has_bias is False and torch.count_nonzero(lens.bias) == 0
    h = torch.randn(3, tiny_llama.cfg.d_model)
    torch.testing.assert_close(lens.transform(h, 0), h + h @ state["0.weight"].T, rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- our own format
def _our_lens(path, model, edit):
    TunedLens.for_model(model).save(path)
    meta = json.loads((path / "config.json").read_text())
    meta = edit(meta)
    (path / "config.json").write_text(json.dumps(meta))


def _set(section, key, value):
    def edit(meta):
        (meta if section is None else meta[section])[key] = value
        return meta

    return edit


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            _set(None, "format_version", "one"),
            r"field 'format_version' must be an integer, got string 'one'",
        ),
        (_set(None, "format_version", 1.5), r"field 'format_version' must be an integer"),
        (_set(None, "format_version", 99), r"newer tlmicroscope \(format 99\)"),
        (
            _set("config", "bias", "false"),
            r"field 'bias' must be true or false, got string 'false'",
        ),
        (_set("config", "d_model", 32.9), r"field 'd_model' must be an integer, got number 32.9"),
        (_set("config", "n_layers", -1), r"field 'n_layers' is -1"),
        (_set("config", "settings", ["a"]), r"field 'settings' must be an object"),
        (_set(None, "config", ["n_layers", 3]), r"field 'config' must be a JSON object, got list"),
        (_set(None, "model", "tiny"), r"field 'model' must be a JSON object, got string"),
        (lambda meta: [meta], r"holds a JSON list, not an object"),
    ],
    ids=[
        "version-string",
        "version-fraction",
        "version-newer",
        "bias-string",
        "d_model-fraction",
        "n_layers-negative",
        "settings-list",
        "config-list",
        "model-string",
        "top-level-list",
    ],
)
def test_our_lens_config_of_the_wrong_type(tiny_llama, tmp_path, edit, message):
    _our_lens(tmp_path / "lens", tiny_llama, edit)
    with pytest.raises(FittedFileError, match=message) as info:
        TunedLens.load(tmp_path / "lens", tiny_llama)
    assert "config.json" in str(info.value) or "format 99" in str(info.value)


def test_our_lens_with_another_model_is_refused_before_its_tensors_are_read(
    tiny_llama, tmp_path, monkeypatch
):
    from tlmicroscope.models import tiny_model

    save_fitted(tmp_path / "obj", {"w": torch.zeros(4)}, kind="thing", config={}, model=tiny_llama)
    import safetensors.torch

    def refuse(*args, **kwargs):
        raise AssertionError("tensors were read before the model was checked")

    monkeypatch.setattr(safetensors.torch, "load_file", refuse)
    with pytest.raises(ModelMismatchError, match="d_model is 32 in the file but 48"):
        load_fitted(
            tmp_path / "obj", kind="thing", model=tiny_model("llama", n_layers=2, d_model=48)
        )
