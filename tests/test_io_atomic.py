"""Atomic folder saves: every failing step and SIGKILL at random points leave the old or the new
copy.

A save of ``atomic_dir`` fills a temporary sibling, then swaps it in (one ``renameat2`` exchange
on Linux; elsewhere two ``os.replace`` calls with a rollback). These tests fail each step in turn,
kill a saving process at random moments, and check after each that the destination is a whole
previous or whole new folder, that the next save or load leaves no temporaries behind, and that
the file permissions follow the umask.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
import warnings

import pytest
import torch

import tlmicroscope.io as io_module
from tlmicroscope.io import (
    FittedFileError,
    atomic_dir,
    atomic_write_text,
    load_fitted,
    recover_dir,
    save_fitted,
)

posix_only = pytest.mark.skipif(os.name != "posix", reason="fork, SIGKILL and umask are POSIX")


def _save(path, step, size=64):
    return save_fitted(
        path, {"w": torch.full((size,), float(step))}, kind="thing", config={"step": step}
    )


def _loaded_step(path):
    """The step of a whole saved copy: its config and every tensor value must agree."""
    tensors, meta = load_fitted(path, kind="thing")
    step = meta["config"]["step"]
    assert torch.equal(tensors["w"], torch.full_like(tensors["w"], float(step)))
    return step


def _dot_entries(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def _dead_pid():
    """The id of a process that has exited and been reaped."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# ------------------------------------------------------------------- each step failing in turn
@pytest.fixture
def replace_fails_at(monkeypatch):
    """Make the k-th (and any listed later) ``os.replace`` call raise; returns the call log."""
    real = os.replace
    calls = []

    def arm(*steps):
        def replace(src, dst):
            calls.append((os.path.basename(src), os.path.basename(dst)))
            if len(calls) in steps:
                raise OSError(5, f"Input/output error (injected at replace #{len(calls)})")
            return real(src, dst)

        monkeypatch.setattr(os, "replace", replace)
        return calls

    return arm


@pytest.mark.parametrize("steps", [(1,), (2,), (2, 3)], ids=["aside", "in", "in+rollback"])
def test_two_step_swap_fails_at_each_rename(tmp_path, monkeypatch, replace_fails_at, steps):
    target = tmp_path / "obj"
    _save(target, 1)
    monkeypatch.setattr(io_module, "_exchange", lambda a, b: False)  # a filesystem without it
    calls = replace_fails_at(*steps)
    with pytest.raises(OSError, match="injected"):
        _save(target, 2)
    monkeypatch.undo()
    # the renames were: previous copy aside, new copy in, (on failure) previous copy back
    assert calls[0][0] == "obj" and calls[0][1].startswith(".obj.old-")
    if steps != (1,):
        assert calls[1][0].startswith(".obj.tmp-") and calls[1][1] == "obj"
        assert calls[2][0].startswith(".obj.old-") and calls[2][1] == "obj"
    if steps == (2, 3):  # the rollback failed too: the previous copy waits beside the destination
        assert not target.exists()
        assert [n.startswith(".obj.old-") for n in _dot_entries(tmp_path)] == [True]
        with pytest.warns(UserWarning, match="previous copy was restored"):
            assert _loaded_step(target) == 1
    else:
        assert _loaded_step(target) == 1
    assert _dot_entries(tmp_path) == []
    _save(target, 3)
    assert _loaded_step(target) == 3 and _dot_entries(tmp_path) == []


def test_two_step_swap_without_failure(tmp_path, monkeypatch, replace_fails_at):
    target = tmp_path / "obj"
    _save(target, 1)
    monkeypatch.setattr(io_module, "_exchange", lambda a, b: False)
    calls = replace_fails_at()
    _save(target, 2)
    assert len(calls) == 2 and _loaded_step(target) == 2 and _dot_entries(tmp_path) == []


def test_exchange_failing_or_interrupted_after_the_swap(tmp_path, monkeypatch):
    target = tmp_path / "obj"
    _save(target, 1)

    def refused(a, b):
        raise OSError(13, "Permission denied (injected)")

    monkeypatch.setattr(io_module, "_exchange", refused)
    with pytest.raises(OSError, match="injected"):
        _save(target, 2)
    monkeypatch.undo()
    assert _loaded_step(target) == 1 and _dot_entries(tmp_path) == []

    real_exchange = io_module._exchange
    swapped = []

    def exchange_then_interrupt(a, b):
        swapped.append(real_exchange(a, b))
        raise KeyboardInterrupt

    monkeypatch.setattr(io_module, "_exchange", exchange_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        _save(target, 2)
    monkeypatch.undo()
    # on Linux the swap happened before the interrupt: the new copy is in, the old one deleted
    assert _loaded_step(target) == (2 if swapped == [True] else 1)
    assert _dot_entries(tmp_path) == []


def test_first_save_failing_leaves_nothing(tmp_path, replace_fails_at):
    replace_fails_at(1)
    with pytest.raises(OSError, match="injected"):
        _save(tmp_path / "obj", 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_file_in_the_way_is_refused(tmp_path):
    (tmp_path / "obj").write_text("not a folder")
    with pytest.raises(FileExistsError, match="not a folder"):
        _save(tmp_path / "obj", 1)
    assert (tmp_path / "obj").read_text() == "not a folder" and _dot_entries(tmp_path) == []


# ---------------------------------------------------------------------- leftovers, old and new
def test_leftover_of_older_versions_is_restored_on_load(tmp_path):
    """The state the issue describes: the destination gone, the old copy in ``.NAME.old-PID``."""
    target = tmp_path / "obj"
    _save(target, 7)
    os.replace(target, tmp_path / f".obj.old-{_dead_pid()}")
    (tmp_path / ".obj.abcd1234.tmp").mkdir()  # an older version's temporary folder
    with pytest.warns(UserWarning, match=r"restored from \.obj\.old-"):
        assert _loaded_step(target) == 7
    assert _dot_entries(tmp_path) == []


def test_leftovers_cleaned_on_next_save_and_live_ones_kept(tmp_path):
    target = tmp_path / "obj"
    _save(target, 1)
    dead = tmp_path / f".obj.tmp-{_dead_pid()}-x1"
    dead.mkdir()
    (dead / "half.bin").write_bytes(b"12")
    stale_old = tmp_path / f".obj.old-{_dead_pid()}-x2"
    stale_old.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = tmp_path / f".obj.tmp-{sleeper.pid}-x3"  # a save running in another process
        live.mkdir()
        unrelated = [
            tmp_path / ".obj.tmp-notapid",
            tmp_path / ".objx.tmp-1-ab",
            tmp_path / "obj.tmp-1-ab",
        ]
        for p in unrelated:
            p.mkdir()
        _save(target, 2)
        assert sorted(_dot_entries(tmp_path)) == sorted(
            [live.name, ".obj.tmp-notapid", ".objx.tmp-1-ab"]
        )
    finally:
        sleeper.kill()
        sleeper.wait()
    assert recover_dir(target) is False  # nothing to restore: the destination is there
    assert not live.exists() and _loaded_step(target) == 2


def test_stale_temporary_files_of_atomic_writes_are_removed(tmp_path):
    (tmp_path / f".report.html.tmp-{_dead_pid()}-zz").write_text("half")
    (tmp_path / ".report.html.ab12cd34.tmp").write_text("half")  # older versions' name
    atomic_write_text(tmp_path / "report.html", "whole")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html"]


def test_resume_never_restarts_because_the_checkpoint_was_moved_aside(tiny_llama, tmp_path):
    """A checkpoint save killed between its two renames: resume restores it and continues."""
    from tlmicroscope.lenses.train import CHECKPOINT_DIR, train_tuned_lens

    text = ["Checkpoints are restored, never silently replaced by a fresh start. " * 12]
    fast = dict(
        tokens_per_step=64,
        seq_len=32,
        precision="fp32",
        progress=False,
        init_tokens=64,
        micro_batch_tokens=64,
        chunk_rows=64,
        steps=4,
    )
    out = tmp_path / "run"
    train_tuned_lens(tiny_llama, text, out_dir=str(out), stop_after=2, checkpoint_every=1, **fast)
    os.replace(out / CHECKPOINT_DIR, out / f".{CHECKPOINT_DIR}.old-{_dead_pid()}-ab12")
    with pytest.warns(UserWarning) as caught:
        resumed = train_tuned_lens(
            tiny_llama, text, out_dir=str(out), resume=True, stop_after=1, **fast
        )
    messages = [str(w.message) for w in caught]
    assert any("previous copy was restored" in m for m in messages)
    assert not any("step 0" in m for m in messages)
    assert resumed.kl.shape[0] == 3  # steps 0-1 from the restored checkpoint, step 2 trained now
    finished = train_tuned_lens(tiny_llama, text, out_dir=str(out), resume=True, **fast)
    full = train_tuned_lens(tiny_llama, text, **fast)
    assert torch.equal(finished.lens.weight, full.lens.weight)
    assert _dot_entries(out) == []


# ----------------------------------------------------------------------------- permissions
@posix_only
@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_saved_files_follow_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        obj = _save(tmp_path / "obj", 1)
        text = atomic_write_text(tmp_path / "report.html", "x")
    finally:
        os.umask(old)
    for name in ("tensors.safetensors", "config.json"):
        assert (obj / name).stat().st_mode & 0o777 == 0o666 & ~umask, name
    assert obj.stat().st_mode & 0o777 == 0o777 & ~umask
    assert text.stat().st_mode & 0o777 == 0o666 & ~umask


@posix_only
def test_tuned_lens_files_are_readable_by_others_under_022(tiny_llama, tmp_path):
    from tlmicroscope.lenses import TunedLens

    old = os.umask(0o022)
    try:
        folder = TunedLens.for_model(tiny_llama).save(tmp_path / "lens")
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in folder.iterdir()}
    assert modes == {"tensors.safetensors": 0o644, "config.json": 0o644}


# ---------------------------------------------------------------------- SIGKILL mid-save
_BLOB = 1 << 20  # bytes per data file: a save then takes tens of milliseconds, kills land inside


def _fill_for(step):
    def fill(tmp):
        for name in ("a.bin", "b.bin"):
            with open(tmp / name, "wb") as f:
                f.write(bytes([step % 251]) * _BLOB)
        (tmp / "config.json").write_text(json.dumps({"step": step}))

    return fill


def _complete_step(folder):
    """The step of a whole folder written by ``_fill_for``; fails on any partial or mixed copy."""
    step = json.loads((folder / "config.json").read_text())["step"]
    for name in ("a.bin", "b.bin"):
        data = (folder / name).read_bytes()
        assert data == bytes([step % 251]) * _BLOB, f"{name} of step {step} is partial or mixed"
    return step


def _saving_child(target, start, two_step):
    """In a forked child: save steps start, start+1, ... until killed (no torch work after fork).

    With ``two_step`` the exchange is unavailable and the child pauses 0.1 s between moving the
    previous copy aside and moving the new one in, so that kills land there too.
    """
    try:
        if two_step:
            io_module._exchange = lambda a, b: False
            real_replace = os.replace

            def slow_replace(src, dst):
                real_replace(src, dst)
                if ".old-" in os.path.basename(dst):  # widen the window between the two renames
                    time.sleep(0.1)

            os.replace = slow_replace
        step = start
        while True:
            atomic_dir(target, _fill_for(step))
            step += 1
    finally:
        os._exit(0)


@posix_only
@pytest.mark.parametrize("two_step", [False, True], ids=["exchange", "two-renames"])
def test_sigkill_at_random_points_leaves_old_or_new(tmp_path, two_step):
    target = tmp_path / "obj"
    atomic_dir(target, _fill_for(0))
    rng = random.Random(14)
    last, between = 0, {"temporaries": 0, "missing": 0}
    for _ in range(16):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # fork of a threaded process
            pid = os.fork()
        if pid == 0:
            _saving_child(target, last + 1, two_step)
        time.sleep(rng.uniform(0.0, 0.25))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        between["temporaries"] += bool(_dot_entries(tmp_path))
        if not target.exists():
            between["missing"] += 1
            # only possible between the two renames, and only without the exchange
            assert two_step, "the exchange must never leave the destination missing"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            recover_dir(target)  # what the next load or save does first
        step = _complete_step(target)
        assert step >= last  # never an older copy than the last one seen whole
        last = step
        assert _dot_entries(tmp_path) == []
    assert last > 0  # the child did save new copies between kills
    # kills landed inside saves (they take most of the child's time), and between the renames
    assert between["temporaries"] > 0 and (between["missing"] > 0) == two_step, between


@pytest.mark.slow
@posix_only
def test_sigkill_of_a_real_python_process_saving_fitted_objects(tmp_path):
    """End to end with save_fitted/load_fitted in a separately started interpreter."""
    target = tmp_path / "obj"
    _save(target, 0, size=1 << 18)
    script = (
        "import sys, torch\n"
        "from tlmicroscope.io import save_fitted\n"
        "target, step = sys.argv[1], int(sys.argv[2])\n"
        "print('ready', flush=True)\n"
        "while True:\n"
        "    save_fitted(target, {'w': torch.full((1 << 18,), float(step))}, kind='thing',\n"
        "                config={'step': step})\n"
        "    step += 1\n"
    )
    rng = random.Random(5)
    last = 0
    for _ in range(5):
        proc = subprocess.Popen(
            [sys.executable, "-c", script, str(target), str(last + 1)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.05, 0.5))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        step = _loaded_step(target)
        assert step >= last
        last = step
        assert _dot_entries(tmp_path) == []
    with pytest.raises(FittedFileError, match="No saved"):
        load_fitted(tmp_path / "never", kind="thing")
