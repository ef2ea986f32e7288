"""The papers' claims on both embedded models, side by side (issue 11, item 7).

For each model: where " Paris" emerges through the logit and tuned lenses, held-out KL of both
lenses per layer, the linearity profile, the intrinsic-dimension peak and the first-token norm
spike, all measured by ``tlmicroscope.claims.family_claims``. Each model's numbers go to
``out/family-claims/<model>.json`` (so the two models can be run at different times); the table is
built from those files and, with ``--write-readme``, written between the README's ``family-claims``
markers. A tuned lens is taken from the artifact store's ``tuned-lens`` folder for the model
(``default_lens_dir(model)``, ``<store>/<model>/tuned-lens``, made by
``tlmicroscope train-lens --model <model>``) when it exists.

Usage:
    python benchmarks/family_claims.py --models smollm2-135m,gemma3-270m
    python benchmarks/family_claims.py --table-only --write-readme   # rebuild from the JSON files
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

START, END = "<!-- family-claims:start -->", "<!-- family-claims:end -->"


def run_model(name: str, out: Path, args: argparse.Namespace) -> None:
    import torch

    import tlmicroscope as tlm
    from tlmicroscope.claims import family_claims
    from tlmicroscope.io import atomic_write_text
    from tlmicroscope.lenses import load_lens
    from tlmicroscope.lenses.train import default_lens_dir

    torch.set_num_threads(args.threads)
    model = tlm.load_model(name)
    lens_dir = default_lens_dir(name)
    lens = load_lens(lens_dir, model) if (lens_dir / "config.json").is_file() else None
    found = f"from {lens_dir}" if lens is not None else "not found (logit only)"
    print(f"{name}: tuned lens {found}")
    t0 = time.perf_counter()
    claims = family_claims(
        model, tuned_lens=lens, kl_tokens=args.kl_tokens, id_points=args.id_points
    )
    data = claims.to_dict() | {
        "seconds": round(time.perf_counter() - t0, 1),
        "tuned_lens_dir": str(lens_dir) if lens is not None else None,
    }
    atomic_write_text(out / f"{name}.json", json.dumps(data, indent=1))
    print(f"{name}: {data['seconds']:.0f} s")


def write_readme(text: str, readme: Path = ROOT / "README.md") -> None:
    from tlmicroscope.io import atomic_write_text

    body = readme.read_text()
    if START not in body or END not in body:
        raise SystemExit(f"{readme} has no {START} ... {END} markers to write between.")
    before, rest = body.split(START, 1)
    atomic_write_text(readme, f"{before}{START}\n{text}\n{END}{rest.split(END, 1)[1]}")


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--models", default="smollm2-135m,gemma3-270m")
    ap.add_argument("--out", type=Path, default=ROOT / "out" / "family-claims")
    ap.add_argument("--kl-tokens", type=int, default=2048)
    ap.add_argument("--id-points", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--table-only", action="store_true", help="build the table from the JSON files")
    ap.add_argument("--write-readme", action="store_true")
    args = ap.parse_args()
    from tlmicroscope.claims import FamilyClaims, claims_table

    names = [m.strip() for m in args.models.split(",") if m.strip()]
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.table_only:
        for name in names:
            run_model(name, args.out, args)
    claims = []
    for name in names:
        path = args.out / f"{name}.json"
        if not path.is_file():
            raise SystemExit(f"No {path}: run without --table-only first.")
        claims.append(FamilyClaims.from_dict(json.loads(path.read_text())))
    text = claims_table(claims)
    print(text)
    if args.write_readme:
        write_readme(text)
        print("README.md updated.")


if __name__ == "__main__":
    main()
