"""Token-geometry estimators against dadapy 0.3.4 on the same clouds: time, ratio, max difference.

dadapy pins numpy<2 and jax 0.4.30, so it cannot share tlmicroscope's environment. This script
creates ``benchmarks/.venv-dadapy/`` (once; pip resolves numpy 1.26 there), writes the clouds to
``.npy`` files, runs dadapy in that environment through a subprocess, and runs tlmicroscope here.

The work per cloud pair (A, B) is what one layer of one prompt costs in the paper's pipeline:
GRIDE at range scalings 2..256 with errors, TwoNN ("base" and "ml") on A, and the neighbourhood
overlap of A with B for k = 1..6. dadapy is used the efficient way: one ``Data(A)`` object whose
cached neighbours serve GRIDE, TwoNN and the overlap, and B's neighbour indices computed once.

Usage::

    flock /tmp/tlm-heavy.lock .venv/bin/python benchmarks/geometry_vs_dadapy.py [--sizes 1024,20000]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import venv
from pathlib import Path

# libgomp's threads spin after each parallel region; on a shared machine that steals the cores from
# the next operation (measured 5x slower per layer with 2 threads). Must precede `import torch`.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
VENV = HERE / ".venv-dadapy"
DADAPY = "dadapy==0.3.4"

# Runs inside the dadapy environment: times the same work on the same files, prints JSON.
WORKER = r"""
import json, sys, time, warnings
import numpy as np
warnings.filterwarnings("ignore")
from dadapy import Data

a, b, reps = np.load(sys.argv[1]), np.load(sys.argv[2]), int(sys.argv[3])
best, out = None, None
for _ in range(reps):
    t0 = time.perf_counter()
    data = Data(coordinates=a, maxk=min(100, len(a) - 1))
    ids, errs, _ = data.return_id_scaling_gride(range_max=256)
    base = data.compute_id_2NN(algorithm="base")[0]
    ml = data.compute_id_2NN(algorithm="ml")[0]
    other = Data(coordinates=b, maxk=6)
    other.compute_distances()
    overlap = [data.return_data_overlap(dist_indices=other.dist_indices, k=k) for k in range(1, 7)]
    dt = time.perf_counter() - t0
    if best is None or dt < best:
        best = dt
        out = {"gride": ids.tolist(), "gride_error": errs.tolist(), "twonn_base": float(base),
               "twonn_ml": float(ml), "overlap": [float(v) for v in overlap]}
out["seconds"] = best
# The call path of the paper's code: a full distance matrix (sklearn), deduplicated rows,
# Data(distances=..., maxk=300); and dadapy's overlap called per k from coordinates.
if len(a) <= 5000:
    from sklearn.metrics.pairwise import euclidean_distances
    t0 = time.perf_counter()
    dist = euclidean_distances(a)
    _, keep = np.unique(dist, axis=0, return_index=True)
    keep = np.sort(keep)
    data = Data(distances=dist[keep][:, keep], maxk=300)
    paper_ids = data.return_id_scaling_gride(range_max=256)[0]
    data.compute_id_2NN(algorithm="base"), data.compute_id_2NN(algorithm="ml")
    full = Data(coordinates=a, maxk=6)
    [full.return_data_overlap(coordinates=b, k=k) for k in range(1, 7)]
    out["seconds_paper_path"] = time.perf_counter() - t0
    out["gride_paper_path"] = paper_ids.tolist()
import dadapy, numpy
dadapy_version = getattr(dadapy, "__version__", "0.3.4")
out["versions"] = f"dadapy {dadapy_version}, numpy {numpy.__version__}"
print(json.dumps(out))
"""


def ensure_venv() -> Path:
    py = VENV / "bin" / "python"
    if (
        py.exists()
        and subprocess.run(
            [str(py), "-c", "import dadapy"], check=False, capture_output=True
        ).returncode
        == 0
    ):
        return py
    print(f"creating {VENV} with {DADAPY} (numpy<2 resolves there) ...", flush=True)
    venv.EnvBuilder(with_pip=True, clear=True).create(VENV)
    subprocess.run([str(py), "-m", "pip", "install", "-q", DADAPY], check=True)
    return py


def clouds(n: int, d: int = 576, seed: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """A low-rank-plus-noise token-cloud stand-in (rank 40) and a perturbed 'next layer'."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((n, 40)) @ rng.standard_normal((40, d)) + 0.3 * rng.standard_normal(
        (n, d)
    )
    b = a + 0.5 * rng.standard_normal((n, d))
    return a, b


def ours(a: np.ndarray, b: np.ndarray, reps: int) -> dict:
    """What ``layer_geometry`` does per layer: one shared neighbour search per cloud."""
    from tlmicroscope.geometry.intrinsic_dimension import (
        gride_from_distances,
        remove_duplicates,
        twonn_from_distances,
    )
    from tlmicroscope.geometry.neighbours import nearest_neighbours, overlap_from_indices

    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    scales = (2, 4, 8, 16, 32, 64, 128, 256)
    ranks = sorted({1, 2, 3, 4, 5, 6} | {r for s in scales for r in (s // 2, s)})
    best, out = None, None
    for _ in range(reps):
        t0 = time.perf_counter()
        ua, _, n_dup = remove_duplicates(ta)
        nn_a = nearest_neighbours(ua, ranks=ranks, need_indices=6)
        ids, errs, _, _ = gride_from_distances(nn_a.distances, nn_a.ranks, scales)
        base = twonn_from_distances(nn_a.at(1), nn_a.at(2), variant="base")[0]
        ml = twonn_from_distances(nn_a.at(1), nn_a.at(2), variant="ml")[0]
        nn_b = nearest_neighbours(tb, 6)
        overlap = overlap_from_indices(nn_a.first(6), nn_b.first(6), range(1, 7)).overlap
        dt = time.perf_counter() - t0
        if best is None or dt < best:
            best = dt
            out = {
                "gride": ids.tolist(),
                "gride_error": errs.tolist(),
                "twonn_base": base,
                "twonn_ml": ml,
                "overlap": overlap.tolist(),
                "n_duplicates": n_dup,
            }
    out["seconds"] = best
    return out


def ours_separate_calls(a: np.ndarray, b: np.ndarray) -> float:
    """The same numbers through the one-call public API (each call searches neighbours again)."""
    from tlmicroscope.geometry import intrinsic_dimension, neighbourhood_overlap

    t0 = time.perf_counter()
    intrinsic_dimension(a, "gride", max_scale=256)
    intrinsic_dimension(a, "twonn")
    intrinsic_dimension(a, "twonn", variant="ml")
    neighbourhood_overlap(a, b)
    return time.perf_counter() - t0


def max_diff(x: dict, y: dict) -> dict[str, float]:
    keys = ("gride", "gride_error", "twonn_base", "twonn_ml", "overlap")
    return {
        k: float(np.max(np.abs(np.asarray(x[k], float) - np.asarray(y[k], float)))) for k in keys
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sizes", default="1024,20000", help="comma-separated cloud sizes N (d = 576)"
    )
    parser.add_argument("--reps", type=int, default=5, help="repetitions (best time) for N <= 5000")
    parser.add_argument("--threads", type=int, default=2, help="threads for both sides")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(args.threads),
        "OPENBLAS_NUM_THREADS": str(args.threads),
        "MKL_NUM_THREADS": str(args.threads),
    }
    py = ensure_venv()
    worst = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for n in (int(s) for s in args.sizes.split(",")):
            a, b = clouds(n)
            fa, fb = Path(tmp) / "a.npy", Path(tmp) / "b.npy"
            np.save(fa, a)
            np.save(fb, b)
            reps = args.reps if n <= 5000 else 1
            proc = subprocess.run(
                [str(py), "-c", WORKER, str(fa), str(fb), str(reps)],
                env=env,
                capture_output=True,
                text=True,
                check=False,
            )
            if proc.returncode:
                print(proc.stderr[-2000:], file=sys.stderr)
                return 1
            ref = json.loads(proc.stdout.strip().splitlines()[-1])
            mine = ours(a, b, reps)
            sep = ours_separate_calls(a, b) if n <= 5000 else float("nan")
            diff = max_diff(mine, ref)
            if "gride_paper_path" in ref:
                diff["gride_paper_path"] = float(
                    np.max(np.abs(np.asarray(mine["gride"]) - np.asarray(ref["gride_paper_path"])))
                )
            worst = max(worst, *diff.values())
            print(
                f"\nN = {n}, d = 576 (GRIDE 2..256 + TwoNN base/ml + overlap k=1..6; "
                f"{args.threads} threads, "
                f"best of {reps}; {ref['versions']})"
            )
            print(
                f"  dadapy       {ref['seconds']:8.3f} s   (efficient use: one Data object, B's "
                "neighbours once)"
            )
            if "seconds_paper_path" in ref:
                print(
                    f"  dadapy       {ref['seconds_paper_path']:8.3f} s   (the paper's call path: "
                    "full distance matrix, Data(distances=, maxk=300), overlap per k; ratio "
                    f"{ref['seconds_paper_path'] / mine['seconds']:.1f}x)"
                )
            print(
                f"  tlmicroscope {mine['seconds']:8.3f} s   ratio "
                f"{ref['seconds'] / mine['seconds']:6.1f}x"
                + (f"   (separate public calls: {sep:.3f} s)" if np.isfinite(sep) else "")
            )
            print("  max |difference|: " + ", ".join(f"{k} {v:.2e}" for k, v in diff.items()))
            print(f"  GRIDE ids: ours {np.round(mine['gride'], 4).tolist()}")
            print(f"             dadapy {np.round(ref['gride'], 4).tolist()}")
    print(
        f"\nlargest difference over all estimates: {worst:.2e} "
        f"({'within' if worst <= 1e-6 else 'OVER'} 1e-6)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
