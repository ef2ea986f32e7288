"""Cost of a Jacobian-lens trajectory against a tuned-lens trajectory on the same text (target <=
1.15x).

Both lenses apply one ``d_model x d_model`` matrix per layer before the shared readout (the tuned
lens adds its translator residually and a bias), so both trajectories should be dominated by the
unembedding of every layer and position. In one process, on a prompt from the embedded corpus:

* ``prediction_trajectory(model, tokens, lens=tuned)``, with the tuned lens from
  ``--tuned`` (default: the artifact store's ``tuned-lens`` folder for the model; an untrained
  lens of the right shape otherwise: the cost does not depend on its values);
* ``prediction_trajectory(model, tokens, lens=jlens)``, with the Jacobian lens from ``--jlens``
  (default: the store's ``jacobian-lens`` folder; random matrices of the right shape otherwise);

and prints best-of-``--repeat`` wall times and their ratio. TransformerLens 4.x only (the J-lens).

Usage: python benchmarks/jlens_trajectory.py [--model smollm2-135m] [--tokens 256] [--repeat 3]
[--threads 2]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _measure import best_time


def _lenses(model, tuned_dir: Path, jlens_dir: Path):
    from tlmicroscope.lenses import TunedLens, load_lens
    from tlmicroscope.lenses.jacobian import JacobianLens, require_jacobian_lens

    tuned = (
        load_lens(tuned_dir, model)
        if (tuned_dir / "config.json").is_file()
        else TunedLens.for_model(model)
    )
    if (jlens_dir / "config.json").is_file():
        jlens = load_lens(jlens_dir, model)
    else:  # the cost does not depend on the fitted values
        L, d = int(model.cfg.n_layers), int(model.cfg.d_model)
        g = torch.Generator().manual_seed(0)
        J = {k: torch.eye(d) + 0.01 * torch.randn(d, d, generator=g) for k in range(L - 1)}
        jlens = JacobianLens(require_jacobian_lens()(J, n_prompts=1, d_model=d), L)
    return tuned, jlens


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tuned", default=None)
    p.add_argument("--jlens", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from tlmicroscope import load_model
    from tlmicroscope.corpus import token_stream
    from tlmicroscope.lenses import prediction_trajectory
    from tlmicroscope.lenses.jacobian import default_jlens_dir
    from tlmicroscope.lenses.train import default_lens_dir

    model = load_model(args.model)
    tuned, jlens = _lenses(
        model,
        Path(args.tuned or default_lens_dir(args.model)),
        Path(args.jlens or default_jlens_dir(args.model)),
    )
    toks = token_stream(model, None)[: args.tokens].unsqueeze(0)
    t_tuned = t_j = float("inf")
    for _ in range(args.repeat):  # interleaved, so a change in the machine's load hits both alike
        t_tuned = min(
            t_tuned, best_time(lambda: prediction_trajectory(model, toks, lens=tuned), repeat=1)
        )
        t_j = min(t_j, best_time(lambda: prediction_trajectory(model, toks, lens=jlens), repeat=1))
    load = os.getloadavg()[0]
    print(
        f"model {args.model}, {toks.shape[1]} tokens, {args.threads} threads, load average "
        f"{load:.2f}"
    )
    print(f"tuned-lens trajectory    {t_tuned:8.3f} s")
    print(f"Jacobian-lens trajectory {t_j:8.3f} s")
    ratio = t_j / t_tuned
    print(
        f"ratio J-lens / tuned     {ratio:8.3f}x (target <= 1.15x): "
        f"{'ok' if ratio <= 1.15 else 'MISSED'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
