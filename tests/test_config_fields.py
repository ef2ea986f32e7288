"""Saved objects other than lenses refuse config fields of the wrong type (issue 14, item 3)."""

from __future__ import annotations

import json

import pytest
import torch

from tlmicroscope.io import FittedFileError, config_bool, config_int


def test_config_int_and_bool_refuse_lookalikes():
    cfg = {"n": 3, "f": 3.0, "s": "3", "b": True, "neg": -1, "flag": False, "sflag": "false"}
    assert config_int(cfg, "n", "x.json") == 3
    for key in ("f", "s", "b"):
        with pytest.raises(FittedFileError, match=f"x.json: field '{key}' must be an integer"):
            config_int(cfg, key, "x.json")
    with pytest.raises(FittedFileError, match="outside"):
        config_int(cfg, "neg", "x.json")
    assert config_bool(cfg, "flag", "x.json", default=True) is False
    with pytest.raises(FittedFileError, match="'sflag' must be true or false"):
        config_bool(cfg, "sflag", "x.json", default=True)


def _edit_config(folder, **changes):
    path = folder / "config.json"
    data = json.loads(path.read_text())
    data["config"].update(changes)
    path.write_text(json.dumps(data))


def test_latent_pca_refuses_a_string_flag(tiny_llama, tmp_path):
    from tlmicroscope.geometry.projection import LatentPCA

    pca = LatentPCA(2).fit(torch.randn(50, tiny_llama.cfg.d_model))
    pca.save(tmp_path / "pca", model=tiny_llama)
    assert LatentPCA.load(tmp_path / "pca", model=tiny_llama).center is False  # the default, saved
    _edit_config(tmp_path / "pca", center="false")
    with pytest.raises(FittedFileError, match="'center' must be true or false"):
        LatentPCA.load(tmp_path / "pca", model=tiny_llama)
    _edit_config(tmp_path / "pca", center=False, n_components=2.5)
    with pytest.raises(FittedFileError, match="'n_components' must be an integer"):
        LatentPCA.load(tmp_path / "pca", model=tiny_llama)
