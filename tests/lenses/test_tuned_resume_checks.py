"""``resume=True`` without a checkpoint: a new folder starts from step 0 out loud, a trained one is refused."""

import logging

import pytest

from tlmicroscope.lenses.train import CHECKPOINT_DIR, train_tuned_lens

pytestmark = pytest.mark.models

TEXT = ["A mistyped output folder must be seen, not silently trained from scratch. " * 12]
FAST = dict(steps=2, tokens_per_step=64, seq_len=32, precision="fp32", progress=False, init_tokens=64,
            micro_batch_tokens=64, chunk_rows=64)


def test_resume_into_a_new_folder_warns_and_logs_the_folder(tiny_llama, tmp_path, caplog):
    out = tmp_path / "typo-in-out"
    with caplog.at_level(logging.WARNING, logger="tlmicroscope.lenses.train"):
        with pytest.warns(UserWarning, match=r"holds no checkpoint .*training starts from step 0") as caught:
            res = train_tuned_lens(tiny_llama, TEXT, out_dir=str(out), resume=True, **FAST)
    assert any(str(out.resolve()) in str(w.message) for w in caught)
    logged = [r for r in caplog.records if r.name == "tlmicroscope.lenses.train"]
    assert len(logged) == 1 and logged[0].levelno == logging.WARNING
    assert str(out.resolve()) in logged[0].getMessage()
    assert res.kl.shape[0] == 2 and (out / CHECKPOINT_DIR).is_dir()  # trained from step 0, saved


def test_resume_without_checkpoint_in_a_new_folder_warns_only_with_resume(tiny_llama, tmp_path, recwarn):
    train_tuned_lens(tiny_llama, TEXT, out_dir=str(tmp_path / "fresh"), **FAST)
    assert not [w for w in recwarn if "checkpoint" in str(w.message)]


def test_resume_in_a_trained_folder_that_lost_its_checkpoint_is_refused(tiny_llama, tmp_path):
    import shutil

    out = tmp_path / "run"
    train_tuned_lens(tiny_llama, TEXT, out_dir=str(out), **FAST)
    shutil.rmtree(out / CHECKPOINT_DIR)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(ValueError, match=r"holds a trained lens \(training.json, tensors.safetensors\) "
                                         r"but no checkpoint/"):
        train_tuned_lens(tiny_llama, TEXT, out_dir=str(out), resume=True, **FAST)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the lens is untouched
