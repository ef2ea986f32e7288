"""``resume=True`` without a checkpoint: a new folder starts from step 0 out loud, a trained one is
refused; a lens save stopped between its two files is finished on the next load."""

import logging

import pytest
import torch

from tlmicroscope.lenses.train import CHECKPOINT_DIR, train_tuned_lens

pytestmark = pytest.mark.models

TEXT = ["A mistyped output folder must be seen, not silently trained from scratch. " * 12]
FAST = dict(
    steps=2,
    tokens_per_step=64,
    seq_len=32,
    precision="fp32",
    progress=False,
    init_tokens=64,
    micro_batch_tokens=64,
    chunk_rows=64,
)


def test_resume_into_a_new_folder_warns_and_logs_the_folder(tiny_llama, tmp_path, caplog):
    out = tmp_path / "typo-in-out"
    with (
        caplog.at_level(logging.WARNING, logger="tlmicroscope.lenses.train"),
        pytest.warns(
            UserWarning, match=r"holds no checkpoint .*training starts from step 0"
        ) as caught,
    ):
        res = train_tuned_lens(tiny_llama, TEXT, out_dir=str(out), resume=True, **FAST)
    assert any(str(out.resolve()) in str(w.message) for w in caught)
    logged = [r for r in caplog.records if r.name == "tlmicroscope.lenses.train"]
    assert len(logged) == 1 and logged[0].levelno == logging.WARNING
    assert str(out.resolve()) in logged[0].getMessage()
    assert res.kl.shape[0] == 2 and (out / CHECKPOINT_DIR).is_dir()  # trained from step 0, saved


def test_resume_without_checkpoint_in_a_new_folder_warns_only_with_resume(
    tiny_llama, tmp_path, recwarn
):
    train_tuned_lens(tiny_llama, TEXT, out_dir=str(tmp_path / "fresh"), **FAST)
    assert not [w for w in recwarn if "checkpoint" in str(w.message)]


def test_resume_in_a_trained_folder_that_lost_its_checkpoint_is_refused(tiny_llama, tmp_path):
    import shutil

    out = tmp_path / "run"
    train_tuned_lens(tiny_llama, TEXT, out_dir=str(out), **FAST)
    shutil.rmtree(out / CHECKPOINT_DIR)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(
        ValueError,
        match=r"holds a trained lens \(training.json, tensors.safetensors\) "
        r"but no checkpoint/",
    ):
        train_tuned_lens(tiny_llama, TEXT, out_dir=str(out), resume=True, **FAST)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the lens is untouched


def test_a_lens_save_stopped_between_its_two_files_is_finished(tiny_llama, tmp_path, monkeypatch):
    """The lens files in the output folder are moved one by one; a stop in between is completed."""
    import os

    from tlmicroscope.io import load_fitted
    from tlmicroscope.lenses import TunedLens

    out = tmp_path / "run"
    real_replace = os.replace
    moves = {"config": 0}

    def replace(src, dst):
        if os.path.basename(dst) == "config.json" and ".lens-staging" in str(src):
            moves["config"] += 1
            if moves["config"] == 2:  # the second checkpoint: tensors moved in, config not
                raise OSError(5, "Input/output error (injected)")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="injected"):
        train_tuned_lens(
            tiny_llama, TEXT, out_dir=str(out), checkpoint_every=1, **{**FAST, "steps": 3}
        )
    monkeypatch.undo()
    assert (out / ".lens-staging" / "config.json").is_file()  # the new config, not yet moved
    ckpt, meta = load_fitted(out / CHECKPOINT_DIR, kind="tuned_lens_checkpoint", model=tiny_llama)
    assert meta["config"]["step"] == 2
    lens = TunedLens.load(out, tiny_llama)
    assert lens.settings["steps"] == 2  # the config now describes the tensors beside it
    assert torch.equal(lens.weight, ckpt["lens.weight"])
    assert not (out / ".lens-staging").exists()
