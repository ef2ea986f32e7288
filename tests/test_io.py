import json

import pytest
import torch

from tlmicroscope.io import (
    FittedFileError,
    ModelMismatchError,
    atomic_dir,
    atomic_write_text,
    load_fitted,
    model_fingerprint,
    save_fitted,
)
from tlmicroscope.models import tiny_model


@pytest.fixture(scope="module")
def two_models():
    return tiny_model("llama", n_layers=2, seed=0), tiny_model("llama", n_layers=2, seed=1)


def test_round_trip_is_exact(tmp_path, two_models):
    m, _ = two_models
    tensors = {"w": torch.randn(3, 4, dtype=torch.float64), "i": torch.arange(5)}
    save_fitted(tmp_path / "obj", tensors, kind="thing", config={"alpha": 0.5}, model=m)
    loaded, meta = load_fitted(tmp_path / "obj", kind="thing", model=m)
    assert torch.equal(loaded["w"], tensors["w"]) and loaded["w"].dtype == torch.float64
    assert torch.equal(loaded["i"], tensors["i"])
    assert meta["config"] == {"alpha": 0.5} and meta["model"]["n_layers"] == 2


def test_another_model_is_refused_naming_the_field(tmp_path, two_models):
    m0, m1 = two_models
    save_fitted(tmp_path / "obj", {"w": torch.zeros(1)}, kind="thing", config={}, model=m0)
    with pytest.raises(ModelMismatchError, match="unembed_sha256"):
        load_fitted(tmp_path / "obj", kind="thing", model=m1)
    wider = tiny_model("llama", n_layers=2, d_model=48)
    with pytest.raises(ModelMismatchError, match="d_model is 32 in the file but 48"):
        load_fitted(tmp_path / "obj", kind="thing", model=wider)


def test_fingerprint_tracks_weights(two_models):
    a, b = model_fingerprint(two_models[0]), model_fingerprint(two_models[1])
    assert a["unembed_sha256"] != b["unembed_sha256"]
    assert {k: a[k] for k in ("d_model", "n_layers", "d_vocab")} == {
        "d_model": 32,
        "n_layers": 2,
        "d_vocab": 259,
    }


def test_corrupt_truncated_missing_and_wrong_kind(tmp_path):
    obj = save_fitted(tmp_path / "obj", {"w": torch.randn(100)}, kind="thing", config={})
    with pytest.raises(FittedFileError, match="holds a 'thing', not a 'lens'"):
        load_fitted(obj, kind="lens")
    data = (obj / "tensors.safetensors").read_bytes()
    (obj / "tensors.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(FittedFileError, match="truncated or corrupt"):
        load_fitted(obj, kind="thing")
    (obj / "config.json").write_text("{not json")
    with pytest.raises(FittedFileError, match="not valid JSON"):
        load_fitted(obj, kind="thing")
    (obj / "config.json").unlink()
    with pytest.raises(FittedFileError, match="config.json is missing"):
        load_fitted(obj, kind="thing")
    with pytest.raises(FittedFileError, match="No saved thing"):
        load_fitted(tmp_path / "absent", kind="thing")


def test_failed_save_keeps_the_previous_copy(tmp_path):
    target = tmp_path / "ckpt"
    save_fitted(target, {"w": torch.ones(3)}, kind="thing", config={"step": 1})

    def fill(tmp):
        (tmp / "partial").write_text("half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        atomic_dir(target, fill)
    tensors, meta = load_fitted(target, kind="thing")
    assert meta["config"]["step"] == 1 and torch.equal(tensors["w"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporary left behind


def test_atomic_text_write_replaces_whole_file(tmp_path):
    p = atomic_write_text(tmp_path / "a" / "report.html", "new")
    assert p.read_text() == "new" and (p.stat().st_mode & 0o777) != 0o600
    json.loads(atomic_write_text(tmp_path / "x.json", '{"a": 1}').read_text())
