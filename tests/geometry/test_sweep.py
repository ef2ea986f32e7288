"""geometry_sweep: file format, resume after an interruption (and a torn line), refusal of other
settings, a 2-process torchrun run equal to 1 process, and the ID-loss correlation."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from scipy import stats

from tlmicroscope.geometry import geometry_sweep, id_loss_correlation, load_geometry_sweep
from tlmicroscope.geometry.correlation import logits_entropy_correlation
from tlmicroscope.geometry.sweep import GeometrySweep

sweep_module = importlib.import_module("tlmicroscope.geometry.sweep")

PROMPTS = torch.randint(0, 256, (3, 64), generator=torch.Generator().manual_seed(0))
SETTINGS = dict(shuffle_levels=(0, 1, 3), seeds=(0, 1), max_scale=16, progress=False)


def _strip(sweep: GeometrySweep) -> list[dict]:
    return [json.loads(json.dumps(r)) for r in sweep.records]


@pytest.mark.models
def test_sweep_records_and_shuffled_loss(tiny_llama, tmp_path):
    sweep = geometry_sweep(tiny_llama, PROMPTS, out=tmp_path / "s.jsonl", **SETTINGS)
    # S = 0 once per prompt, S > 0 once per seed
    assert [(r["prompt"], r["shuffle"], r["seed"]) for r in sweep.records] == [
        (p, s, seed) for p in range(3) for s in (0, 1, 3) for seed in ((0,) if s == 0 else (0, 1))
    ]
    rec = next(
        r for r in sweep.records if r["prompt"] == 1 and r["shuffle"] == 3 and r["seed"] == 1
    )
    shuffled = sweep_module.shuffle_tokens(PROMPTS[1], 3, np.random.default_rng([1, 1, 3]))
    with torch.no_grad():
        assert rec["loss"] == pytest.approx(
            float(tiny_llama(shuffled[None], return_type="loss")), abs=1e-5
        )
    assert sweep.metric("gride", 1, scale=4).shape == (6, tiny_llama.cfg.n_layers + 1)
    assert sweep.metric("overlap", 0, k=2).shape == (3, tiny_llama.cfg.n_layers)
    lines = (tmp_path / "s.jsonl").read_text().splitlines()
    assert json.loads(lines[0])["settings"]["shuffle_levels"] == [0, 1, 3] and len(lines) == 1 + 15
    df = sweep.to_dataframe()
    assert len(df) == 15 * (tiny_llama.cfg.n_layers + 1)


@pytest.mark.models
def test_resumed_sweep_equals_uninterrupted(tiny_llama, tmp_path, monkeypatch):
    full = geometry_sweep(tiny_llama, PROMPTS, out=tmp_path / "full.jsonl", **SETTINGS)
    real = sweep_module.layer_geometry
    calls = {"n": 0}

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(sweep_module, "layer_geometry", interrupted)
    path = tmp_path / "part.jsonl"
    with pytest.raises(KeyboardInterrupt):
        geometry_sweep(tiny_llama, PROMPTS, out=path, **SETTINGS)
    monkeypatch.undo()
    assert len(path.read_text().splitlines()) == 1 + 5
    with open(path, "ab") as f:  # a write torn by the interruption
        f.write(b'{"prompt": 2, "shuffle": 1, "se')
    resumed = geometry_sweep(tiny_llama, PROMPTS, out=path, **SETTINGS)
    assert _strip(resumed) == _strip(full)
    assert (
        path.read_text().splitlines()[1:] == (tmp_path / "full.jsonl").read_text().splitlines()[1:]
    )


@pytest.mark.models
def test_resume_refuses_other_settings(tiny_llama, tmp_path):
    path = tmp_path / "s.jsonl"
    geometry_sweep(
        tiny_llama, PROMPTS[:1], out=path, shuffle_levels=(0,), max_scale=8, progress=False
    )
    with pytest.raises(ValueError, match="max_scale=8, not 16"):
        geometry_sweep(
            tiny_llama, PROMPTS[:1], out=path, shuffle_levels=(0,), max_scale=16, progress=False
        )
    with pytest.raises(ValueError, match="prompts_sha256"):
        geometry_sweep(
            tiny_llama, PROMPTS[1:2], out=path, shuffle_levels=(0,), max_scale=8, progress=False
        )
    with pytest.raises(ValueError, match="already exists"):
        geometry_sweep(
            tiny_llama, PROMPTS[:1], out=path, shuffle_levels=(0,), max_scale=8, resume=False
        )
    with pytest.raises(ValueError, match="Shuffle levels must lie in 0..3"):
        geometry_sweep(tiny_llama, PROMPTS[:1], out=tmp_path / "x.jsonl", shuffle_levels=(4,))


WORKER = textwrap.dedent(
    """
    import sys, torch
    torch.set_num_threads(1)
    from tlmicroscope.models import tiny_model
    from tlmicroscope.geometry import geometry_sweep
    model = tiny_model("llama", n_layers=3, d_model=32, seed=0)
    prompts = torch.randint(0, 256, (3, 64), generator=torch.Generator().manual_seed(0))
    geometry_sweep(model, prompts, out=sys.argv[1], shuffle_levels=(0, 1, 3), seeds=(0, 1),
                   max_scale=16, progress=False)
    """
)


@pytest.mark.distributed
def test_two_process_sweep_equals_one_process(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    one = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "one.jsonl")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            str(script),
            str(tmp_path / "two.jsonl"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = load_geometry_sweep(tmp_path / "one.jsonl"), load_geometry_sweep(tmp_path / "two.jsonl")
    assert not list(tmp_path.glob("two.jsonl.rank*"))  # parts merged and removed
    assert len(a.records) == len(b.records) == 15
    for ra, rb in zip(a.records, b.records):
        assert ra.keys() == rb.keys()
        for key in ra:
            if isinstance(ra[key], str):
                assert ra[key] == rb[key]
                continue
            np.testing.assert_allclose(
                np.asarray(ra[key], dtype=float),
                np.asarray(rb[key], dtype=float),
                rtol=1e-9,
                atol=1e-9,
                err_msg=key,
            )


def _synthetic_sweep(n=40, seed=0) -> GeometrySweep:
    rng = np.random.default_rng(seed)
    recs = []
    for p in range(n):
        for s, shift in ((0, 0.0), (2, 3.0)):
            loss = shift + rng.normal()
            ids = [
                [float(np.exp(0.5 * loss + rng.normal()))],
                [float(np.exp(-0.5 * loss + rng.normal()))],
            ]
            recs.append(
                {
                    "prompt": p,
                    "shuffle": s,
                    "seed": 0,
                    "layers": [0, 1],
                    "gride_scales": [2],
                    "gride": ids,
                    "loss": loss,
                    "contextual_entropy": loss + rng.normal(),
                    "logits_gride": [float(np.exp(loss))],
                }
            )
    return GeometrySweep({"settings": {}}, recs)


def test_id_loss_correlation_matches_scipy_per_level():
    sweep = _synthetic_sweep()
    corr = id_loss_correlation(sweep)
    assert corr.shuffle_levels == (0, 2) and corr.n_prompts == (40, 40)
    for i, level in enumerate((0, 2)):
        loss = sweep.scalar("loss", level)
        for layer in (0, 1):
            ids = sweep.metric("gride", level)[:, layer]
            pr, sr = stats.pearsonr(np.log(ids), loss), stats.spearmanr(ids, loss)
            assert corr.pearson[i, layer] == pytest.approx(pr.statistic)
            assert corr.pearson_p[i, layer] == pytest.approx(pr.pvalue)
            assert corr.spearman[i, layer] == pytest.approx(sr.statistic)
            assert corr.spearman_p[i, layer] == pytest.approx(sr.pvalue)
    assert corr.pearson[0, 0] > 0 > corr.pearson[0, 1]
    # never pooled: a pooled correlation over both levels would differ
    pooled = stats.pearsonr(
        np.log(np.concatenate([sweep.metric("gride", s)[:, 0] for s in (0, 2)])),
        np.concatenate([sweep.scalar("loss", s) for s in (0, 2)]),
    ).statistic
    assert all(abs(pooled - r) > 1e-3 for r in corr.pearson[:, 0])
    assert len(corr.to_dataframe()) == 4
    ent = logits_entropy_correlation(sweep)
    assert ent.pearson[0] == pytest.approx(
        stats.pearsonr(sweep.scalar("loss", 0), sweep.scalar("contextual_entropy", 0)).statistic
    )
    with pytest.raises(ValueError, match="at least 3"):
        id_loss_correlation(_synthetic_sweep(n=2))


def test_figures_build_from_results():
    from tlmicroscope.viz.token_geometry import id_loss_correlation_figure, sweep_profile_figure

    sweep = _synthetic_sweep()
    fig = sweep_profile_figure(sweep, "gride", skip_embedding=False, band="std")
    means = [t for t in fig.data if t.mode == "lines+markers"]
    assert [t.name for t in means] == ["S=0 (n=40)", "S=2 (n=40)"]
    np.testing.assert_allclose(means[0].y, sweep.metric("gride", 0).mean(0))
    fig = id_loss_correlation_figure(id_loss_correlation(sweep))
    assert len(fig.data) == 4
